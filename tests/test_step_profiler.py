"""The step profiler's window (NANOSLG_PROFILE_STEPS) on the CPU: its file gives each step's host timeline with the
launch's phases in the order the runner passes them."""
from nanoslg import LLM, SamplingParams
from tiny_models import make_tiny_model


def test_the_profile_window_times_each_phase_of_the_host_launch(tmp_path, monkeypatch):
    out = tmp_path / "profile.txt"
    monkeypatch.setenv("NANOSLG_PROFILE_STEPS", "2:3")
    monkeypatch.setenv("NANOSLG_PROFILE_OUT", str(out))
    folder = make_tiny_model("llama", str(tmp_path / "llama"), num_layers=2, vocab_size=512)
    with LLM(folder, max_model_len=128) as llm:
        llm.generate([[1, 2, 3, 4]] * 2, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    text = out.read_text()
    assert text.startswith("3 steps in ")
    rows = text.split("host phases (ms after the plan arrived)\n")[1].strip().splitlines()
    assert [int(r.split("\t")[0]) for r in rows] == [2, 3, 4]
    for row in rows:
        marks = row.split("\t")[4].split()
        names, ms = marks[::2], [float(m) for m in marks[1::2]]
        assert names == ["batch", "planned", "forward", "logits", "sampled"]
        assert ms == sorted(ms) and ms[0] >= 0


def test_a_timeline_only_window_gives_each_phase_median_without_the_torch_profiler(tmp_path, monkeypatch):
    out = tmp_path / "timeline.txt"
    monkeypatch.setenv("NANOSLG_PROFILE_STEPS", "1:6")
    monkeypatch.setenv("NANOSLG_PROFILE_KERNELS", "0")
    monkeypatch.setenv("NANOSLG_PROFILE_OUT", str(out))
    folder = make_tiny_model("llama", str(tmp_path / "llama"), num_layers=2, vocab_size=512)
    with LLM(folder, max_model_len=128) as llm:
        llm.generate([[1, 2, 3, 4]] * 2, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    head, table = out.read_text().split("host phases (ms after the plan arrived)\n")
    assert head.startswith("6 steps in ") and "(host timeline only)" in head and "Self CPU" not in head
    medians = dict(m.rsplit(" ", 1) for m in head.split("medians (ms): ")[1].strip().split(", "))
    assert list(medians)[:5] == ["batch", "planned", "forward", "logits", "sampled"]
    assert {"launched", "reported after its launch", "plan to plan"} <= set(medians)
    assert float(medians["batch"]) <= float(medians["launched"])
    assert [int(r.split("\t")[0]) for r in table.strip().splitlines()] == list(range(1, 7))
    # the one-line summary the GPU script prints: the worker's medians and the scheduler's result-to-plan time
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "host_timeline.py")
    line = subprocess.run([sys.executable, script, str(out)], capture_output=True, text=True,
                          check=True).stdout
    assert line.startswith("batch ") and "scheduler result to next plan" in line, line
