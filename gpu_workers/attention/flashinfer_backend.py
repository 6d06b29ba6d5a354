"""FlashInfer paged attention (SM80+): one plan per step, BatchDecode for pure decode steps and BatchPrefill (ragged
queries over the paged cache) for prefill and mixed steps. The cache is the base class's tensor, viewed per layer as
(k, v) pages in FlashInfer's NHD layout."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from gpu_workers.attention import fp8_decode, xqa_decode
from gpu_workers.attention.base import AttentionBackend, BatchLayout
from gpu_workers.upload import pinned, upload

WORKSPACE_BYTES = 256 * 1024 * 1024
log = logging.getLogger("nanoslg.worker")


def flashinfer_usable(device: torch.device) -> tuple[bool, str]:
    """(usable, reason) for the log line that says which backend runs and why."""
    if device.type != "cuda":
        return False, f"device is {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return False, f"GPU is SM{major}{minor}, FlashInfer needs SM80+"
    try:
        import flashinfer  # noqa: F401
    except Exception as e:  # ImportError, or a broken install that fails while loading its libraries
        return False, f"flashinfer does not import ({type(e).__name__}: {e})"
    return True, f"SM{major}{minor} and flashinfer imports"


class PageTables:
    """FlashInfer's CSR form of a step's page tables: indptr, flat page indices and last-page fill.

    indptr and last-page fill stay on the host (plan() reads them there), pinned so FlashInfer's own copies of them
    are asynchronous; the indices go to the device here, because the CUDA-graph wrapper copies host indices with a
    blocking copy that would wait for the step still running."""

    @staticmethod
    def build(layout: BatchLayout, page_size: int, device: torch.device):
        kv_lens = layout.kv_lens.long()
        pages_per_seq = (kv_lens + page_size - 1) // page_size
        indptr = torch.zeros(len(kv_lens) + 1, dtype=torch.int32)
        torch.cumsum(pages_per_seq, 0, out=indptr[1:])
        cols = torch.arange(layout.page_tables.shape[1])
        indices = layout.page_tables[cols[None, :] < pages_per_seq[:, None]]
        last = (kv_lens - (pages_per_seq - 1) * page_size).to(torch.int32)
        return pinned(indptr), upload(indices, device, torch.int32), pinned(last)


@dataclass(slots=True)
class FlashInferPlan:
    """A batch's attention: the decode kernel over its leading one-token rows, the prefill kernel over the rest."""

    # flashinfer's wrapper classes (Any: flashinfer is imported only where it runs)
    decode: Optional[Any]  # a decode wrapper planned for rows [0, num_decode), or None
    prefill: Optional[Any]  # a prefill wrapper planned for the other rows, or None
    num_decode: int
    slot_mapping: torch.Tensor


