"""NanoFlow's global batch, as the scheduler forms it: every step carries about D tokens (every running decode plus
prefill chunks that fill the rest), the running set is held near a target R, and a request is admitted only when
the KV pool can hold what it is predicted to use (its prompt plus its expected output), so a full pool means
admitting less rather than preempting.

Why a dense batch of about R x (1 + prompt / output) tokens: in a steady state each step finishes about R / output
requests, and admitting as many again costs R x prompt / output prefill tokens. A budget of that size spreads new
prompts over the steps instead of letting requests that finish together come back together (the waves of equal
output lengths), and keeps every step's GEMMs at the same, large token count."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Optional

from scheduler_proc.request import Request

# D auto leaves this much room over the steady-state need, so the prefill keeps up with small fluctuations, and
# rounds up to a whole number of GEMM tiles (a step of 845 tokens runs 7 tiles of 128 rows, the last one mostly idle).
DENSE_MARGIN = 1.1
DENSE_ROUND = 128
OUTPUT_WINDOW = 512  # requests the length estimates look back on
OUTPUT_QUANTILE = 0.9


class LengthStats:
    """Running means of prompt lengths and a quantile of observed output lengths, for D auto and for predicting
    how long a request without max_tokens will run."""

    def __init__(self) -> None:
        # recent requests only, so the estimates follow traffic that changes
        self.outputs: deque = deque(maxlen=OUTPUT_WINDOW)
        self.prompts: deque = deque(maxlen=OUTPUT_WINDOW)
        self.bounds: deque = deque(maxlen=OUTPUT_WINDOW)  # max_tokens of arrived requests that gave one

    def arrived(self, r: Request) -> None:
        # counted on arrival, so the first step already knows the traffic (else it would take a step of the whole
        # cap, and requests admitted together would finish together: a wave)
        self.prompts.append(len(r.prompt_ids))
        if r.max_tokens_given:
            self.bounds.append(r.max_tokens)

    def finished(self, num_output: int) -> None:
        self.outputs.append(num_output)

    def output_estimate(self) -> Optional[int]:
        """A high quantile of recent output lengths (None before any request finished)."""
        if not self.outputs:
            return None
        ordered = sorted(self.outputs)
        return ordered[min(len(ordered) - 1, int(OUTPUT_QUANTILE * len(ordered)))]

    def mean_prompt(self) -> Optional[float]:
        return sum(self.prompts) / len(self.prompts) if self.prompts else None

    def mean_output(self) -> Optional[float]:
        recent = self.outputs or self.bounds
        return sum(recent) / len(recent) if recent else None


@dataclass(slots=True)
class BatchTargets:
    """The step's shape. running_target (R) and dense_batch_tokens (D, None: derived from the traffic) come from the
    tuned config or flags; max_num_seqs and max_num_batched_tokens cap them (vLLM's names)."""

    max_num_seqs: int
    max_num_batched_tokens: int
    running_target: Optional[int] = None  # None: max_num_seqs
    dense_batch_tokens: Optional[int] = None
    page_size: int = 16

    @property
    def target(self) -> int:
        return min(self.running_target or self.max_num_seqs, self.max_num_seqs)

    def dense_tokens(self, lengths: LengthStats, pool_tokens: int = 0) -> int:
        """Tokens a step should carry: D, or R x (1 + mean prompt / mean output) with a margin, capped; R here is
        the running target or what the KV pool (pool_tokens) holds of requests of the mean size, if fewer."""
        cap = self.max_num_batched_tokens
        if self.dense_batch_tokens:
            return min(self.dense_batch_tokens, cap)
        prompt, output = lengths.mean_prompt(), lengths.mean_output()
        if prompt is None or not output:
            return cap
        running = min(self.target, pool_tokens / (prompt + output)) if pool_tokens else self.target
        auto = -(-int(running * (1 + prompt / output) * DENSE_MARGIN) // DENSE_ROUND) * DENSE_ROUND
        return max(min(cap, 4 * self.page_size), min(cap, auto))


def expected_output(r: Request, lengths: LengthStats) -> int:
    """Tokens r is expected to generate in all: its max_tokens when it gave one (a bound the admission can keep),
    else the estimate from finished requests, never less than what it has already generated plus one."""
    if r.max_tokens_given:
        return r.max_tokens
    return min(r.max_tokens, max(len(r.output_ids) + 1, lengths.output_estimate() or 0))


def predicted_tokens(r: Request, lengths: LengthStats, max_model_len: int) -> int:
    return min(len(r.prompt_ids) + expected_output(r, lengths), max_model_len)
