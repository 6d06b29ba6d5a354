import argparse
import json
import os
import time

import pytest

from nanoslg import model_registry as reg
from nanoslg.entrypoints.cli import add_pull_arguments, run_pull
from nanoslg.model_spec import ConfigError


@pytest.fixture
def tmp_models(tmp_path, monkeypatch):
    """An empty private cache, so these tests never touch (or depend on) the shared one."""
    d = tmp_path / "models"
    monkeypatch.setenv("NANOSLG_MODELS_DIR", str(d))
    return d


def _fake_pulled(models, name):
    """A folder that passes the cache's completeness check without running a conversion."""
    folder = models / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (folder / "model.safetensors").write_bytes(b"")
    return str(folder)


def _cli(argv):
    parser = argparse.ArgumentParser(prog="nanoslg pull")
    add_pull_arguments(parser)
    return run_pull(parser.parse_args(argv))


def test_models_dir_env_and_default(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOSLG_MODELS_DIR", str(tmp_path))
    assert reg.models_dir() == str(tmp_path)
    monkeypatch.delenv("NANOSLG_MODELS_DIR")
    assert reg.models_dir() == os.path.expanduser("~/.cache/nanoslg/models")


def test_resolve_existing_folder(tmp_path, tmp_models, monkeypatch):
    folder = tmp_path / "my-model"
    folder.mkdir()
    assert reg.resolve_model_path(str(folder)) == str(folder)
    monkeypatch.chdir(tmp_path)
    assert reg.resolve_model_path("my-model") == str(folder)  # relative paths come back absolute


def test_resolve_pulled_name(tmp_models):
    path = _fake_pulled(tmp_models, "mine")
    assert reg.resolve_model_path("mine") == path


def test_resolve_unknown_name(tmp_models):
    with pytest.raises(ConfigError) as e:
        reg.resolve_model_path("no-such-model")
    msg = str(e.value)
    assert "no-such-model" in msg and "neither a folder" in msg
    assert reg.DEFAULT_MODEL in msg  # lists what could be pulled instead


def test_pull_missing_gguf(tmp_models):
    with pytest.raises(reg.PullError, match="/nonexistent.gguf"):
        reg.pull(name="x", gguf="/nonexistent.gguf", progress=False)


def test_pull_bad_arguments(tmp_models):
    with pytest.raises(reg.PullError, match="needs a name"):
        reg.pull(gguf="/nonexistent.gguf", progress=False)
    with pytest.raises(reg.PullError, match="unknown model 'nope'"):
        reg.pull("nope", progress=False)
    with pytest.raises(reg.PullError, match="plain folder name"):
        reg.pull("../escape", gguf="/nonexistent.gguf", progress=False)


def test_failed_conversion_leaves_nothing(tmp_path, tmp_models):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file")
    with pytest.raises(reg.PullError, match="cannot convert .*junk.gguf"):
        reg.pull(name="junk", gguf=str(junk), progress=False)
    # Neither the target nor a staging folder may survive the failure.
    assert os.listdir(tmp_models) == []


def test_cli_prints_folder(tmp_models, capsys):
    path = _fake_pulled(tmp_models, "mine")
    assert _cli(["mine"]) == 0
    assert capsys.readouterr().out.strip() == path


def test_cli_errors(tmp_models, capsys):
    assert _cli(["--gguf", "/nonexistent.gguf", "--name", "x"]) == 1
    err = capsys.readouterr().err
    assert "/nonexistent.gguf" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as e:  # argparse-style usage error
        _cli(["--gguf", "/nonexistent.gguf"])
    assert e.value.code == 2 and "--name" in capsys.readouterr().err


@pytest.mark.slow
def test_pull_default_model():
    """Pulls into the shared cache (a no-op after the first run), so later tests can use the real model."""
    path = reg.pull(reg.DEFAULT_MODEL)
    assert path == os.path.join(reg.models_dir(), reg.DEFAULT_MODEL)
    with open(os.path.join(path, "config.json")) as f:
        assert json.load(f)["architectures"] == ["LlamaForCausalLM"]
    for name in ("model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert os.path.isfile(os.path.join(path, name)), name

    start = time.monotonic()
    assert reg.pull(reg.DEFAULT_MODEL) == path
    assert reg.resolve_model_path(None) == path
    assert time.monotonic() - start < 2.0
