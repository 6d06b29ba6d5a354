"""How a linear layer holds and applies its weight: plain (the model's dtype) or FP8. A method creates the layer's
parameters, each with a weight_loader that copies the layer's part (linear.py's out_span/in_span) of a checkpoint
tensor; process() turns what was loaded into what runs; apply() multiplies. The model never branches on the
quantization: it hands each layer its method (method_for)."""
from __future__ import annotations

import logging
import math
from typing import Any, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from gpu_workers.layers import fp8, gemv
from nanoslg.quantization import QuantScheme

log = logging.getLogger("nanoslg.worker")


class Linear(Protocol):
    """What a method needs of its layer (linear.py's ParallelLinear)."""

    in_local: int
    out_local: int
    shard_names: tuple[Optional[str], ...]
    fp8_scale_chunk: int

    def out_span(self, shard: Optional[str]) -> tuple[int, int, int]: ...

    def in_span(self) -> tuple[int, int]: ...

    def full_shape(self, shard: Optional[str]) -> tuple[int, int]: ...

    def register_parameter(self, name: str, param: Optional[nn.Parameter]) -> None: ...


FP8_NAMES = (str(fp8.FP8), "F8_E4M3", "F8_E5M2", str(torch.float8_e5m2))


def dtype_name(loaded) -> str:
    """A tensor's dtype, or a weight_loader.CheckpointTensor's as its file names it (known before it is read)."""
    return str(loaded.dtype) if isinstance(loaded, torch.Tensor) else loaded.dtype_name


def copy_checked(param: torch.Tensor, loaded, shard: Optional[str] = None) -> None:
    """The whole of loaded (a tensor, or a weight_loader.CheckpointTensor read only now) into param, converting
    dtype and device (shard: accepted so this serves as any parameter's loader). An FP8 tensor only goes into an
    FP8 parameter: cast without its scales it would be garbage."""
    if param.shape != loaded.shape:
        raise ValueError(f"checkpoint tensor of shape {tuple(loaded.shape)} does not fit parameter "
                         f"of shape {tuple(param.shape)}")
    if dtype_name(loaded) in FP8_NAMES and param.dtype != fp8.FP8:
        raise ValueError(f"the checkpoint holds it in FP8 ({dtype_name(loaded)}), but config.json's "
                         f"quantization_config does not quantize this layer (a missing or unrecognised "
                         f"quantization_config, or one whose ignore list nanoslg reads differently)")
    param.data.copy_(loaded if isinstance(loaded, torch.Tensor) else loaded.load())


def _scalar(loaded, what: str) -> float:
    """The one value of a per-tensor scale (stored as [] or [1])."""
    values = _read(loaded).reshape(-1)
    if values.numel() != 1:
        raise ValueError(f"{what} of shape {tuple(loaded.shape)}; expected one value")
    return float(values[0])


def _check_shape(loaded, expected: tuple[int, ...], what: str) -> None:
    if tuple(loaded.shape) != expected:
        raise ValueError(f"{what} of shape {tuple(loaded.shape)}; this layer's is {expected}")


def _read(loaded) -> torch.Tensor:
    return loaded if isinstance(loaded, torch.Tensor) else loaded.load()


def _add(layer: Linear, name: str, shape: tuple[int, ...], dtype: torch.dtype, loader: Any,
         fill: Optional[float] = None) -> None:
    param = nn.Parameter(torch.empty(shape, dtype=dtype) if fill is None else torch.full(shape, fill, dtype=dtype),
                         requires_grad=False)
    setattr(param, "weight_loader", loader)  # noqa: B010 (an attribute nn.Parameter does not declare)
    layer.register_parameter(name, param)


def _set(layer: Any, name: str, value: Optional[torch.Tensor]) -> None:
    if value is None:
        if hasattr(layer, name):
            delattr(layer, name)
        return
    layer.register_parameter(name, nn.Parameter(value, requires_grad=False))


