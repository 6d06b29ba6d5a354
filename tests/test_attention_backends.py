"""The FlashInfer backend's planning on CPU, against the SDPA backend: decode rows of a mixed step go to the decode
wrapper and the rest to the prefill wrapper, each nano-batch slot keeps its own plans, and page tables may be in any
order. FlashInfer itself is stood in for by tests/fake_flashinfer.py (its kernels run in the GPU suite)."""
import random
import sys

import pytest
import torch

import fake_flashinfer
from gpu_workers.attention.base import BatchLayout
from gpu_workers.attention.sdpa import SdpaBackend

PS, HEADS, KV_HEADS, DIM, PAGES = 4, 8, 2, 16, 64


@pytest.fixture(params=["auto", "fp8"])
def backends(monkeypatch, request):
    """(FlashInfer, SDPA) over the same random cache: the model's dtype, or FP8 with per-tensor scales."""
    monkeypatch.setitem(sys.modules, "flashinfer", fake_flashinfer.module())
    from gpu_workers.attention.flashinfer_backend import FlashInferBackend

    kv_fp8 = request.param == "fp8"
    args = (2, PAGES, PS, HEADS, KV_HEADS, DIM, torch.float32, torch.device("cpu"), kv_fp8)
    fi, sd = FlashInferBackend(*args), SdpaBackend(*args)
    torch.manual_seed(0)
    sd.kv_cache.copy_(torch.randn(sd.kv_cache.shape).to(sd.kv_cache.dtype))
    fi.kv_cache.copy_(sd.kv_cache)
    if kv_fp8:
        for b in (fi, sd):
            b.k_scale, b.v_scale = 0.5, 2.0
    return fi, sd


