"""Two "nodes" on loopback (two launchers, --nnodes 2, PP=2 across them): the same tokens as one process; a peer
without the shared secret refused and logged; a dead or missing node failing the engine fast, naming the node."""
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import zmq

from conftest import random_prompts
from nanoslg import LLM, SamplingParams, protocol
from nanoslg.engine_client import EngineDeadError
from nanoslg.launcher import EngineStartupError
from nanoslg.model_spec import ConfigError
from nanoslg.protocol import NodeHello, Ready

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET = "a-shared-secret-for-the-tests"
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture
def addr(monkeypatch):
    monkeypatch.setenv("NANOSLG_CLUSTER_SECRET", SECRET)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def _node1(folder: str, addr: str, *extra: str, secret: str = SECRET) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nanoslg", "serve", folder, "-pp", "2", "--max-model-len", "128",
                             "--nnodes", "2", "--node-rank", "1", "--dist-init-addr", addr, *extra], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": ROOT, "NANOSLG_CLUSTER_SECRET": secret})


def _node0(folder: str, addr: str, **extra) -> LLM:
    return LLM(folder, max_model_len=128, pipeline_parallel_size=2, nnodes=2, node_rank=0, dist_init_addr=addr,
               **extra)


def _children(pid: int) -> list:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_two_nodes_give_the_tokens_of_one_process(tiny_model_dir, hf_reference, addr):
    folder = tiny_model_dir("llama")
    prompts = random_prompts(6, seed=50)
    node1 = _node1(folder, addr)
    try:
        with _node0(folder, addr) as llm:
            assert llm.engine.info["worker1"]["layers"] == [2, 3]  # stage 1 runs on node 1
            got = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    finally:
        code = node1.wait(30)
    assert got == hf_reference(folder, prompts, 12)
    assert code == 0  # node 0 shutting down stops node 1 cleanly


def test_a_peer_without_the_secret_is_refused_and_logged(tiny_model_dir, addr, caplog):
    folder = tiny_model_dir("llama")
    node1 = _node1(folder, addr, "--node-join-timeout", "5", secret="not-the-shared-secret-at-all")
    host, port = addr.rsplit(":", 1)
    ctx = zmq.Context()
    stranger = ctx.socket(zmq.DEALER)  # no CURVE at all, claiming to be node 1 and its worker
    stranger.setsockopt(zmq.LINGER, 0)
    stranger.connect(f"tcp://{host}:{int(port) + 1}")
    stranger.send(protocol.encode(NodeHello(1, "forged")))
    stranger.send(protocol.encode(Ready("worker1", {"num_pages": 10 ** 9})))
    caplog.set_level(logging.WARNING, logger="nanoslg.cluster")
    try:
        with pytest.raises(EngineStartupError, match="node 1 did not join within 5 s"):
            _node0(folder, addr, node_join_timeout_s=5)
    finally:
        stranger.close()
        ctx.term()
        assert node1.wait(30) == 1  # node 1 never heard from node 0 either
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert refusals and "wrong cluster secret, or not a nanoslg node" in refusals[0]


def test_killing_a_worker_of_the_other_node_fails_the_engine_fast(tiny_model_dir, addr):
    folder = tiny_model_dir("llama")
    node1 = _node1(folder, addr)
    llm = _node0(folder, addr)
    try:
        ours = list(llm.engine.launcher.pids.values())
        theirs = _children(node1.pid)
        assert len(theirs) == 1
        os.kill(theirs[0], signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(EngineDeadError, match="node 1: worker1 was killed by SIGKILL"):
            llm.generate(random_prompts(2, seed=51), SamplingParams(max_tokens=200, ignore_eos=True))
        assert time.monotonic() - start < 10
    finally:
        llm.close()
    assert node1.wait(30) == 1
    deadline = time.monotonic() + 15
    while any(_alive(p) for p in ours + theirs) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in ours + theirs if _alive(p)]


def test_nodes_with_different_settings_are_refused(tiny_model_dir, addr):
    folder = tiny_model_dir("llama")
    node1 = _node1(folder, addr, "--max-num-seqs", "7")
    try:
        with pytest.raises(EngineStartupError, match="node 1 runs a different engine configuration"):
            _node0(folder, addr)
    finally:
        assert node1.wait(30) == 1  # told why, node 1 stops at once


def test_a_cluster_needs_a_secret(tiny_model_dir, addr, monkeypatch):
    monkeypatch.delenv("NANOSLG_CLUSTER_SECRET")
    with pytest.raises(ConfigError, match="needs a shared secret of at least 16 bytes"):
        _node0(tiny_model_dir("llama"), addr)
