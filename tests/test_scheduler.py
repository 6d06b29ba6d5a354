"""The scheduler alone: batch formation logic, and the scheduler process against a stand-in worker."""
import dataclasses
import os
import subprocess
import sys
import tempfile
import threading

import zmq

from nanoslg import ipc
from nanoslg.config import EngineConfig
from nanoslg.sampling_params import SamplingParams
from nanoslg.protocol import Ready, StepResult, TokenBatch, TokenizedRequest, token_ids
from scheduler_proc.scheduler import Scheduler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _req(rid, n, max_tokens=4, stop=()):
    return TokenizedRequest(rid, token_ids(range(10, 10 + n)), SamplingParams(max_tokens=max_tokens), list(stop))


def _run_step(s: Scheduler, token=7):
    plan = s.schedule()
    sampled = [c.rid for c in plan.seqs if c.sample]
    return plan, s.on_result(StepResult(plan.step_id, sampled, token_ids([token] * len(sampled))))


def test_budgets_mixed_steps_and_chunked_prefill():
    s = Scheduler(num_pages=100, page_size=4, max_num_seqs=3, max_num_batched_tokens=10, max_model_len=64)
    for i, n in enumerate([6, 25, 3, 3]):
        assert s.add(_req(f"r{i}", n)) is None
    plan, _ = _run_step(s)
    # r0 takes 6 tokens, r1 the remaining 4 of the budget as its first chunk; r2 waits for budget
    assert [(c.rid, len(c.token_ids), c.sample) for c in plan.seqs] == [("r0", 6, True), ("r1", 4, False)]
    plan, _ = _run_step(s)
    # r0 decodes (1 token) alongside r1's next prefill chunk: a mixed step
    assert [(c.rid, len(c.token_ids), c.start_pos) for c in plan.seqs] == [("r0", 1, 6), ("r1", 9, 4)]
    assert plan.seqs[0].token_ids.tolist() == [7] and plan.seqs[0].setup is None
    plan, _ = _run_step(s)
    assert [(c.rid, len(c.token_ids)) for c in plan.seqs] == [("r0", 1), ("r1", 9)]
    plan, _ = _run_step(s)
    # r1's last 3 prompt tokens, then r2 fits; max_num_seqs=3 leaves r3 waiting despite spare budget
    assert [(c.rid, len(c.token_ids), c.sample) for c in plan.seqs] == [("r0", 1, True), ("r1", 3, True),
                                                                       ("r2", 3, True)]
    assert s.state()["waiting"] == 1


def test_finish_frees_pages_and_releases_worker_state():
    s = Scheduler(num_pages=10, page_size=4, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64)
    s.add(_req("a", 5, max_tokens=2, stop=[99]))
    _, updates = _run_step(s)
    assert updates[0].finish_reason is None and s.blocks.num_used == 2
    plan = s.schedule()
    updates = s.on_result(StepResult(plan.step_id, ["a"], token_ids([99])))
    assert updates[0].finish_reason == "stop" and s.blocks.num_used == 0
    assert s.schedule().released == ["a"]


def test_preemption_frees_the_newest_and_recomputes_it():
    # No max_tokens: the admission cannot predict how long they run (and nothing has finished to learn from), so
    # both start and the pool runs out under them.
    s = Scheduler(num_pages=4, page_size=4, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=16)
    s.add(_req("old", 7, max_tokens=None))
    s.add(_req("new", 7, max_tokens=None))
    _run_step(s)  # both prefilled: 2 pages each, pool full
    _run_step(s)  # both at 8 tokens... next decode needs a third page each
    plan, _ = _run_step(s)
    assert [c.rid for c in plan.seqs] == ["old"]
    assert s.state()["preempted"] == 1 and s.total_preemptions == 1
    while True:
        plan = s.schedule()
        if plan.seqs[0].rid == "new":
            break
        s.on_result(StepResult(plan.step_id, ["old"], token_ids([7])))
    # once old finished, new comes back and recomputes prompt + its 2 generated tokens in one chunk
    assert plan.seqs[0].rid == "new" and plan.seqs[0].start_pos == 0 and len(plan.seqs[0].token_ids) == 9


