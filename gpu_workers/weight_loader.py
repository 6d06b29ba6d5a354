"""Fill a model's parameters from a Hugging Face safetensors checkpoint (single file or sharded with an index), or
with seeded random values for --load-format dummy. Each rank reads only the tensors its stage needs and copies only
its TP slice (the parameter's own weight_loader slices)."""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Optional

import torch
from safetensors import safe_open

from gpu_workers.layers.linear_methods import copy_checked


class WeightLoadError(RuntimeError):
    pass


class CheckpointTensor:
    """A tensor of a safetensors file that is read only where it is narrowed to, so a tensor-parallel rank reads its
    own slice of each weight from disk, not the whole tensor. Parameters' weight_loaders narrow it, then load()."""

    def __init__(self, file_slice: Any, shape: tuple[int, ...], ranges: Optional[tuple[tuple[int, int], ...]] = None,
                 on_read: Optional[Callable[[int], None]] = None):
        self._slice, self._on_read = file_slice, on_read
        self.ranges = ranges or tuple((0, n) for n in shape)
        self.shape = torch.Size(stop - start for start, stop in self.ranges)

    @property
    def dtype_name(self) -> str:
        """The file's name for the tensor's dtype (BF16, F8_E4M3, ...), known before anything is read."""
        return str(self._slice.get_dtype())

    def narrow(self, dim: int, start: int, length: int) -> "CheckpointTensor":
        if start < 0 or start + length > self.shape[dim]:
            raise ValueError(f"slice [{start}, {start + length}) of dimension {dim} is outside shape "
                             f"{tuple(self.shape)}")
        base = self.ranges[dim][0]
        ranges = self.ranges[:dim] + ((base + start, base + start + length),) + self.ranges[dim + 1:]
        return CheckpointTensor(self._slice, (), ranges, self._on_read)

    def load(self) -> torch.Tensor:
        tensor = self._slice[tuple(slice(a, b) for a, b in self.ranges)]
        if self._on_read is not None:
            self._on_read(tensor.numel() * tensor.element_size())
        return tensor


def _checkpoint_files(folder: str, names: set[str]) -> dict[str, set[str]]:
    """file path -> checkpoint names in it that we need."""
    index_path = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise WeightLoadError(f"cannot read {index_path}: {e}") from None
        files: dict[str, set[str]] = {}
        for name, file in weight_map.items():
            if name in names:
                files.setdefault(os.path.join(folder, file), set()).add(name)
        return files
    shards = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not shards:
        raise WeightLoadError(f"no model.safetensors (or sharded *.safetensors with an index) in {folder}")
    return {os.path.join(folder, f): names for f in shards}


def load_checkpoint(targets: dict[str, tuple[torch.nn.Parameter, Optional[str]]], required: set[str],
                    folder: str) -> int:
    """targets: checkpoint name -> (parameter, shard id). Returns the bytes read from disk; raises WeightLoadError
    naming the file or tensor."""
    loaded: set[str] = set()
    read = [0]

    def count(nbytes: int) -> None:
        read[0] += nbytes

    for path, wanted in _checkpoint_files(folder, set(targets)).items():
        if not os.path.isfile(path):
            raise WeightLoadError(f"weight file {path} is missing")
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in f.keys():
                    if name not in wanted or name not in targets:
                        continue
                    param, shard = targets[name]
                    file_slice = f.get_slice(name)
                    tensor = CheckpointTensor(file_slice, tuple(file_slice.get_shape()), on_read=count)
                    try:
                        loader = getattr(param, "weight_loader", copy_checked)
                        loader(param, tensor, shard)
                    except (ValueError, RuntimeError) as e:
                        raise WeightLoadError(f"tensor {name} in {path}: {e}") from None
                    loaded.add(name)
        except WeightLoadError:
            raise
        except Exception as e:  # safetensors raises its own error types for truncated or garbled files
            raise WeightLoadError(f"cannot read weights from {path}: {e}") from None
    missing = sorted(required - loaded)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise WeightLoadError(f"checkpoint in {folder} lacks {', '.join(missing[:5])}{more}")
    return read[0]


def init_dummy(model: torch.nn.Module, seed: int) -> None:
    """Random weights with the right shapes: speed does not depend on the values. Norm weights stay 1 so activations
    keep a sane scale through many layers."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, param in model.named_parameters():
        if "norm" in name:
            param.data.fill_(1.0)
            continue
        values = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, 0.02, generator=gen) \
            if param.numel() < (1 << 24) else None
        if values is None:  # large tensors: generate on the device, the CPU would take minutes for 8B params
            param.data.normal_(0.0, 0.02)
        else:
            param.data.copy_(values)
