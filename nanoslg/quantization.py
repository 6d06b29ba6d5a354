"""Which quantization a model runs with, decided once from `--quantization` and config.json's `quantization_config`
(pure Python: the scheduler and the CLI check it without torch; gpu_workers/layers/fp8.py carries it out).

FP8 (e4m3) is the one scheme: weights quantized at load (`--quantization fp8` on a bf16/fp32 checkpoint), or read
pre-quantized from the two layouts published FP8 checkpoints use:
- compressed-tensors `float-quantized` (the `*-FP8-dynamic` / `*-FP8` checkpoints): per-channel, per-tensor or
  block weight scales (`weight_scale`), dynamic per-token activations or static per-tensor `input_scale`s;
- transformers' `quant_method: fp8`: 128x128 (or the config's `weight_block_size`) block scales in
  `weight_scale_inv` (Qwen3-*-FP8, DeepSeek).
Anything else is refused at startup with its name: a quantized checkpoint must never load silently wrong."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

from nanoslg.model_spec import ConfigError

QUANTIZATIONS = ("fp8",)  # --quantization choices (unset: whatever the checkpoint says)
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")  # auto: the model's dtype; fp8 is e4m3 (vLLM's names)
FP8_MAX = 448.0  # the largest finite e4m3 value


@dataclass(frozen=True, slots=True)
class QuantScheme:
    """How a model's linear layers (every projection of every decoder layer) are quantized."""

    source: str  # "online" (quantized at load) | "compressed-tensors" | "fp8" (transformers' block layout)
    weight_scales: str  # "channel" | "tensor" | "block"
    block: tuple[int, int] = (0, 0)  # (rows, columns) of a weight-scale block
    static_input_scales: bool = False  # the checkpoint has per-tensor activation scales (input_scale)
    ignored: tuple[str, ...] = ()  # Hugging Face module names (or "re:" patterns) left unquantized

    @property
    def scale_name(self) -> str:
        """The checkpoint's name for a weight's scales."""
        return "weight_scale_inv" if self.source == "fp8" else "weight_scale"

    def quantizes(self, hf_module: str) -> bool:
        """Whether the module of this Hugging Face name (model.layers.0.mlp.down_proj, say) is quantized: matched
        against the ignore list as its writer reads it (compressed-tensors: a name, or "re:" and a pattern matched
        from the start; transformers' modules_to_not_convert: any part of the name)."""
        for entry in self.ignored:
            if self.source == "fp8":
                if entry in hf_module:
                    return False
            elif entry.startswith("re:"):
                if re.match(entry[3:], hf_module):
                    return False
            elif entry == hf_module:
                return False
        return True

    def describe(self) -> str:
        where = "quantized at load" if self.source == "online" else f"{self.source} checkpoint"
        scales = f"{self.block[0]}x{self.block[1]} block" if self.weight_scales == "block" else \
            f"per-{self.weight_scales}"
        acts = "static per-tensor" if self.static_input_scales else "dynamic per-token"
        return f"fp8 e4m3 weights ({where}, {scales} scales), {acts} activations"


def kv_cache_dtype(name: str) -> str:
    """The KV cache dtype a --kv-cache-dtype value stands for: "auto" or "fp8"."""
    if name not in KV_CACHE_DTYPES:
        raise ConfigError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {name!r}")
    return "auto" if name == "auto" else "fp8"


def quant_scheme(hf_quant: Optional[dict[str, Any]], asked: Optional[str]) -> Optional[QuantScheme]:
    """The scheme for config.json's quantization_config (None or {} when the checkpoint is not quantized) and
    --quantization (None when not given); raises ConfigError naming what cannot run."""
    if asked is not None and asked not in QUANTIZATIONS:
        raise ConfigError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {asked!r}")
    if not hf_quant:
        return QuantScheme("online", "channel") if asked == "fp8" else None
    if not isinstance(hf_quant, dict):
        raise ConfigError(f"config.json's quantization_config is not an object: {hf_quant!r}")
    method = hf_quant.get("quant_method")
    if method == "compressed-tensors":
        return _compressed_tensors(hf_quant)
    if method == "fp8":
        return _transformers_fp8(hf_quant)
    raise ConfigError(f"config.json's quantization_config has quant_method {method!r}, which nanoslg cannot run "
                      f"(it runs FP8 checkpoints: compressed-tensors float-quantized, or quant_method fp8)")


