"""Prefix caching: shared KV pages give the same tokens as recomputing them (the Hugging Face fp32 oracle), the pool
always comes back, and cached pages yield to new work."""
import time

import pytest

from conftest import UNBOUNDED, random_prompts
from nanoslg import LLM, SamplingParams
from nanoslg.entrypoints.debug import DebugClient
from nanoslg.protocol import GenerateRequest, TokenizedRequest, token_ids
from scheduler_proc.block_manager import BlockManager
from scheduler_proc.scheduler import Scheduler

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
PS = 4  # tokens per page in these tests


def _state(llm) -> dict:
    with DebugClient(llm.config.run_dir) as debug:
        return debug.state()


def _variants(base: list, seed: int) -> list:
    """Prompts sharing 0, 1, several and all-but-one full pages of base (10 pages), and base itself."""
    fresh = random_prompts(4, seed=seed, lengths=[40, 36, 12, 4])
    return [fresh[0],  # shares nothing
            base[:PS] + fresh[1],  # one page
            base[:6 * PS] + fresh[2],  # several
            base[:9 * PS] + fresh[3],  # all but the last page
            list(base)]  # all of it: the last page is recomputed, it yields the logits to sample


# ---------------------------------------------------------------- block manager and scheduler logic
def test_cached_pages_wait_in_lru_order_and_yield_to_new_work():
    bm = BlockManager(4, PS, enable_prefix_caching=True)
    a = bm.allocate(2)
    bm.register(a[0], b"k0")
    bm.register(a[1], b"k1")
    bm.release(a[::-1])
    assert bm.num_free == 4 and bm.num_used == 0 and bm.num_cached == 2
    assert bm.match([b"k0", b"k1", b"k2"]) == a and bm.match([b"k1"]) == [a[1]] and bm.match([b"x"]) == []
    fresh = bm.allocate(3)  # the two clean pages, then the least recently released cached one: the deeper k1
    assert a[1] in fresh and a[0] not in fresh and bm.match([b"k0", b"k1"]) == [a[0]]
    bm.share([a[0]])
    assert bm.allocate(1) is None  # a page in use is never evicted
    bm.forget([a[0]])
    assert bm.match([b"k0"]) == [] and bm.num_cached == 0
    bm.release(fresh + [a[0]])
    assert bm.num_free == 4 and not bm.evictable


def test_disabled_cache_registers_nothing():
    bm = BlockManager(2, PS)
    p = bm.allocate(1)
    bm.register(p[0], b"k")
    assert bm.match([b"k"]) == [] and bm.num_cached == 0


def _run_to_end(s: Scheduler, sampled: int = 7) -> list:
    plans = []
    while (plan := s.schedule()) is not None:
        plans.append(plan)
        s.on_result(_result(plan, sampled))
    return plans


def _result(plan, tok):
    from nanoslg.protocol import StepResult

    rids = [c.rid for c in plan.seqs if c.sample]
    return StepResult(plan.step_id, rids, token_ids([tok] * len(rids)))


def test_a_request_sharing_a_running_requests_prefix_starts_after_the_shared_pages():
    s = Scheduler(64, PS, 8, 64, 256, enable_prefix_caching=True)
    prompt = list(range(10, 40))  # 30 tokens: 7 full pages
    s.add(TokenizedRequest("a", token_ids(prompt), SamplingParams(max_tokens=4), []))
    first = s.schedule()
    assert first.seqs[0].start_pos == 0 and len(first.seqs[0].token_ids) == 30
    # a is still running (its step in flight) when b, with the same first 24 tokens, arrives
    s.add(TokenizedRequest("b", token_ids(prompt[:24] + [99] * 9), SamplingParams(max_tokens=4), []))
    second = s.schedule()
    chunk = next(c for c in second.seqs if c.rid == "b")
    assert chunk.start_pos == 24 and list(chunk.page_table[:6]) == list(first.seqs[0].page_table[:6])
    # identical prompt: all but the last full page comes from the cache (the last token must be computed)
    s.add(TokenizedRequest("c", token_ids(prompt[:28]), SamplingParams(max_tokens=4), []))
    third = s.schedule()
    assert next(c for c in third.seqs if c.rid == "c").start_pos == 24
    s.on_result(_result(first, 7))
    s.on_result(_result(second, 7))
    s.on_result(_result(third, 7))
    _run_to_end(s)
    st = s.state()
    assert st["prefix_cache_hits"] == 48 and st["prefix_cache_queries"] == 30 + 33 + 28
    assert st["kv_pages_used"] == 0 and st["kv_pages_free"] == 64 and st["kv_pages_cached"] > 0


