"""`nanoslg tune` on CPU: it measures a tiny model, the defaults among the candidates, and writes its tuned config
(values only where a candidate beat the defaults by more than the noise); `serve` and `bench throughput` pick that
file up for the same model, device and layout (a log line says so; `nanoslg debug state` shows the values). A tuned
config that is corrupt or made for another engine is an error naming the file."""
import json
import os
import subprocess
import sys
import time

import pytest

from nanoslg import LLM, tuned_config
from nanoslg.entrypoints.debug import DebugClient
from nanoslg.entrypoints.tune_model import MIN_GAIN, Candidate, decide
from nanoslg.model_spec import ConfigError
from server_utils import Server
from tiny_models import make_tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _nanoslg(*args, env_dir, timeout=300):
    env = {**os.environ, "PYTHONPATH": ROOT, "NANOSLG_TUNED_DIR": env_dir}
    return subprocess.run([sys.executable, "-m", "nanoslg", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=timeout)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """(model folder, tuned-config folder, tune's output, its wall time) after one `nanoslg tune` run."""
    root = tmp_path_factory.mktemp("tune")
    folder = make_tiny_model("qwen2", str(root / "model"))
    tuned_dir = str(root / "tuned")
    started = time.monotonic()
    out = _nanoslg("tune", folder, "--max-model-len", "256", "--input-len", "32", "--output-len", "16",
                   env_dir=tuned_dir)
    return folder, tuned_dir, out, time.monotonic() - started


def test_tune_writes_a_config_with_its_decisions_in_under_two_minutes(tuned):
    folder, tuned_dir, out, elapsed = tuned
    assert out.returncode == 0, out.stderr
    assert elapsed < 120
    files = os.listdir(tuned_dir)
    assert len(files) == 1 and files[0].endswith("__cpu__tp1-pp1.json")
    doc = json.load(open(os.path.join(tuned_dir, files[0])))
    checked = doc["candidates"]
    assert 1 <= len(checked) <= 3 and all(c["measured_tokens_per_s"] > 0 for c in checked)
    defaults = doc["defaults"]
    assert len(defaults["runs"]) == 2 and all(x > 0 for x in defaults["runs"])
    assert defaults["running_target"] == 256  # the CPU's default max_num_seqs, measured as it is
    assert any("nano-batches" in d and "measured on the real step" in d for d in doc["decisions"])
    assert doc["profile"]["ops"]["gemm"] and doc["profile"]["steps"]
    # the values are set only when the best candidate beat the defaults by more than their noise (and 3 %)
    mean = sum(defaults["runs"]) / 2
    best = max(c["measured_tokens_per_s"] for c in checked)
    needed = max(MIN_GAIN, (max(defaults["runs"]) - min(defaults["runs"])) / mean)
    engine = doc["engine"]
    if best / mean - 1 > needed:
        assert engine["running_target"] >= 8 and engine["max_num_seqs"] >= engine["running_target"]
        assert engine["nano_batches"] == 1  # no streams on CPU: an overlap never wins there
        assert any(d.startswith("tuned beats the defaults") for d in doc["decisions"])
    else:
        assert engine == {} and any(d.startswith("the defaults are best") for d in doc["decisions"])
    # the table of predicted against measured (the defaults' two runs first), and the decisions, are printed
    assert "predicted tok/s" in out.stdout and "measured tok/s" in out.stdout and "not used" in out.stdout
    assert "defaults" in out.stdout


def _candidate(r: int, measured: float) -> Candidate:
    return Candidate(r, None, 1, "none", False, 0.0, 0.0, 0.0, 0.0, measured)


def test_tune_keeps_the_defaults_unless_a_candidate_beats_them_by_more_than_the_noise():
    a, b = _candidate(64, 103.0), _candidate(128, 101.0)
    verdict = decide([100.0, 104.0], [a, b])  # the defaults at 102 +- 4 %: a 1 % gain is noise
    assert verdict.chosen is None and verdict.reason.startswith("the defaults are best")
    assert abs(verdict.noise - 4 / 102) < 1e-9 and verdict.threshold == verdict.noise
    winner = _candidate(96, 110.0)
    verdict = decide([100.0, 104.0], [a, winner, b])
    assert verdict.chosen is winner and verdict.reason.startswith("tuned beats the defaults by +7.8%")
    # quiet runs: still 3 % at least, so a tuned config is never a coin toss
    assert decide([100.0, 100.0], [_candidate(64, 102.9)]).chosen is None
    assert decide([100.0, 100.0], [_candidate(64, 103.5)]).chosen is not None
    # a loud run: the noise decides (what loses to the defaults is never chosen)
    assert decide([80.0, 120.0], [_candidate(64, 130.0)]).chosen is None
    assert decide([100.0, 101.0], [_candidate(64, 90.0)]).chosen is None


@pytest.fixture(scope="module")
def pickup(tuned, tmp_path_factory):
    """(model folder, folder of a tuned config with values set, those values): the file tune wrote, with values
    set by hand when tune found the defaults best (which one wins on a CPU is up to the noise)."""
    folder, tuned_dir, _, _ = tuned
    name = os.listdir(tuned_dir)[0]
    doc = json.load(open(os.path.join(tuned_dir, name)))
    if not doc["engine"]:
        doc["engine"] = {"max_num_seqs": 24, "running_target": 24, "max_num_batched_tokens": 512,
                         "dense_batch_tokens": None, "nano_batches": 1, "nano_overlap": "none",
                         "sequence_parallel": False}
    out_dir = str(tmp_path_factory.mktemp("pickup"))
    tuned_config.write(os.path.join(out_dir, name), {k: v for k, v in doc.items() if k != "format"})
    return folder, out_dir, doc["engine"]


def test_bench_and_the_offline_engine_pick_the_tuned_config_up(pickup, monkeypatch):
    folder, tuned_dir, engine = pickup
    out = _nanoslg("bench", "throughput", folder, "--max-model-len", "256", "--input-len", "16", "--output-len",
                   "8", "--num-prompts", "8", "--warmup-prompts", "0", env_dir=tuned_dir)
    assert out.returncode == 0, out.stderr
    assert f"tuned config {tuned_dir}" in out.stderr and f"running_target={engine['running_target']}" in out.stderr
    assert "Tuned config:" in out.stdout and tuned_dir in out.stdout
    monkeypatch.setenv("NANOSLG_TUNED_DIR", tuned_dir)
    with LLM(folder, max_model_len=256, max_num_seqs=4) as llm, DebugClient(llm.config.run_dir) as debug:
        state = debug.state()
    assert state["tuned_config"].startswith(tuned_dir)
    assert state["running_target"] == min(4, engine["running_target"])  # a flag still caps it
    assert state["max_num_seqs"] == 4 and state["nano_batches"] == engine["nano_batches"]
    with LLM(folder, max_model_len=256, use_tuned_config=False) as llm:
        assert llm.config.tuned_config_path == "" and llm.config.running_target is None


def test_serve_picks_the_tuned_config_up(pickup, tmp_path, monkeypatch):
    folder, tuned_dir, engine = pickup
    monkeypatch.setenv("NANOSLG_TUNED_DIR", tuned_dir)
    log = open(tmp_path / "serve.log", "w+")
    with Server(folder, "--max-model-len", "256", stderr=log):
        out = _nanoslg("debug", "state", env_dir=tuned_dir, timeout=60)
    log.seek(0)
    assert f"tuned config {tuned_dir}" in log.read()
    state = json.loads(out.stdout)
    assert state["tuned_config"].startswith(tuned_dir)
    assert (state["running_target"], state["max_num_seqs"]) == (engine["running_target"], engine["max_num_seqs"])


def test_a_tuned_config_of_the_defaults_sets_nothing_and_says_so(pickup, tmp_path, caplog):
    folder, tuned_dir, _ = pickup
    doc = json.load(open(os.path.join(tuned_dir, os.listdir(tuned_dir)[0])))
    doc["engine"] = {}
    path = str(tmp_path / "defaults.json")
    tuned_config.write(path, {k: v for k, v in doc.items() if k != "format"})
    from nanoslg.config import EngineConfig

    with caplog.at_level("INFO", logger="nanoslg"):
        cfg = EngineConfig(model=folder, max_model_len=256, tuned_config=path).resolve()
    assert cfg.tuned_config_path == path and cfg.running_target is None and cfg.max_num_seqs == 256
    assert "the defaults (tune found nothing faster)" in caplog.text


def test_a_corrupt_or_mismatched_tuned_config_is_an_error_naming_the_file(pickup, tmp_path, monkeypatch):
    folder, tuned_dir, _ = pickup
    good = os.path.join(tuned_dir, os.listdir(tuned_dir)[0])
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    corrupt = bad_dir / os.path.basename(good)
    corrupt.write_text('{"format": "nanoslg-tuned-config/1", "identity": ')
    monkeypatch.setenv("NANOSLG_TUNED_DIR", str(bad_dir))
    with pytest.raises(ConfigError, match=f"tuned config {corrupt}: not valid JSON"):
        LLM(folder, max_model_len=256)
    out = _nanoslg("generate", folder, "-p", "1 2 3", "--max-model-len", "256", env_dir=str(bad_dir), timeout=60)
    assert out.returncode == 2 and str(corrupt) in out.stderr
    with LLM(folder, max_model_len=256, use_tuned_config=False) as llm:  # --no-tuned-config: ignored
        assert llm.config.tuned_config_path == ""
    # made for another model: refused, naming the file and what differs
    other = make_tiny_model("llama", str(tmp_path / "other"), hidden_size=96, num_attention_heads=6,
                            num_key_value_heads=2)
    with pytest.raises(ConfigError, match=f"tuned config {good} was made for another engine: model 'model'"):
        LLM(other, max_model_len=256, tuned_config=good)
    doc = json.load(open(good))
    doc["engine"]["running_target"] = -3
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=f"tuned config {wrong}: engine.running_target = -3"):
        LLM(folder, max_model_len=256, tuned_config=str(wrong))
    with pytest.raises(ConfigError, match="cannot read it"):
        LLM(folder, max_model_len=256, tuned_config=str(tmp_path / "missing.json"))
    assert tuned_config.FORMAT in open(good).read()


