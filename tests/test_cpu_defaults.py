"""CPU defaults that fit the CPU: --dtype auto picks a dtype the CPU computes natively, and a CPU worker's torch
threads leave the front-end processes a core where that is cheap. No model is loaded."""
import logging
from types import SimpleNamespace

import pytest
import torch

from gpu_workers import cpu_features
from gpu_workers.device_choice import choose_dtype, resolve_dtype
from gpu_workers.worker_proc import cpu_threads

SPR_FLAGS = "fpu sse2 avx2 avx512f avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8"
ICL_FLAGS = "fpu sse2 avx2 avx512f avx512vl"


def _cpuinfo(tmp_path, flags):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: {flags}\n\nprocessor\t: 1\n"
                    f"flags\t\t: {flags}\n")
    return str(path)


def _cfg(dtype="auto", config_dtype="bfloat16"):
    return SimpleNamespace(dtype=dtype, model_spec=SimpleNamespace(torch_dtype=config_dtype))


@pytest.fixture
def fake_cpu(monkeypatch, tmp_path):
    """fake_cpu(flags) makes cpu_features read a /proc/cpuinfo with those flags (None: unreadable)."""
    def use(flags):
        path = str(tmp_path / "absent") if flags is None else _cpuinfo(tmp_path, flags)
        monkeypatch.setattr(cpu_features, "CPUINFO", path)
    return use


def test_flags_are_read_from_cpuinfo(tmp_path):
    assert cpu_features.native_bf16(_cpuinfo(tmp_path, SPR_FLAGS)) == (True, "this CPU has AVX512-BF16, AMX-BF16")
    assert cpu_features.native_bf16(_cpuinfo(tmp_path, ICL_FLAGS)) == (False, "this CPU has no AVX512-BF16/AMX-BF16")
    assert cpu_features.native("float16", _cpuinfo(tmp_path, "avx2 amx_fp16"))[0]
    assert not cpu_features.native("float16", _cpuinfo(tmp_path, ICL_FLAGS))[0]
    ok, why = cpu_features.native_bf16(str(tmp_path / "absent"))
    assert not ok and "unreadable" in why
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert not cpu_features.native_bf16(str(arm))[0]


@pytest.mark.parametrize("flags, want", [(SPR_FLAGS, "bfloat16"), (ICL_FLAGS, "float32"), (None, "float32")])
def test_auto_on_cpu_follows_the_cpu(fake_cpu, caplog, flags, want):
    fake_cpu(flags)
    with caplog.at_level(logging.INFO, logger="nanoslg.worker"):
        assert resolve_dtype(_cfg(), torch.device("cpu")) is getattr(torch, want)
    [record] = [r for r in caplog.records if r.name == "nanoslg.worker"]
    assert record.levelno == logging.INFO  # a routine start-up fact (at the default log level, it shows)
    line = record.getMessage()
    assert line.startswith(f"dtype auto on cpu: {want} (config says bfloat16")
    if want == "bfloat16":
        assert "has AVX512-BF16, AMX-BF16" in line
    elif flags is None:
        assert "unreadable" in line
    else:
        assert line == "dtype auto on cpu: float32 (config says bfloat16, but this CPU has no AVX512-BF16/AMX-BF16)"


@pytest.mark.parametrize("flags", [SPR_FLAGS, ICL_FLAGS])
@pytest.mark.parametrize("asked", ["float32", "bfloat16", "float16"])
def test_explicit_dtype_wins(fake_cpu, caplog, flags, asked):
    fake_cpu(flags)
    with caplog.at_level(logging.INFO, logger="nanoslg.worker"):
        assert resolve_dtype(_cfg(dtype=asked), torch.device("cpu")) is getattr(torch, asked)
    assert not caplog.records  # nothing was decided for the user


def test_choice_rules():
    yes = lambda dtype: (True, "yes")  # noqa: E731
    no = lambda dtype: (False, "no")  # noqa: E731
    assert choose_dtype("auto", "float16", "cpu", no) == ("float32", "config says float16, but no")
    assert choose_dtype("auto", "float16", "cpu", yes) == ("float16", "config says float16 and yes")
    assert choose_dtype("auto", "float32", "cpu", yes) == ("float32", "config says float32")
    assert choose_dtype("auto", "float64", "cpu", yes)[0] == "float32"
    # GPUs keep config.json's dtype whatever the host CPU has.
    assert choose_dtype("auto", "bfloat16", "cuda", no) == ("bfloat16", "config says bfloat16")
    assert choose_dtype("float32", "bfloat16", "cuda", no) == ("float32", "asked for")


def test_no_log_line_without_a_choice(fake_cpu, caplog):
    fake_cpu(ICL_FLAGS)
    with caplog.at_level(logging.INFO, logger="nanoslg.worker"):
        assert resolve_dtype(_cfg(), torch.device("cuda", 0)) is torch.bfloat16  # GPUs keep config.json's dtype
        assert resolve_dtype(_cfg(config_dtype="float32"), torch.device("cpu")) is torch.float32
    assert not caplog.records


@pytest.mark.parametrize("cores, ranks, want", [
    (1, 1, 1), (2, 1, 2), (3, 1, 3),        # a spare core would cost a third or more of the compute
    (4, 1, 3), (8, 1, 7), (64, 1, 63),      # from 4 cores, one is left to the front end
    (2, 2, 1), (4, 2, 2), (6, 2, 3),        # several ranks: only where a rank loses at most a quarter
    (8, 2, 3), (16, 4, 3), (3, 4, 1),
])
def test_thread_rule(cores, ranks, want):
    assert cpu_threads(cores, ranks) == want


def test_thread_override(caplog):
    assert cpu_threads(2, 1, "1") == 1
    assert cpu_threads(8, 1, " 8 ") == 8
    with caplog.at_level(logging.WARNING, logger="nanoslg.worker"):
        assert cpu_threads(8, 1, "lots") == 7
        assert cpu_threads(8, 1, "0") == 7
    assert len(caplog.records) == 2 and "NANOSLG_CPU_THREADS" in caplog.records[0].getMessage()
