"""Batched sampling on the model's device: greedy, temperature, top-k, top-p, min-p, grammar masks (structured
outputs) and top-k logprobs.

Random draws come from a per-row generator seeded by (request seed, position of the sampled token), so a seeded
request gets the same tokens whatever else shares its batch, and after preemption and recompute too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from gpu_workers.grammar import GrammarBook, StepMask
from gpu_workers.upload import upload
from nanoslg.protocol import RowSetup
from nanoslg.sampling_params import SamplingParams

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads consecutive positions across the seed space


@dataclass(slots=True)
class RowParams:
    """A request's sampling state on a worker: its parameters (as the API edge validated them) and, when penalties
    need it, every token fed so far."""

    params: SamplingParams
    prompt_len: int = 0
    history: Optional[list[int]] = None  # prompt + output so far, kept only when penalties need it

    @classmethod
    def from_setup(cls, setup: RowSetup) -> "RowParams":
        row = cls(setup.params, setup.prompt_len)
        if setup.params.has_penalties:
            row.history = list(setup.prefix_ids or ())  # a prompt prefix served from the prefix cache
        return row

    def record_input(self, start_pos: int, tokens, pending: int) -> None:
        # A pending token was appended to the history when it was sampled (see record_sampled).
        if self.history is not None and not pending:
            del self.history[start_pos:]  # a recompute after preemption starts over at 0
            self.history.extend(tokens)

    def record_sampled(self, token: int) -> None:
        if self.history is not None:
            self.history.append(token)


@dataclass(slots=True)
class Sampled:
    """A step's sampling results, still on the device; to_host() is the step's one synchronisation."""

    tokens: torch.Tensor
    logprob_rows: list[int]  # row indices that asked for logprobs
    # set (all of them) when logprob_rows is not empty
    chosen: Optional[torch.Tensor] = None
    top_ids: Optional[torch.Tensor] = None
    top_vals: Optional[torch.Tensor] = None
    rows: Optional[list[RowParams]] = None
    copied: Optional[torch.cuda.Event] = None

    def start_copy(self) -> None:
        """Queue the device-to-host copies now, so to_host() only waits for them."""
        if self.tokens.device.type == "cuda":
            self.tokens = self.tokens.to("cpu", non_blocking=True)
            if self.chosen is not None:
                assert self.top_ids is not None and self.top_vals is not None  # set with chosen
                self.chosen = self.chosen.to("cpu", non_blocking=True)
                self.top_ids = self.top_ids.to("cpu", non_blocking=True)
                self.top_vals = self.top_vals.to("cpu", non_blocking=True)
            self.copied = torch.cuda.Event()
            self.copied.record()

    def to_host(self) -> tuple[list[int], Optional[list[Any]]]:
        if self.copied is not None:
            self.copied.synchronize()  # non-blocking copies land in host memory only when the stream gets there
        tokens = self.tokens.tolist()
        if not self.logprob_rows:
            return tokens, None
        # _logprobs sets all four whenever a row asked for logprobs
        assert self.chosen is not None and self.top_ids is not None and self.top_vals is not None
        assert self.rows is not None
        chosen, top_ids, top_vals = self.chosen.tolist(), self.top_ids.tolist(), self.top_vals.tolist()
        out: list[Optional[list[Any]]] = [None] * len(tokens)
        for j, i in enumerate(self.logprob_rows):
            n = self.rows[i].params.logprobs
            out[i] = [chosen[j], [[t, v] for t, v in zip(top_ids[j][:n], top_vals[j][:n])]]
        return tokens, out


class Sampler:
    """grammars: the rank's constrained-decoding book, on a sampling rank: a step's rows with a matcher sample only
    what their grammar allows."""

    def __init__(self, device: torch.device, seed: int, grammars: Optional[GrammarBook] = None):
        self.device, self.grammars = device, grammars
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def constrains(self, rids: list[str]) -> bool:
        """Whether any of a step's sampling rows samples under a grammar (then its mask needs the previous step's
        tokens, and sampling waits for them)."""
        return self.grammars is not None and self.grammars.constrains(rids)

    def grammar_mask(self, rids: list[str]) -> Optional[StepMask]:
        """The bitmask of a step's sampling rows (request ids in row order), filled on the host; None when no row
        is constrained."""
        return self.grammars.mask(rids) if self.grammars is not None else None

    def __call__(self, logits: torch.Tensor, rows: list[RowParams], positions: list[int],
                 mask: Optional[StepMask] = None) -> Sampled:
        """logits: [B, V], float32 or the model's dtype (converted here unless every row takes the argmax as it
        is). positions[b]: the position the sampled token will occupy. mask (grammar_mask's): the logits of the
        tokens a grammar forbids become -inf (every option below then samples among the allowed tokens only)."""
        if logits.dtype != torch.float32 and (mask is not None and mask.rows or any(
                not r.params.greedy or r.params.has_penalties or r.params.logprobs is not None for r in rows)):
            logits = logits.float()
        raw = logits  # logprobs report the model's distribution, before penalties and grammars
        if any(r.params.has_penalties for r in rows):
            logits = self._apply_penalties(logits.clone(), rows)
        if mask is not None and mask.rows:
            logits = logits.clone() if logits is raw else logits
            mask.apply(logits)
        tokens = logits.argmax(dim=-1)
        sampled_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
        if sampled_rows:
            idx = upload(sampled_rows, logits.device)
            tokens[idx] = self._sample(logits[idx], [rows[i] for i in sampled_rows],
                                       [positions[i] for i in sampled_rows])
        return self._logprobs(raw, tokens, rows)

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, rows: list[RowParams]) -> torch.Tensor:
        vocab, dev = logits.shape[-1], logits.device
        for i, r in enumerate(rows):
            if not r.params.has_penalties:
                continue
            seen = upload(r.history, dev)
            if r.params.repetition_penalty != 1:
                present = torch.zeros(vocab, dtype=torch.bool, device=dev)
                present[seen] = True
                row = logits[i]
                penalised = torch.where(row > 0, row / r.params.repetition_penalty, row * r.params.repetition_penalty)
                logits[i] = torch.where(present, penalised, row)
            # index_add_, not bincount: bincount reads the ids' range back to the host, a sync per row and step.
            generated = seen[r.prompt_len:]
            counts = torch.zeros(vocab, dtype=logits.dtype, device=dev).index_add_(
                0, generated, torch.ones(len(generated), dtype=logits.dtype, device=dev))
            logits[i] -= r.params.frequency_penalty * counts + r.params.presence_penalty * (counts > 0).to(logits.dtype)
        return logits

    def _sample(self, logits: torch.Tensor, rows: list[RowParams], positions: list[int]) -> torch.Tensor:
        dev = logits.device
        temps = upload([r.params.temperature for r in rows], dev, torch.float32)
        logits = logits / temps[:, None]
        if any(r.params.top_k > 0 or r.params.top_p < 1.0 for r in rows):
            logits = self._top_k_top_p(logits, rows)
        probs = logits.softmax(dim=-1)
        if any(r.params.min_p > 0 for r in rows):
            min_p = upload([r.params.min_p for r in rows], dev, torch.float32)
            probs = probs.masked_fill(probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values, 0.0)
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p without a normalised CDF.
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for i, (r, pos) in enumerate(zip(rows, positions)):
            if r.params.seed is not None:  # seeded rows redraw from their own stream (one small launch each)
                g = torch.Generator(device=dev)
                g.manual_seed((r.params.seed * _MIX + pos) % (2 ** 63))
                noise[i].exponential_(generator=g)
        return (probs / noise).argmax(dim=-1)

    @staticmethod
    def _top_k_top_p(logits: torch.Tensor, rows: list[RowParams]) -> torch.Tensor:
        dev = logits.device
        vocab = logits.shape[-1]
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ks = upload([r.params.top_k if r.params.top_k > 0 else vocab for r in rows], dev)
        rank = torch.arange(vocab, device=dev)[None, :]
        drop = rank >= ks[:, None]
        top_p = upload([r.params.top_p for r in rows], dev, torch.float32)
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass before it already does.
        mass_before = probs.cumsum(dim=-1) - probs
        drop |= mass_before >= top_p[:, None]
        drop[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        return torch.empty_like(logits).scatter_(-1, order, sorted_logits)

    @staticmethod
    def _logprobs(logits: torch.Tensor, tokens: torch.Tensor, rows: list[RowParams]) -> Sampled:
        wanted = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        if not wanted:
            return Sampled(tokens, [])
        idx = upload(wanted, logits.device)
        logp = logits[idx].log_softmax(dim=-1)
        chosen = logp.gather(-1, tokens[idx][:, None]).squeeze(-1)
        k = max(rows[i].params.logprobs or 0 for i in wanted)  # all set in wanted rows: `or 0` only narrows
        top_vals, top_ids = logp.topk(k, dim=-1) if k > 0 else (logp[:, :0], logp[:, :0].long())
        return Sampled(tokens, wanted, chosen, top_ids, top_vals, rows)
