import os
import random
import signal
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from tiny_models import VOCAB, hf_greedy, make_tiny_model  # noqa: E402

# A shell starts background jobs (`pytest ... &`) with SIGINT ignored, and child processes inherit that: the tests
# that press Ctrl-C on a child would see it ignored. A handler here is reset to the default in every child instead.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """arch -> folder of a tiny random HF model (fp32), made once per session."""
    root = tmp_path_factory.mktemp("tiny-models")
    return lambda arch: make_tiny_model(arch, str(root / arch))


def random_prompts(n: int, seed: int = 0, lengths=None) -> list:
    rng = random.Random(seed)
    lengths = lengths or [rng.randrange(3, 60) for _ in range(n)]
    return [[rng.randrange(3, VOCAB) for _ in range(k)] for k in lengths]


@pytest.fixture(scope="session")
def hf_reference():
    """Memoised HF greedy continuations: (folder, prompts, n) -> token lists."""
    cache = {}

    def get(folder, prompts, n):
        key = (folder, tuple(map(tuple, prompts)), n)
        if key not in cache:
            cache[key] = hf_greedy(folder, prompts, n)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def hf_to_max_len(hf_reference):
    """HF greedy continuations of requests without max_tokens: each runs until prompt + output = max_model_len."""

    def get(folder, prompts, max_model_len):
        full = hf_reference(folder, prompts, max_model_len - min(len(p) for p in prompts))
        return [out[:max_model_len - len(p)] for p, out in zip(prompts, full)]

    return get


# A request without max_tokens runs to max_model_len, and the admission cannot know how long it will run until
# requests like it have finished: requests that can outgrow the KV pool and be preempted.
UNBOUNDED = dict(max_tokens=None, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="session")
def smollm2_dir():
    from nanoslg.model_registry import pull

    return pull("smollm2-135m-instruct", progress=False)


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory, smollm2_dir):
    """A tiny random Llama with SmolLM2's tokenizer and chat template."""
    from server_utils import make_tiny_chat_model

    return make_tiny_chat_model(str(tmp_path_factory.mktemp("tiny-chat") / "model"), smollm2_dir)
