"""Tests for streaming detokenization and stop-string matching."""

import os
import random

import pytest

from tokenizer_proc.detokenizer import IncrementalDetokenizer, StopStringMatcher

TOKENIZER_PATH = os.environ.get("NANOSLG_TEST_TOKENIZER", "/tmp/smolhf")
MULTIBYTE_TEXT = "héllo wörld — 你好 🙂 done"


@pytest.fixture(scope="module")
def tokenizer():
    if not os.path.isfile(os.path.join(TOKENIZER_PATH, "tokenizer.json")):
        pytest.skip(f"no tokenizer at {TOKENIZER_PATH} (set NANOSLG_TEST_TOKENIZER)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER_PATH)


@pytest.fixture(scope="module")
def sentencepiece_tokenizer():
    """A tiny Metaspace (SentencePiece-style) tokenizer built offline.

    Its decoder strips the leading space of the first token in a decode call,
    which is exactly what breaks naive one-token-at-a-time decoding.
    """
    from tokenizers import SentencePieceBPETokenizer
    from transformers import PreTrainedTokenizerFast

    corpus = ["hello world this is a test of the sentence piece tokenizer",
              "the quick brown fox jumps over the lazy dog"] * 20
    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator(corpus, vocab_size=80, min_frequency=1, show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=sp._tokenizer)


def stream(detok, ids, chunk_sizes=(1,)):
    """Feed ids in chunks (cycling through chunk_sizes); return the deltas."""
    deltas, i, k = [], 0, 0
    while i < len(ids):
        n = chunk_sizes[k % len(chunk_sizes)]
        deltas.append(detok.add(ids[i:i + n]))
        i, k = i + n, k + 1
    return deltas


def encode(tok, text):
    return tok.encode(text, add_special_tokens=False)


# ---------------------------------------------------------------- detokenizer

def test_multibyte_one_token_at_a_time(tokenizer):
    ids = encode(tokenizer, MULTIBYTE_TEXT)
    # Sanity: the text really does split characters across tokens.
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    deltas = stream(IncrementalDetokenizer(tokenizer, prompt_ids=[]), ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)
    assert "".join(deltas) == MULTIBYTE_TEXT


@pytest.mark.parametrize("chunks", [(2,), (3,), (1, 4, 2), (100,)])
def test_multibyte_in_chunks(tokenizer, chunks):
    ids = encode(tokenizer, MULTIBYTE_TEXT + " and more: ñ, ü, 日本語, 🎉🎉")
    deltas = stream(IncrementalDetokenizer(tokenizer, prompt_ids=[]), ids, chunks)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)


def test_leading_space_after_prompt(tokenizer):
    prompt = encode(tokenizer, "User: say hi\nAssistant:")
    generated = encode(tokenizer, " Hello there, friend")
    deltas = stream(IncrementalDetokenizer(tokenizer, prompt), generated)
    assert deltas[0].startswith(" ")
    assert "".join(deltas) == " Hello there, friend"


def test_special_tokens_skipped_and_rendered(tokenizer):
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    prompt_ids = encode(tokenizer, prompt)
    ids = encode(tokenizer, "Sure — 你好!") + [tokenizer.eos_token_id]
    skipped = "".join(stream(IncrementalDetokenizer(tokenizer, prompt_ids), ids))
    assert skipped == tokenizer.decode(ids, skip_special_tokens=True) == "Sure — 你好!"
    rendered = "".join(stream(IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=False), ids))
    assert rendered == tokenizer.decode(ids, skip_special_tokens=False)
    assert rendered.endswith(tokenizer.eos_token)


def test_long_random_stream_matches_full_decode(tokenizer):
    rng = random.Random(0)
    words = ["the", "naïve", "café", "—", "北京", "🙂", "x", "\n", "  ", "déjà", "vu"]
    text = " ".join(rng.choice(words) for _ in range(400))
    ids = encode(tokenizer, text)
    detok = IncrementalDetokenizer(tokenizer, encode(tokenizer, "Prompt text:"))
    deltas = stream(detok, ids, (1, 2, 1, 3))
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text
    # The retained window stays small no matter how long the output is.
    assert len(detok._ids) < 16


