"""The scheduler alone: batch formation logic, and the scheduler process against a stand-in worker."""
import os
import subprocess
import sys
import tempfile
import threading

import zmq

from nanoslg import ipc
from nanoslg.config import EngineConfig
from nanoslg.protocol import Ready, StepResult, TokenBatch, TokenizedRequest, token_ids
from scheduler_proc.scheduler import Scheduler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _req(rid, n, max_tokens=4, stop=()):
    return TokenizedRequest(rid, token_ids(range(10, 10 + n)), {"max_tokens": max_tokens}, list(stop))


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
    assert plan.seqs[0].token_ids.tolist() == [7] and plan.seqs[0].params is None
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
    cfg.run_dir = run_dir
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


def _run_all(s: Scheduler, on_step=None, in_flight: int = 2, limit: int = 100000) -> list:
    """Run the scheduler against a stand-in worker with `in_flight` steps queued (overlap scheduling); returns the
    rids in the order their first chunk was planned."""
    pending, first_seen, seen = [], [], set()
    for _ in range(limit):
        while len(s.steps_in_flight) < in_flight:
            plan = s.schedule()
            if plan is None:
                break
            pending.append(plan)
            for c in plan.seqs:
                if c.rid not in seen:
                    seen.add(c.rid)
                    first_seen.append(c.rid)
            if on_step:
                on_step(s, plan)
        if not pending:
            return first_seen
        plan = pending.pop(0)
        sampled = [c.rid for c in plan.seqs if c.sample]
        s.on_result(StepResult(plan.step_id, sampled, token_ids([7] * len(sampled))))
    raise AssertionError(f"did not finish: {s.state()}")


