"""The tokenizer process: renders chat templates, tokenizes and validates requests on the way in; detokenizes
incrementally and applies stop strings on the way out."""
from __future__ import annotations

import json
import logging
import os
import sys
from array import array
from dataclasses import dataclass
from typing import Any, Optional, cast

import zmq

from nanoslg import ipc
from nanoslg.config import ResolvedConfig
from nanoslg.errors import ContextLengthExceeded, EmptyPrompt, MaxTokensTooLarge, Rejection
from nanoslg.logs import setup_logging
from nanoslg.protocol import (AbortRequest, ClientReset, GenerateRequest, OutputBatch, OutputDelta, ProtocolError,
                              Shutdown, TokenBatch, TokenizedRequest, token_ids)
from nanoslg.sampling_params import SamplingParams
from tokenizer_proc.detokenizer import IncrementalDetokenizer, StopStringMatcher

log = logging.getLogger("nanoslg.tokenizer")

# Output batches queued for an API-server process that takes none (gone, restarting, or stuck for ~100 s of steps)
# before its requests are aborted here: the engine must not keep running them for nobody.
CLIENT_QUEUE_LIMIT = 10000


class RequestError(Rejection):
    pass


def load_tokenizer(path: str):
    """The model's tokenizer, or None for a folder without one (token-id prompts only, no text output)."""
    from transformers import AutoTokenizer

    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    if not any(os.path.isfile(os.path.join(path, n)) for n in names):
        log.warning("no tokenizer in %s: only token-id prompts are accepted", path)
        return None
    return AutoTokenizer.from_pretrained(path)


def eos_token_ids(cfg: ResolvedConfig, tokenizer) -> list[int]:
    """EOS ids from generation_config.json, else config.json, else the tokenizer: never a hard-coded id."""
    path = os.path.join(cfg.model, "generation_config.json")
    ids: list[int] = []
    if os.path.isfile(path):
        with open(path) as f:
            eos = json.load(f).get("eos_token_id")
        ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    if not ids:
        ids = list(cfg.model_spec.eos_token_ids)
    if not ids and tokenizer is not None and tokenizer.eos_token_id is not None:
        ids = [tokenizer.eos_token_id]
    return ids


@dataclass(slots=True)
class Stream:
    """Per-request output state."""

    detokenizer: Optional[IncrementalDetokenizer]
    stop: StopStringMatcher
    stop_token_ids: frozenset[int]
    prompt_ids: array[int]  # sent with the first delta
    prompt_text: Optional[str]  # for echo
    client: int = 0  # the API-server process that gets its outputs
    first: bool = True