def test_sentencepiece_leading_spaces(sentencepiece_tokenizer):
    tok = sentencepiece_tokenizer
    prompt = encode(tok, "the quick brown")
    ids = encode(tok, "fox says hello world")
    # Naive per-token decode loses the spaces; the incremental one must not.
    assert "".join(tok.decode([i]) for i in ids) != " fox says hello world"
    deltas = stream(IncrementalDetokenizer(tok, prompt), ids)
    assert "".join(deltas) == " fox says hello world"
    # Without a prompt the first word has no leading space, as in a full decode.
    no_prompt = "".join(stream(IncrementalDetokenizer(tok, []), ids))
    assert no_prompt == tok.decode(ids) == "fox says hello world"


# ---------------------------------------------------------- stop-string matcher

def feed_all(matcher, chunks):
    out = []
    for c in chunks:
        text, stopped = matcher.feed(c)
        out.append(text)
        if stopped:
            return "".join(out), True
    return "".join(out), False


def test_stop_split_across_chunks():
    m = StopStringMatcher(["STOP", "\n\n"])
    assert m.feed("abc ST") == ("abc ", False)
    assert m.feed("O") == ("", False)
    assert m.feed("P tail") == ("", True)
    assert m.text == "abc "
    assert m.matched_stop == "STOP"
    # After stopping, further input and flush produce nothing.
    assert m.feed("more") == ("", True)
    assert m.flush() == ""
    assert m.text == "abc "


def test_near_miss_prefix_is_released():
    m = StopStringMatcher(["STOP", "\n\n"])
    assert m.feed("ST") == ("", False)
    assert m.feed("X") == ("STX", False)
    assert m.feed("y\n") == ("y", False)
    assert m.feed("z") == ("\nz", False)
    assert m.text == "STXy\nz"


def test_include_stop_str_in_output():
    m = StopStringMatcher(["STOP", "\n\n"], include_stop_str_in_output=True)
    assert feed_all(m, ["abc ST", "O", "P tail"]) == ("abc STOP", True)
    assert m.text == "abc STOP"


def test_flush_returns_held_text():
    m = StopStringMatcher(["STOP", "\n\n"])
    assert m.feed("end\n") == ("end", False)
    assert m.feed("S") == ("\n", False)  # "\nS" can't become a stop; "S" can
    assert m.flush() == "S"
    assert m.text == "end\nS"
    assert m.flush() == ""


def test_earliest_stop_wins_and_overlapping_prefixes():
    m = StopStringMatcher(["bcd", "abcx"])
    assert feed_all(m, ["xab", "cd rest"]) == ("xa", True)
    m = StopStringMatcher(["aab"])
    assert m.feed("aaa") == ("a", False)  # "aa" may still become "aab"
    assert m.feed("b") == ("", True)
    assert m.text == "a"


def test_no_stop_strings_pass_through():
    for stops in (None, [], [""]):
        m = StopStringMatcher(stops)
        assert m.feed("ST") == ("ST", False)
        assert m.feed("\n") == ("\n", False)
        assert m.flush() == ""
        assert m.text == "ST\n"


# ----------------------------------------------------------------- combined

def test_detokenize_then_stop_across_token_boundaries(tokenizer):
    text = "The answer is 42 — 你好.\n\nIgnored trailing text"
    ids = encode(tokenizer, text)
    stop = "42 — 你"
    # The stop string is not contained in any single token's text.
    assert not any(stop in tokenizer.decode([i]) for i in ids)
    detok = IncrementalDetokenizer(tokenizer, encode(tokenizer, "Q: what?\nA:"))
    matcher = StopStringMatcher([stop, "\n\n"])
    emitted, stopped = [], False
    for tid in ids:
        out, stopped = matcher.feed(detok.add([tid]))
        emitted.append(out)
        assert "\ufffd" not in out
        if stopped:
            break
    assert stopped
    assert "".join(emitted) == matcher.text == "The answer is "
    assert matcher.matched_stop == stop


def test_combined_length_finish_flushes(tokenizer):
    text = "line one\n"  # ends with a held "\n" that could start "\n\n"
    ids = encode(tokenizer, text)
    detok, matcher = IncrementalDetokenizer(tokenizer, []), StopStringMatcher(["\n\n"])
    out = "".join(matcher.feed(detok.add([t]))[0] for t in ids)
    assert out == "line one"
    assert out + matcher.flush() == text == matcher.text
