"""The access log: one INFO line per HTTP request once its response is sent (streamed too), with the completion's
tokens, finish reason and TTFT; health probes only at DEBUG; --no-access-log turns it off."""
import re
import time

import httpx

from server_utils import Server

LINE = re.compile(r'nanoslg\.access\[\d+\] INFO 127\.0\.0\.1:\d+ "(?P<method>\w+) (?P<path>\S+)" (?P<status>\d+)'
                  r'(?P<rest>.*) (?P<seconds>\d+\.\d+) s')


def _lines(log_path) -> list[dict]:
    with open(log_path) as f:
        return [m.groupdict() for m in map(LINE.search, f) if m]


def _traffic(url: str) -> None:
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
            "ignore_eos": True}
    assert httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=60).status_code == 200
    with httpx.stream("POST", f"{url}/v1/completions", timeout=60,
                      json={"model": "tiny", "prompt": "hello", "max_tokens": 3, "stream": True,
                            "ignore_eos": True}) as r:
        assert r.status_code == 200 and list(r.iter_lines())
    assert httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": [1, 2], "max_tokens": 9999},
                      timeout=60).status_code == 400
    assert httpx.get(f"{url}/v1/models").status_code == 200
    assert httpx.get(f"{url}/health").status_code == 200


def test_one_line_per_request_with_what_the_engine_did(tiny_chat_model, tmp_path):
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log, Server(tiny_chat_model, "--max-model-len", "256", "--served-model-name",
                                            "tiny", stderr=log) as srv:
        before = len(_lines(log_path))  # the readiness probes (at DEBUG: none)
        _traffic(srv.url)
        time.sleep(0.5)  # the streamed request's line comes after its last event
    lines = _lines(log_path)[before:]
    assert [(x["method"], x["path"], x["status"]) for x in lines] == [
        ("POST", "/v1/chat/completions", "200"), ("POST", "/v1/completions", "200"),
        ("POST", "/v1/completions", "400"), ("GET", "/v1/models", "200")]
    chat, stream, rejected, models = (x["rest"] for x in lines)
    assert re.fullmatch(r" \d+ prompt \+ 5 output tokens, finish length, TTFT \d+\.\d+ s,", chat), chat
    assert re.fullmatch(r" 1 prompt \+ 3 output tokens, finish length, TTFT \d+\.\d+ s,", stream), stream
    assert rejected == " rejected by the engine," and models == ""
    with open(log_path) as f:
        assert "[request " in f.read()  # each completion's line carries its request id


def test_no_access_log_turns_it_off(tiny_chat_model, tmp_path):
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log, Server(tiny_chat_model, "--max-model-len", "256", "--served-model-name",
                                            "tiny", "--no-access-log", stderr=log) as srv:
        _traffic(srv.url)
    assert _lines(log_path) == []
