"""A step's tokens reported from inside the next step's launch, between its layers, as soon as the device is done
with it (on a GPU, where a launch only queues work): the scheduler forms the step after next meanwhile. The path is
forced on here, on the CPU, where every previous step is done by the first layer, so each report happens inside a
launch: the tokens must still be Hugging Face's, through chunked prefill, chained decodes, preemption, prefix hits,
aborts, constrained rows and penalties."""
import json

import jsonschema
import pytest
import torch

from gpu_workers.nano_batch import NanoState, OpRunner
from gpu_workers.worker_proc import reports_between_layers
from nanoslg import LLM, SamplingParams
from scenario import run_scenario


def test_reports_between_layers_on_gpus_unless_told():
    assert reports_between_layers("cuda", "") and not reports_between_layers("cpu", "")
    assert reports_between_layers("cpu", "1") and not reports_between_layers("cuda", "0")


class _Layer:
    def __init__(self, log: list, i: int):
        self.ops = [("gemm", lambda s: log.append(("op", i, "a"))), ("other", lambda s: log.append(("op", i, "b")))]


def test_the_op_runner_calls_back_after_each_layer_over_every_nano_batch():
    log: list = []
    runner = OpRunner(torch.device("cpu"), frozenset())
    runner.between_layers = lambda: log.append("between")
    states = [NanoState(torch.zeros(1), None, torch.zeros(1, 2)) for _ in range(2)]
    runner.run([_Layer(log, i) for i in range(3)], states)
    per_layer = [("op", 0, "a")] * 2 + [("op", 0, "b")] * 2 + ["between"]
    assert log[:5] == per_layer and log.count("between") == 3 and log[-1] == "between"


@pytest.mark.parametrize("layout", [{}, dict(tensor_parallel_size=2)], ids=["single", "tp2"])
def test_reports_from_inside_launches_keep_transformers_tokens(layout, tiny_model_dir, hf_reference, hf_to_max_len,
                                                              monkeypatch):
    monkeypatch.setenv("NANOSLG_REPORT_BETWEEN_LAYERS", "1")
    run_scenario(tiny_model_dir("llama"), hf_reference, hf_to_max_len, **layout)


SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                         "maximum": 999}},
          "required": ["ok", "n"], "additionalProperties": False}


def test_constrained_and_penalized_rows_reported_inside_launches(tiny_chat_model, monkeypatch):
    """Constrained rows sample only after the previous step's tokens advanced their matchers, and rows with
    penalties wait for their history: both must hold when that step was reported from inside a launch."""
    monkeypatch.setenv("NANOSLG_REPORT_BETWEEN_LAYERS", "1")
    params = [SamplingParams(max_tokens=80, temperature=0, structured_outputs={"json": SCHEMA}),
              SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, repetition_penalty=1.5),
              SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)] * 2
    prompts = ["Hello", "Write JSON", "1 2 3", "The capital", "a b", "x"]
    with LLM(tiny_chat_model, max_model_len=256) as llm:
        together = llm.generate(prompts, params)
        alone = [llm.generate([p], [sp])[0] for p, sp in zip(prompts, params)]
    for i, o in enumerate(together):
        if i % 3 == 0:
            assert o.finish_reason == "stop", o.text
            jsonschema.validate(json.loads(o.text), SCHEMA)
        else:
            assert len(o.token_ids) == 24
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]


class _Span:
    def __init__(self, done: bool):
        self._done = done

    def done(self) -> bool:
        return self._done


class _Step:
    def __init__(self, sampled=None, span=None):
        self.sampled, self.span, self.step_id = sampled, span, 7


def test_a_step_that_sampled_nothing_is_done_only_when_its_device_span_is():
    """A middle prefill chunk or a stage before the last has no tokens to copy: reporting it before the device is
    through would block the launch it is called from."""
    from gpu_workers.model_runner import ModelRunner

    assert not ModelRunner.is_done(_Step(span=_Span(False)))
    assert ModelRunner.is_done(_Step(span=_Span(True))) and ModelRunner.is_done(_Step())


def test_a_report_failing_inside_a_launch_is_raised_after_it_and_keeps_its_step(monkeypatch):
    from gpu_workers import worker_proc

    sent = []

    def report(runner, launched, to_scheduler, profiler):
        if not sent:
            sent.append("failed")
            raise OSError("socket closed")
        sent.append(launched.step_id)

    monkeypatch.setattr(worker_proc, "_report", report)
    runner = type("Runner", (), {"is_done": staticmethod(lambda launched: True)})()
    reports = worker_proc._Reports(runner, None, None)
    step = reports.launched = _Step()
    reports.report_between_layers()  # the failure is kept for after the launch, not raised into it
    reports.report_between_layers()  # and no second report is tried meanwhile
    assert reports.launched is step and sent == ["failed"]
    with pytest.raises(OSError, match="socket closed"):
        reports.raise_error()
    reports.raise_error()  # raised once
    reports.report_between_layers()
    assert sent == ["failed", 7] and reports.launched is None
