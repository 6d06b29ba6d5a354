"""FP8 (e4m3) arithmetic: quantizing weights per output channel and activations per token, dequantizing the scale
layouts checkpoints ship, and the GEMM on Hopper's (SM89+) FP8 tensor cores. Values are clamped to +-448 before
every cast (a cast of a larger value is NaN on some devices) and scales never reach 0 (an all-zero row keeps a tiny
scale, so dividing by it stays finite)."""
from __future__ import annotations

import functools
import logging
import os
from typing import Optional

import torch

from gpu_workers.layers import gemv
from nanoslg.quantization import FP8_MAX

FP8 = torch.float8_e4m3fn
MIN_SCALE = 1e-12
# Up to this many rows, a Triton GEMV reads the FP8 weight and multiplies bf16 activations (weight-only FP8):
# _scaled_mm reads FP8 weights at half the bandwidth at M=1 (../shared/probes/fp8-h100.md). 0 turns it off.
GEMV_MAX_ROWS = int(os.environ.get("NANOSLG_FP8_GEMV_MAX_ROWS", "16"))
# Activation quantization fused into what precedes the GEMM, where the GEMM quantizes its input (more rows than the
# GEMV takes, one GPU): SiLU-and-mul's for the down projection, the residual add and RMSNorm's for the QKV and
# gate/up projections. Off until an engine A/B on a GPU measures them.
FUSED_SILU = os.environ.get("NANOSLG_FP8_FUSED_SILU", "0") == "1"
FUSED_NORM = os.environ.get("NANOSLG_FP8_FUSED_NORM", "0") == "1"
log = logging.getLogger("nanoslg.worker")

try:  # Triton comes with CUDA builds of torch; the CPU build runs the torch-op versions below
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None


def fp8_kernels_supported(device: torch.device) -> bool:
    """Whether this device runs the FP8 Triton kernels here: Triton has e4m3 (fp8e4nv) from SM89 on."""
    return device.type == "cuda" and triton is not None and _sm89_or_later(device.index)


@functools.lru_cache(maxsize=None)
def _sm89_or_later(device_index: Optional[int]) -> bool:
    # asked a few hundred times a step (every activation quantization): the device query costs microseconds
    return torch.cuda.get_device_capability(device_index) >= (8, 9)


