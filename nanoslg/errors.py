"""Why the engine refuses a request, each reason written once with the OpenAI error code it answers with.

Engine processes raise these (or send their code beside the message, OutputDelta.error_code); the HTTP server
turns the code into OpenAI's error shape, never parsing the text."""
from __future__ import annotations

from typing import Optional


class Rejection(ValueError):
    """A request the engine cannot serve as asked: a 400 (the client's request is at fault)."""

    code: Optional[str] = None


class ContextLengthExceeded(Rejection):
    code = "context_length_exceeded"

    def __init__(self, num_tokens: int, max_model_len: int):
        super().__init__(f"the prompt has {num_tokens} tokens, but max_model_len is {max_model_len} (prompt and "
                         f"output must fit in it)")


class MaxTokensTooLarge(Rejection):
    code = "context_length_exceeded"

    def __init__(self, max_tokens: int, num_tokens: int, max_model_len: int):
        super().__init__(f"max_tokens is {max_tokens}, but the prompt has {num_tokens} token{'s' * (num_tokens != 1)} "
                         f"and max_model_len is "
                         f"{max_model_len}: at most {max_model_len - num_tokens} tokens can be generated (ask for "
                         f"fewer, or leave max_tokens out)")


class EmptyPrompt(Rejection):
    code = "empty_prompt"

    def __init__(self) -> None:
        super().__init__("the prompt is empty")


class InvalidGrammar(Rejection):
    """A structured output the engine cannot build, or this model's vocabulary cannot follow."""

    code = "invalid_grammar"

    def __init__(self, detail: str):
        super().__init__(f"structured output: {detail}")
