"""`nanoslg chat`: against a fake OpenAI-style SSE server (history, /reset, piping, stats, errors, Ctrl-C),
then against the real server when it is importable."""
import argparse
import asyncio
import importlib.util
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from nanoslg.entrypoints.chat import add_chat_arguments, run_chat
from server_utils import ROOT, Server, free_port

STATS = re.compile(r"^\[(\d+) tokens, [\d.]+ tok/s[^\]]*\]$", re.M)


class FakeServer:
    """Starlette + uvicorn in a thread. The reply to the n-th user turn is "echo n: <last message>",
    streamed one word per chunk, then a usage chunk and [DONE]. "bad" gets a 400; "slow" streams 200
    chunks 50 ms apart; bodies and aborted streams are recorded."""

    def __init__(self):
        import uvicorn
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse, StreamingResponse
        from starlette.routing import Route

        self.bodies, self.aborted, self.auth = [], [], []

        async def models(request):
            self.auth.append(request.headers.get("authorization"))
            return JSONResponse({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

        async def chat(request):
            body = await request.json()
            self.bodies.append(body)
            msgs = body["messages"]
            last = msgs[-1]["content"]
            if last == "bad":
                return JSONResponse({"error": {"message": "fake bad request", "type": "invalid_request_error",
                                               "code": 400}}, status_code=400)
            turn = sum(m["role"] == "user" for m in msgs)
            words = ["slow"] * 200 if last == "slow" else f"echo {turn}: {last}".split(" ")

            async def events():
                def sse(delta=None, finish=None, usage=None):
                    choices = [] if usage else [{"index": 0, "delta": delta or {}, "finish_reason": finish}]
                    chunk = {"id": "c1", "object": "chat.completion.chunk", "model": body["model"],
                             "choices": choices, "usage": usage}
                    return f"data: {json.dumps(chunk)}\n\n"

                done = False
                try:
                    yield sse({"role": "assistant", "content": ""})
                    for i, w in enumerate(words):
                        yield sse({"content": w if i == 0 else " " + w})
                        if last == "slow":
                            await asyncio.sleep(0.05)
                    yield sse(finish="stop")
                    yield sse(usage={"prompt_tokens": 3, "completion_tokens": len(words),
                                     "total_tokens": 3 + len(words)})
                    yield "data: [DONE]\n\n"
                    done = True
                finally:
                    if not done:
                        self.aborted.append(last)

            return StreamingResponse(events(), media_type="text/event-stream")

        app = Starlette(routes=[Route("/v1/models", models), Route("/v1/chat/completions", chat, methods=["POST"])])
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "fake server did not start"
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(5)


@pytest.fixture(scope="module")
def fake():
    srv = FakeServer()
    yield srv
    srv.stop()


@pytest.fixture
def server(fake):
    fake.bodies.clear()
    fake.aborted.clear()
    fake.auth.clear()
    return fake


def chat(argv, stdin="", monkeypatch=None, capsys=None):
    """Run `nanoslg chat` in-process; returns (rc, stdout, stderr)."""
    parser = argparse.ArgumentParser()
    add_chat_arguments(parser)
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    rc = run_chat(parser.parse_args(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def chat_proc(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "nanoslg.entrypoints.chat", *args], cwd=ROOT, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1"}, **kw)


def test_prompt_mode_streams_reply_and_stats(server, monkeypatch, capsys):
    monkeypatch.setenv("NANOSLG_API_KEY", "")
    rc, out, err = chat(["--url", server.url, "--prompt", "hi there", "--system", "be brief", "--api-key", "k1",
                         "--temperature", "0", "--max-tokens", "7"], monkeypatch=monkeypatch, capsys=capsys)
    assert rc == 0 and out == "echo 1: hi there\n"
    assert [int(n) for n in STATS.findall(err)] == [4]
    assert server.auth == ["Bearer k1"]
    (body,) = server.bodies
    assert body["model"] == "fake-model" and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["temperature"] == 0 and body["max_tokens"] == 7
    assert body["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]


def test_interactive_sends_history_and_reset_clears_it(server, monkeypatch, capsys):
    rc, out, err = chat(["--url", server.url, "--model", "m", "--system", "sys"],
                        stdin="one\n\ntwo\n/reset\nthree\n", monkeypatch=monkeypatch, capsys=capsys)
    assert rc == 0
    assert out.splitlines() == ["echo 1: one", "echo 2: two", "echo 1: three"]
    assert len(STATS.findall(err)) == 3 and "[history cleared]" in err
    sys_msg = {"role": "system", "content": "sys"}
    assert [b["messages"] for b in server.bodies] == [
        [sys_msg, {"role": "user", "content": "one"}],
        [sys_msg, {"role": "user", "content": "one"}, {"role": "assistant", "content": "echo 1: one"},
         {"role": "user", "content": "two"}],
        [sys_msg, {"role": "user", "content": "three"}],
    ]
    assert all(b["model"] == "m" for b in server.bodies)


def test_http_error_prints_message_and_keeps_session(server, monkeypatch, capsys):
    rc, out, err = chat(["--url", server.url], stdin="a\nbad\nb\n/exit\nnever sent\n",
                        monkeypatch=monkeypatch, capsys=capsys)
    assert rc == 0 and out.splitlines() == ["echo 1: a", "echo 2: b"]
    assert "fake bad request" in err
    # the failed turn is not kept in the history; nothing after /exit is sent
    assert [m["content"] for m in server.bodies[-1]["messages"]] == ["a", "echo 1: a", "b"]
    assert len(server.bodies) == 3


def test_http_error_in_prompt_mode_exits_1(server, monkeypatch, capsys):
    rc, out, err = chat(["--url", server.url, "--prompt", "bad"], monkeypatch=monkeypatch, capsys=capsys)
    assert rc == 1 and out == "" and "fake bad request" in err


def test_unreachable_server_is_one_line_and_exit_1(monkeypatch, capsys):
    rc, out, err = chat(["--url", f"http://127.0.0.1:{free_port()}", "--prompt", "x"],
                        monkeypatch=monkeypatch, capsys=capsys)
    assert rc == 1 and out == "" and len(err.strip().splitlines()) == 1 and "cannot reach" in err


def test_piped_stdin_subprocess(server):
    p = chat_proc("--url", server.url)
    out, err = p.communicate("hello\nworld\n", timeout=30)
    assert p.returncode == 0, err
    assert out.splitlines() == ["echo 1: hello", "echo 2: world"]
    assert len(STATS.findall(err)) == 2


def test_ctrl_c_stops_reply_then_ctrl_c_at_prompt_exits_0(server):
    p = chat_proc("--url", server.url)
    p.stdin.write("slow\n")
    p.stdin.flush()
    assert p.stdout.read(4) == "slow"  # the reply is streaming
    p.send_signal(signal.SIGINT)
    deadline = time.monotonic() + 10
    while "slow" not in server.aborted:  # closing the stream aborted the request on the server
        assert time.monotonic() < deadline, "the stream was not closed"
        time.sleep(0.05)
    p.stdin.write("after\n")
    p.stdin.flush()
    assert p.stdout.readline().endswith("\n")  # the cut reply's line is ended
    assert p.stdout.readline() == "echo 2: after\n"  # the partial reply stayed in the history
    err = ""
    while not STATS.search(err):  # the turn is over once its stats line is out
        line = p.stderr.readline()
        assert line, err
        err += line
    p.send_signal(signal.SIGINT)  # now waiting at the prompt
    out, rest = p.communicate(timeout=10)
    err += rest
    assert p.returncode == 0, err
    assert "[interrupted]" in err and "Traceback" not in err
    assert server.bodies[-1]["messages"][1]["role"] == "assistant"


real_server = pytest.mark.skipif(importlib.util.find_spec("nanoslg.server") is None
                                 or importlib.util.find_spec("nanoslg.server.app") is None,
                                 reason="nanoslg.server.app is not written yet")


@real_server
@pytest.mark.slow
def test_real_server_smollm2_answers_paris(smollm2_dir):
    with Server(smollm2_dir, "--max-model-len", "1024") as srv:
        r = subprocess.run([sys.executable, "-m", "nanoslg.entrypoints.chat", "--url", srv.url, "--prompt",
                            "What is the capital of France?", "--temperature", "0", "--max-tokens", "48"],
                           cwd=ROOT, capture_output=True, text=True, timeout=60,
                           env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout and STATS.search(r.stderr)


@real_server
def test_real_server_tiny_model_piped_two_turns(tiny_chat_model):
    with Server(tiny_chat_model, "--max-model-len", "512") as srv:
        p = chat_proc("--url", srv.url, "--max-tokens", "8", "--temperature", "0")
        out, err = p.communicate("hello\nand again\n", timeout=60)
    assert p.returncode == 0, err
    counts = [int(n) for n in STATS.findall(err)]  # one stats line per reply (the text is gibberish)
    assert len(counts) == 2 and all(1 <= n <= 8 for n in counts), err
    assert out.count("\n") >= 2 and "error" not in err
