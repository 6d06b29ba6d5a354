"""Process lifecycle, startup errors, bad requests and the debug socket."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import random_prompts
from nanoslg import LLM, SamplingParams
from nanoslg.model_spec import ConfigError
from nanoslg.launcher import EngineStartupError
from nanoslg.protocol import GenerateRequest, token_ids

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes; its parent (init) reaps it
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ")[1][0] != "Z"


def _wait_gone(pids, timeout=15.0) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p)]
        if not alive:
            return []
        time.sleep(0.2)
    return alive


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_killing_the_launcher_leaves_no_child(sig, tiny_model_dir):
    script = textwrap.dedent(f"""
        import json, sys, time
        from nanoslg import LLM
        llm = LLM({tiny_model_dir('llama')!r}, max_model_len=128)
        print(json.dumps(list(llm.engine.launcher.pids.values())), flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": ROOT})
    pids = json.loads(proc.stdout.readline())
    assert len(pids) == 3 and all(_alive(p) for p in pids)
    proc.send_signal(sig)
    proc.wait(30)
    assert _wait_gone(pids) == []


def test_close_stops_every_process(tiny_model_dir):
    llm = LLM(tiny_model_dir("llama"), max_model_len=128)
    pids = list(llm.engine.launcher.pids.values())
    run_dir = llm.config.run_dir
    assert oct(os.stat(run_dir).st_mode & 0o777) == "0o700"
    llm.close()
    assert _wait_gone(pids, 1.0) == []
    assert not os.path.exists(run_dir)


def _copy_model(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_unknown_architecture(tiny_model_dir, tmp_path):
    folder = _copy_model(tiny_model_dir("llama"), tmp_path / "m")
    cfg_path = os.path.join(folder, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["architectures"] = ["FooForCausalLM"]
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(ConfigError, match="unsupported model architecture.*FooForCausalLM"):
        LLM(folder)


def test_missing_weights(tiny_model_dir, tmp_path):
    folder = _copy_model(tiny_model_dir("llama"), tmp_path / "m")
    os.remove(os.path.join(folder, "model.safetensors"))
    with pytest.raises(EngineStartupError, match="worker0 failed to start.*no model.safetensors"):
        LLM(folder)


def test_corrupt_weights(tiny_model_dir, tmp_path):
    folder = _copy_model(tiny_model_dir("llama"), tmp_path / "m")
    path = os.path.join(folder, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(EngineStartupError, match="cannot read weights from .*model.safetensors"):
        LLM(folder)


def test_missing_tensor_is_named(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _copy_model(tiny_model_dir("llama"), tmp_path / "m")
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(EngineStartupError, match="lacks model.layers.1.mlp.up_proj.weight"):
        LLM(folder)


def test_bad_requests_fail_alone(tiny_model_dir):
    good = random_prompts(3, seed=20)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    with LLM(tiny_model_dir("llama"), max_model_len=64) as llm:
        outs = llm.generate([good[0], list(range(3, 80)), good[1], [9999], good[2]], params)
        assert [o.error is None for o in outs] == [True, False, True, False, True]
        assert "77 tokens" in outs[1].error and "max_model_len is 64" in outs[1].error
        assert "token id 9999 is outside the vocabulary" in outs[3].error
        assert all(len(outs[i].token_ids) == 6 for i in (0, 2, 4))
        # a raw request whose params are not the typed message fails alone, with the reason
        bad = {"temperature": -1.0}
        llm.engine.submit(GenerateRequest("bad", bad, prompt_ids=token_ids(good[0])))
        deltas = []
        while not deltas:
            deltas = llm.engine.poll_deltas(100)
        assert deltas[0].rid == "bad" and "params must be a SamplingParams message" in deltas[0].error
        with pytest.raises(ValueError, match="temperature must be a number >= 0"):  # validated at the edge
            SamplingParams(temperature=-1.0)
        # text needs a tokenizer, which this model folder lacks
        assert "no tokenizer" in llm.generate("hello", params)[0].error
        # the engine still serves
        assert llm.generate([good[0]], params)[0].token_ids == outs[0].token_ids


def test_debug_cli_follows_a_request_until_its_pages_are_free(tiny_model_dir):
    with LLM(tiny_model_dir("llama"), max_model_len=512) as llm:
        out = subprocess.run([sys.executable, "-m", "nanoslg", "debug", "--run-dir", llm.config.run_dir,
                              "submit", "5", "6", "7", "8", "--max-tokens", "300", "--ignore-eos", "--wait"],
                             capture_output=True, text=True, timeout=60, cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": ROOT})
        assert out.returncode == 0, out.stderr
        lines = {line.split(":", 1)[0]: line.split(":", 1)[1] for line in out.stdout.splitlines()}
        finished = json.loads(lines["finished"])
        assert finished["finish_reason"] == "length" and len(finished["output_ids"]) == 300
        after = json.loads(lines["after"])
        assert after["kv_pages_used"] == 0 and after["running"] == 0
        assert after["kv_pages_free"] == after["kv_pages_total"]
        running = [json.loads(line.split(":", 1)[1]) for line in out.stdout.splitlines()
                   if line.startswith("running:")]
        assert all(s["kv_pages_used"] > 0 for s in running)
        state = subprocess.run([sys.executable, "-m", "nanoslg", "debug", "--run-dir", llm.config.run_dir,
                                "state"], capture_output=True, text=True, timeout=60, cwd=ROOT,
                               env={**os.environ, "PYTHONPATH": ROOT})
        assert json.loads(state.stdout)["last_step"]["num_decode"] == 1
