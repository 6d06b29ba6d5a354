"""The Llama-family decoder: Llama 2/3, Mistral, Qwen2 (qkv bias) and Qwen3 (q/k RMSNorm), tied or untied
embeddings, GQA. With pipeline parallelism a model instance holds only its stage's layers."""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from gpu_workers.attention.context import current_backend
from gpu_workers.layers import fp8
from gpu_workers.layers.activation import silu_and_mul
from gpu_workers.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from gpu_workers.layers.linear import MergedColumnParallelLinear, ParallelLinear, QKVParallelLinear, RowParallelLinear
from gpu_workers.layers.linear_methods import method_for
from gpu_workers.layers.norm import RMSNorm
from gpu_workers.layers.rotary import RotaryEmbedding
from gpu_workers.nano_batch import ATTENTION, COLLECTIVE, GEMM, OTHER, NanoState, OpRunner
from gpu_workers import sequence_parallel
from gpu_workers.parallel import parallel_state
from nanoslg.model_spec import ModelSpec
from nanoslg.quantization import QuantScheme


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, layer_index: int, rotary: RotaryEmbedding, dtype: torch.dtype,
                 quant: Optional[QuantScheme], hf_prefix: str):
        super().__init__()
        self.layer_index = layer_index  # index among this stage's layers: the KV cache's layer slot
        self.qkv_proj = QKVParallelLinear(spec.hidden_size, spec.head_dim, spec.num_heads, spec.num_kv_heads,
                                          spec.qkv_bias, dtype,
                                          method_for(quant, [f"{hf_prefix}.{p}_proj" for p in "qkv"]))
        self.o_proj = RowParallelLinear(spec.num_heads * spec.head_dim, spec.hidden_size, False, dtype,
                                        method_for(quant, [f"{hf_prefix}.o_proj"]))
        self.num_heads, self.num_kv_heads = self.qkv_proj.local_heads, self.qkv_proj.local_kv_heads
        self.head_dim = spec.head_dim
        self.rotary = rotary
        self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, dtype) if spec.qk_norm else None
        self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, dtype) if spec.qk_norm else None

    def project(self, positions: torch.Tensor, x: torch.Tensor,
                x_fp8: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> tuple[torch.Tensor, torch.Tensor,
                                                                                    torch.Tensor]:
        """(q, k, v) for x (or for x quantized already: x_fp8, with x the residual, which gives the dtype), rotated;
        q contiguous, as the attention kernels read it."""
        d = self.head_dim
        qkv = self.qkv_proj(x) if x_fp8 is None else self.qkv_proj.forward_fp8(*x_fp8, x.dtype)
        q, k, v = qkv.split([self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d], -1)
        q = q.view(-1, self.num_heads, d)
        k = k.view(-1, self.num_kv_heads, d)
        v = v.view(-1, self.num_kv_heads, d)
        if self.q_norm is not None and self.k_norm is not None:  # both or neither
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        return q.contiguous(), k, v


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec, dtype: torch.dtype, quant: Optional[QuantScheme], hf_prefix: str):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            spec.hidden_size, spec.intermediate_size, ("gate", "up"), dtype,
            method_for(quant, [f"{hf_prefix}.gate_proj", f"{hf_prefix}.up_proj"]))
        self.down_proj = RowParallelLinear(spec.intermediate_size, spec.hidden_size, False, dtype,
                                           method_for(quant, [f"{hf_prefix}.down_proj"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj.reduce_(self.local(x))

    def local(self, x: torch.Tensor, x_fp8: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """This rank's down projection of SiLU-and-mul, before the TP reduction (x_fp8: x quantized already, see
        Attention.project). With fp8.FUSED_SILU, where the down projection takes FP8 activations, their quantization
        is fused into SiLU-and-mul (the bf16 product is never written)."""
        gate_up = self.gate_up_proj(x) if x_fp8 is None else self.gate_up_proj.forward_fp8(*x_fp8, x.dtype)
        dtype = gate_up.dtype
        if fp8.FUSED_SILU and self.down_proj.method.takes_fp8_input(self.down_proj, gate_up.shape[0]):
            xq, xs = fp8.silu_mul_quantize(gate_up)
            del gate_up  # freed before the down projection allocates, as a one-expression chain would
            return self.down_proj.local_fp8(xq, xs, dtype)
        h = silu_and_mul(gate_up)
        del gate_up
        return self.down_proj.local(h)


class DecoderLayer(nn.Module):
    """A decoder layer as a list of operations over a nano-batch's state, each tagged with its class (see
    gpu_workers/nano_batch.py); run in order they are the usual pre-norm layer."""

    def __init__(self, spec: ModelSpec, layer_index: int, rotary: RotaryEmbedding, dtype: torch.dtype,
                 quant: Optional[QuantScheme] = None, global_index: Optional[int] = None):
        super().__init__()
        hf_prefix = f"model.layers.{layer_index if global_index is None else global_index}"
        self.self_attn = Attention(spec, layer_index, rotary, dtype, quant, f"{hf_prefix}.self_attn")
        self.mlp = MLP(spec, dtype, quant, f"{hf_prefix}.mlp")
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype)
        reduces = parallel_state().tp_size > 1  # one rank: o_proj and down_proj have no bias to add either
        # the norms quantize for the QKV and gate/up GEMMs (fp8.FUSED_NORM); one rank only, as sequence
        # parallelism gathers the normalized rows between the norm and the GEMM
        self.norm_quantizes = fp8.FUSED_NORM and not reduces
        self.ops = [(OTHER, self._norm_in), (GEMM, self._qkv), (ATTENTION, self._attend), (GEMM, self._o_proj)] + \
            ([(COLLECTIVE, self._reduce_attn)] if reduces else []) + \
            [(OTHER, self._norm_post), (GEMM, self._mlp)] + ([(COLLECTIVE, self._reduce_mlp)] if reduces else [])
        attn = self.self_attn
        self.sp_ops = sequence_parallel.layer_ops(
            self._norm_in, self._qkv, self._attend, self._norm_post, attn.o_proj, attn.num_heads * attn.head_dim,
            self.mlp.gate_up_proj, self.mlp.down_proj) if reduces else self.ops

    def _quantizing_norm(self, norm: RMSNorm, gemm: ParallelLinear, s: NanoState) -> bool:
        """Residual add, norm and the GEMM's activation quantization in one kernel, where the GEMM takes FP8 input:
        s.hidden_fp8 holds the result, s.hidden the residual stream."""
        if not (self.norm_quantizes and gemm.method.takes_fp8_input(gemm, s.hidden.shape[0])):
            return False
        xq, xs, s.residual = fp8.add_rms_norm_quantize(s.hidden, s.residual, norm.weight, norm.eps)
        s.hidden_fp8, s.hidden = (xq, xs), s.residual
        return True

    def _norm_in(self, s: NanoState) -> None:
        if self._quantizing_norm(self.input_layernorm, self.self_attn.qkv_proj, s):
            return
        if s.residual is None:
            s.residual, s.hidden = s.hidden, self.input_layernorm(s.hidden)
        else:
            s.hidden, s.residual = self.input_layernorm(s.hidden, s.residual)

    def _qkv(self, s: NanoState) -> None:
        s.q, s.k, s.v = self.self_attn.project(s.positions, s.hidden, s.hidden_fp8)
        s.hidden_fp8 = None
        s.hidden = torch.empty_like(s.q)  # the attention's output, made here so the attention allocates nothing

    def _attend(self, s: NanoState) -> None:
        assert s.q is not None and s.k is not None and s.v is not None  # made by _qkv, the operation before
        current_backend().forward(self.self_attn.layer_index, s.q, s.k, s.v, s.plan, out=s.hidden)
        s.q = s.k = s.v = None

    def _o_proj(self, s: NanoState) -> None:
        attn = self.self_attn
        s.hidden = attn.o_proj.local(s.hidden.view(-1, attn.num_heads * attn.head_dim))

    def _reduce_attn(self, s: NanoState) -> None:
        self.self_attn.o_proj.reduce_(s.hidden)

    def _norm_post(self, s: NanoState) -> None:
        if not self._quantizing_norm(self.post_attention_layernorm, self.mlp.gate_up_proj, s):
            s.hidden, s.residual = self.post_attention_layernorm(s.hidden, s.residual)

    def _mlp(self, s: NanoState) -> None:
        s.hidden = self.mlp.local(s.hidden, s.hidden_fp8)
        s.hidden_fp8 = None

    def _reduce_mlp(self, s: NanoState) -> None:
        self.mlp.down_proj.reduce_(s.hidden)


def _residuals(states: list[NanoState]) -> list[torch.Tensor]:
    """The nano-batches' residuals after a stage's layers ran (each layer's first norm sets them)."""
    out = []
    for s in states:
        assert s.residual is not None
        out.append(s.residual)
    return out


def stage_layer_range(num_layers: int, pp_size: int, pp_rank: int) -> range:
    """Split layers as evenly as possible; earlier stages take the remainder (they also hold the embedding)."""
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return range(start, start + base + (1 if pp_rank < extra else 0))


class LlamaForCausalLM(nn.Module):
    norm: Optional[RMSNorm]  # on the last stage only, as lm_head
    lm_head: Optional[ParallelLMHead]

    def __init__(self, spec: ModelSpec, dtype: torch.dtype, max_positions: int,
                 quant: Optional[QuantScheme] = None):
        super().__init__()
        ps = parallel_state()
        self.spec = spec
        self.compute_dtype = dtype  # the activations' (FP8 weights are not)
        self.layer_range = stage_layer_range(spec.num_layers, ps.pp_size, ps.pp_rank)
        rotary = RotaryEmbedding(spec.head_dim, max_positions, spec.rope_theta, spec.rope_scaling)
        self.embed_tokens = VocabParallelEmbedding(spec.vocab_size, spec.hidden_size, dtype) \
            if ps.is_first_stage else None
        self.layers = nn.ModuleList(DecoderLayer(spec, i, rotary, dtype, quant, self.layer_range.start + i)
                                    for i in range(len(self.layer_range)))
        if ps.is_last_stage:
            self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype)
            if spec.tie_word_embeddings and ps.is_first_stage:
                self.lm_head = ParallelLMHead(spec.vocab_size, spec.hidden_size, dtype)
                assert self.embed_tokens is not None  # made on the first stage
                self.lm_head.weight = self.embed_tokens.weight
            else:
                self.lm_head = ParallelLMHead(spec.vocab_size, spec.hidden_size, dtype)
        else:
            self.norm = self.lm_head = None

    def forward(self, positions: torch.Tensor, plans: list[object], bounds: list[tuple[int, int]], runner: OpRunner,
                input_ids: Optional[torch.Tensor] = None, hidden: Optional[torch.Tensor] = None,
                residual: Optional[torch.Tensor] = None, sequence_parallel: bool = False):
        """Stage 0 takes input_ids; later stages take the previous stage's (hidden, residual). The batch runs as
        nano-batches: tokens [start, end) of each bound, with the attention plan beside it. The last stage returns
        final-normed hidden states; others return (hidden, residual) to pass on. With sequence parallelism (and
        TP) the (hidden, residual) passed between stages are this rank's shards, nano-batch after nano-batch."""
        if self.embed_tokens is not None:
            hidden, residual = self.embed_tokens(input_ids), None
        if sequence_parallel and parallel_state().tp_size > 1:
            return self._forward_sequence_parallel(positions, plans, bounds, runner, hidden, residual)
        assert hidden is not None  # embedded above on the first stage, passed in on the others
        states = [NanoState(positions[a:b], plan, hidden[a:b], None if residual is None else residual[a:b])
                  for (a, b), plan in zip(bounds, plans)]
        runner.run(self.layers, states)
        if len(states) == 1:
            hidden, residual = states[0].hidden, states[0].residual
        else:
            hidden = torch.cat([s.hidden for s in states])
            residual = torch.cat(_residuals(states))
        if self.norm is None:
            return hidden, residual
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def _forward_sequence_parallel(self, positions, plans, bounds, runner, hidden, residual):
        states, offset = [], 0
        for (a, b), plan in zip(bounds, plans):
            if residual is None:  # this stage embedded the full batch
                h, r = sequence_parallel.shard_of(hidden[a:b]), None
            else:
                m = sequence_parallel.shard_rows(b - a)
                h, r = hidden[offset:offset + m], residual[offset:offset + m]
                offset += m
            states.append(NanoState(positions[a:b], plan, h, r, num_tokens=b - a))
        runner.run(self.layers, states, sequence_parallel=True)
        if self.norm is None:
            return torch.cat([s.hidden for s in states]), torch.cat(_residuals(states))
        return torch.cat([sequence_parallel.gathered(self.norm(s.hidden, s.residual)[0], s.num_tokens)
                          for s in states])

    def compute_logits(self, hidden: torch.Tensor, float32: bool = True) -> torch.Tensor:
        """float32 False: in the model's dtype (the sampler converts them only where a row needs more than an
        argmax, which the conversion cannot change)."""
        assert self.lm_head is not None  # only the last stage computes logits
        logits = self.lm_head(hidden)
        return logits.float() if float32 else logits

    def checkpoint_targets(self) -> dict[str, tuple[nn.Parameter, Optional[str]]]:
        """Map each checkpoint tensor name this stage needs to (parameter, shard) — HF naming in, fused params out."""
        params = dict(self.named_parameters(remove_duplicate=False))
        targets: dict[str, tuple[nn.Parameter, Optional[str]]] = {}
        fused = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
                 "gate_proj": ("gate_up_proj", "gate"), "up_proj": ("gate_up_proj", "up")}
        for local, global_index in enumerate(self.layer_range):
            for name, param in params.items():
                prefix = f"layers.{local}."
                if not name.startswith(prefix):
                    continue
                rest = name[len(prefix):]
                hf_base = f"model.layers.{global_index}."
                for hf_proj, (ours, shard) in fused.items():
                    if f".{ours}." in rest:
                        targets[hf_base + rest.replace(ours, hf_proj)] = (param, shard)
                if not any(f".{ours}." in rest for ours, _ in fused.values()):
                    targets[hf_base + rest] = (param, None)
        if self.embed_tokens is not None:
            targets["model.embed_tokens.weight"] = (self.embed_tokens.weight, None)
        if self.norm is not None and self.lm_head is not None:  # the last stage: both or neither
            targets["model.norm.weight"] = (self.norm.weight, None)
            if self.lm_head.weight is not getattr(self.embed_tokens, "weight", None):
                # A tied checkpoint may still ship lm_head.weight; an untied model needs it.
                targets["lm_head.weight"] = (self.lm_head.weight, None)
                if self.spec.tie_word_embeddings:
                    targets["model.embed_tokens.weight"] = (self.lm_head.weight, None)
        return targets


def iter_required(targets: dict[str, tuple[nn.Parameter, Optional[str]]], spec: ModelSpec) -> Iterable[str]:
    """Checkpoint names that must be present (lm_head may be absent when embeddings are tied)."""
    for name in targets:
        if name == "lm_head.weight" and spec.tie_word_embeddings:
            continue
        yield name
