"""`nanoslg chat`: a terminal chat that streams replies from a running nanoslg (or any OpenAI-compatible) server."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, cast

import httpx

HELP = "commands: /reset clears the history, /exit (or Ctrl-D) quits; Ctrl-C stops a reply"


class ChatError(Exception):
    """The server answered with an error: print its message; the session may go on."""


def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (default: %(default)s)")
    parser.add_argument("--model", default=None, help="model id (default: the first one from GET /v1/models)")
    parser.add_argument("--api-key", default=os.environ.get("NANOSLG_API_KEY"),
                        help="bearer token (default: $NANOSLG_API_KEY)")
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="a reply's length limit (default: the server's; prompt and reply must fit in its "
                             "max_model_len)")
    parser.add_argument("--prompt", default=None, help="send this one message, print the reply and exit")


def _error_message(resp: httpx.Response) -> str:
    """The OpenAI-shaped {"error": {"message": ...}} of an error response, else its raw text."""
    try:
        resp.read()
        body = resp.json()
        err = body.get("error", body) if isinstance(body, dict) else body
        msg = err.get("message") or err.get("detail") if isinstance(err, dict) else err
        if msg:
            return f"{msg} (HTTP {resp.status_code})"
    except Exception:  # not JSON, or not the expected shape
        pass
    return f"HTTP {resp.status_code}: {resp.text.strip()[:500] or resp.reason_phrase}"


def _sse_events(resp: httpx.Response):
    """Yield the data payload of each server-sent event (multi-line data joined with newlines)."""
    data: list[str] = []
    for line in resp.iter_lines():
        if not line:
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    if data:
        yield "\n".join(data)


def first_model(client: httpx.Client) -> str:
    resp = client.get("/v1/models")
    if resp.status_code >= 400:
        raise ChatError(_error_message(resp))
    try:
        models = resp.json().get("data") or []
    except (ValueError, AttributeError):
        raise ChatError(f"{resp.url} did not return an OpenAI model list") from None
    if not models:
        raise ChatError("the server lists no models; pass --model")
    return models[0]["id"]


def stream_reply(client: httpx.Client, body: dict[str, Any], out=None) -> tuple[str, dict[str, Any]]:
    """POST a streaming chat completion, writing content deltas to `out` as they come.

    Returns (text, stats). A KeyboardInterrupt closes the stream (so the server aborts the request); it and a
    ChatError propagate with the text shown so far on the exception as `.partial_text`.
    """
    out = out or sys.stdout
    start = time.monotonic()
    parts: list[str] = []
    usage, finish, chunks = None, None, 0
    try:
        with client.stream("POST", "/v1/chat/completions", json=body) as resp:
            if resp.status_code >= 400:
                raise ChatError(_error_message(resp))
            for data in _sse_events(resp):
                if data.strip() == "[DONE]":
                    break
                try:
                    chunk = json.loads(data)
                except ValueError:
                    raise ChatError(f"the server sent a bad stream event: {data[:200]!r}") from None
                if chunk.get("error"):
                    err = chunk["error"]
                    raise ChatError(err.get("message", str(err)) if isinstance(err, dict) else str(err))
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or []:
                    finish = choice.get("finish_reason") or finish
                    delta = (choice.get("delta") or {}).get("content")
                    if delta:
                        chunks += 1
                        parts.append(delta)
                        out.write(delta)
                        out.flush()
    except (KeyboardInterrupt, ChatError) as e:
        cast(Any, e).partial_text = "".join(parts)  # a KeyboardInterrupt gets it too: readers use getattr
        raise
    elapsed = time.monotonic() - start
    tokens = (usage or {}).get("completion_tokens", chunks)
    return "".join(parts), {"tokens": tokens, "seconds": elapsed, "finish_reason": finish}


def _stats(stats: dict[str, Any]) -> None:
    secs = stats["seconds"]
    text = f"[{stats['tokens']} tokens, {stats['tokens'] / secs if secs > 0 else 0.0:.1f} tok/s"
    if stats.get("finish_reason") == "length":
        text += ", hit the length limit"
    text += "]"
    if sys.stderr.isatty():
        text = f"\033[2m{text}\033[0m"
    print(text, file=sys.stderr, flush=True)


def _read_line(interactive: bool):
    """The next input line without its newline, or None at EOF."""
    if interactive:
        try:
            return input("> ")
        except EOFError:
            print(file=sys.stderr)
            return None
    line = sys.stdin.readline()
    return line.rstrip("\r\n") if line else None


def run_chat(args) -> int:
    for stream in (sys.stdout, sys.stderr):  # gibberish from a random model must not crash an ASCII terminal
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = httpx.Timeout(10.0, read=300.0)
    system = [{"role": "system", "content": args.system}] if args.system else []
    try:
        with httpx.Client(base_url=args.url.rstrip("/"), headers=headers, timeout=timeout) as client:
            model = args.model or first_model(client)
            params = {"model": model, "stream": True, "stream_options": {"include_usage": True},
                      "temperature": args.temperature}
            if args.max_tokens is not None:
                params["max_tokens"] = args.max_tokens
            if args.prompt is not None:
                try:
                    _, stats = stream_reply(client, {**params, "messages": system + [
                        {"role": "user", "content": args.prompt}]})
                except (KeyboardInterrupt, ChatError) as e:
                    if getattr(e, "partial_text", ""):
                        print(flush=True)
                    raise
                print(flush=True)
                _stats(stats)
                return 0
            return _interactive(client, params, system)
    except ChatError as e:
        print(f"nanoslg chat: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except (httpx.ConnectError, httpx.ConnectTimeout) as e:
        print(f"nanoslg chat: cannot reach the server at {args.url}: {e}", file=sys.stderr)
        return 1
    except httpx.TransportError as e:  # the server went away or stalled mid-reply
        print(f"\nnanoslg chat: connection to {args.url} failed: {str(e) or type(e).__name__}", file=sys.stderr)
        return 1


def _interactive(client: httpx.Client, params: dict[str, Any], system: list[dict[str, Any]]) -> int:
    """The read-send-print loop. Ctrl-C during a reply stops it; anywhere else (at the prompt) it exits 0."""
    tty = sys.stdin.isatty()
    if tty:
        print(f"chatting with {params['model']}; {HELP}", file=sys.stderr)
    history = list(system)
    try:
        while (line := _read_line(tty)) is not None:
            text = line.strip()
            if text in ("/exit", "/quit"):
                break
            if text == "/reset":
                history = list(system)
                print("[history cleared]", file=sys.stderr, flush=True)
            elif text in ("/help", "/?"):
                print(HELP, file=sys.stderr)
            elif text:
                history = _turn(client, params, history, line)
    except KeyboardInterrupt:
        print(file=sys.stderr)
    return 0


def _turn(client: httpx.Client, params: dict[str, Any], history: list[dict[str, Any]], line: str
          ) -> list[dict[str, Any]]:
    """Send one user message; return the history to go on with."""
    sent = history + [{"role": "user", "content": line}]
    try:
        reply, stats = stream_reply(client, {**params, "messages": sent})
    except ChatError as e:  # the turn failed: keep the history as it was
        if getattr(e, "partial_text", ""):
            print(flush=True)
        print(f"error: {e}", file=sys.stderr, flush=True)
        return history
    except KeyboardInterrupt as e:  # keep what was shown, so that the history matches the screen
        partial = getattr(e, "partial_text", "")
        print(flush=True)
        print("[interrupted]", file=sys.stderr, flush=True)
        return sent + [{"role": "assistant", "content": partial}] if partial else history
    print(flush=True)
    _stats(stats)
    return sent + [{"role": "assistant", "content": reply}]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="nanoslg chat", description=__doc__)
    add_chat_arguments(parser)
    return run_chat(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
