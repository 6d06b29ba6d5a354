"""What quantization costs in quality (`nanoslg bench quality` runs this as its own process): the perplexity of a
text under a baseline model and under the quantized one, and the mean KL divergence of their next-token
distributions (what llama.cpp's `perplexity --kl-divergence` reports), each model one eager ModelRunner on one device.

    python -m gpu_workers.quality BASELINE_CONFIG QUANTIZED_CONFIG TOKENS_FILE CONTEXT

The configs are ResolvedConfig arguments (to_arg()), the tokens a JSON list; one JSON object comes out on stdout."""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from typing import Any

import torch

from gpu_workers.model_runner import ModelRunner
from nanoslg.config import ResolvedConfig
from nanoslg.protocol import SeqChunk, StepPlan, token_ids


def runner_for(cfg: ResolvedConfig, context: int) -> ModelRunner:
    """An eager runner whose KV pool holds one window."""
    pages = -(-context // cfg.page_size) + 1
    return ModelRunner(dataclasses.replace(cfg, enforce_eager=True, num_kv_pages=pages,
                                           max_model_len=max(cfg.max_model_len, context)))


def window_log_probs(runner: ModelRunner, window: list[int]) -> torch.Tensor:
    """[len(window) - 1, vocab] float32 log-probabilities of each next token, on the runner's device."""
    pages = token_ids(range(-(-len(window) // runner.cfg.page_size)))
    logits = runner.logits(StepPlan(0, [SeqChunk("window", token_ids(window), 0, pages, True)]), every_token=True)
    return torch.log_softmax(logits[:-1].float(), dim=-1)


def compare(baseline: ModelRunner, quantized: ModelRunner, tokens: list[int], context: int) -> dict[str, Any]:
    """Perplexities, mean KL(baseline || quantized) and top-1 agreement over the text's windows of `context`
    tokens (every token but each window's first is predicted)."""
    nll = {"baseline": 0.0, "quantized": 0.0}
    kl_sum, same_top, count = 0.0, 0, 0
    with torch.inference_mode():
        for start in range(0, len(tokens) - 1, context):
            window = tokens[start:start + context]
            if len(window) < 2:
                break
            # summed on the device, per token in float32 and over tokens in float64: only sums reach the host (a
            # window's log-probabilities are GBs at a 128k vocabulary)
            base = window_log_probs(baseline, window)
            targets = torch.tensor(window[1:], device=base.device)
            quant = window_log_probs(quantized, window).to(base.device)
            nll["baseline"] -= float(base.gather(1, targets[:, None]).double().sum())
            nll["quantized"] -= float(quant.gather(1, targets[:, None]).double().sum())
            kl_sum += float((base.exp() * (base - quant)).sum(-1).double().sum())
            same_top += int((base.argmax(-1) == quant.argmax(-1)).sum())
            count += len(targets)
    return {"tokens": count, "context": context,
            "ppl_baseline": math.exp(nll["baseline"] / count), "ppl_quantized": math.exp(nll["quantized"] / count),
            "mean_kl": kl_sum / count, "top1_agreement": same_top / count}


def main(argv: list[str]) -> int:
    base_arg, quant_arg, tokens_file, context = argv
    with open(tokens_file) as f:
        tokens = json.load(f)
    base_cfg, quant_cfg = ResolvedConfig.from_arg(base_arg), ResolvedConfig.from_arg(quant_arg)
    baseline = runner_for(base_cfg, int(context))
    quantized = runner_for(quant_cfg, int(context))
    result = compare(baseline, quantized, tokens, int(context))
    result["weights"] = {"baseline": baseline.weights_dtype, "quantized": quantized.weights_dtype}
    result["fp8_compute"] = quantized.fp8_compute  # FP8 GEMMs, or weights dequantized (activations unquantized)
    result["kv_cache"] = {"baseline": baseline.kv_dtype, "quantized": quantized.kv_dtype}
    result["device"] = str(baseline.device)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