class LinearMethod:
    """Plain weights in the model's dtype."""

    name = "plain"

    def create_weights(self, layer: Linear, dtype: torch.dtype) -> None:
        _add(layer, "weight", (layer.out_local, layer.in_local), dtype, self._weight_loader(layer))

    def _weight_loader(self, layer: Linear):
        def load(param: torch.Tensor, loaded, shard: Optional[str] = None) -> None:
            _check_shape(loaded, layer.full_shape(shard), "a weight")
            dest, rows, src = layer.out_span(shard)
            first, cols = layer.in_span()
            part = loaded.narrow(0, src, rows)
            if cols != loaded.shape[1]:
                part = part.narrow(1, first, cols)
            self._check_weight(part)
            copy_checked(param.data.narrow(0, dest, rows), part)
        return load

    def _check_weight(self, part) -> None:
        """Refuse a checkpoint tensor this method cannot hold (before it is read)."""

    def process(self, layer: Any, dtype: torch.dtype, device: torch.device) -> None:
        """Turn what was loaded (or randomly filled) into what apply() runs on."""

    def takes_fp8_input(self, layer: Any, rows: int) -> bool:
        """Whether apply_fp8 (activations already quantized per token) is how this layer runs `rows` rows."""
        return False

    def apply_fp8(self, layer: Any, xq: torch.Tensor, xs: torch.Tensor, bias: Optional[torch.Tensor],
                  out_dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} takes no FP8 activations")

    def apply(self, layer: Any, x: torch.Tensor, bias: Optional[torch.Tensor],
              out: Optional[torch.Tensor] = None) -> torch.Tensor:
        if out is None:
            if gemv.BF16_ROW and x.is_cuda and x.numel() == x.shape[-1] and layer.weight.dtype == torch.bfloat16:
                y = gemv.gemv(x.reshape(1, -1), layer.weight)  # batch-1 decode (NANOSLG_BF16_GEMV=1)
                return (y if bias is None else y.add_(bias)).view(*x.shape[:-1], -1)
            return F.linear(x, layer.weight, bias)
        assert bias is None  # the padded output of a sequence-parallel row-parallel GEMM, which has no bias
        return torch.mm(x, layer.weight.t(), out=out)


UNQUANTIZED = LinearMethod()