def test_abort_of_an_in_flight_request_waits_for_its_step():
    s = Scheduler(num_pages=10, page_size=4, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64)
    s.add(_req("a", 5))
    plan = s.schedule()
    s.abort("a")
    assert s.blocks.num_used == 2  # the step in flight still writes these pages
    assert s.on_result(StepResult(plan.step_id, ["a"], token_ids([3]))) == []
    assert s.blocks.num_used == 0 and s.state()["running"] == 0


def test_unservable_requests_get_errors():
    s = Scheduler(num_pages=2, page_size=4, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64)
    assert "max_model_len" in s.add(_req("long", 64)).error
    assert "KV pages" in s.add(_req("big", 20)).error
    assert "empty" in s.add(_req("empty", 0)).error


def test_scheduler_process_against_a_stand_in_worker(tiny_model_dir):
    """Run the real scheduler process with a fake worker thread that always samples token 42."""
    run_dir = tempfile.mkdtemp(prefix="nanoslg-test-")
    cfg = EngineConfig(model=tiny_model_dir("llama"), max_model_len=64).resolve()
    cfg = dataclasses.replace(cfg, run_dir=run_dir)
    ctx = zmq.Context()
    launcher = ipc.pull(ctx, run_dir, ipc.LAUNCHER)
    tokenizer_inbox = ipc.pull(ctx, run_dir, ipc.TOKENIZER)
    plan_feed = ctx.socket(zmq.SUB)
    plan_feed.setsockopt(zmq.SUBSCRIBE, b"")
    plan_feed.connect(ipc.address(run_dir, ipc.PLANS))  # before the scheduler binds it, as a worker does
    plans = []
    stop = threading.Event()

    def stand_in_worker():
        to_scheduler = ipc.push(ctx, run_dir, ipc.SCHEDULER)
        while not stop.is_set():
            if not plan_feed.poll(100):
                continue
            plan = ipc.recv(plan_feed)
            plans.append(plan)
            rids = [c.rid for c in plan.seqs if c.sample]
            ipc.send(to_scheduler, StepResult(plan.step_id, rids, token_ids([42] * len(rids))))

    worker = threading.Thread(target=stand_in_worker, daemon=True)
    worker.start()
    proc = subprocess.Popen([sys.executable, "-m", "scheduler_proc.main", cfg.to_arg(), "32"], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": ROOT})
    try:
        assert launcher.poll(30000)
        ready = ipc.recv(launcher)
        assert isinstance(ready, Ready) and ready.info["num_pages"] == 32
        to_scheduler = ipc.push(ctx, run_dir, ipc.SCHEDULER)
        ipc.send(to_scheduler, _req("x", 5, max_tokens=3))
        tokens = []
        while True:
            assert tokenizer_inbox.poll(10000)
            batch = ipc.recv(tokenizer_inbox)
            assert isinstance(batch, TokenBatch)
            for u in batch.updates:
                tokens += list(u.token_ids)
                finish = u.finish_reason
            if finish:
                break
        assert tokens == [42, 42, 42] and finish == "length"
        # a prefill, then one-token decodes; with overlap scheduling a decode may be planned before its input
        # token is known (pending), depending on when results come back
        assert [len(p.seqs[0].token_ids) + p.seqs[0].pending for p in plans[:3]] == [5, 1, 1]
        assert plans[1].seqs[0].pending == 1  # planned right behind the prefill, before its result
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
        # stop the stand-in before tearing down its sockets: a thread blocked in recv at exit can crash
        stop.set()
        worker.join(10)
        ctx.destroy(linger=0)


def test_overlap_chains_decodes_and_drains_after_a_stop():
    s = Scheduler(num_pages=10, page_size=4, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64,
                  overlap=True)
    s.add(_req("a", 5, max_tokens=10, stop=[99]))
    first = s.schedule()
    chained = s.schedule()  # planned while `first` runs: consumes the token `first` will sample
    assert chained.seqs[0].pending == 1 and chained.seqs[0].start_pos == 5 and len(chained.seqs[0].token_ids) == 0
    assert s.schedule() is None  # at most one step chained on an unknown token
    updates = s.on_result(StepResult(first.step_id, ["a"], token_ids([99])))
    assert updates[0].finish_reason == "stop"
    assert s.blocks.num_used == 2  # `chained` still writes position 5
    assert s.on_result(StepResult(chained.step_id, ["a"], token_ids([7]))) == []  # its token is void
    assert s.blocks.num_used == 0 and s.schedule().released == ["a"]


def test_overlap_never_plans_past_max_tokens():
    s = Scheduler(num_pages=10, page_size=4, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64,
                  overlap=True)
    s.add(_req("a", 5, max_tokens=2))
    first, second = s.schedule(), s.schedule()
    assert second.seqs[0].pending == 1
    s.on_result(StepResult(first.step_id, ["a"], token_ids([7])))
    assert s.schedule() is None  # the two planned samples are all max_tokens allows
    updates = s.on_result(StepResult(second.step_id, ["a"], token_ids([8])))
    assert updates[0].finish_reason == "length" and s.blocks.num_used == 0


def test_a_request_waits_for_pages_held_by_a_draining_step():
    s = Scheduler(num_pages=4, page_size=4, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=16)
    s.add(_req("a", 12))
    plan = s.schedule()
    s.abort("a")  # its step is still in flight: its 3 pages stay taken
    s.add(_req("b", 12))
    assert s.schedule() is None and not s.unreported  # b waits rather than being failed
    s.on_result(StepResult(plan.step_id, ["a"], token_ids([1])))
    assert [c.rid for c in s.schedule().seqs] == ["b"]


def test_micro_batches_take_disjoint_requests_spread_evenly():
    """Pipeline parallelism: up to three plans in flight over disjoint requests, each a fair share of what is ready,
    and no decode chained onto a token an in-flight step has yet to sample."""
    s = Scheduler(num_pages=100, page_size=4, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64,
                  micro_batches=3)
    for i in range(7):
        s.add(_req(f"r{i}", 4))
    plans = [s.schedule() for _ in range(3)]
    assert [len(p.seqs) for p in plans] == [3, 2, 2]
    rids = [c.rid for p in plans for c in p.seqs]
    assert sorted(rids) == sorted(f"r{i}" for i in range(7))  # each request in exactly one micro-batch
    assert s.schedule() is None  # every request is in flight
    assert [(m["num_seqs"], m["num_tokens"]) for m in s.state()["micro_batches"]] == [(3, 12), (2, 8), (2, 8)]
    second = plans[1]
    s.on_result(StepResult(second.step_id, [c.rid for c in second.seqs], token_ids([7, 7])))
    again = s.schedule()
    assert [c.rid for c in again.seqs] == [c.rid for c in second.seqs]  # only those whose step came back
    assert all(c.pending == 0 and list(c.token_ids) == [7] for c in again.seqs)


def _drive(s: Scheduler, max_steps: int) -> dict:
    """Run s against a stand-in pipeline that returns results oldest first; rid -> finish reason."""
    in_flight, finished = [], {}
    for _ in range(max_steps):
        while len(in_flight) < s.micro_batches + 1:
            plan = s.schedule()
            if plan is None:
                break
            in_flight.append(plan)
        if not in_flight:
            break
        plan = in_flight.pop(0)
        rids = [c.rid for c in plan.seqs if c.sample]
        for u in s.on_result(StepResult(plan.step_id, rids, token_ids([7] * len(rids)))):
            if u.finish_reason:
                finished[u.rid] = u.finish_reason
    return finished


def test_requests_too_big_to_share_the_pool_finish_one_after_another_with_steps_in_flight():
    """Each request needs 9 of the 10 pages at full length. With steps in flight an older request waits for a newer
    one's step to come back and then preempts it, instead of preempting itself: two requests that kept undoing each
    other's work would never finish."""
    for micro_batches in (1, 3):
        s = Scheduler(num_pages=10, page_size=4, max_num_seqs=8, max_num_batched_tokens=8, max_model_len=64,
                      overlap=micro_batches == 1, micro_batches=micro_batches)
        for i in range(3):
            s.add(_req(f"r{i}", 20, max_tokens=15))
        assert _drive(s, 2000) == {f"r{i}": "length" for i in range(3)}
        assert s.blocks.num_used == 0
