"""Per-request sampling settings, validated once where the request enters the engine (the API edge, the offline
API), then sent to the tokenizer, the scheduler and the workers as this one typed message (protocol.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

from nanoslg import structured_outputs as so

MAX_LOGPROBS = 20


@dataclass(slots=True)
class SamplingParams:
    """Field names and defaults follow vLLM. ``temperature == 0`` means greedy; ``top_k == 0`` disables top-k."""

    max_tokens: Optional[int] = 16  # None: until max_model_len
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: Optional[int] = None  # number of top alternatives to return with each sampled token
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence among generated tokens
    repetition_penalty: float = 1.0  # divides positive / multiplies negative logits of prompt + generated tokens
    # what the output must match (structured_outputs.py): {"json": schema} / {"regex": ...} / {"choice": [...]} ...
    structured_outputs: Optional[dict[str, Any]] = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.structured_outputs = so.normalize(self.structured_outputs)
        self.validate()
        if self.top_k == -1:  # vLLM's spelling of "no top-k"
            self.top_k = 0

    def validate(self) -> None:
        def need(ok: bool, name: str, what: str):
            if not ok:
                raise ValueError(f"{name} {what}, got {getattr(self, name)!r}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        need(self.max_tokens is None or (is_int(self.max_tokens) and self.max_tokens >= 1), "max_tokens",
             "must be an integer >= 1")
        need(is_num(self.temperature) and self.temperature >= 0, "temperature", "must be a number >= 0")
        need(is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        need(is_int(self.top_k) and self.top_k >= -1, "top_k", "must be an integer >= 0 (0 or -1 disables it)")
        need(is_num(self.min_p) and 0 <= self.min_p <= 1, "min_p", "must be in [0, 1]")
        need(self.seed is None or is_int(self.seed), "seed", "must be an integer or None")
        assert isinstance(self.stop, list)  # __post_init__ turned a str or None into a list
        need(all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings")
        need(all(is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
             "must be non-negative integers")
        need(isinstance(self.ignore_eos, bool), "ignore_eos", "must be a boolean")
        need(self.logprobs is None or (is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
             "logprobs", f"must be an integer in [0, {MAX_LOGPROBS}] or None")
        need(is_num(self.presence_penalty) and -2 <= self.presence_penalty <= 2, "presence_penalty",
             "must be in [-2, 2]")
        need(is_num(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2, "frequency_penalty",
             "must be in [-2, 2]")
        need(is_num(self.repetition_penalty) and 0 < self.repetition_penalty <= 10, "repetition_penalty",
             "must be in (0, 10]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        """Whether sampling needs the request's full token history (prompt and output so far)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1