def test_requests_arriving_together_share_the_prefix_instead_of_computing_it_twice():
    s = Scheduler(64, PS, 8, 64, 256, enable_prefix_caching=True)
    prompt = list(range(10, 40))  # 30 tokens: 7 full pages
    for rid, tail in (("a", [1, 2]), ("b", [3, 4, 5]), ("c", [6])):
        s.add(TokenizedRequest(rid, token_ids(prompt + tail), SamplingParams(max_tokens=2), []))
    s.add(TokenizedRequest("other", token_ids([200] * 9), SamplingParams(max_tokens=2), []))
    first = s.schedule()
    # b would compute the pages a computes in this very step: it (and, in order, those behind it) waits one step
    assert [c.rid for c in first.seqs] == ["a"]
    second = s.schedule()
    starts = {c.rid: c.start_pos for c in second.seqs}
    assert starts["b"] == starts["c"] == 28 and starts["other"] == 0  # 7 pages from the cache, each
    s.on_result(_result(first, 7))
    s.on_result(_result(second, 7))
    _run_to_end(s)
    st = s.state()
    assert st["prefix_cache_hits"] == 2 * 28 and st["kv_pages_used"] == 0


def test_a_flood_of_distinct_prompts_evicts_cached_pages_and_never_fails_for_want_of_them():
    s = Scheduler(12, PS, 4, 64, 64, enable_prefix_caching=True)  # 12 pages: ~2 requests at a time
    for i in range(30):
        s.add(TokenizedRequest(f"r{i}", token_ids([100 + i] * 17), SamplingParams(max_tokens=3), []))
    finished = {}
    while (plan := s.schedule()) is not None:
        for u in s.on_result(_result(plan, 5)):
            assert u.error is None, u.error
            if u.finish_reason:
                finished[u.rid] = u.finish_reason
    assert len(finished) == 30 and set(finished.values()) == {"length"}
    st = s.state()
    assert st["kv_pages_used"] == 0 and st["kv_pages_cached"] <= 12


# ---------------------------------------------------------------- against Hugging Face
@pytest.mark.parametrize("arch", ARCHS)
def test_shared_prefixes_of_every_length_give_hf_tokens(arch, tiny_model_dir, hf_reference):
    folder = tiny_model_dir(arch)
    base = random_prompts(1, seed=40, lengths=[10 * PS])[0]
    prompts = _variants(base, seed=41)
    with LLM(folder, max_model_len=128, page_size=PS) as llm:
        warm = llm.generate([base], GREEDY)[0]
        outs = llm.generate(prompts, GREEDY)
        state = _state(llm)
    assert warm.token_ids == hf_reference(folder, [base], 10)[0]
    assert [o.token_ids for o in outs] == hf_reference(folder, prompts, 10)
    # hits: 0 + 1 + 6 + 9 + 9 pages (base itself: all but its last page)
    assert state["prefix_cache_hits"] >= 25 * PS
    assert state["kv_pages_used"] == 0


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_prompts_sent_together_hit_each_others_pages_and_give_hf_tokens(arch, tiny_model_dir, hf_reference):
    folder = tiny_model_dir(arch)
    base = random_prompts(1, seed=43, lengths=[10 * PS])[0]
    prompts = _variants(base, seed=44)  # no warm-up: the shared pages are first computed within this batch
    with LLM(folder, max_model_len=128, page_size=PS) as llm:
        outs = llm.generate(prompts, GREEDY)
        state = _state(llm)
    assert [o.token_ids for o in outs] == hf_reference(folder, prompts, 10)
    # each variant reads what the one before it computed: 1 + 6 + 9 pages (base: its last page is recomputed)
    assert state["prefix_cache_hits"] >= (1 + 6 + 9) * PS
    assert state["kv_pages_used"] == 0


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_hits_on_pages_of_a_request_still_running(arch, tiny_model_dir, hf_reference):
    folder = tiny_model_dir(arch)
    base = random_prompts(1, seed=42, lengths=[48])[0]
    late = base[:40] + [7, 8, 9]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    tokens, cached, done = {"first": [], "late": []}, {}, set()
    with LLM(folder, max_model_len=128, page_size=PS) as llm:
        llm.engine.submit(GenerateRequest("first", params, prompt_ids=token_ids(base)))
        deadline = time.monotonic() + 60
        while len(done) < 2 and time.monotonic() < deadline:
            for d in llm.engine.poll_deltas(50):
                tokens[d.rid] += list(d.token_ids)
                cached[d.rid] = d.num_cached_tokens
                if d.finish_reason is not None:
                    done.add(d.rid)
            if len(tokens["first"]) >= 4 and "late" not in cached:
                assert "first" not in done
                llm.engine.submit(GenerateRequest("late", params, prompt_ids=token_ids(late)))
                cached["late"] = None
    assert cached["first"] == 0 and cached["late"] == 40
    assert [tokens["first"], tokens["late"]] == hf_reference(folder, [base, late], 40)


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_hits_after_preemption_and_after_eviction(arch, tiny_model_dir, hf_reference, hf_to_max_len):
    folder = tiny_model_dir(arch)
    base = random_prompts(1, seed=43, lengths=[24])[0]
    shared = [base[:16] + p for p in random_prompts(6, seed=44, lengths=[14, 9, 20, 11, 17, 6])]
    flood = random_prompts(8, seed=45, lengths=[30] * 8)
    # 24 pages of 4 tokens: six sequences running to 64 tokens (no max_tokens, so the admission cannot plan for
    # it) cannot all fit, so the newest are preempted and come back through the cache; then the flood evicts
    # everything, and base is recomputed from scratch.
    with LLM(folder, max_model_len=64, page_size=PS, num_kv_pages=24) as llm:
        first = llm.generate(shared, SamplingParams(**UNBOUNDED))
        mid = _state(llm)
        llm.generate(flood, GREEDY)
        again = llm.generate(shared[:2], GREEDY)
        state = _state(llm)
    assert mid["total_preemptions"] > 0 and mid["prefix_cache_hits"] > 0
    assert [o.token_ids for o in first] == hf_to_max_len(folder, shared, 64)
    assert [o.token_ids for o in again] == hf_reference(folder, shared[:2], 10)
    assert state["kv_pages_used"] == 0 and state["kv_pages_cached"] <= 24


