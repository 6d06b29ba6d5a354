"""`nanoslg bench quality` on the CPU: its baseline perplexity is Hugging Face's on the same windows, a model
compared with itself has KL 0, and FP8 weights or an FP8 KV cache show up as a KL above 0."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENS, CONTEXT = 300, 128


def _quality(model, tmp_path, *flags):
    out = tmp_path / "quality.json"
    proc = subprocess.run([sys.executable, "-m", "nanoslg", "bench", "quality", model, "--tokens", str(TOKENS),
                           "--context", str(CONTEXT), "--output-json", str(out), "--log-level", "warning", *flags],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text()), proc.stdout


def _hf_perplexity(model, tokens):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(tokens) - 1, CONTEXT):
            window = torch.tensor([tokens[start:start + CONTEXT]])
            logp = torch.log_softmax(hf(window).logits[0, :-1].double(), -1)
            nll -= float(logp.gather(1, window[0, 1:, None]).sum())
            count += window.shape[1] - 1
    return math.exp(nll / count)


def test_baseline_perplexity_is_transformers_and_a_model_against_itself_has_kl_zero(tiny_chat_model, tmp_path):
    from transformers import AutoTokenizer

    from nanoslg.entrypoints.bench_quality import stdlib_text

    result, _ = _quality(tiny_chat_model, tmp_path, "--baseline", tiny_chat_model)
    tokens = AutoTokenizer.from_pretrained(tiny_chat_model)(stdlib_text()[0], add_special_tokens=False)[
        "input_ids"][:TOKENS]
    assert result["tokens"] == TOKENS - math.ceil(TOKENS / CONTEXT)  # each window's first token is not predicted
    assert result["ppl_baseline"] == pytest.approx(_hf_perplexity(tiny_chat_model, tokens), rel=1e-5)
    assert result["ppl_quantized"] == result["ppl_baseline"]
    assert result["mean_kl"] == pytest.approx(0.0, abs=1e-12) and result["top1_agreement"] == 1.0


@pytest.mark.parametrize("flags, weights, kv", [(["--quantization", "fp8"], "fp8", "float32"),
                                                (["--kv-cache-dtype", "fp8"], "float32", "fp8")])
def test_fp8_weights_or_kv_cost_a_measurable_kl(flags, weights, kv, tiny_chat_model, tmp_path):
    result, printed = _quality(tiny_chat_model, tmp_path, *flags)
    assert (result["weights"]["quantized"], result["kv_cache"]["quantized"]) == (weights, kv)
    assert result["weights"]["baseline"] == result["kv_cache"]["baseline"] == "float32"
    assert 1e-6 < result["mean_kl"] < 0.5 and 0.5 < result["top1_agreement"] < 1.0
    assert result["ppl_quantized"] != result["ppl_baseline"]
    assert "perplexity" in printed and "mean KL divergence" in printed


@pytest.mark.parametrize("flags, error", [([], "nothing to compare"),
                                          (["--kv-cache-dtype", "fp8", "--context", "1"], "--context")])
def test_a_run_that_cannot_measure_is_a_clear_error(flags, error, tiny_chat_model):
    proc = subprocess.run([sys.executable, "-m", "nanoslg", "bench", "quality", tiny_chat_model, *flags], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 2 and error in proc.stderr
