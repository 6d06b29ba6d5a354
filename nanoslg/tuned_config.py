"""Where `nanoslg tune` keeps what it decided, and how an engine finds it again: one JSON per model, device and
parallel layout, under ~/.cache/nanoslg/tuned (NANOSLG_TUNED_DIR overrides). EngineConfig.resolve() loads the file
for its model, device and layout when there is one; a file that cannot be read or was made for something else is an
error naming the file, never a silent default."""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
from typing import Any, Optional

from nanoslg.model_spec import ConfigError, ModelSpec

FORMAT = "nanoslg-tuned-config/1"
# The engine settings a tuned config may set; EngineConfig takes each one the user did not set.
ENGINE_KEYS = ("max_num_seqs", "max_num_batched_tokens", "running_target", "dense_batch_tokens", "nano_batches",
               "nano_overlap", "sequence_parallel")
NANO_OVERLAPS = ("none", "network", "memory", "network+memory")


def tuned_dir() -> str:
    return os.environ.get("NANOSLG_TUNED_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanoslg", "tuned")


def spec_digest(spec: ModelSpec) -> str:
    """A short digest of the model's shape: a tuned config fits every checkpoint of that shape."""
    shape = [spec.hidden_size, spec.intermediate_size, spec.num_layers, spec.num_heads, spec.num_kv_heads,
             spec.head_dim, spec.vocab_size]
    return hashlib.blake2b(json.dumps(shape).encode(), digest_size=6).hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-") or "unnamed"


def identity(model: str, spec: ModelSpec, device: str, tp: int, pp: int, quantization: Optional[str] = None,
             kv_cache_dtype: str = "auto") -> dict[str, Any]:
    """What a tuned config was made for; an engine uses one only where all of it matches. FP8 weights or KV (which
    change the best batch sizes) are named only when used, so a bf16 engine's tuned files keep their names."""
    ident: dict[str, Any] = {"model": _slug(os.path.basename(os.path.normpath(model))),
                             "model_shape": spec_digest(spec), "device": device, "tensor_parallel_size": tp,
                             "pipeline_parallel_size": pp}
    if quantization:
        ident["quantization"] = quantization
    if kv_cache_dtype != "auto":
        ident["kv_cache_dtype"] = kv_cache_dtype
    return ident


def default_path(ident: dict[str, Any]) -> str:
    dtypes = "".join(f"-{key.split('_')[0]}-{ident[key]}" for key in ("quantization", "kv_cache_dtype") if key in ident)
    name = (f"{ident['model']}-{ident['model_shape']}__{_slug(ident['device'])}__tp{ident['tensor_parallel_size']}"
            f"-pp{ident['pipeline_parallel_size']}{dtypes}.json")
    return os.path.join(tuned_dir(), name)


def load(path: str, ident: dict[str, Any]) -> dict[str, Any]:
    """The engine settings of the tuned config at path, checked against ident; ConfigError naming the file when it
    is unreadable, malformed or made for another model, device or layout."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except OSError as e:
        raise ConfigError(f"tuned config {path}: cannot read it ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"tuned config {path}: not valid JSON ({e}); run `nanoslg tune` again or pass "
                          f"--no-tuned-config") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ConfigError(f"tuned config {path}: not a {FORMAT} file")
    made_for = doc.get("identity")
    if not isinstance(made_for, dict):
        raise ConfigError(f"tuned config {path}: has no identity")
    keys = list(ident) + [k for k in ("quantization", "kv_cache_dtype") if k in made_for and k not in ident]
    wrong = [f"{k} {made_for.get(k)!r} (this engine: {ident.get(k)!r})" for k in keys
             if made_for.get(k) != ident.get(k)]
    if wrong:
        raise ConfigError(f"tuned config {path} was made for another engine: {'; '.join(wrong)}")
    engine = doc.get("engine")
    if not isinstance(engine, dict) or set(engine) - set(ENGINE_KEYS):
        raise ConfigError(f"tuned config {path}: 'engine' must hold only {', '.join(ENGINE_KEYS)}")
    for key, value in engine.items():
        if key == "nano_overlap":
            ok = value is None or value in NANO_OVERLAPS
        elif key == "sequence_parallel":
            ok = value is None or isinstance(value, bool)
        else:
            ok = value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)
        if not ok:
            raise ConfigError(f"tuned config {path}: engine.{key} = {value!r} is not valid")
    return engine


def write(path: str, doc: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"format": FORMAT, **doc}, f, indent=2)
    os.replace(tmp, path)  # a reader never sees half a file


def _nvml_gpu_name(index: int) -> Optional[str]:
    """The name of GPU `index` from NVML, without creating a CUDA context in this process (None without NVML)."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None
    if nvml.nvmlInit_v2() != 0:
        return None
    try:
        handle = ctypes.c_void_p()
        if nvml.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(index), ctypes.byref(handle)) != 0:
            return None
        buf = ctypes.create_string_buffer(96)
        if nvml.nvmlDeviceGetName(handle, buf, ctypes.c_uint(96)) != 0:
            return None
        return buf.value.decode(errors="replace")
    finally:
        nvml.nvmlShutdown()


def device_name(device: str) -> str:
    """What the engine's workers will run on: "cpu" or the first visible GPU's name."""
    if device == "cpu":
        return "cpu"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    name = _nvml_gpu_name(int(visible) if visible.isdigit() else 0)
    if name is None and visible != "-1":
        try:
            import torch

            if torch.cuda.is_available():
                name = torch.cuda.get_device_name(0)
        except Exception:
            name = None
    if name is None and device == "cuda":
        raise ConfigError("--device cuda was asked for but no CUDA GPU is visible")
    return name or "cpu"
