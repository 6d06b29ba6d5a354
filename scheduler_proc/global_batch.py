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
MIN_OBSERVED = 64  # finished requests the mean output length needs before it outweighs the arrivals' max_tokens


class LengthStats:
    """Running means of prompt lengths and a quantile of observed output lengths, for D auto and for predicting
    how long a request without max_tokens will run."""

    def __init__(self) -> None:
        # recent requests only, so the estimates follow traffic that changes
        self.outputs: deque[int] = deque(maxlen=OUTPUT_WINDOW)
        self.prompts: deque[int] = deque(maxlen=OUTPUT_WINDOW)
        self.bounds: deque[int] = deque(maxlen=OUTPUT_WINDOW)  # max_tokens of arrived requests that gave one

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
        # Observed lengths are the truth, but a handful of them (a warm-up of short requests before a long batch)
        # says little about the traffic now arriving: until enough have finished, the arrivals' own bounds decide.
        recent = self.outputs if len(self.outputs) >= MIN_OBSERVED or not self.bounds else self.bounds
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

    def capacity(self, lengths: LengthStats, pool_tokens: int = 0, micro_batches: int = 1) -> float:
        """Requests the running set can hold: the target (per micro-batch), or fewer when the KV pool holds fewer of
        the mean size (half their output grown, as staggered requests are: PoolForecast) than that."""
        prompt, output = lengths.mean_prompt(), lengths.mean_output()
        if not pool_tokens or prompt is None or not output:
            return self.target * micro_batches
        return min(self.target * micro_batches, pool_tokens / (prompt + output / 2))

    def dense_tokens(self, lengths: LengthStats, pool_tokens: int = 0) -> int:
        """Tokens a step should carry: D, or R x (1 + mean prompt / mean output) with a margin, capped; R here is
        the running target or what the KV pool (pool_tokens) holds of requests at their mean size, if fewer."""
        cap = self.max_num_batched_tokens
        if self.dense_batch_tokens:
            return min(self.dense_batch_tokens, cap)
        prompt, output = lengths.mean_prompt(), lengths.mean_output()
        if prompt is None or not output:
            return cap
        running = self.capacity(lengths, pool_tokens)
        auto = -(-int(running * (1 + prompt / output) * DENSE_MARGIN) // DENSE_ROUND) * DENSE_ROUND
        return max(min(cap, 4 * self.page_size), min(cap, auto))

    def prefill_tokens(self, lengths: LengthStats, dense: int) -> int:
        """Of a step of `dense` tokens, the prefill share: prompt / (prompt + output) of it with D's margin taken
        off, in whole tiles (rounded up: the only slack), i.e. about R x prompt / output, the prefill that replaces
        the R / output requests finishing each step. With the margin left on, a cold start fills the running set in
        ~10 % fewer steps than an output takes and those requests finish closer together: offline-1024-512 on the
        H200's pool, driven against a stand-in worker, had 804 decode-only steps instead of 652."""
        prompt, output = lengths.mean_prompt(), lengths.mean_output()
        if prompt is None or not output:
            return dense
        share = dense * prompt / (prompt + output) / DENSE_MARGIN
        return min(dense, max(DENSE_ROUND, -(-int(share) // DENSE_ROUND) * DENSE_ROUND))


def expected_output(r: Request, lengths: LengthStats) -> int:
    """Tokens r is expected to generate in all: its max_tokens when it gave one (a bound the admission can keep),
    else the estimate from finished requests, never less than what it has already generated plus one."""
    if r.max_tokens_given:
        return r.max_tokens
    return min(r.max_tokens, max(len(r.output_ids) + 1, lengths.output_estimate() or 0))


def predicted_tokens(r: Request, lengths: LengthStats, max_model_len: int) -> int:
    return min(len(r.prompt_ids) + expected_output(r, lengths), max_model_len)


# A finished request's pages come back when its last step does, up to the in-flight steps after it sampled its
# last token; meanwhile the others grow. Each decoding request is forecast this many tokens larger.
FORECAST_MARGIN_TOKENS = 4


class PoolForecast:
    """The most KV pages the running requests are predicted to hold at any one time from now on.

    Requests do not all reach their predicted size at once: each decoding request grows one token per step until
    it finishes and frees everything. So the pool's peak comes just before some request finishes, when those still
    running hold their tokens now plus the steps until then; with equal output lengths and staggered starts that is
    about the mean size, not the final one, and the pool holds ~20 % more requests than reserving each one's final
    size would allow. A request still prefilling is counted at its final size throughout (its decode has not
    started, so when it ends is unknown). Never below what the requests will hold while their lengths stay within
    the prediction, so admitting up to the forecast never has to preempt."""

    def __init__(self, running: list[Request], lengths: LengthStats, max_model_len: int, page_size: int, num_free: int,
                 running_pages: int):
        """running_pages: the distinct pages the running requests hold (at most: shared prefix pages once)."""
        self.page_size, self.lengths, self.max_model_len = page_size, lengths, max_model_len
        self.num_free, self.running_pages = num_free, running_pages
        self.fixed = self.final_total = self.held = 0
        self.decoding = []  # (steps left, tokens now plus the margin, final pages)
        for r in running:  # (runs every step over up to ~1,000 requests: kept to plain arithmetic)
            now = len(r.prompt_ids) + len(r.output_ids)
            final = min(len(r.prompt_ids) + r.max_tokens, max_model_len) if r.max_tokens_given else \
                predicted_tokens(r, lengths, max_model_len)
            most = -(-final // page_size)
            self.final_total += most
            self.held += len(r.pages)
            # Still prefilling, or without max_tokens (its end is a guess: it may run on), it is counted at its
            # final size until it is gone, never as freeing its pages at a forecast finish.
            if now - r.num_computed > 1 or not r.max_tokens_given:
                self.fixed += most
            else:
                self.decoding.append((max(0, final - now), now + FORECAST_MARGIN_TOKENS, most))
        self._decoding_peak: Optional[int] = None

    def pages_at_most(self, r: Request) -> int:
        return -(-predicted_tokens(r, self.lengths, self.max_model_len) // self.page_size)

    @property
    def peak(self) -> int:
        if self._decoding_peak is None:
            # Just before the request with `left` steps to go finishes, every request with at least as many left
            # holds its tokens now plus `left` (one page more each for rounding), never more than its final size.
            self._decoding_peak = tokens = count = final_pages = 0
            for left, now, most in sorted(self.decoding, reverse=True):
                tokens, count, final_pages = tokens + now, count + 1, final_pages + most
                grown = -(-(tokens + count * left) // self.page_size) + count
                self._decoding_peak = max(self._decoding_peak, min(grown, final_pages))
        return self.fixed + self._decoding_peak

    def fits(self, r: Request) -> bool:
        """Whether the pool holds r too at the forecast peak."""
        need = self.pages_at_most(r)
        # Every request at its final size at once is the bound the forecast only tightens: when it fits, the
        # forecast is not needed (a pool far from full pays no sort per step). Each request grows private pages
        # only, so the pages it holds now, shared prefix pages too, are its own to count here.
        if self.final_total + need <= self.num_free + self.held:
            return True
        # The peak sums each request's own pages, but a finished request leaves its shared prefix pages to the
        # others: only the pages physically held now come back.
        return self.peak + need <= self.num_free + self.running_pages

    def add(self, r: Request) -> None:
        """Count a newly admitted request (still to prefill)."""
        most = self.pages_at_most(r)
        self.fixed += most
        self.final_total += most
