"""Streaming detokenization and stop-string matching.

Two small, independent pieces used per request while streaming output:

* ``IncrementalDetokenizer`` turns a growing list of generated token ids into
  text deltas without ever emitting half a UTF-8 character, and without losing
  the leading spaces that SentencePiece-style decoders strip from the first
  token of a decode call.
* ``StopStringMatcher`` holds back text that could still turn into a stop
  string, so a stop string split across tokens/deltas never leaks to the client.
"""

from __future__ import annotations

# How many prompt tokens seed the decode window. The first generated token is
# decoded together with a little real context so that its leading space (and
# any merge behaviour of the decoder) comes out as in a full decode.
PROMPT_CONTEXT_TOKENS = 5

# What tokenizers put in place of an incomplete UTF-8 sequence.
REPLACEMENT_CHAR = "\ufffd"


def _special_ids_skipped_by_decode(tokenizer) -> set[int]:
    """Ids that ``decode(..., skip_special_tokens=True)`` drops.

    The Rust decoder skips exactly the added tokens flagged ``special``; use
    that set when we can so filtering ids up front is identical to decoding
    with skip_special_tokens. Fall back to the Python-level list otherwise.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "get_added_tokens_decoder"):
        return {i for i, tok in backend.get_added_tokens_decoder().items() if tok.special}
    return set(tokenizer.all_special_ids)


class IncrementalDetokenizer:
    """Emit text deltas for a growing sequence of generated token ids.

    Uses the prefix_offset/read_offset technique: ``ids[prefix_offset:read_offset]``
    is a short window of already-emitted tokens kept only as decoding context,
    and ``ids[read_offset:]`` are tokens whose text has not been emitted yet.
    Decoding both windows and taking the difference gives the new text with
    correct spacing; if the result ends in U+FFFD, a multi-byte character is
    still incomplete and we wait for more tokens. Each call decodes only the
    window, so cost does not grow with the length of the output.
    """

    def __init__(self, tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # Dropping skipped special ids before they enter the window is equivalent
        # to decoding with skip_special_tokens=True, and it avoids a stall where a
        # special token adds no text, so the offsets would never advance past it.
        self._skipped_ids = _special_ids_skipped_by_decode(tokenizer) if skip_special_tokens else set()
        context = [i for i in prompt_ids[-(PROMPT_CONTEXT_TOKENS * 4):] if i not in self._skipped_ids]
        context = context[-PROMPT_CONTEXT_TOKENS:]
        # Holds only the current window: ids before prefix_offset are dropped
        # in add() once they can no longer be decoding context.
        self._ids: list[int] = list(context)
        self._prefix_offset = 0
        self._read_offset = len(context)

    def _decode(self, ids: list[int]) -> str:
        # With skip_special_tokens=False the special ids stay in the window and
        # must be rendered, so pass the flag through.
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def add(self, new_ids: list[int]) -> str:
        """Append generated ids; return the text that became decodable (may be "")."""
        self._ids.extend(i for i in new_ids if i not in self._skipped_ids)
        if len(self._ids) == self._read_offset:
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            # Incomplete UTF-8 (or nothing new yet): wait for more tokens.
            return ""
        delta = new_text[len(prefix_text):]
        # Slide the window: what was pending becomes context for the next call.
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        # Drop ids that can never be part of a window again, so memory stays
        # bounded by the window too.
        if self._prefix_offset > 0:
            del self._ids[:self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        return delta


class StopStringMatcher:
    """Hold back text that might start a stop string; detect the stop.

    Invariant: the held-back text is the longest suffix of the unemitted text
    that is a proper prefix of some stop string. Any stop string occurrence
    must therefore begin inside held-back + new text, so we never need to look
    at text that was already emitted.
    """

    def __init__(self, stop: list[str] | None, include_stop_str_in_output: bool = False):
        # Empty stop strings would match everywhere; ignore them.
        self._stops = sorted({s for s in (stop or []) if s}, key=len, reverse=True)
        self._include_stop = include_stop_str_in_output
        self._held = ""
        self._emitted: list[str] = []
        self.stopped = False
        self.matched_stop: str | None = None

    @property
    def text(self) -> str:
        """Everything emitted so far (the final output once the request ends)."""
        return "".join(self._emitted)

    def _emit(self, out: str) -> str:
        if out:
            self._emitted.append(out)
        return out

    def feed(self, text: str) -> tuple[str, bool]:
        """Add new text; return (text safe to emit now, stopped)."""
        if self.stopped:
            return "", True
        if not self._stops:
            return self._emit(text), False  # Pass-through: zero hold-back.
        buf = self._held + text

        # Earliest occurrence wins; on a tie the longest stop (sorted first).
        best_pos, best_stop = -1, None
        for stop in self._stops:
            pos = buf.find(stop)
            if pos != -1 and (best_pos == -1 or pos < best_pos):
                best_pos, best_stop = pos, stop
        if best_stop is not None:
            self.stopped = True
            self.matched_stop = best_stop
            self._held = ""
            out = buf[:best_pos] + (best_stop if self._include_stop else "")
            return self._emit(out), True

        hold = self._longest_partial_stop_suffix(buf)
        self._held = buf[len(buf) - hold:] if hold else ""
        return self._emit(buf[:len(buf) - hold]), False

    def _longest_partial_stop_suffix(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of a stop."""
        best = 0
        for stop in self._stops:
            # Only lengths longer than the current best can improve it.
            for k in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:k]):
                    best = k
                    break
        return best

    def flush(self) -> str:
        """Release held-back text when the request ends for another reason."""
        if self.stopped:
            return ""
        out, self._held = self._held, ""
        return self._emit(out)
