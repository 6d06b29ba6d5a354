"""`nanoslg bench quality`: what a quantized deployment loses, measured the way llama.cpp's `perplexity
--kl-divergence` does it: the perplexity of one text under the unquantized model and under the quantized one, and
the mean KL divergence of their next-token distributions.

    nanoslg bench quality MODEL --quantization fp8 --kv-cache-dtype fp8
    nanoslg bench quality Llama-3.1-8B-FP8 --baseline Llama-3.1-8B       # a pre-quantized checkpoint

The text is Python standard-library source (on every machine) unless --text names a file. Both models run one
window at a time in one worker process on one device (gpu_workers/quality.py)."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import textwrap

from nanoslg.config import ResolvedConfig
from nanoslg.engine_args import add_engine_arguments, engine_config_from_args
from nanoslg.model_spec import ConfigError

STDLIB_TEXTS = ("argparse.py", "textwrap.py", "dataclasses.py", "functools.py", "fractions.py", "shlex.py")


def add_bench_quality_arguments(parser) -> None:
    add_engine_arguments(parser)
    g = parser.add_argument_group("quality")
    g.add_argument("--baseline", default=None, metavar="MODEL",
                   help="the unquantized model to compare with (default: MODEL itself without --quantization and "
                        "--kv-cache-dtype)")
    g.add_argument("--text", default=None, metavar="FILE",
                   help="the text to score (default: Python standard-library sources)")
    g.add_argument("--tokens", type=int, default=8192, help="tokens of the text scored")
    g.add_argument("--context", type=int, default=1024, help="tokens per window (each window starts afresh)")
    g.add_argument("--output-json", default=None)


def stdlib_text() -> tuple[str, str]:
    """(text, where it came from): the standard library's sources, found next to the running interpreter's."""
    folder = os.path.dirname(textwrap.__file__)
    names = [n for n in STDLIB_TEXTS if os.path.isfile(os.path.join(folder, n))]
    parts = []
    for name in names:
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            parts.append(f.read())
    return "\n\n".join(parts), f"Python standard-library source ({', '.join(names)})"


def configs(args) -> tuple[ResolvedConfig, ResolvedConfig]:
    """(baseline, quantized) configs, both on one rank."""
    if args.context < 2 or args.tokens < 2:
        raise ConfigError(f"--context and --tokens must be >= 2, got {args.context} and {args.tokens}")
    quantized = engine_config_from_args(args).resolve()
    if quantized.world_size != 1:
        raise ConfigError("bench quality runs each model on one device (no --tensor/--pipeline-parallel-size)")
    if args.baseline is None and quantized.quantization is None and quantized.kv_cache_dtype == "auto":
        raise ConfigError("nothing to compare: give --quantization fp8 and/or --kv-cache-dtype fp8, or --baseline")
    base = dataclasses.replace(engine_config_from_args(args), model=args.baseline or quantized.model,
                               quantization=None, kv_cache_dtype="auto").resolve()
    scheme = base.quant_scheme
    if scheme is not None:
        raise ConfigError(f"the baseline {base.model} is itself quantized ({scheme.describe()}); give the "
                          f"unquantized checkpoint with --baseline")
    if base.model_spec.vocab_size != quantized.model_spec.vocab_size:
        raise ConfigError("the baseline and the quantized model have different vocabularies")
    return base, quantized


def tokenize(tokenizer_dir: str, text: str, count: int) -> list[int]:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load a tokenizer from {tokenizer_dir} ({e}); give --tokenizer") from None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:count]
    if len(ids) < 2:
        raise ConfigError("the text has fewer than 2 tokens")
    return list(ids)


def run_bench_quality(args) -> int:
    base, quantized = configs(args)
    if args.text:
        with open(args.text, encoding="utf-8", errors="replace") as text_file:
            text, source = text_file.read(), args.text
    else:
        text, source = stdlib_text()
    tokens = tokenize(quantized.tokenizer, text, args.tokens)
    context = min(args.context, quantized.max_model_len)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as tokens_file:
        json.dump(tokens, tokens_file)
    try:
        proc = subprocess.run([sys.executable, "-m", "gpu_workers.quality", base.to_arg(), quantized.to_arg(),
                               tokens_file.name, str(context)], stdout=subprocess.PIPE, text=True)
    finally:
        os.unlink(tokens_file.name)
    if proc.returncode != 0:
        print(f"nanoslg: the quality run failed (exit {proc.returncode})", file=sys.stderr)
        return 1
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(model=quantized.model, baseline=base.model, text=source)
    weights, kv = result["weights"], result["kv_cache"]
    change = result["ppl_quantized"] / result["ppl_baseline"] - 1
    print(f"text: {result['tokens']} predicted tokens of {source}, windows of {context} tokens, on "
          f"{result['device']}")
    print(f"baseline  ({weights['baseline']} weights, {kv['baseline']} KV): perplexity {result['ppl_baseline']:.4f}")
    print(f"quantized ({weights['quantized']} weights, {kv['quantized']} KV): perplexity "
          f"{result['ppl_quantized']:.4f} ({change:+.2%})")
    print(f"mean KL divergence {result['mean_kl']:.5f} nats per token; same top token {result['top1_agreement']:.1%}")
    if result.get("fp8_compute") and result["fp8_compute"] != "FP8 GEMMs":
        print(f"note: FP8 {result['fp8_compute']}: the weights' rounding is measured, activations run unquantized")
    if args.output_json:
        with open(args.output_json, "w") as out:
            json.dump(result, out, indent=1)
    return 0