def test_tune_with_tensor_parallelism_weighs_nano_batching_and_sequence_parallelism(tmp_path):
    folder = make_tiny_model("llama", str(tmp_path / "model"))
    out = _nanoslg("tune", folder, "-tp", "2", "--max-model-len", "256", "--input-len", "32", "--output-len", "16",
                   "--validate", "1", env_dir=str(tmp_path / "tuned"))
    assert out.returncode == 0, out.stderr
    doc = json.load(open(os.path.join(tmp_path / "tuned", os.listdir(tmp_path / "tuned")[0])))
    assert doc["identity"]["tensor_parallel_size"] == 2
    decisions = " | ".join(doc["decisions"])
    assert "all-reduce beside GEMMs in 2 nano-batches" in decisions and "with sequence parallelism" in decisions
    assert {tuple(s[3:6]) for s in doc["profile"]["steps"]} >= {(1, "none", False), (1, "none", True),
                                                                 (2, "network", False), (2, "network", True)}
    assert doc["engine"].get("nano_batches", 1) == 1  # no streams on CPU (an empty engine: the defaults)


def test_gpus_searches_only_the_layouts_the_model_splits_into(tiny_model_dir):
    """`tune --gpus G` tries every tp x pp = G that the model can be split into (the check every engine makes at
    startup)."""
    from nanoslg.config import EngineConfig
    from nanoslg.entrypoints.tune import _layouts

    base = EngineConfig(model=tiny_model_dir("llama"), use_tuned_config=False).resolve()
    # 4 query heads (no TP 8), 2 KV heads (replicated on 4 ranks), 3 layers (no 4 stages)
    assert _layouts(base, 4) == [(2, 2), (4, 1)]
    assert _layouts(base, 3) == [(1, 3)]
    assert _layouts(base, 8) == [(4, 2)]
    assert _layouts(base, 16) == []