def test_global_batch_holds_the_running_set_without_waves():
    """Equal output lengths: once the first requests have finished, the running set stays within 10 % of its
    target while requests wait, each step carries about as many decodes, admission is first come first served and
    every request finishes."""
    target, n, prompt, output = 32, 400, 96, 48
    s = Scheduler(num_pages=4096, page_size=16, max_num_seqs=64, max_num_batched_tokens=2048, max_model_len=1024,
                  overlap=True, running_target=target)
    for i in range(n):
        s.add(_req(f"r{i:03d}", prompt, max_tokens=output))
    running, decodes = [], []

    def watch(s, plan):
        if s.lengths.outputs and s.waiting:  # after warm-up: requests have finished, others still wait
            running.append(len(s.running))
            decodes.append(sum(1 for c in plan.seqs if len(c.token_ids) + c.pending == 1))

    order = _run_all(s, watch)
    assert order == [f"r{i:03d}" for i in range(n)]  # first come, first served
    assert s.state()["running"] == 0 and not s.requests  # nobody starved
    assert len(running) > 200
    assert all(0.9 * target <= r <= 1.1 * target for r in running), (min(running), max(running))
    # no wave: every step decodes most of the running set (a few requests are always prefilling, never all)
    assert min(decodes) >= 0.75 * target, (min(decodes), max(decodes))
    # the dense batch: about target x (1 + prompt / output) tokens per step, in whole 128-row tiles
    assert s.state()["dense_batch_tokens"] == 128 * -(-int(target * 3 * 1.1) // 128)


def test_a_full_pool_admits_less_rather_than_preempting():
    """The pool holds 12 requests at their full length (13-14 staggered ones at their mean); the target asks for
    32: the admission holds the running set to what fits, and nothing is ever preempted."""
    s = Scheduler(num_pages=12 * 9, page_size=16, max_num_seqs=64, max_num_batched_tokens=512, max_model_len=1024,
                  overlap=True, running_target=32)
    for i in range(100):
        s.add(_req(f"r{i}", 96, max_tokens=48))  # 144 tokens: 9 pages each
    most = []
    _run_all(s, lambda s, plan: most.append(len(s.running)))
    assert s.total_preemptions == 0 and 12 <= max(most) <= 14 and not s.requests


def test_the_pool_forecast_admits_staggered_requests_at_their_mean_size_without_preempting():
    """Requests that started at different times do not all reach their final size at once: the forecast of the
    pool's peak lets more of them run than reserving each one's final size (40 of 512 tokens in 1280 pages of 16)
    would, and still nothing is ever preempted."""
    s = Scheduler(num_pages=1280, page_size=16, max_num_seqs=64, max_num_batched_tokens=512, max_model_len=1024,
                  overlap=True, running_target=64)
    for i in range(150):
        s.add(_req(f"r{i}", 256, max_tokens=256))
    most = []
    _run_all(s, lambda s, plan: most.append(len(s.running)))
    assert max(most) > 40 and s.total_preemptions == 0 and not s.requests


def test_the_pool_forecast_peaks_before_the_first_finish():
    from scheduler_proc.global_batch import LengthStats, PoolForecast
    from scheduler_proc.request import Request

    def decoding(n_prompt, n_out, max_tokens, given=True):
        r = Request("r", list(range(n_prompt)), {}, frozenset(), max_tokens, max_tokens_given=given)
        r.output_ids = [1] * n_out
        r.num_computed = r.num_tokens
        return r

    # Both at 200 tokens; a ends at 210 (14 pages) in 10 steps, b at 300 (19 pages) in 100. Just before a finishes
    # both hold 200 + 10 + the margin: 27 pages of tokens + 1 each for rounding = 29, more than b alone at its
    # end (19) and less than both at their final sizes (33).
    a, b = decoding(190, 10, 20), decoding(190, 10, 110)
    f = PoolForecast([a, b], LengthStats(), max_model_len=4096, page_size=16, num_free=32, running_pages=0)
    assert f.peak == 29
    new = Request("new", list(range(40)), {}, frozenset(), 8)  # 48 tokens: 3 pages, still to prefill
    assert f.fits(new)  # 29 + 3 <= 32, though 33 + 3 final pages would not fit
    assert not PoolForecast([a, b], LengthStats(), 4096, 16, num_free=31, running_pages=0).fits(new)
    f.add(new)
    assert f.peak == 32
    # without max_tokens its end is only an estimate: it counts at its final size throughout, never as freeing
    # its pages at a forecast finish
    c = decoding(190, 10, 20, given=False)
    assert PoolForecast([c, b], LengthStats(), 4096, 16, num_free=0, running_pages=0).peak == 19 + 13


def test_a_cold_start_after_a_short_warm_up_makes_no_wave_and_the_pool_holds_more_than_final_sizes():
    """The H200 run of offline-1024-512 at a quarter of its KV pool: a warm-up of 8-token requests must not make
    the first steps take the whole 8,192-token cap (requests admitted together finish together: waves), and once
    staggered the pool holds more requests than reserving each one's final size would (139), without a
    preemption."""
    s = Scheduler(num_pages=13373, page_size=16, max_num_seqs=1024, max_num_batched_tokens=8192, max_model_len=4096,
                  overlap=True)
    for i in range(16):
        s.add(_req(f"w{i}", 1024, max_tokens=8))
    _run_all(s)
    n = 500
    for i in range(n):
        s.add(_req(f"r{i:03d}", 1024, max_tokens=512))
    first, running = [], []

    def watch(s, plan):
        if not first:
            first.append(sum(len(c.token_ids) + c.pending for c in plan.seqs))
        if len(s.lengths.outputs) > 16 and s.waiting:  # the batch's first requests have finished, others wait
            running.append(len(s.running))

    order = _run_all(s, watch)
    assert order == [f"r{i:03d}" for i in range(n)] and not s.requests and s.total_preemptions == 0
    assert first[0] <= 1024
    median = sorted(running)[len(running) // 2]
    assert median > 139 and all(0.9 * median <= r <= 1.1 * median for r in running), (min(running), median)



def _run_arrivals(s: Scheduler, arrivals: list, stop_after: dict, on_step=None) -> None:
    """Like _run_all, with requests arriving at given steps ([(step, request)], in order) and some stopping on
    their own (rid -> tokens after which they sample the stop token 99)."""
    pending, produced, step = [], {}, 0
    for _ in range(100000):
        while arrivals and arrivals[0][0] <= step:
            s.add(arrivals.pop(0)[1])
        while len(s.steps_in_flight) < 2:
            plan = s.schedule()
            if plan is None:
                break
            pending.append(plan)
            if on_step:
                on_step(s, plan)
        step += 1
        if not pending:
            if arrivals:
                continue
            return
        plan = pending.pop(0)
        sampled = [c.rid for c in plan.seqs if c.sample]
        tokens = []
        for rid in sampled:
            produced[rid] = produced.get(rid, 0) + 1
            tokens.append(99 if produced[rid] >= stop_after.get(rid, 1 << 30) else 7)
        s.on_result(StepResult(plan.step_id, sampled, token_ids(tokens)))
    raise AssertionError(f"did not finish: {s.state()}")


def test_the_forecast_counts_shared_prefix_pages_once():
    """B and A share a 640-token prefix (40 pages, held once); A finishes soon. Were A's pages all forecast to
    come back, C (1,600 tokens to go) would be admitted into pages that stay with B, and B would be preempted."""
    s = Scheduler(num_pages=212, page_size=16, max_num_seqs=64, max_num_batched_tokens=2048, max_model_len=4096,
                  overlap=True, enable_prefix_caching=True)
    prefix = list(range(10, 650))
    s.add(TokenizedRequest("B", token_ids(prefix + [7001] * 16), {"max_tokens": 1600}, [99]))
    arrivals = [(3, TokenizedRequest("A", token_ids(prefix + [7002] * 16), {"max_tokens": 16}, [99])),
                (8, TokenizedRequest("C", token_ids(range(9000, 9016)), {"max_tokens": 1600}, [99]))]
    _run_arrivals(s, arrivals, {})
    assert s.total_preemptions == 0 and not s.requests and s.blocks.hit_tokens >= 512  # A shares B's pages


def test_a_request_without_max_tokens_is_not_forecast_to_free_its_pages():
    """A (3,000-token prompt, no max_tokens, stops after 200 tokens) is predicted to end any step now; lending its
    pages to the stream of bounded requests behind it would preempt them when it runs on."""
    s = Scheduler(num_pages=250, page_size=16, max_num_seqs=64, max_num_batched_tokens=2048, max_model_len=8192,
                  overlap=True)
    s.add(TokenizedRequest("A", token_ids(range(10, 3010)), {}, [99]))
    arrivals = [(5 + 10 * i, TokenizedRequest(f"r{i}", token_ids(range(10, 26)), {"max_tokens": 300}, [99]))
                for i in range(60)]
    _run_arrivals(s, arrivals, {"A": 200})
    assert s.total_preemptions == 0 and not s.requests


def test_prefill_is_paced_at_its_share_of_the_dense_batch_while_the_running_set_fills():
    """D = 2,048 tokens, prompts of 127 and outputs of 2,000: the prefill share is 128 tokens a step. The first
    step (nothing decodes yet) takes the whole D; after it no step carries more prefill than its share, not even
    as one-token chunks of many prompts, so the running set grows by a request or two a step."""
    s = Scheduler(num_pages=100000, page_size=16, max_num_seqs=256, max_num_batched_tokens=8192, max_model_len=4096,
                  overlap=True, running_target=64, dense_batch_tokens=2048)
    for i in range(400):
        s.add(_req(f"r{i}", 127, max_tokens=2000))
    assert s.targets.prefill_tokens(s.lengths, 2048) == 128
    steps = []
    for _ in range(40):
        plan, _ = _run_step(s)
        steps.append((sum(len(c.token_ids) for c in plan.seqs if len(c.token_ids) + c.pending > 1 or
                          c.start_pos < 127), len(s.running)))
    assert steps[0] == (2048, 17)
    assert all(prefill <= 128 for prefill, _ in steps[1:])
    assert all(b - a <= 2 for (_, a), (_, b) in zip(steps, steps[1:])) and steps[-1][1] > 50


def test_a_cold_start_fills_the_running_set_over_most_of_an_output_length():
    """offline-1024-512 on the H200's pool (53,493 pages of 16): paced at its prefill share, the running set takes
    most of the 512 steps an output lasts to fill (unpaced it is full in ~300, and those requests finish within
    a few hundred steps of each other, then nothing finishes for ~200: decode-only steps)."""
    s = Scheduler(num_pages=53493, page_size=16, max_num_seqs=1024, max_num_batched_tokens=8192, max_model_len=4096,
                  overlap=True)
    for i in range(800):
        s.add(_req(f"r{i:03d}", 1024, max_tokens=512))
    pending, running = [], []
    while len(running) < 500:
        while len(s.steps_in_flight) < 2:
            pending.append(s.schedule())
        plan = pending.pop(0)
        running.append(len(s.running))
        sampled = [c.rid for c in plan.seqs if c.sample]
        s.on_result(StepResult(plan.step_id, sampled, token_ids([7] * len(sampled))))
    assert running[-1] > 557  # more than the pool holds at final sizes
    assert next(i for i, r in enumerate(running) if r >= 0.95 * running[-1]) >= 0.8 * 512
