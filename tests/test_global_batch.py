"""NanoFlow's global batch in the scheduler (scheduler_proc/global_batch.py), driven without sockets against a
stand-in worker: the running set held near its target without waves, the pool forecast, the prefill pacing."""
from nanoslg.sampling_params import SamplingParams
from nanoslg.protocol import StepResult, TokenizedRequest, token_ids
from scheduler_proc.scheduler import Scheduler
from test_scheduler import _req, _run_step


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
    s.add(TokenizedRequest("B", token_ids(prefix + [7001] * 16), SamplingParams(max_tokens=1600), [99]))
    arrivals = [(3, TokenizedRequest("A", token_ids(prefix + [7002] * 16), SamplingParams(max_tokens=16), [99])),
                (8, TokenizedRequest("C", token_ids(range(9000, 9016)), SamplingParams(max_tokens=1600), [99]))]
    _run_arrivals(s, arrivals, {})
    assert s.total_preemptions == 0 and not s.requests and s.blocks.hit_tokens >= 512  # A shares B's pages


def test_a_request_without_max_tokens_is_not_forecast_to_free_its_pages():
    """A (3,000-token prompt, no max_tokens, stops after 200 tokens) is predicted to end any step now; lending its
    pages to the stream of bounded requests behind it would preempt them when it runs on."""
    s = Scheduler(num_pages=250, page_size=16, max_num_seqs=64, max_num_batched_tokens=2048, max_model_len=8192,
                  overlap=True)
    s.add(TokenizedRequest("A", token_ids(range(10, 3010)), SamplingParams(max_tokens=None), [99]))
    arrivals = [(5 + 10 * i, TokenizedRequest(f"r{i}", token_ids(range(10, 26)), SamplingParams(max_tokens=300), [99]))
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
