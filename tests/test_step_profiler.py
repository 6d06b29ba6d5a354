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
