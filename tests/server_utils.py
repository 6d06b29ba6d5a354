"""Start a real `nanoslg serve` on a free loopback port for tests."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`with Server(model, "--max-model-len", "512") as srv:` then srv.url ("http://127.0.0.1:PORT")."""

    def __init__(self, model: str, *args: str, api_key: str | None = None, timeout: float = 180.0, stderr=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "nanoslg", "serve", model, "--host", "127.0.0.1", "--port",
               str(self.port), *args]
        if "--api-server-count" not in args:  # the default depends on the machine's cores: tests say how many
            cmd += ["--api-server-count", "1"]
        if api_key:
            cmd += ["--api-key", api_key]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, stderr=stderr)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nanoslg serve exited with {self.proc.returncode} before it was ready")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("nanoslg serve was not healthy in time")
            time.sleep(0.3)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def make_tiny_chat_model(folder: str, tokenizer_dir: str, arch: str = "llama") -> str:
    """A tiny random model that shares a real tokenizer and chat template (SmolLM2's), for fast HTTP tests."""
    import json

    from tiny_models import make_tiny_model

    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        return folder
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with open(os.path.join(tokenizer_dir, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    make_tiny_model(arch, tmp, vocab_size=vocab)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        src = os.path.join(tokenizer_dir, name)
        if os.path.isfile(src):
            shutil.copy(src, os.path.join(tmp, name))
    os.replace(tmp, folder)
    return folder
