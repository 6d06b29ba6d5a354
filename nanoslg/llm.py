"""The offline Python API, running on the same multi-process engine as the server."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union, cast

from nanoslg.config import EngineConfig
from nanoslg.engine_client import EngineClient
from nanoslg.protocol import GenerateRequest, token_ids
from nanoslg.sampling_params import SamplingParams

Prompt = Union[str, Sequence[int]]
Conversation = list[dict[str, Any]]  # chat messages


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: Optional[str] = None  # stop | length | rejected (bad request) | error (engine failure)
    # per token: (logprob, [(token id, logprob), ...top-k])
    logprobs: Optional[list[tuple[float, list[tuple[Any, ...]]]]] = None
    error: Optional[str] = None


class LLM:
    """``LLM(model, **engine_args)``: engine_args are EngineConfig fields (dtype, max_model_len, max_num_seqs...).
    Use as a context manager, or call close(), to stop the engine's processes."""

    def __init__(self, model: Optional[str] = None, **engine_args: Any):
        self.engine = EngineClient(EngineConfig(model=model, **engine_args).resolve())
        self.config = self.engine.cfg  # resolved, with the engine's run directory
        self._ids = itertools.count()

    def generate(self, prompts: Union[Prompt, Sequence[Prompt]],
                 sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        # mypy cannot narrow a union on its first element: one prompt is a str or a sequence of ints
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            batch: Sequence[Prompt] = [cast(Prompt, prompts)]
        else:
            batch = cast("Sequence[Prompt]", prompts)
        reqs = []
        for p, params in zip(batch, self._per_request(sampling_params, len(batch))):
            rid = f"gen-{next(self._ids)}"
            if isinstance(p, str):
                reqs.append(GenerateRequest(rid, params, prompt=p))
            else:
                reqs.append(GenerateRequest(rid, params, prompt_ids=token_ids(p)))
        return self._run(reqs, use_tqdm)

    def chat(self, conversations: Union[Conversation, Sequence[Conversation]],
             sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
             use_tqdm: bool = False, chat_template_kwargs: Optional[dict[str, Any]] = None
             ) -> list[RequestOutput]:
        # as in generate: one conversation is a list of message dicts
        if conversations and isinstance(conversations[0], dict):
            batch: Sequence[Conversation] = [cast(Conversation, conversations)]
        else:
            batch = cast("Sequence[Conversation]", conversations)
        reqs = [GenerateRequest(f"chat-{next(self._ids)}", params, messages=list(conv),
                                chat_template_kwargs=chat_template_kwargs)
                for conv, params in zip(batch, self._per_request(sampling_params, len(batch)))]
        return self._run(reqs, use_tqdm)

    @staticmethod
    def _per_request(sampling_params: Union[SamplingParams, Sequence[SamplingParams], None],
                     n: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams()] * n
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * n
        if len(sampling_params) != n:
            raise ValueError(f"got {len(sampling_params)} sampling params for {n} prompts")
        return list(sampling_params)

    def _run(self, reqs: list[GenerateRequest], use_tqdm: bool) -> list[RequestOutput]:
        outputs = {r.rid: RequestOutput(r.rid, r.prompt, list(r.prompt_ids or [])) for r in reqs}
        for r in reqs:
            self.engine.submit(r)
        pending = set(outputs)
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(reqs), desc="generating", unit="req")
        try:
            while pending:
                for d in self.engine.poll_deltas(100):
                    out = outputs.get(d.rid)
                    if out is None or d.rid not in pending:
                        continue
                    if d.prompt_ids is not None:
                        out.prompt_token_ids = list(d.prompt_ids)
                    out.text += d.text
                    out.token_ids.extend(d.token_ids)
                    if d.logprobs:
                        out.logprobs = (out.logprobs or []) + [
                            (lp, [tuple(t) for t in top]) for lp, top in d.logprobs]
                    if d.finish_reason is not None:
                        out.finish_reason, out.error = d.finish_reason, d.error
                        pending.discard(d.rid)
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for rid in pending:  # e.g. Ctrl-C: free the engine for the next call
                self.engine.abort(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [outputs[r.rid] for r in reqs]

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()