class Fp8LinearMethod(LinearMethod):
    """FP8 e4m3 weights with float32 scales. Where the GPU has FP8 tensor cores the weight stays FP8 with one scale
    per output channel (a block-scaled checkpoint requantized per channel) and activations are quantized per token
    (or with the checkpoint's static scale); elsewhere the weight is dequantized at load to the model's dtype, so
    the model computes exactly what Hugging Face computes from the dequantized checkpoint."""

    name = "fp8"

    def __init__(self, scheme: QuantScheme):
        self.scheme = scheme

    def create_weights(self, layer: Linear, dtype: torch.dtype) -> None:
        s, rows, cols = self.scheme, layer.out_local, layer.in_local
        if s.source == "online":  # a bf16 checkpoint, quantized in process()
            super().create_weights(layer, dtype)
            return
        _add(layer, "weight", (rows, cols), fp8.FP8, self._weight_loader(layer))
        if s.weight_scales == "block":
            # Scales per row (expanded from block rows) and per chunk of `chunk` columns: a whole block where this
            # rank's columns start on a block edge, else the largest piece that never straddles one.
            layer.fp8_scale_chunk = math.gcd(s.block[1], layer.in_span()[0])
            _add(layer, s.scale_name, (rows, -(-cols // layer.fp8_scale_chunk)), torch.float32,
                 self._block_scale_loader(layer, *s.block))
        else:
            loader = self._channel_scale_loader(layer) if s.weight_scales == "channel" else \
                self._tensor_scale_loader(layer)
            _add(layer, s.scale_name, (rows,), torch.float32, loader)
        if s.static_input_scales:
            _add(layer, "input_scale", (len(layer.shard_names),), torch.float32, self._input_scale_loader(layer),
                 fill=0.0)

    def _check_weight(self, part) -> None:
        if self.scheme.source == "online":
            return
        dtype = dtype_name(part)
        if dtype not in (str(fp8.FP8), "F8_E4M3"):
            raise ValueError(f"the quantization_config says FP8, but the checkpoint's weight is {dtype}")

    def _channel_scale_loader(self, layer: Linear):
        def load(param: torch.Tensor, loaded, shard: Optional[str] = None) -> None:
            dest, rows, src = layer.out_span(shard)
            out = layer.full_shape(shard)[0]
            if tuple(loaded.shape) == (out, 1):  # compressed-tensors writes [out, 1]
                values = _read(loaded.narrow(0, src, rows)).reshape(rows)
            elif tuple(loaded.shape) == (out,):
                values = _read(loaded.narrow(0, src, rows))
            else:
                raise ValueError(f"per-channel weight scales of shape {tuple(loaded.shape)}; this layer's are "
                                 f"[{out}] or [{out}, 1]")
            copy_checked(param.data.narrow(0, dest, rows), values)
        return load

    def _tensor_scale_loader(self, layer: Linear):
        def load(param: torch.Tensor, loaded, shard: Optional[str] = None) -> None:
            dest, rows, _ = layer.out_span(shard)
            # each merged part keeps its own scale
            param.data.narrow(0, dest, rows).fill_(_scalar(loaded, "a per-tensor weight scale"))
        return load

    def _block_scale_loader(self, layer: Linear, block_rows: int, block_cols: int):
        def load(param: torch.Tensor, loaded, shard: Optional[str] = None) -> None:
            dest, rows, src = layer.out_span(shard)
            first, cols = layer.in_span()
            full_rows, full_cols = layer.full_shape(shard)
            _check_shape(loaded, (-(-full_rows // block_rows), -(-full_cols // block_cols)),
                         f"{block_rows}x{block_cols}-block weight scales")
            first_block, last_block = src // block_rows, -(-(src + rows) // block_rows)
            first_col_block, last_col_block = first // block_cols, -(-(first + cols) // block_cols)
            part = _read(loaded.narrow(0, first_block, last_block - first_block)
                         .narrow(1, first_col_block, last_col_block - first_col_block))
            chunk = layer.fp8_scale_chunk  # each chunk's block column, counted from this rank's first
            chunk_blocks = (first + torch.arange(param.shape[1]) * chunk) // block_cols - first_col_block
            part = part.index_select(1, chunk_blocks.to(part.device))
            copy_checked(param.data.narrow(0, dest, rows), fp8.expand_block_rows(part, src, rows, block_rows))
        return load

    def _input_scale_loader(self, layer: Linear):
        def load(param: torch.Tensor, loaded, shard: Optional[str] = None) -> None:
            param.data[list(layer.shard_names).index(shard)] = _scalar(loaded, "an input_scale")
        return load

    def process(self, layer: Any, dtype: torch.dtype, device: torch.device) -> None:
        s = self.scheme
        weight = layer.weight.data
        layer.fp8_gemm, layer.fp8_reason = fp8.fp8_gemm_supported(device, dtype)
        if layer.fp8_gemm and (layer.in_local % 16 or layer.out_local % 16):
            layer.fp8_gemm, layer.fp8_reason = False, f"a {layer.out_local}x{layer.in_local} weight (FP8 GEMMs need " \
                "multiples of 16)"
        full: Optional[torch.Tensor] = None  # a block checkpoint's dequantized weight
        if s.source == "online":
            q, scale = fp8.quantize_rows(weight)
        elif s.weight_scales == "block":
            full = fp8.dequantize_blocks(weight, getattr(layer, s.scale_name).data, layer.fp8_scale_chunk)
            # no block-scaled GEMM here yet: FP8 tensor cores get the weight requantized per output channel
            q, scale = fp8.quantize_rows(full) if layer.fp8_gemm else (weight, weight)
        else:
            q, scale = weight, getattr(layer, s.scale_name).data
        _set(layer, s.scale_name, None)
        layer.fp8_input_scale = None
        if s.static_input_scales:
            # one scale for the merged input: the largest of its parts' (they all saw the same activations)
            layer.fp8_input_scale = layer.input_scale.data.max().reshape(1, 1).float()
            _set(layer, "input_scale", None)
        if layer.fp8_gemm:
            _set(layer, "weight", q)
            layer.weight_scale_row = scale.float().reshape(1, -1).contiguous()
        else:
            _set(layer, "weight", full.to(dtype) if full is not None else fp8.dequantize_rows(q, scale, dtype))

    def takes_fp8_input(self, layer: Any, rows: int) -> bool:
        # the GEMV (few rows) multiplies bf16 activations; a static input scale quantizes with its own scale
        return layer.fp8_gemm and layer.fp8_input_scale is None and rows > fp8.GEMV_MAX_ROWS

    def apply_fp8(self, layer: Any, xq: torch.Tensor, xs: torch.Tensor, bias: Optional[torch.Tensor],
                  out_dtype: torch.dtype) -> torch.Tensor:
        return fp8.scaled_mm(xq, xs, layer.weight, layer.weight_scale_row, bias, out_dtype)

    def apply(self, layer: Any, x: torch.Tensor, bias: Optional[torch.Tensor],
              out: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not layer.fp8_gemm:
            return super().apply(layer, x, bias, out)
        y = fp8.fp8_linear(x, layer.weight, layer.weight_scale_row, bias, layer.fp8_input_scale)
        return y if out is None else out.copy_(y)


def method_for(scheme: Optional[QuantScheme], hf_modules: list[str]) -> LinearMethod:
    """The method of the layer that holds these Hugging Face modules (q_proj, k_proj and v_proj of one layer, say):
    FP8 when the scheme quantizes them, plain when it leaves them out; a fused layer must be one or the other."""
    if scheme is None:
        return UNQUANTIZED
    quantized = [scheme.quantizes(name) for name in hf_modules]
    if all(quantized):
        return Fp8LinearMethod(scheme)
    if not any(quantized):
        return UNQUANTIZED
    raise ValueError(f"the checkpoint quantizes some of {', '.join(hf_modules)} but not all, and nanoslg runs "
                     f"them as one fused layer")


def process_weights(model: nn.Module, dtype: torch.dtype, device: torch.device) -> Optional[str]:
    """Run every linear layer's method's process() after loading; returns how the FP8 GEMMs run (None: no FP8)."""
    how = None
    for module in model.modules():
        method = getattr(module, "method", None)
        if isinstance(method, LinearMethod):
            method.process(module, dtype, device)
            if isinstance(method, Fp8LinearMethod):
                how = "FP8 GEMMs" if module.fp8_gemm else f"weights dequantized to {dtype} ({module.fp8_reason})"
    return how