class TokenizerProcess:
    def __init__(self, cfg: ResolvedConfig):
        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg.tokenizer)
        self.eos_ids = eos_token_ids(cfg, self.tokenizer)
        self.vocab_size = cfg.model_spec.vocab_size
        ctx = zmq.Context()
        self.inbox = ipc.pull(ctx, cfg.run_dir, ipc.TOKENIZER)
        self.to_scheduler = ipc.push(ctx, cfg.run_dir, ipc.SCHEDULER)
        self.to_clients = [ipc.push(ctx, cfg.run_dir, ipc.CLIENT)]
        for address in cfg.client_inboxes:
            sock = ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, CLIENT_QUEUE_LIMIT)
            sock.connect(address)
            self.to_clients.append(sock)
        self.streams: dict[str, Stream] = {}

    def run(self, ready) -> None:
        ready({"eos_token_ids": self.eos_ids, "has_tokenizer": self.tokenizer is not None})
        while True:
            try:
                msg = ipc.recv(self.inbox)
            except ProtocolError as e:
                log.warning("dropped a bad message: %s", e)
                continue
            if isinstance(msg, TokenBatch):
                self._on_tokens(msg)
            elif isinstance(msg, GenerateRequest):
                self._on_request(msg)
            elif isinstance(msg, AbortRequest):
                if self.streams.pop(msg.rid, None) is not None:
                    ipc.send(self.to_scheduler, msg)
            elif isinstance(msg, ClientReset):
                self._reset_client(msg.client)
            elif isinstance(msg, Shutdown):
                return
            else:
                log.warning("unexpected %s on the tokenizer inbox", type(msg).__name__)

    def _reset_client(self, client: int) -> None:
        """Abort every request of an API-server process that died or restarted."""
        gone = [rid for rid, s in self.streams.items() if s.client == client]
        for rid in gone:
            del self.streams[rid]
            ipc.send(self.to_scheduler, AbortRequest(rid))
        if gone:
            log.warning("API server %d is gone or restarted: aborted its %d requests", client, len(gone))

    def _send(self, client: int, batch: OutputBatch) -> None:
        if client == 0:  # the process that owns the engine: it lives exactly as long as this one
            ipc.send(self.to_clients[0], batch)
            return
        try:
            ipc.send(self.to_clients[client], batch, zmq.NOBLOCK)
        except zmq.Again:
            log.warning("API server %d takes no outputs (gone or stuck): its requests are aborted", client)
            self._reset_client(client)

    # ------------------------------------------------------------------ inbound
    def _on_request(self, req: GenerateRequest) -> None:
        if not 0 <= req.client < len(self.to_clients):
            log.warning("dropped request %s from unknown API server %d", req.rid, req.client)
            return
        try:
            if req.rid in self.streams:
                raise RequestError(f"request id {req.rid!r} is already in use")
            params = req.params  # validated where it entered the engine
            if not isinstance(params, SamplingParams):
                raise RequestError(f"params must be a SamplingParams message, got {type(params).__name__}")
            prompt_ids = self._tokenize(req)
        except (ValueError, TypeError) as e:
            self._send(req.client, OutputBatch([OutputDelta(req.rid, finish_reason="rejected", error=str(e),
                                                             error_code=getattr(e, "code", None))]))
            return
        except Exception as e:  # e.g. a chat template's raise_exception (a conversation it does not accept)
            error = f"the chat template refused the conversation: {e}" if req.messages is not None else \
                f"the request could not be tokenized: {type(e).__name__}: {e}"
            self._send(req.client, OutputBatch([OutputDelta(req.rid, finish_reason="rejected", error=error)]))
            return
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_ids))
        detok = None
        if self.tokenizer is not None:
            detok = IncrementalDetokenizer(self.tokenizer, list(prompt_ids), params.skip_special_tokens)
        stop = cast(Optional[list[str]], params.stop)  # SamplingParams.__post_init__ made it a list at the edge
        self.streams[req.rid] = Stream(detok, StopStringMatcher(stop, params.include_stop_str_in_output),
                                       frozenset(stop_ids), prompt_ids, self._prompt_text(req, prompt_ids), req.client)
        ipc.send(self.to_scheduler, TokenizedRequest(req.rid, prompt_ids, params, sorted(stop_ids)))

    def _prompt_text(self, req: GenerateRequest, prompt_ids) -> Optional[str]:
        if not req.echo:
            return None
        if req.prompt is not None:
            return req.prompt
        return self.tokenizer.decode(list(prompt_ids)) if self.tokenizer is not None else ""

    def _token_texts(self, logprobs: list[tuple[int, Any]]) -> list[list[Any]]:
        def text(t: int) -> str:
            return self.tokenizer.decode([t]) if self.tokenizer is not None else ""

        return [[text(tok), [text(t) for t, _ in top]] for tok, (_, top) in logprobs]

    def _tokenize(self, req: GenerateRequest) -> array[int]:
        given = [x is not None for x in (req.prompt, req.prompt_ids, req.messages)]
        if sum(given) != 1:
            raise RequestError("give exactly one of prompt, prompt_ids or messages")
        if req.prompt_ids is not None:
            ids = token_ids(req.prompt_ids)
            bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise RequestError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        else:
            if self.tokenizer is None:
                raise RequestError("this model has no tokenizer: send token ids, not text")
            if req.messages is not None:
                text = self._render_chat(req.messages, req.chat_template_kwargs or {})
                ids = token_ids(self.tokenizer(text, add_special_tokens=False).input_ids)
            else:
                if not isinstance(req.prompt, str):
                    raise RequestError("prompt must be a string")
                ids = token_ids(self.tokenizer(req.prompt).input_ids)
        if not ids:
            raise EmptyPrompt()
        if len(ids) >= self.cfg.max_model_len:
            raise ContextLengthExceeded(len(ids), self.cfg.max_model_len)
        asked = req.params.max_tokens
        if req.strict_max_tokens and asked is not None and len(ids) + asked > self.cfg.max_model_len:
            raise MaxTokensTooLarge(asked, len(ids), self.cfg.max_model_len)
        return ids

    def _render_chat(self, messages: list[dict[str, Any]], kwargs: dict[str, Any]) -> str:
        if not messages:
            raise RequestError("messages must not be empty")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool"):
                raise RequestError(f"messages[{i}] needs a role of system, user, assistant or tool")
        if not getattr(self.tokenizer, "chat_template", None):
            raise RequestError("this model's tokenizer has no chat template")
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)

    # ------------------------------------------------------------------ outbound
    def _on_tokens(self, batch: TokenBatch) -> None:
        """One OutputBatch per API-server process per step, with all of its requests' deltas."""
        by_client: dict[int, list[OutputDelta]] = {}
        for u in batch.updates:
            stream = self.streams.get(u.rid)
            if stream is None:
                continue  # aborted by its client while tokens were in flight
            deltas = by_client.setdefault(stream.client, [])
            if u.error is not None:
                del self.streams[u.rid]
                deltas.append(OutputDelta(u.rid, finish_reason=u.finish_reason or "error", error=u.error,
                                          error_code=u.error_code))
                continue
            ids = list(u.token_ids)
            text_ids = ids[:-1] if u.finish_reason == "stop" and ids and ids[-1] in stream.stop_token_ids else ids
            text = stream.detokenizer.add(text_ids) if stream.detokenizer is not None else ""
            text, stopped = stream.stop.feed(text)
            finish = u.finish_reason
            if stopped:
                if finish is None:  # the scheduler would go on generating
                    ipc.send(self.to_scheduler, AbortRequest(u.rid))
                finish = "stop"
            elif finish is not None:
                text += stream.stop.flush()
            lp_texts = self._token_texts(list(zip(ids, u.logprobs))) if u.logprobs else None
            deltas.append(OutputDelta(u.rid, text, u.token_ids, finish, u.logprobs, len(stream.prompt_ids),
                                      stream.prompt_ids if stream.first else None, None,
                                      stream.prompt_text if stream.first else None, lp_texts,
                                      u.num_cached_tokens, u.queue_time, u.prefill_time))
            stream.first = False
            if finish is not None:
                del self.streams[u.rid]
        for client, deltas in by_client.items():
            self._send(client, OutputBatch(deltas))


def main() -> None:
    cfg = ResolvedConfig.from_arg(sys.argv[1])
    setup_logging(cfg.log_level, cfg.log_format)
    ipc.run_child(ipc.TOKENIZER, cfg.run_dir, lambda ready: TokenizerProcess(cfg).run(ready))


if __name__ == "__main__":
    main()
