"""The datasets of `nanoslg bench serve`: random and ShareGPT-like prompts, and multi-turn conversations that
share one system prompt, each turn re-sending the whole history as token ids (earlier replies as the ids the server
generated), as a chat client does: the traffic prefix caching is for."""
from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np

# Prompt token ids come from the middle of typical vocabularies: clear of special/byte tokens at the bottom
# and still inside small vocabularies (the server tokenizes nothing, so lengths are exact).
TOKEN_ID_RANGE = (1000, 20000)
# Chat prompts must be text; common words that are one token each (with their leading space) in BPE
# vocabularies keep the prompt length close to the requested number of tokens.
WORDS = ("the of and to in is was for on with as by at from his her they this that have had not are but "
         "one all were when there can more time if will each about many then them these some would like "
         "into has two make first been its who now people my made over did down only way find use may "
         "water long little very after words called just where most know get through back much go good "
         "new write our used me man too any day same right look think also around another came come work "
         "three word must because does part even place well such here take why things help put years "
         "different away again off went old number great tell men say small every found still between name "
         "should home big give air line set own under read last never us left end along while might next "
         "sound below saw something thought both few those always looked show large often together asked "
         "house world going want school important until form food keep children feet land side without boy "
         "once animals life enough took sometimes four head above kind began almost live page got earth").split()
# ShareGPT conversations average roughly 202 prompt and 179 completion tokens with a long right tail.
SHAREGPT_MEAN_IN, SHAREGPT_MEAN_OUT, SHAREGPT_SIGMA = 202.0, 179.0, 0.9
SHAREGPT_CLIP = (4, 1024)


def range_ratio_arg(value: str) -> float:
    """argparse type of --random-range-ratio: a number in [0, 1)."""
    import argparse

    try:
        r = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {value!r}") from None
    if not 0 <= r < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {value!r}")
    return r


@dataclass
class BenchRequest:
    prompt: Union[list[int], str]  # list of token ids (completions) or a string (chat)
    input_len: int  # requested prompt length in tokens
    output_len: int  # max_tokens


def make_requests(dataset: str, endpoint: str, num_prompts: int, input_len: int, output_len: int, seed: int,
                  max_model_len: Optional[int] = None, range_ratio: float = 0.0,
                  token_id_range: tuple[int, int] = TOKEN_ID_RANGE) -> list[BenchRequest]:
    """range_ratio (vLLM's --random-range-ratio): random lengths drawn uniformly from [len x (1 - r), len x (1 + r)]
    instead of exactly len."""
    rng = np.random.default_rng(seed)
    if dataset == "random":
        if range_ratio:
            draw = lambda n: rng.integers(max(1, int(n * (1 - range_ratio))), int(n * (1 + range_ratio)) + 1,  # noqa: E731
                                          size=num_prompts).tolist()
            lengths = list(zip(draw(input_len), draw(output_len)))
        else:
            lengths = [(input_len, output_len)] * num_prompts
    else:
        budget = max_model_len
        if budget and endpoint == "chat":  # words are not exactly tokens and the chat template adds some
            budget = max(8, int(budget * 0.9) - 32)
        lengths = [_sharegpt_like_lengths(rng, budget) for _ in range(num_prompts)]
    requests = []
    for n_in, n_out in lengths:
        if endpoint == "completions":
            prompt = rng.integers(*token_id_range, size=n_in).tolist()
        else:
            prompt = " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), size=n_in))
        requests.append(BenchRequest(prompt, n_in, n_out))
    return requests


def _sharegpt_like_lengths(rng: np.random.Generator, max_model_len: Optional[int]) -> tuple[int, int]:
    # Lognormal with mean exp(mu + sigma^2 / 2) equal to the target mean (before clipping).
    def draw(mean: float) -> int:
        mu = math.log(mean) - SHAREGPT_SIGMA ** 2 / 2
        return int(np.clip(round(rng.lognormal(mu, SHAREGPT_SIGMA)), *SHAREGPT_CLIP))

    # Pairs that do not fit the server are drawn again, as vLLM drops ShareGPT conversations that are too
    # long; with a tiny limit that could take forever, so after a while the pair is scaled down instead.
    for _ in range(100):
        n_in, n_out = draw(SHAREGPT_MEAN_IN), draw(SHAREGPT_MEAN_OUT)
        if not max_model_len or n_in + n_out <= max_model_len:
            return n_in, n_out
    assert max_model_len  # without a limit the first pair fits
    scale = max_model_len / (n_in + n_out)
    return max(1, int(n_in * scale)), max(1, int(n_out * scale))


def make_conversations(num: int, turns: int, system_len: int, user_len: int, seed: int, id_range: tuple[int, int]
                       ) -> tuple[list[int], list[list[list[int]]]]:
    """(system prompt ids, per conversation the user turns' ids)."""
    rng = np.random.default_rng([seed, 2])
    system = rng.integers(*id_range, size=system_len).tolist()
    users = [[rng.integers(*id_range, size=user_len).tolist() for _ in range(turns)] for _ in range(num)]
    return system, users


async def run_conversations(system: list[int], users: list[list[list[int]]], offsets: list[float], send,
                            new_result) -> list[Any]:
    """Run every conversation, each starting at its offset (seconds from now) and sending turn t+1 once turn t's
    reply is complete. send(prompt_ids, result) streams one request into result; new_result(index, prompt_len)
    makes one. Returns the results in (conversation, turn) order; a failed turn ends its conversation."""
    t0 = time.perf_counter()
    turns = len(users[0]) if users else 0
    results: list[Any] = []  # bench_serve's RequestResult

    async def conversation(c: int) -> None:
        await asyncio.sleep(max(0.0, t0 + offsets[c] - time.perf_counter()))
        history = list(system)
        for t, user in enumerate(users[c]):
            prompt = history + user
            result = new_result(c * turns + t, len(prompt))
            result.turn = t
            results.append(result)
            await send(prompt, result)
            if not result.success:
                return
            history = prompt + result.output_ids

    await asyncio.gather(*(conversation(c) for c in range(len(users))))
    return sorted(results, key=lambda r: r.index)


def ttft_by_turn(results: list[Any]) -> dict[str, dict[str, float]]:
    """Per turn: completed requests and their TTFT median and P99 in ms."""
    out = {}
    for t in sorted({r.turn for r in results}):
        ttfts = [r.ttft * 1e3 for r in results if r.turn == t and r.success]
        if ttfts:
            out[str(t + 1)] = {"completed": len(ttfts), "p50_ttft_ms": float(np.percentile(ttfts, 50)),
                               "p99_ttft_ms": float(np.percentile(ttfts, 99))}
    return out


def format_turns(by_turn: dict[str, dict[str, float]]) -> str:
    lines = ["TTFT by turn (ms):"]
    for turn, m in by_turn.items():
        lines.append(f"  turn {turn}: median {m['p50_ttft_ms']:9.2f}   P99 {m['p99_ttft_ms']:9.2f}"
                     f"   ({m['completed']} requests)")
    return "\n".join(lines)