def fp8_gemm_supported(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """(supported, why): FP8 GEMMs need an SM89+ GPU whose torch build runs a row-wise scaled GEMM (tried once),
    Triton, and a bf16 model."""
    if device.type != "cuda":
        return False, f"the device is {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return False, f"SM{major}{minor} has no FP8 tensor cores (SM89+)"
    if dtype != torch.bfloat16:
        return False, f"row-wise FP8 GEMMs write bf16 and the model runs {dtype}"
    if triton is None:
        return False, "Triton (the activation quantizer) does not import"
    why = _scaled_mm_fails(device.index if device.index is not None else torch.cuda.current_device())
    if why:
        return False, f"torch's row-wise _scaled_mm does not run here ({why})"
    return True, f"SM{major}{minor} FP8 tensor cores"


@functools.lru_cache(maxsize=None)
def _scaled_mm_fails(device_index: int) -> str:
    """'' where a 16x16 row-wise scaled GEMM runs on the device, else the error."""
    device = torch.device("cuda", device_index)
    try:
        a = torch.ones(16, 16, device=device).to(FP8)
        ones = torch.ones(16, 1, device=device)
        torch._scaled_mm(a, a.t(), scale_a=ones, scale_b=ones.t().contiguous(), out_dtype=torch.bfloat16)
        return ""
    except Exception as e:  # an unsupported kernel or layout surfaces as RuntimeError or NotImplementedError
        return f"{type(e).__name__}: {e}"


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x as e4m3, float32 scale per row [rows]) with x ~= q * scale[:, None]: each row's largest magnitude maps
    to 448."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1) / FP8_MAX).clamp(min=MIN_SCALE)
    return (xf / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def to_fp8(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """x / scale as e4m3, clamped (a per-tensor scale)."""
    xf = x.float() if scale == 1.0 else x.float() / scale
    return xf.clamp(-FP8_MAX, FP8_MAX).to(FP8)


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale.float().reshape(-1, 1)).to(dtype)


def expand_block_rows(scale: torch.Tensor, first_row: int, rows: int, block_rows: int) -> torch.Tensor:
    """Rows [first_row, first_row + rows) of a weight, each given its block row of `scale` [row blocks, column
    blocks] (the grid starts at row 0 of `scale`, which covers row block first_row // block_rows)."""
    index = torch.arange(first_row, first_row + rows) // block_rows - first_row // block_rows
    return scale.float().index_select(0, index.to(scale.device))


def dequantize_blocks(q: torch.Tensor, row_scales: torch.Tensor, block_cols: int) -> torch.Tensor:
    """float32 weight of q [rows, cols] whose block scales are given per row [rows, ceil(cols / block_cols)] (a
    partial last block included)."""
    cols = q.shape[1]
    per_col = row_scales.float().repeat_interleave(block_cols, dim=1)[:, :cols]
    return q.float() * per_col


def quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token activation quantization: (e4m3 [M, K], float32 scales [M, 1]). One fused kernel on CUDA
    (as torch ops it costs more than the FP8 GEMM saves: ../shared/probes/fp8-h100.md)."""
    if fp8_kernels_supported(x.device):
        return _quantize_tokens_triton(x)
    q, scale = quantize_rows(x)
    return q, scale[:, None]


def silu_mul_quantize(gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SiLU(gate) * up of the merged gate/up projection [M, 2I], quantized per token for the down projection: (e4m3
    [M, I], float32 scales [M, 1]), on CUDA in one pass that never writes the bf16 product."""
    if fp8_kernels_supported(gate_up.device):
        return _silu_mul_quantize_triton(gate_up)
    gate, up = gate_up.float().chunk(2, dim=-1)
    q, scale = quantize_rows(torch.nn.functional.silu(gate) * up)
    return q, scale[:, None]


def add_rms_norm_quantize(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, eps: float
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The decoder layer's residual add and RMSNorm with the next GEMM's per-token quantization, in one pass on CUDA:
    (e4m3 [M, H], float32 scales [M, 1], the residual stream). With a residual it becomes x + residual in place (the
    sum in fp32, stored in the model's dtype), as FlashInfer's fused_add_rmsnorm does, and the norm is of the fp32
    sum; without one, x is the residual. The normalized row is rounded to the model's dtype before it is quantized,
    so the values equal the unfused norm's output quantized."""
    if fp8_kernels_supported(x.device):
        res = residual if residual is not None else x  # the kernel reads it only with HAS_RESIDUAL
        q, scale = _quantize_per_row(_add_rms_norm_quantize_kernel, x, x.shape[1], res, weight, eps, res.stride(0),
                                     HAS_RESIDUAL=residual is not None)
        return q, scale, res
    xf = x.float()
    if residual is not None:
        xf = xf + residual.float()
        residual.copy_(xf)
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
    q, row_scale = quantize_rows(y)
    return q, row_scale[:, None], residual if residual is not None else x


def scaled_mm(xq: torch.Tensor, xs: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
              bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    """e4m3 activations [M, K] with scales [M, 1] times an e4m3 weight [N, K] with scales [1, N] (+ bias)."""
    y = torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=weight_scale, out_dtype=out_dtype)
    return y if bias is None else y.add_(bias)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: Optional[torch.Tensor],
               input_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [.., K] (bf16) times an e4m3 weight [N, K] with float32 scales [1, N]: activations quantized per token
    (or with a static per-tensor input_scale), the GEMM on FP8 tensor cores, bf16 out."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.shape[0] <= GEMV_MAX_ROWS and triton is not None and input_scale is None:
        y = gemv.gemv(x2, weight, weight_scale)
        if bias is not None:
            y.add_(bias)
        return y.view(*shape[:-1], weight.shape[0])
    if input_scale is None:
        xq, xs = quantize_tokens(x2)
    else:
        xq = (x2.float() / input_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        xs = input_scale.expand(x2.shape[0], 1).contiguous()
    return scaled_mm(xq, xs, weight, weight_scale, bias, x.dtype).view(*shape[:-1], weight.shape[0])


if triton is not None:
    @triton.jit
    def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, cols, x_stride, q_stride, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # rows x stride passes 2^31 in a large prefill
        offs = tl.arange(0, BLOCK)
        mask = offs < cols
        x = tl.load(x_ptr + row * x_stride + offs, mask=mask, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), axis=0) / 448.0, 1e-12)
        q = tl.minimum(tl.maximum(x / scale, -448.0), 448.0)
        tl.store(q_ptr + row * q_stride + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + row, scale)


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slots: torch.Tensor, k_scale: float, v_scale: float) -> None:
    """k / k_scale and v / v_scale (rows [T, kv heads, head dim]) as e4m3 into cache rows `slots` of the FP8 caches
    [slots, kv heads, head dim]: one Triton kernel on CUDA (the quantization fused into the KV write), torch ops
    elsewhere (written as bytes: index_copy_ has no float8 kernel on the CPU)."""
    if fp8_kernels_supported(k.device):
        # each row's heads side by side (a view of the QKV projection is), rows anywhere
        k, v = (t if t.stride(2) == 1 and t.stride(1) == t.shape[2] else t.contiguous() for t in (k, v))
        rows, width = k.shape[0], k.shape[1] * k.shape[2]
        if rows:
            block = triton.next_power_of_2(width)
            _store_kv_kernel[(rows,)](k, v, k_cache, v_cache, slots, width, k.stride(0), v.stride(0), 1.0 / k_scale,
                                      1.0 / v_scale, BLOCK=block, num_warps=min(8, max(1, block // 256)))
        return
    k_cache.view(torch.uint8).index_copy_(0, slots, to_fp8(k, k_scale).view(torch.uint8))
    v_cache.view(torch.uint8).index_copy_(0, slots, to_fp8(v, v_scale).view(torch.uint8))


if triton is not None:
    @triton.jit
    def _store_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, width, k_stride, v_stride, k_inv, v_inv,
                         BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        slot = tl.load(slot_ptr + row).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < width
        k = tl.load(k_ptr + row * k_stride + offs, mask=mask, other=0.0).to(tl.float32) * k_inv
        v = tl.load(v_ptr + row * v_stride + offs, mask=mask, other=0.0).to(tl.float32) * v_inv
        k = tl.minimum(tl.maximum(k, -448.0), 448.0)
        v = tl.minimum(tl.maximum(v, -448.0), 448.0)
        tl.store(kc_ptr + slot * width + offs, k.to(kc_ptr.dtype.element_ty), mask=mask)
        tl.store(vc_ptr + slot * width + offs, v.to(vc_ptr.dtype.element_ty), mask=mask)


if triton is not None:
    @triton.jit
    def _add_rms_norm_quantize_kernel(x_ptr, q_ptr, s_ptr, cols, x_stride, q_stride, res_ptr, w_ptr, eps, res_stride,
                                      HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < cols
        x = tl.load(x_ptr + row * x_stride + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            x += tl.load(res_ptr + row * res_stride + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(res_ptr + row * res_stride + offs, x.to(res_ptr.dtype.element_ty), mask=mask)
        inv = tl.rsqrt(tl.sum(x * x, axis=0) / cols + eps)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = (x * inv * w).to(x_ptr.dtype.element_ty).to(tl.float32)  # the unfused norm's output, as rounded
        scale = tl.maximum(tl.max(tl.abs(y), axis=0) / 448.0, 1e-12)
        q = tl.minimum(tl.maximum(y / scale, -448.0), 448.0)
        tl.store(q_ptr + row * q_stride + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + row, scale)

    @triton.jit
    def _silu_mul_quantize_kernel(x_ptr, q_ptr, s_ptr, inter, x_stride, q_stride, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < inter
        gate = tl.load(x_ptr + row * x_stride + offs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * x_stride + inter + offs, mask=mask, other=0.0).to(tl.float32)
        y = gate / (1.0 + tl.exp(-gate)) * up
        scale = tl.maximum(tl.max(tl.abs(y), axis=0) / 448.0, 1e-12)
        q = tl.minimum(tl.maximum(y / scale, -448.0), 448.0)
        tl.store(q_ptr + row * q_stride + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + row, scale)


def _silu_mul_quantize_triton(gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _quantize_per_row(_silu_mul_quantize_kernel, gate_up, gate_up.shape[1] // 2)


def _quantize_tokens_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _quantize_per_row(_quantize_rows_kernel, x, x.shape[1])


def _quantize_per_row(kernel, x: torch.Tensor, cols: int, *args, **meta) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 [rows, cols], float32 scales [rows, 1]) from a kernel that quantizes one row of x per program; args and
    meta: the kernel's own arguments after (x, q, scale, cols, x's row stride, q's row stride), and constexprs."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    rows = x.shape[0]
    q = torch.empty((rows, cols), dtype=FP8, device=x.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if rows:
        block = triton.next_power_of_2(cols)
        kernel[(rows,)](x, q, scale, cols, x.stride(0), q.stride(0), *args, BLOCK=block,
                        num_warps=min(16, max(1, block // 512)), **meta)
    return q, scale
