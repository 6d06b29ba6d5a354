"""Steps replayed as CUDA graphs around the attention (gpu_workers/piecewise_graphs.py). On the CPU nothing is
captured: NANOSLG_PIECEWISE_GRAPHS=eager runs each step padded to its token count and cut at every attention the
way the graphs are, which is what can go wrong outside the capture (the padding, the attention on the real rows
only, the shared output buffer, a later stage's inputs). The GPU suite checks the captured graphs against eager
steps (tests/gpu)."""
import pytest
import torch

from gpu_workers.piecewise_graphs import non_owning, token_ladder
from nanoslg.config import EngineConfig
from nanoslg.protocol import RowSetup, SeqChunk, StepPlan, token_ids
from nanoslg.sampling_params import SamplingParams
from scenario import run_scenario


def test_the_token_ladder_ends_at_the_largest_step_and_pads_little():
    ladder = token_ladder(4096)
    assert ladder == sorted(set(ladder)) and ladder[0] == 8 and ladder[-1] == 4096
    assert token_ladder(100)[-1] == 100 and all(s < 100 for s in token_ladder(100)[:-1])
    # up to 256 tokens a step is padded by at most 32 tokens, above by at most 64
    for small, big in zip(ladder, ladder[1:]):
        assert big - small <= (32 if small < 256 else 64)
    assert len(ladder) == 72
    big = token_ladder(16384)  # no gap above 8192
    assert all(b - a <= 64 for a, b in zip(big[12:], big[13:])) and big[-1] == 16384


def test_a_non_owning_view_reads_and_writes_the_same_memory():
    t = torch.arange(24.0).view(4, 6)
    view = non_owning(t[1:, 2:4])
    assert view.data_ptr() == t[1:, 2:4].data_ptr() and view.stride() == (6, 1)
    view[0, 0] = -1.0
    assert t[1, 2] == -1.0 and torch.equal(view, t[1:, 2:4])


def _plan() -> StepPlan:
    """Two decode rows and two prompt chunks: 10 tokens, padded to 16."""
    def row(rid, ids, start, pages):
        return SeqChunk(rid, token_ids(ids), start, token_ids(pages), True,
                        RowSetup(SamplingParams(temperature=0), start + len(ids)))
    return StepPlan(0, [row("p0", [5, 6, 7, 8, 9], 0, [0, 1]), row("d0", [17], 6, [2, 3]),
                        row("p1", [3, 4, 11], 0, [4]), row("d1", [40], 2, [5])])


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_padded_and_cut_steps_give_the_eager_logits(arch, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("NANOSLG_PIECEWISE_GRAPHS", "eager")
    from gpu_workers.model_runner import ModelRunner

    cfg = EngineConfig(model=tiny_model_dir(arch), device="cpu", max_model_len=64, page_size=4, num_kv_pages=16,
                       max_num_batched_tokens=40).resolve()
    runner = ModelRunner(cfg)
    piecewise = runner.piecewise
    assert piecewise is not None and piecewise.sizes[-1] == 40
    ran = []
    replay = piecewise.run
    piecewise.run = lambda *a, **k: (ran.append(len(a[0].positions)), replay(*a, **k))[1]  # type: ignore
    padded = runner.logits(_plan(), every_token=True)
    runner.piecewise = None
    plain = runner.logits(_plan(), every_token=True)
    assert ran == [10] and padded.shape == plain.shape == (10, padded.shape[1])
    torch.testing.assert_close(padded, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", [{}, dict(pipeline_parallel_size=2), dict(tensor_parallel_size=2)],
                         ids=["single", "pp2", "tp2"])
def test_padded_and_cut_steps_keep_transformers_tokens(layout, tiny_model_dir, hf_reference, hf_to_max_len,
                                                       monkeypatch):
    """The whole engine with every step that is not a decode graph's padded and cut (here all of them: on the CPU
    there are no decode graphs), through chunked prefill, preemption, prefix hits and aborts."""
    monkeypatch.setenv("NANOSLG_PIECEWISE_GRAPHS", "eager")
    run_scenario(tiny_model_dir("llama"), hf_reference, hf_to_max_len, **layout)