def _layout(rows: list, seed: int) -> BatchLayout:
    """rows: (query tokens, tokens already cached) per sequence, on shuffled pages."""
    rng = random.Random(seed)
    free = list(range(PAGES))
    rng.shuffle(free)
    tables, positions, slots = [], [], []
    for q, start in rows:
        n = -(-(start + q) // PS)
        table = [free.pop() for _ in range(n)]
        tables.append(table)
        for p in range(start, start + q):
            positions.append(p)
            slots.append(table[p // PS] * PS + p % PS)
    width = max(map(len, tables))
    return BatchLayout(torch.tensor([q for q, _ in rows], dtype=torch.int32),
                       torch.tensor([s for _, s in rows], dtype=torch.int32),
                       torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
                       torch.tensor(positions), torch.tensor(slots))


@pytest.mark.parametrize("rows", [
    [(1, 9), (1, 3), (1, 17)],  # decode only
    [(7, 0), (5, 6)],  # prefill only
    [(1, 9), (1, 22), (6, 3), (11, 0)],  # mixed: the decode rows first
    [(1, 0), (4, 4)],  # a decode at position 0 beside a chunk
])
def test_flashinfer_planning_matches_sdpa(backends, rows):
    fi, sd = backends
    layout = _layout(rows, seed=len(rows))
    t = int(layout.q_lens.sum())
    q = torch.randn(t, HEADS, DIM)
    k, v = torch.randn(t, KV_HEADS, DIM), torch.randn(t, KV_HEADS, DIM)
    plan = fi.plan(layout)
    nd = layout.num_decode
    assert (plan.decode is not None) == (nd > 0) and (plan.prefill is not None) == (nd < len(rows))
    out = torch.full_like(q, float("nan"))
    fi.forward(0, q, k, v, plan, out=out)
    ref = sd.forward(0, q, k, v, sd.plan(layout))
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_an_fp8_cache_holds_k_and_v_to_e4m3_precision_in_a_quarter_of_fp32s_bytes():
    args = (2, PAGES, PS, HEADS, KV_HEADS, DIM, torch.float32, torch.device("cpu"))
    fp8 = SdpaBackend(*args, kv_fp8=True)
    fp8.k_scale, fp8.v_scale = 0.25, 4.0
    assert fp8.kv_cache.dtype == torch.float8_e4m3fn
    assert SdpaBackend.bytes_per_page(2, PS, KV_HEADS, DIM, torch.bfloat16, torch.device("cpu"), True) * 4 == \
        SdpaBackend.bytes_per_page(2, PS, KV_HEADS, DIM, torch.bfloat16, torch.device("cpu"))
    k, v = torch.randn(5, KV_HEADS, DIM) * 3, torch.randn(5, KV_HEADS, DIM) * 1000  # v beyond 448 * 1: scaled
    slots = torch.tensor([3, 17, 4, 60, 0])
    fp8.write_kv(1, k, v, slots)
    k_back, v_back = fp8.kv_cache[1, 0, slots].float() * 0.25, fp8.kv_cache[1, 1, slots].float() * 4.0
    assert torch.allclose(k_back, k, rtol=1 / 16, atol=2.0 ** -9 * 0.25)
    assert torch.allclose(v_back, v.clamp(-448 * 4, 448 * 4), rtol=1 / 16, atol=2.0 ** -9 * 4)


def test_each_nano_batch_slot_keeps_its_own_plan(backends):
    fi, sd = backends
    a, b = _layout([(1, 5), (3, 2)], seed=1), _layout([(1, 12), (1, 7)], seed=2)
    plans = [fi.plan(a, slot=0), fi.plan(b, slot=1)]  # both planned before either runs, as a nano-batched step
    for layout, plan in zip((a, b), plans):
        t = int(layout.q_lens.sum())
        q, k = torch.randn(t, HEADS, DIM), torch.randn(t, KV_HEADS, DIM)
        torch.testing.assert_close(fi.forward(1, q, k, k, plan), sd.forward(1, q, k, k, sd.plan(layout)),
                                   rtol=1e-5, atol=1e-5)


def _reference_decode(q, k_cache, v_cache, page_table, kv_lens, page_size, sm_scale, k_scale, v_scale, out, splits,
                      interpret_dot=False, buffers=None):
    """gpu_workers/attention/fp8_decode.paged_decode_fp8's contract in torch (its kernel needs Triton on a GPU)."""
    group = q.shape[1] // k_cache.shape[1]
    for b in range(q.shape[0]):
        t = torch.arange(int(kv_lens[b]))
        rows = page_table[b, t // page_size].long() * page_size + t % page_size
        k = (k_cache[rows].float() * k_scale).repeat_interleave(group, 1)
        v = (v_cache[rows].float() * v_scale).repeat_interleave(group, 1)
        scores = torch.einsum("hd,khd->hk", q[b].float(), k) * sm_scale
        out[b] = torch.einsum("hk,khd->hd", scores.softmax(-1), v).to(out.dtype)
    return out


def _reference_xqa(q, kv_cache, workspace, block_tables, seq_lens, max_seq_len, bmm1_scale, bmm2_scale, out):
    """flashinfer.decode.xqa_batch_decode_with_kv_cache's contract in torch (XQA runs on SM90 only)."""
    assert workspace.dtype == torch.uint8 and seq_lens.dtype == torch.uint32
    assert max_seq_len == block_tables.shape[1] * kv_cache[0].shape[1]
    k, v = (c.reshape(-1, *c.shape[2:]) for c in kv_cache)
    return _reference_decode(q, k, v, block_tables, seq_lens.view(torch.int32), kv_cache[0].shape[1], bmm1_scale,
                             1.0, bmm2_scale, out, 1)


@pytest.mark.parametrize("kernel", ["triton", "xqa", "auto"])
def test_own_fp8_decode_kernels_get_the_pages_and_lengths_flashinfer_would(kernel, monkeypatch):
    """NANOSLG_FP8_DECODE=triton or xqa: the decode rows' page tables, lengths and scales reach the kernel as planned,
    eager and through a CUDA graph's fixed buffers (the kernels themselves: tests/gpu/test_gpu_fp8.py)."""
    import types

    from gpu_workers.attention import fp8_decode, xqa_decode

    monkeypatch.setitem(sys.modules, "flashinfer", fake_flashinfer.module())
    monkeypatch.setitem(sys.modules, "flashinfer.decode",
                        types.SimpleNamespace(xqa_batch_decode_with_kv_cache=_reference_xqa))
    monkeypatch.setenv("NANOSLG_FP8_DECODE", kernel)
    monkeypatch.setattr(fp8_decode, "triton", object())
    monkeypatch.setattr(fp8_decode, "paged_decode_fp8", _reference_decode)
    monkeypatch.setattr(xqa_decode, "supports", lambda *args: True)
    from gpu_workers.attention.flashinfer_backend import FlashInferBackend

    args = (2, PAGES, PS, HEADS, KV_HEADS, DIM, torch.float32, torch.device("cpu"), True)
    fi, sd = FlashInferBackend(*args), SdpaBackend(*args)
    assert fi.fp8_decode == ("xqa" if kernel == "auto" else kernel)  # XQA where it runs, unless asked otherwise
    torch.manual_seed(0)
    sd.kv_cache.copy_(torch.randn(sd.kv_cache.shape).to(sd.kv_cache.dtype))
    fi.kv_cache.copy_(sd.kv_cache)
    for b in (fi, sd):
        b.k_scale, b.v_scale = 0.5, 2.0
    layout = _layout([(1, 9), (1, 3), (1, 17), (1, 0)], seed=3)
    q, k = torch.randn(4, HEADS, DIM), torch.randn(4, KV_HEADS, DIM)
    ref = sd.forward(1, q, k, k, sd.plan(layout))
    torch.testing.assert_close(fi.forward(1, q, k, k, fi.plan(layout)), ref, rtol=1e-5, atol=1e-5)
    graph_wrapper = fi.graph_decode_wrapper(8, 8 * 8)  # fixed buffers wider and taller than this batch
    torch.testing.assert_close(fi.forward(1, q, k, k, fi.plan_decode(graph_wrapper, layout)), ref, rtol=1e-5,
                               atol=1e-5)


def test_an_fp8_cache_decodes_on_flashinfer_where_xqa_cannot_build(monkeypatch, caplog):
    """XQA is compiled on first use: where that fails, the backend says so and decodes on FlashInfer's kernel."""
    import types

    from gpu_workers.attention import xqa_decode

    def no_compiler(*args, **kwargs):
        raise RuntimeError("nvcc not found")

    monkeypatch.setitem(sys.modules, "flashinfer", fake_flashinfer.module())
    monkeypatch.setitem(sys.modules, "flashinfer.decode",
                        types.SimpleNamespace(xqa_batch_decode_with_kv_cache=no_compiler))
    monkeypatch.setattr(xqa_decode, "supports", lambda *args: True)
    monkeypatch.delenv("NANOSLG_FP8_DECODE", raising=False)
    from gpu_workers.attention.flashinfer_backend import FlashInferBackend

    with caplog.at_level("WARNING", logger="nanoslg.worker"):
        fi = FlashInferBackend(2, PAGES, PS, HEADS, KV_HEADS, DIM, torch.float32, torch.device("cpu"), True)
    assert fi.fp8_decode == "flashinfer" and fi._xqa_workspace is None
    assert "XQA decode unavailable (RuntimeError: nvcc not found)" in caplog.text