class FlashInferBackend(AttentionBackend):
    name = "flashinfer"
    runs_on_side_streams = True  # forward() writes into `out` and allocates nothing
    supports_cuda_graphs = True
    uses_fused_ops = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        device = self.kv_cache.device
        # One float workspace for every wrapper: their kernels all run on one stream (the main one, or the memory
        # stream of nano-batching), never two at once. Each wrapper keeps its plan in its own int workspace.
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        # Decode on tensor cores (FlashInfer's fa2 prefill kernel) once 4+ query heads share a KV head: one A/B on
        # an H100 (300 prompts of 1024/512, Llama-3.1-8B's group of 4) gave 2.6 % more throughput (BENCHMARKS.md).
        self.decode_tc = self.num_heads // self.num_kv_heads >= 4 and self._tensor_core_decode_works()
        # fa3 prefill on SM90 (prebuilt in the GPU kit), fa2 elsewhere.
        # fa3 prefill on SM90 (prebuilt in the GPU kit), fa2 elsewhere and for an FP8 cache (fa3's FP8 variant does
        # not build in the kit: ../shared/probes/fp8-h100.md).
        sm90 = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9
        self.prefill_backend = "fa3" if sm90 and not self.kv_fp8 else "fa2"

        # An FP8 cache's decode: XQA's Hopper kernel where it runs (per layer 1.90x the bf16 decode on an H100,
        # FlashInfer's FP8 decode 1.41x: BENCHMARKS.md), else FlashInfer's tensor-core kernel;
        # NANOSLG_FP8_DECODE=flashinfer, triton (gpu_workers/attention/fp8_decode.py) or xqa asks for one.
        self._xqa_workspace: Optional[torch.Tensor] = None  # one for every XQA wrapper: they run one at a time
        self.fp8_decode = self._fp8_decode_kernel(os.environ.get("NANOSLG_FP8_DECODE", "auto"))
        self._wrappers: dict[int, tuple[Any, Any]] = {}  # nano-batch slot -> (decode wrapper, prefill wrapper)
        self._planned = None  # event after the last step's plan copies

    @property
    def scales(self) -> dict[str, float]:
        """What the kernels are given to scale FP8 K and V back (per tensor)."""
        return {"k_scale": self.k_scale, "v_scale": self.v_scale} if self.kv_fp8 else {}

    def _fp8_decode_kernel(self, asked: str) -> str:
        if not self.kv_fp8 or asked == "flashinfer":
            return "flashinfer"
        device, group = self.kv_cache.device, self.num_heads // self.num_kv_heads
        if asked == "triton" and fp8_decode.supports(device, self.head_dim):
            log.info("FP8 KV decode on the Triton kernel (NANOSLG_FP8_DECODE=triton)")
            return asked
        if asked in ("auto", "xqa") and xqa_decode.supports(device, self.head_dim, group, self.page_size) and \
                self._xqa_works():
            log.info("FP8 KV decode on XQA's Hopper kernel")
            return "xqa"
        if asked != "auto":
            log.warning("NANOSLG_FP8_DECODE=%s does not run here (device, head size %d, group %d, page size %d): "
                        "FP8 KV decode on FlashInfer's kernel", asked, self.head_dim, group, self.page_size)
        return "flashinfer"

    def _xqa_works(self) -> bool:
        """XQA is compiled on its first use (FlashInfer's JIT, a minute or two, then cached): try it once on the
        scratch page, so a machine that cannot build it decodes on FlashInfer's kernel instead of failing a step."""
        if self.kv_cache.shape[0] == 0:
            return False
        device = self.kv_cache.device
        self._xqa_workspace = torch.zeros(xqa_decode.WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        try:
            probe = xqa_decode.XqaDecodeWrapper(device, self.num_heads, self.num_kv_heads, self.head_dim,
                                                self.page_size, self.scale, workspace=self._xqa_workspace)
            one = torch.ones(1, dtype=torch.int32)
            probe.plan(BatchLayout(one, one - 1, torch.tensor([[self.scratch_page]], dtype=torch.int32),
                                   torch.zeros(1, dtype=torch.long, device=device),
                                   torch.zeros(1, dtype=torch.long, device=device)))
            q = torch.zeros(1, self.num_heads, self.head_dim, dtype=self.compute_dtype, device=device)
            probe.run(q, self.layer_cache(0), torch.empty_like(q), self.k_scale, self.v_scale)
            return True
        except Exception as e:  # a JIT build failure surfaces as any of several exception types
            log.warning("XQA decode unavailable (%s: %s); FP8 KV decode on FlashInfer's kernel", type(e).__name__, e)
            self._xqa_workspace = None
            return False

    def _tensor_core_decode_works(self) -> bool:
        """Tensor-core decode loads FlashInfer's fa2 prefill module, which the GPU kit does not ship prebuilt: it is
        compiled on first use. Where that fails (no compiler, say), decode stays on the CUDA-core kernel."""
        import flashinfer

        if self.kv_cache.shape[0] == 0:
            return False
        dev, dtype, kv_dtype = self.kv_cache.device, self.compute_dtype, self.kv_cache.dtype
        try:
            probe = flashinfer.BatchDecodeWithPagedKVCacheWrapper(self.workspace, "NHD", backend="fa2",
                                                                  use_tensor_cores=True)
            probe.plan(torch.tensor([0, 1], dtype=torch.int32),
                       torch.tensor([self.scratch_page], dtype=torch.int32, device=dev),
                       torch.tensor([1], dtype=torch.int32), self.num_heads, self.num_kv_heads, self.head_dim,
                       self.page_size, q_data_type=dtype, kv_data_type=kv_dtype)
            probe.run(torch.zeros(1, self.num_heads, self.head_dim, dtype=dtype, device=dev), self.layer_cache(0),
                      **self.scales)
            return True
        except Exception as e:  # a JIT build failure surfaces as any of several exception types
            log.warning("tensor-core decode unavailable (%s: %s); decoding on CUDA cores", type(e).__name__, e)
            return False

    def _slot_wrappers(self, slot: int) -> tuple[Any, Any]:
        if slot not in self._wrappers:
            import flashinfer

            self._wrappers[slot] = (
                self._own_decode_wrapper() if self.fp8_decode != "flashinfer" else
                flashinfer.BatchDecodeWithPagedKVCacheWrapper(self.workspace, "NHD", backend="fa2",
                                                              use_tensor_cores=self.decode_tc),
                flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD", backend=self.prefill_backend))
        return self._wrappers[slot]

    def begin_planning(self) -> None:
        # plan() stages its metadata in a pinned host buffer and copies it asynchronously. With overlap scheduling
        # the previous step may not have reached its copies yet: wait for them before the buffers are rewritten.
        if self._planned is not None:
            self._planned.synchronize()

    def finish_planning(self) -> None:
        if self.kv_cache.device.type == "cuda":
            self._planned = torch.cuda.Event()
            self._planned.record()

    def _own_decode_wrapper(self, batch_size: Optional[int] = None, max_pages: int = 0):
        args = (self.kv_cache.device, self.num_heads, self.num_kv_heads, self.head_dim, self.page_size, self.scale,
                batch_size, max_pages // batch_size if batch_size else 0)
        if self.fp8_decode == "triton":
            return fp8_decode.Fp8DecodeWrapper(*args)
        return xqa_decode.XqaDecodeWrapper(*args, workspace=self._xqa_workspace)

    def graph_decode_wrapper(self, batch_size: int, max_pages: int):
        """A decode wrapper whose plan lives in fixed buffers, so a captured CUDA graph can replay it (max_pages:
        of the whole batch)."""
        if self.fp8_decode != "flashinfer":
            return self._own_decode_wrapper(batch_size, max_pages)
        import flashinfer

        device = self.kv_cache.device
        return flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_cuda_graph=True, backend="fa2", use_tensor_cores=self.decode_tc,
            paged_kv_indptr_buffer=torch.zeros(batch_size + 1, dtype=torch.int32, device=device),
            paged_kv_indices_buffer=torch.zeros(max_pages, dtype=torch.int32, device=device),
            paged_kv_last_page_len_buffer=torch.zeros(batch_size, dtype=torch.int32, device=device))

    def plan_decode(self, wrapper, layout: BatchLayout) -> FlashInferPlan:
        """Plan a decode-only batch on the given wrapper (a CUDA graph's own, or a slot's)."""
        if isinstance(wrapper, fp8_decode.PagedDecodeWrapper):
            wrapper.plan(layout)
            return FlashInferPlan(wrapper, None, len(layout.q_lens), layout.slot_mapping)
        indptr, indices, last = PageTables.build(layout, self.page_size, self.kv_cache.device)
        wrapper.plan(indptr, indices, last, self.num_heads, self.num_kv_heads, self.head_dim, self.page_size,
                     q_data_type=self.compute_dtype, kv_data_type=self.kv_cache.dtype)
        return FlashInferPlan(wrapper, None, len(layout.q_lens), layout.slot_mapping)

    def layer_cache(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (self.num_pages + 1, self.page_size, self.num_kv_heads, self.head_dim)
        return self.kv_cache[layer, 0].view(shape), self.kv_cache[layer, 1].view(shape)

    def plan(self, layout: BatchLayout, slot: int = 0) -> FlashInferPlan:
        """Decode rows on the decode kernel, the others on the prefill kernel: a decode row run through the
        prefill kernel costs far more than on its own (a mixed step cost more than its parts)."""
        decode, prefill = self._slot_wrappers(slot)
        nd, rows = layout.num_decode, len(layout.q_lens)
        plan = FlashInferPlan(None, None, nd, layout.slot_mapping)
        if nd:
            plan.decode = self.plan_decode(decode, layout.rows(0, nd, 0, nd)).decode
        if nd < rows:
            part = layout.rows(nd, rows, nd, len(layout.positions))
            # FlashInfer plans on the CPU from the host tensors (pinned, so its copies of them do not block); the
            # page indices are already on the device.
            indptr, indices, last = PageTables.build(part, self.page_size, self.kv_cache.device)
            qo_indptr = torch.zeros(len(part.q_lens) + 1, dtype=torch.int32)
            torch.cumsum(part.q_lens, 0, out=qo_indptr[1:])
            # seq_lens given (pinned): otherwise plan() derives them into pageable memory and copies from there.
            prefill.plan(pinned(qo_indptr), indptr, indices, last, self.num_heads, self.num_kv_heads, self.head_dim,
                         self.page_size, causal=True, q_data_type=self.compute_dtype,
                         kv_data_type=self.kv_cache.dtype, seq_lens=pinned(part.kv_lens.int()))
            plan.prefill = prefill
        return plan

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: FlashInferPlan,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
        self.write_kv(layer, k, v, plan.slot_mapping)
        cache = self.layer_cache(layer)
        q = q if q.is_contiguous() else q.contiguous()
        out = torch.empty_like(q) if out is None else out
        nd = plan.num_decode
        if plan.decode is not None:
            plan.decode.run(q[:nd], cache, out=out[:nd], **self.scales)
        if plan.prefill is not None:
            plan.prefill.run(q[nd:], cache, out=out[nd:], **self.scales)
        return out
