"""The web chat page, driven in a real headless Chromium against a real `nanoslg serve`.

Needs Debian's chromium (/usr/bin/chromium), Node and `npm install` in tests/browser. Without them the
test is skipped locally, but fails under CI (env var CI set), where they must be installed.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess

import pytest

from server_utils import ROOT, Server

CHROMIUM = "/usr/bin/chromium"
BROWSER_DIR = os.path.join(ROOT, "tests", "browser")
SCRIPT = os.path.join(BROWSER_DIR, "chat_page.mjs")
SCREENSHOT = os.path.join(ROOT, "test-artifacts", "chat_page.png")


def _missing() -> list[str]:
    missing = []
    if not os.access(CHROMIUM, os.X_OK):
        missing.append(f"{CHROMIUM} (apt-get install -y chromium)")
    if shutil.which("node") is None:
        missing.append("node")
    if not os.path.isdir(os.path.join(BROWSER_DIR, "node_modules", "playwright-core")):
        missing.append("tests/browser/node_modules (cd tests/browser && npm ci)")
    return missing


MISSING = _missing()
pytestmark = pytest.mark.skipif(bool(MISSING) and not os.environ.get("CI"),
                                reason="browser test needs " + ", ".join(MISSING))


def _png_size(path: str) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


@pytest.mark.parametrize("api_servers", ["1", "2"], ids=["1api", "2api"])
def test_chat_page_streams_a_reply(tiny_chat_model, api_servers):
    assert not MISSING, "CI must install the browser test's tools: missing " + ", ".join(MISSING)
    os.makedirs(os.path.dirname(SCREENSHOT), exist_ok=True)
    if os.path.exists(SCREENSHOT):
        os.remove(SCREENSHOT)

    with Server(tiny_chat_model, "--max-model-len", "1024", "--api-server-count", api_servers) as srv:
        proc = subprocess.run(["node", SCRIPT, srv.url, SCREENSHOT], cwd=BROWSER_DIR,
                              capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"chat_page.mjs exited {proc.returncode}\n{proc.stderr}\n{proc.stdout}"
    summary = json.loads(proc.stdout)

    assert summary["userText"] == "What is the capital of France?"
    assert summary["model"] and summary["model"] != "model unavailable"
    assert summary["finalText"].strip(), summary
    # Streamed: the reply was rendered at two or more different non-empty lengths before it was done.
    assert len({n for n in summary["lengthsSeen"] if n > 0}) >= 2, summary["lengthsSeen"]
    assert "tok/s" in summary["stats"], summary["stats"]
    assert summary["stopEnabledWhileStreaming"] and summary["sendEnabledAfter"], summary

    width, height = _png_size(SCREENSHOT)
    assert width >= 800 and height >= 600, (width, height)
    assert os.path.getsize(SCREENSHOT) > 10_000, "screenshot is suspiciously small"
