"""Requests with a structured output wait here, outside the scheduler, until the driver worker has compiled their
grammar: a step never stalls on a compile, and the first compile of a schema delays only its own requests."""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Optional

from nanoslg import structured_outputs as so
from nanoslg.protocol import GrammarCompile, GrammarCompiled, TokenizedRequest

# a quarter of the grammars the workers keep compiled (gpu_workers.grammar.MAX_GRAMMARS): a key known here is
# compiled there unless hundreds of new grammars came while its request waited (a worker that dropped one
# recompiles it, usually a hit in xgrammar's own cache)
MAX_KNOWN = 128


class GrammarGate:
    def __init__(self, announce: Callable[[GrammarCompile], None]):
        self.announce = announce
        self.compiled: OrderedDict[str, None] = OrderedDict()
        self.waiting: dict[str, list[TokenizedRequest]] = {}

    def offer(self, req: TokenizedRequest) -> bool:
        """True when req can be scheduled now; else it is held until its grammar is compiled."""
        spec = req.params.structured_outputs
        if not spec:
            return True
        key = so.cache_key(spec)
        if key in self.compiled:
            self.compiled.move_to_end(key)
            return True
        held = self.waiting.setdefault(key, [])
        if not held:
            self.announce(GrammarCompile(key, spec))
        held.append(req)
        return False

    def on_compiled(self, msg: GrammarCompiled) -> tuple[list[TokenizedRequest], Optional[str]]:
        """The requests msg releases, and the error that fails them (None: schedule them)."""
        if msg.error is None:
            self.compiled[msg.key] = None
            while len(self.compiled) > MAX_KNOWN:
                self.compiled.popitem(last=False)
        return self.waiting.pop(msg.key, []), msg.error

    def abort(self, rid: str) -> bool:
        for held in self.waiting.values():
            for i, req in enumerate(held):
                if req.rid == rid:
                    del held[i]
                    return True
        return False

    @property
    def num_waiting(self) -> int:
        return sum(len(held) for held in self.waiting.values())
