"""GPU suite (scripts/gpu_check.sh runs it on the GPU machines; skipped without CUDA)."""
import json

import pytest
import torch

from conftest import random_prompts
from nanoslg import LLM, SamplingParams
from tiny_models import make_tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# head_dim 128 uses FlashInfer's prebuilt SM90 kernels; 4 query heads over 2 KV heads exercises GQA.
HD128 = dict(hidden_size=512, intermediate_size=1024, num_attention_heads=4, num_key_value_heads=2, head_dim=128)


@pytest.fixture(scope="module")
def tiny_bf16(tmp_path_factory):
    return make_tiny_model("llama", str(tmp_path_factory.mktemp("gpu") / "llama-hd128"), num_layers=4,
                           vocab_size=1024, dtype=torch.bfloat16, **HD128)


def _logits(folder, backend, prompts):
    """Prefill logits for every prompt then one decode step's, with the given attention backend."""
    from gpu_workers.attention.context import forward_context
    from gpu_workers.model_runner import ModelRunner
    from nanoslg.config import EngineConfig
    from nanoslg.protocol import SeqChunk, StepPlan, token_ids

    cfg = EngineConfig(model=folder, attention_backend=backend, enforce_eager=True, max_model_len=512,
                       num_kv_pages=256).resolve()
    runner = ModelRunner(cfg)
    out = []
    tables = [token_ids(range(i * 32, (i + 1) * 32)) for i in range(len(prompts))]
    for step, chunks in enumerate([[(p, 0) for p in prompts], [([7], len(p)) for p in prompts]]):
        plan = StepPlan(step, [SeqChunk(f"r{i}", token_ids(c), s, tables[i], True) for i, (c, s) in
                               enumerate(chunks)])
        input_ids, layout, cu = runner._layout(plan)
        with torch.inference_mode(), forward_context(runner.backend):
            runner.backend.plan(layout)
            hidden = runner.model(layout.positions, input_ids=input_ids)
            last = torch.tensor([int(cu[b + 1]) - 1 for b in range(len(chunks))], device=runner.device)
            out.append(runner.model.compute_logits(hidden[last]).float().cpu())
    return out, runner.backend.name


def test_flashinfer_matches_sdpa_within_bf16_tolerance(tiny_bf16):
    prompts = random_prompts(6, seed=30, lengths=[5, 17, 64, 100, 1, 33])
    prompts = [[t % 1024 for t in p] for p in prompts]
    fi, name = _logits(tiny_bf16, "flashinfer", prompts)
    assert name == "flashinfer"
    sd, _ = _logits(tiny_bf16, "sdpa", prompts)
    for a, b in zip(fi, sd):
        rel = (a - b).norm() / b.norm()
        assert rel < 2e-2, rel


def test_cuda_graph_decode_equals_eager(tiny_bf16):
    prompts = [[t % 1024 for t in p] for p in random_prompts(24, seed=31)]
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    with LLM(tiny_bf16, enforce_eager=True, max_model_len=512) as llm:
        eager = [o.token_ids for o in llm.generate(prompts, params)]
    with LLM(tiny_bf16, max_model_len=512) as llm:
        assert llm.engine.info["worker0"]["attention_backend"] == "flashinfer"
        graphed = [o.token_ids for o in llm.generate(prompts, params)]
    assert graphed == eager


def _hf_bf16_greedy(folder, prompts, n):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).cuda().eval()
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p], device="cuda")
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
            outs.append(gen[0, len(p):].tolist())
    return outs


def _match_rate(ours, ref):
    return sum(a == b for a, b in zip(ours, ref)) / len(ref)


def test_tiny_model_matches_transformers_bf16(tiny_bf16):
    prompts = [[t % 1024 for t in p] for p in random_prompts(20, seed=32)]
    with LLM(tiny_bf16, max_model_len=512) as llm:
        ours = [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=32, temperature=0,
                                                                         ignore_eos=True))]
    rate = _match_rate(ours, _hf_bf16_greedy(tiny_bf16, prompts, 32))
    print(json.dumps({"tiny_bf16_match_rate": rate}))
    assert rate >= 0.95


def test_smollm2_matches_transformers_bf16(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "The three primary colors are",
             "In 1969, the first", "Water boils at", "The largest planet in the solar system",
             "To make a cup of tea,", "Machine learning is", "The Pythagorean theorem states",
             "My favourite food is", "import numpy as np\n", "Dear Sir or Madam,", "The speed of light",
             "Photosynthesis converts", "A haiku about autumn:", "The stock market", "Roses are red,",
             "How do airplanes fly?", "The mitochondria is"]
    prompts = [tok(t).input_ids for t in texts]
    with LLM(smollm2_dir, dtype="bfloat16", max_model_len=1024) as llm:
        ours = [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=32, temperature=0,
                                                                         ignore_eos=True))]
        chat = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                        SamplingParams(max_tokens=24, temperature=0))[0]
    rate = _match_rate(ours, _hf_bf16_greedy(smollm2_dir, prompts, 32))
    print(json.dumps({"smollm2_bf16_match_rate": rate, "chat": chat.text}))
    assert "Paris" in chat.text
    assert rate >= 0.95
