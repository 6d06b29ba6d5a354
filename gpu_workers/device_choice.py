"""Which device a worker runs on and which dtype its model computes in."""
from __future__ import annotations

import logging
import os

import torch

from gpu_workers import cpu_features
from nanoslg.config import ResolvedConfig

log = logging.getLogger("nanoslg.worker")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(cfg: ResolvedConfig, local_rank: int) -> torch.device:
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA GPU")
    if local_rank >= torch.cuda.device_count():
        raise RuntimeError(f"this node runs {cfg.ranks_per_node} workers, one per GPU, but torch sees "
                           f"{torch.cuda.device_count()} GPU(s) (CUDA_VISIBLE_DEVICES="
                           f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def choose_dtype(asked: str, config_dtype: str, device_type: str, native=None) -> tuple[str, str]:
    """(dtype name, why). An explicit --dtype wins; auto takes config.json's dtype, except that on CPU a dtype the
    CPU does not compute natively becomes float32 (see cpu_features)."""
    if asked != "auto":
        return asked, "asked for"
    if config_dtype not in _DTYPES:
        return "float32", f"config says {config_dtype}, which nanoslg does not run"
    if device_type != "cpu" or config_dtype == "float32":
        return config_dtype, f"config says {config_dtype}"
    ok, why = (native or cpu_features.native)(config_dtype)
    if ok:
        return config_dtype, f"config says {config_dtype} and {why}"
    return "float32", f"config says {config_dtype}, but {why}"


def resolve_dtype(cfg: ResolvedConfig, device: torch.device) -> torch.dtype:
    name, why = choose_dtype(cfg.dtype, cfg.model_spec.torch_dtype, device.type)
    if cfg.dtype == "auto" and device.type == "cpu" and cfg.model_spec.torch_dtype != "float32":
        # The dtype decides CPU speed more than anything else, and auto may overrule config.json here: say so.
        log.info("dtype auto on cpu: %s (%s)", name, why)
    return _DTYPES[name]