def _transformers_fp8(q: dict[str, Any]) -> QuantScheme:
    if q.get("activation_scheme", "dynamic") != "dynamic":
        raise ConfigError(f"quant_method fp8 with activation_scheme {q.get('activation_scheme')!r} is not "
                          f"supported (only dynamic)")
    block = q.get("weight_block_size")
    if block is None:
        raise ConfigError("quant_method fp8 without weight_block_size (per-tensor fp8 in this layout) is not "
                          "supported; nanoslg reads its block-wise weight_scale_inv")
    rows, cols = _block(block, "weight_block_size")
    ignored = tuple(q.get("modules_to_not_convert") or ())
    return QuantScheme("fp8", "block", (rows, cols), False, _names(ignored, "modules_to_not_convert"))


def _compressed_tensors(q: dict[str, Any]) -> QuantScheme:
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ConfigError("compressed-tensors quantization_config has no config_groups")
    schemes = set()
    for name, group in groups.items():
        if not isinstance(group, dict):
            raise ConfigError(f"compressed-tensors config group {name!r} is not an object")
        # newer writers name the format per group (the top level then says "mixed" or nothing)
        fmt = group.get("format") if q.get("format") in (None, "mixed") else q.get("format")
        if fmt not in ("float-quantized", "naive-quantized"):
            raise ConfigError(f"compressed-tensors format {fmt!r} is not supported (nanoslg runs float-quantized "
                              f"FP8)")
        targets = group.get("targets") or []
        if targets != ["Linear"]:
            raise ConfigError(f"compressed-tensors config group {name!r} targets {targets!r}; nanoslg runs one "
                              f"scheme for every Linear layer")
        schemes.add(_group_scheme(name, group))
    if len(schemes) != 1:
        raise ConfigError("compressed-tensors config groups with different schemes are not supported")
    weight_scales, block, static = schemes.pop()
    for key, what in (("kv_cache_scheme", "calibrated KV scales; use --kv-cache-dtype fp8"),
                      ("sparsity_config", "sparse weights"), ("transform_config", "transformed (rotated) weights")):
        if q.get(key):
            raise ConfigError(f"compressed-tensors {key} ({what}) is not supported")
    scheme = QuantScheme("compressed-tensors", weight_scales, block, static, _names(q.get("ignore") or (), "ignore"))
    if scheme.quantizes("lm_head"):
        raise ConfigError("the compressed-tensors checkpoint quantizes lm_head (its ignore list does not name it); "
                          "nanoslg keeps the LM head in the model's dtype")
    return scheme


def _group_scheme(name: str, group: dict[str, Any]) -> tuple[str, tuple[int, int], bool]:
    weights = group.get("weights")
    if not isinstance(weights, dict):
        raise ConfigError(f"compressed-tensors config group {name!r} has no weights scheme")
    if weights.get("type") != "float" or weights.get("num_bits") != 8:
        raise ConfigError(f"compressed-tensors weights of type {weights.get('type')!r} with {weights.get('num_bits')}"
                          f" bits are not supported (nanoslg runs 8-bit float, FP8)")
    if weights.get("dynamic") or weights.get("symmetric") is False:
        raise ConfigError("compressed-tensors FP8 weights must be static and symmetric")
    strategy = weights.get("strategy")
    block = (0, 0)
    if strategy == "block":
        block = _block(weights.get("block_structure"), "block_structure")
    elif strategy not in ("channel", "tensor"):
        raise ConfigError(f"compressed-tensors FP8 weight strategy {strategy!r} is not supported (channel, tensor "
                          f"or block)")
    acts = group.get("input_activations")
    static = False
    if acts:  # None: weight-only FP8, whose activations run dynamic per token here
        if acts.get("type") != "float" or acts.get("num_bits") != 8:
            raise ConfigError(f"compressed-tensors activations of type {acts.get('type')!r} are not supported")
        if acts.get("dynamic"):
            if acts.get("strategy") not in ("token", "group", "tensor"):
                raise ConfigError(f"dynamic activation strategy {acts.get('strategy')!r} is not supported")
        elif acts.get("strategy") == "tensor":
            static = True
        else:
            raise ConfigError(f"static activation strategy {acts.get('strategy')!r} is not supported (tensor)")
    return strategy, block, static


def _block(value: Any, what: str) -> tuple[int, int]:
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) and v > 0
                                                                         for v in value)):
        raise ConfigError(f"quantization_config {what} must be two positive integers, got {value!r}")
    return int(value[0]), int(value[1])


def _names(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"quantization_config {what} must be a list of module names, got {value!r}")
    return tuple(value)