def test_aborts_leave_every_page_free_or_evictable(tiny_model_dir):
    folder = tiny_model_dir("llama")
    base = random_prompts(1, seed=46, lengths=[32])[0]
    params = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
    with LLM(folder, max_model_len=128, page_size=PS) as llm:
        for i in range(6):
            llm.engine.submit(GenerateRequest(f"r{i}", params, prompt_ids=token_ids(base + [i + 3] * (i + 1))))
        seen = set()
        deadline = time.monotonic() + 30
        while len(seen) < 6 and time.monotonic() < deadline:
            seen |= {d.rid for d in llm.engine.poll_deltas(50) if d.token_ids}
        for i in range(6):
            llm.engine.abort(f"r{i}")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            llm.engine.poll_deltas(20)
            state = _state(llm)
            if state["running"] == 0 and state["kv_pages_used"] == 0:
                break
    assert state["kv_pages_used"] == 0 and state["kv_pages_free"] == state["kv_pages_total"]
    assert state["kv_pages_cached"] >= 8  # the shared prompt stays cached, evictable


def test_seeds_penalties_and_logprobs_agree_with_and_without_a_hit(tiny_model_dir):
    folder = tiny_model_dir("qwen2")
    base = random_prompts(1, seed=47, lengths=[36])[0]
    prompt = base[:32] + [5, 6, 7]
    params = SamplingParams(max_tokens=12, temperature=0.8, seed=11, repetition_penalty=1.3, presence_penalty=0.5,
                            frequency_penalty=0.4, logprobs=3, ignore_eos=True)
    runs = {}
    for cache in (True, False):
        with LLM(folder, max_model_len=128, page_size=PS, enable_prefix_caching=cache) as llm:
            llm.generate([base], GREEDY)
            runs[cache] = llm.generate([prompt], params)[0]
            hits = _state(llm)["prefix_cache_hits"]
        assert (hits >= 32) == cache
    assert runs[True].token_ids == runs[False].token_ids
    for a, b in zip(runs[True].logprobs, runs[False].logprobs):
        assert a[0] == pytest.approx(b[0], abs=1e-4)


# ---------------------------------------------------------------- through the server
def _chat_ids(tokenizer, messages) -> list:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_a_multi_turn_chat_reports_cached_tokens_and_matches_a_server_without_the_cache(tiny_chat_model):
    import openai
    from transformers import AutoTokenizer

    from server_utils import Server

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model)
    system = {"role": "system", "content": "You are a terse assistant who answers in one short sentence. " * 4}
    questions = ["What is the capital of France?", "And of Italy?", "Which one is older?", "Thanks, bye."]
    transcripts = {}
    for flag in ("--enable-prefix-caching", "--no-enable-prefix-caching"):
        with Server(tiny_chat_model, "--max-model-len", "1024", "--page-size", str(PS), "--served-model-name", "tiny",
                    flag) as srv:
            client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused")
            messages, turns = [system], []
            for q in questions:
                messages.append({"role": "user", "content": q})
                r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8,
                                                   temperature=0)
                reply = r.choices[0].message.content
                turns.append((reply, r.usage.prompt_tokens, r.usage.prompt_tokens_details.cached_tokens,
                               _chat_ids(tokenizer, messages)))
                messages.append({"role": "assistant", "content": reply})
            transcripts[flag] = turns
    with_cache, without = transcripts["--enable-prefix-caching"], transcripts["--no-enable-prefix-caching"]
    assert [t[0] for t in with_cache] == [t[0] for t in without]
    assert all(t[2] == 0 for t in without) and with_cache[0][2] == 0
    for (_, _, _, prev_ids), (_, prompt_tokens, cached, ids) in zip(with_cache, with_cache[1:]):
        shared = next((i for i, (a, b) in enumerate(zip(prev_ids, ids)) if a != b), len(prev_ids))
        # at least the full pages shared with the previous turn's prompt; the previous reply's pages may add more
        assert cached % PS == 0 and shared // PS * PS <= cached <= prompt_tokens - 1 and cached > 0
