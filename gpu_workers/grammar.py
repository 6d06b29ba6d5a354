"""Constrained decoding on a sampling rank (the last pipeline stage; every TP rank of it samples alike): compiled
grammars, one xgrammar matcher per constrained request, and each step's token bitmask, which the sampler applies
to the logits.

Compiling runs on a thread pool (xgrammar releases the GIL), started when the scheduler announces a grammar
(GrammarCompile), before any of its requests is scheduled; the scheduler admits them once the driver says it is
compiled. A matcher advances on each sampled token when the step's tokens reach the host (ModelRunner.finish),
which the worker loop does before it samples the next step, so the bitmask for step N+1 is filled while the
device still runs step N+1's forward pass: on as many threads as the node's cores leave (grammar_threads), since
at 256 constrained rows the fill is tens of milliseconds of one core.
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Literal, Optional

import torch

from gpu_workers import cpu_features
from nanoslg import structured_outputs as so
from nanoslg.config import ResolvedConfig

log = logging.getLogger("nanoslg.worker")

GRAMMAR_THREADS_ENV = "NANOSLG_GRAMMAR_THREADS"
# compiled grammars kept: more than the scheduler's known-compiled keys (grammar_gate.MAX_KNOWN), so a request the
# scheduler admitted as compiled finds its grammar here unless hundreds of new ones came while it waited
MAX_GRAMMARS = 512
COMPILER_CACHE_BYTES = 512 << 20  # xgrammar's own cache of compiled grammars: a schema per request must not grow it
MAX_FILL_THREADS = 32


def grammar_threads(device_type: str, cores: int, ranks_per_node: int, torch_threads: int, other_processes: int,
                    override: str = "") -> int:
    """Threads that fill a step's token bitmask on each sampling rank. On a GPU the fill runs on the host while the
    device runs the step's forward pass, and the worker's own torch threads only launch kernels (4 at most): the
    fill takes the cores the node's processes leave (one per worker, and `other_processes`: the scheduler, the
    tokenizer and the API servers on node 0), shared among the node's ranks. On a CPU the forward pass has
    finished when the fill runs, so it takes the rank's torch threads. `override` ($NANOSLG_GRAMMAR_THREADS), a
    positive integer, wins.

    Measured on an H100 host of 16 cores (issue 25): sharegpt-like x 1000 under a JSON schema ran at 0.61x the
    unconstrained rate on 4 fill threads and 0.88x on 12 (BENCHMARKS.md)."""
    override = override.strip()
    if override.isdigit() and int(override) > 0:
        return int(override)
    if override:
        log.warning("ignoring %s=%r: not a positive integer", GRAMMAR_THREADS_ENV, override)
    if device_type != "cuda":
        return max(1, torch_threads)
    spare = (cores - ranks_per_node - other_processes) // max(1, ranks_per_node)
    return max(1, min(MAX_FILL_THREADS, spare))


class StepMask:
    """A step's token bitmask on the host (pinned on a GPU machine) for its sampling rows that have a matcher.
    rows: those the sampler masks; dead_ends: those whose grammar allows no token of the vocabulary at all."""

    def __init__(self, book: "GrammarBook", bitmask: torch.Tensor, rows: list[int], dead_ends: list[int]):
        self.book, self.bitmask, self.rows, self.dead_ends = book, bitmask, rows, dead_ends

    def apply(self, logits: torch.Tensor) -> None:
        """Sets the logits of the tokens the bitmask forbids to -inf, in place, in the masked rows (the copy to the
        device is queued without waiting for the stream)."""
        if self.rows:
            self.book.apply(logits, self.bitmask, self.rows)


def synthetic_vocab(vocab_size: int, seed: int = 0) -> list[bytes]:
    """A stand-in vocabulary for a model served without a tokenizer (dummy weights), so grammars compile and match
    at the real vocabulary's size and about its cost: every byte as a token, then tokens drawn like a byte-level BPE
    vocabulary's (Qwen's 151k, measured): a third start with a space, most are letters, over a third other scripts,
    about 1 % hold JSON's punctuation (a quote, a bracket, a colon or comma) and 1.5 % a newline. A matcher inside a
    JSON string checks every token's characters, and punctuation ends strings: the earlier stand-in, short strings
    of JSON's characters, cost a matcher 5x a real vocabulary's fill (../shared/probes/xgrammar-vocab.md)."""
    rng = random.Random(seed)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    weights = [26 - i for i in range(len(letters))]  # common letters first, as in text
    other_scripts = "éèàüöäçñßøåαβγδεжзийкл中国的是在人有我他这个们来到时大地为上"
    punctuation = ['"', '",', '":', '{"', '"}', '[', ']', ',', ':', '{', '}', '("', '."', "']", '":"', '"]']
    out = [bytes([i]) for i in range(min(256, vocab_size))]
    while len(out) < vocab_size:
        draw = rng.random()
        if draw < 0.01:
            text = rng.choice(punctuation)
        elif draw < 0.025:
            text = "\n" + " " * rng.randint(0, 8)
        elif draw < 0.4:
            text = "".join(rng.choice(other_scripts) for _ in range(rng.randint(1, 3)))
        else:
            text = "".join(rng.choices(letters, weights, k=rng.randint(2, 9)))
            if rng.random() < 0.1:
                text = text.capitalize()
        if rng.random() < 0.35:
            text = " " + text
        out.append(text.encode())
    return out


def _tokenizer_info(cfg: ResolvedConfig, vocab_size: int) -> Any:
    import xgrammar

    eos = list(cfg.model_spec.eos_token_ids) or [vocab_size - 1]
    path = cfg.tokenizer or cfg.model
    if any(os.path.isfile(os.path.join(path, n)) for n in ("tokenizer.json", "tokenizer_config.json",
                                                          "tokenizer.model")):
        from transformers import AutoTokenizer

        return xgrammar.TokenizerInfo.from_huggingface(AutoTokenizer.from_pretrained(path), vocab_size=vocab_size,
                                                      stop_token_ids=eos)
    return xgrammar.TokenizerInfo(synthetic_vocab(vocab_size), vocab_size=vocab_size, stop_token_ids=eos)


class GrammarBook:
    """This rank's compiled grammars (by structured_outputs.cache_key) and live matchers (by request id)."""

    def __init__(self, cfg: ResolvedConfig, vocab_size: int, device: torch.device,
                 on_compiled: Optional[Callable[[str, Optional[str]], None]] = None):
        self.cfg, self.vocab_size, self.device, self.on_compiled = cfg, vocab_size, device, on_compiled
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="grammar")
        self._lock = threading.Lock()
        self._compiler: Any = None
        self._compiled: OrderedDict[str, Future[Any]] = OrderedDict()
        self.matchers: dict[str, Any] = {}
        # node 0 also runs the scheduler, the tokenizer and the API servers (one, and one per client inbox more)
        others = 3 + len(cfg.client_inboxes) if cfg.node_rank == 0 else 0
        self.fill_threads = grammar_threads(device.type, cpu_features.usable_cores(), cfg.ranks_per_node,
                                            torch.get_num_threads(), others, os.environ.get(GRAMMAR_THREADS_ENV, ""))
        self._batch_matcher: Any = None
        # one pinned buffer: its copy to the device is queued without a wait, and the next fill starts only after
        # the worker waited for that step's tokens, which the stream makes after the copy
        self._bitmask: Optional[torch.Tensor] = None
        self._apply_backend: Literal["auto", "torch_native"] = "auto"

    def _get_compiler(self) -> Any:
        with self._lock:  # the first grammar loads the vocabulary (once; later compiles reuse it)
            if self._compiler is None:
                import xgrammar

                self._compiler = xgrammar.GrammarCompiler(_tokenizer_info(self.cfg, self.vocab_size), max_threads=2,
                                                          cache_limit_bytes=COMPILER_CACHE_BYTES)
                self._warm_up_apply()
            return self._compiler

    def _warm_up_apply(self) -> None:
        """Builds the bitmask kernel (Triton, on a GPU) here, before the first grammar is reported compiled, not
        in the first constrained step."""
        bitmask = torch.full((1, -(-self.vocab_size // 32)), -1, dtype=torch.int32)
        try:
            # this thread's current CUDA device is 0 whatever the worker's: make it the worker's for the launch
            with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
                logits = torch.zeros((1, self.vocab_size), dtype=torch.float32, device=self.device)
                self.apply(logits, bitmask, [0])
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
        except Exception as e:
            log.warning("the token bitmask kernel failed to warm up (%s): constrained steps use torch ops", e)
            self._apply_backend = "torch_native"

    def _future(self, key: str, spec: dict[str, Any]) -> Future[Any]:
        fut = self._compiled.get(key)
        if fut is None or (fut.done() and fut.exception() is not None):  # a failure is not kept: it may pass later
            fut = self._pool.submit(lambda: so.compile_with(self._get_compiler(), spec))
            self._compiled[key] = fut
            while len(self._compiled) > MAX_GRAMMARS:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(key)
        return fut

    def prepare(self, key: str, spec: dict[str, Any]) -> None:
        """Start compiling (or find compiled) spec; on_compiled(key, error) follows from the pool's thread."""
        fut = self._future(key, spec)
        on_compiled = self.on_compiled
        if on_compiled is not None:
            fut.add_done_callback(lambda f: on_compiled(key, _error_of(f)))

    def add(self, rid: str, spec: dict[str, Any], stop_token_ids: list[int]) -> None:
        """A matcher for a request's first chunk. Its grammar was announced before the request was scheduled, so
        it is compiled here or about to be (a non-driver TP rank may lag the driver by a moment)."""
        import xgrammar

        fut = self._future(so.cache_key(spec), spec)
        if not fut.done():
            log.warning("request %s waits for its grammar to compile (dropped from this rank's cache, or a TP "
                        "rank behind the driver)", rid)
        compiled = fut.result()  # raises GrammarError
        self.matchers[rid] = xgrammar.GrammarMatcher(compiled, override_stop_tokens=stop_token_ids or None)

    def release(self, rid: str) -> None:
        self.matchers.pop(rid, None)

    def accept(self, rid: str, token: int) -> bool:
        """Advance rid's matcher by its sampled token; True once its output is complete. Raises when the grammar
        refuses the token (it cannot, under the mask: a broken grammar), which fails that request alone."""
        m = self.matchers.get(rid)
        if m is None or m.is_terminated():
            return m is not None
        if not m.accept_token(token):
            raise RuntimeError(f"the grammar refused token {token} it had allowed")
        return m.is_terminated()

    def constrains(self, rids: list[str]) -> bool:
        return bool(self.matchers) and any(rid in self.matchers for rid in rids)

    def mask(self, rids: list[str]) -> Optional[StepMask]:
        """The token bitmask of a step's sampling rows (their request ids, in row order), filled on the host; None
        when none of them is constrained. A request whose grammar allows no token at all loses its matcher and is
        listed in dead_ends (its caller fails it rather than sampling outside its grammar)."""
        rows = [i for i, rid in enumerate(rids) if rid in self.matchers] if self.matchers else []
        if not rows:
            return None
        bitmask = self.fill([rid if rid in self.matchers else None for rid in rids])
        dead = self.dead_ends(bitmask, rows)
        for i in dead:
            self.release(rids[i])
        return StepMask(self, bitmask, [i for i in rows if i not in dead], dead)

    def fill(self, rows: list[Optional[str]]) -> torch.Tensor:
        """The bitmask for a step's sampling rows: rows[i] a request id or None (unconstrained, left unfilled).
        A finished matcher allows everything: the token it gets is discarded by the scheduler anyway."""
        import xgrammar

        n, words = len(rows), -(-self.vocab_size // 32)
        if self._bitmask is None or self._bitmask.shape[0] < n:
            self._bitmask = torch.empty((max(n, 64), words), dtype=torch.int32,
                                        pin_memory=self.device.type == "cuda")
        bitmask = self._bitmask[:n]
        bitmask.fill_(-1)
        matchers, indices = [], []
        for i, rid in enumerate(rows):
            m = self.matchers.get(rid) if rid is not None else None
            if m is not None and not m.is_terminated():
                matchers.append(m)
                indices.append(i)
        if matchers:
            if self._batch_matcher is None:
                self._batch_matcher = xgrammar.BatchGrammarMatcher(max_threads=self.fill_threads)
            self._batch_matcher.batch_fill_next_token_bitmask(matchers, bitmask, indices)
        return bitmask

    @staticmethod
    def dead_ends(bitmask: torch.Tensor, rows: list[int]) -> list[int]:
        """The rows (of those given) whose bitmask allows no token at all."""
        if not rows:
            return []
        alive = bitmask[rows].ne(0).any(dim=1).tolist()
        return [i for i, ok in zip(rows, alive) if not ok]

    def advance(self, rids: list[str], tokens: list[int]) -> tuple[list[str], list[tuple[str, str]]]:
        """Advances each constrained request's matcher by its sampled token: (requests whose output the grammar
        ended, [(request, error)] for those whose grammar broke; their matchers go and they fail alone)."""
        ended, failed = [], []
        for rid, tok in zip(rids, tokens):
            if rid not in self.matchers:
                continue
            try:
                if self.accept(rid, tok):
                    ended.append(rid)
            except Exception as e:
                self.release(rid)
                failed.append((rid, f"structured output: {e}"))
        return ended, failed

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
        """Sets the logits of the tokens the bitmask forbids to -inf, in place, in the given rows."""
        import xgrammar

        mask = bitmask.to(logits.device, non_blocking=True)
        try:
            xgrammar.apply_token_bitmask_inplace(logits, mask, vocab_size=self.vocab_size, indices=rows,
                                                 backend=self._apply_backend)
        except Exception as e:  # e.g. no Triton to build the GPU kernel: torch's own ops do the same
            if self._apply_backend != "auto":
                raise
            log.warning("xgrammar's bitmask kernel failed (%s); applying the bitmask with torch ops", e)
            self._apply_backend = "torch_native"
            xgrammar.apply_token_bitmask_inplace(logits, mask, vocab_size=self.vocab_size, indices=rows,
                                                 backend=self._apply_backend)


def _error_of(fut: Future[Any]) -> Optional[str]:
    e = fut.exception()
    return None if e is None else str(e) if isinstance(e, so.GrammarError) else f"{type(e).__name__}: {e}"
