"""A request as the scheduler tracks it: its tokens, KV pages, prefix-cache keys and where it stands."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Optional

from nanoslg.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Request:
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    stop_token_ids: frozenset[int]
    max_tokens: int
    # whether max_tokens came from the request (a bound the admission can plan with) or is max_model_len's default
    max_tokens_given: bool = True
    output_ids: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose KV is in the cache (or being written by an in-flight step)
    status: Status = Status.WAITING
    in_flight: int = 0  # steps in flight that include this request
    params_sent: bool = False
    num_preemptions: int = 0
    finish_reason: Optional[str] = None
    page_keys: list[bytes] = field(default_factory=list)  # prefix-cache keys of the full pages of the known tokens
    num_registered: int = 0  # leading pages offered to the prefix cache
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
    arrival: float = field(default_factory=time.monotonic)
    first_scheduled: float = 0.0  # when it first left the waiting queue

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        p = len(self.prompt_ids)
        if end <= p:
            return self.prompt_ids[start:end]
        if start >= p:  # decode steps: avoid copying the whole prompt
            return self.output_ids[start - p:end - p]
        return self.prompt_ids[start:] + self.output_ids[:end - p]
