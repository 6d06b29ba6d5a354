"""`nanoslg tune MODEL [-tp N] [-pp M] [--gpus G]`: NanoFlow's automated parameter search, measured on this machine.

For each layout it starts the engine once, has every worker time the model's real operations (GEMMs over a range of
token counts, attention over a range of sequences and contexts, all-reduces) and whole steps (unsplit, and split in
nano-batches with each overlap), fits a cost model (tune_model.py), searches the running target R, the dense batch D
and the nano-batch split, checks the best candidates with real runs on the same engine (R and D change live through
the scheduler's debug socket), each measured in its steady state, and writes what it decided, with why, to the
tuned config that `serve` and `bench throughput` load for this model, device and layout.

The defaults are always a candidate, run before and after the others: their two runs measure the run-to-run noise,
and the tuned config sets values only when a candidate beats the defaults by more than that noise (and at least
tune_model.MIN_GAIN); otherwise it says the defaults are best and sets nothing.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import sys
import time
from typing import Any, Optional, cast

from nanoslg import tuned_config
from nanoslg.config import ResolvedConfig
from nanoslg.engine_args import add_engine_arguments, engine_config_from_args, engine_fields
from nanoslg.entrypoints.tune_model import Candidate, CostModel, decide, search, steady_state

OVERLAP_NAMES = {"memory": "attention beside GEMMs", "network": "all-reduce beside GEMMs",
                 "network+memory": "attention and all-reduce beside GEMMs"}


def add_tune_arguments(parser) -> None:
    add_engine_arguments(parser)
    g = parser.add_argument_group("tune")
    g.add_argument("--gpus", type=int, default=None,
                   help="also choose the layout: try every TP x PP split of this many GPUs the model allows")
    g.add_argument("--dataset", default="random", choices=["random", "sharegpt-like"],
                   help="the traffic to tune for (its mean prompt and output lengths)")
    g.add_argument("--input-len", type=int, default=1024)
    g.add_argument("--output-len", type=int, default=512)
    g.add_argument("--validate", type=int, default=3,
                   help="best candidates checked with a real run each (besides the defaults, run twice)")
    g.add_argument("--window", type=float, default=None,
                   help="seconds of steady state each check measures at least (default: 10 on a GPU, 2 on CPU)")
    g.add_argument("--max-running", type=int, default=None,
                   help="largest running target searched (default: 1024 on a GPU, 64 on CPU)")
    g.add_argument("--output", default=None, help="write the tuned config here instead of its default place")


def _workload(args, vocab_size: int, max_model_len: int) -> tuple[list[list[int]], list[int]]:
    """(prompts, output lengths) of the traffic tuned for: token ids folded into the vocabulary, each pair fitting
    max_model_len."""
    from nanoslg.entrypoints.bench_datasets import make_requests

    reqs = make_requests(args.dataset, "completions", 256, args.input_len, args.output_len, 0, max_model_len)
    outputs = [max(1, min(r.output_len, max_model_len // 2)) for r in reqs]
    ids = [cast("list[int]", r.prompt) for r in reqs]  # completions prompts are token ids
    prompts = [[t % vocab_size for t in p[:max_model_len - 1 - n]] for p, n in zip(ids, outputs)]
    return prompts, outputs


def _layouts(base: ResolvedConfig, gpus: int) -> list[tuple[int, int]]:
    """Every (tp, pp) with tp x pp = gpus that the model splits into."""
    from nanoslg.model_spec import ConfigError

    out = []
    for tp in range(1, gpus + 1):
        if gpus % tp:
            continue
        try:
            dataclasses.replace(base, tensor_parallel_size=tp, pipeline_parallel_size=gpus // tp).check_layout()
            out.append((tp, gpus // tp))
        except ConfigError:
            continue
    return out


def run_tune(args) -> int:
    from tqdm import tqdm

    from nanoslg.entrypoints.bench_throughput import resolve_model_arg

    args.model = resolve_model_arg(args.model)
    base = dataclasses.replace(engine_config_from_args(args), use_tuned_config=False).resolve()
    layouts = _layouts(base, args.gpus) if args.gpus else \
        [(base.tensor_parallel_size, base.pipeline_parallel_size)]
    if not layouts:
        print(f"nanoslg tune: {base.model_spec.num_heads} heads split over no layout of {args.gpus} GPUs",
              file=sys.stderr)
        return 2
    started = time.monotonic()
    steps = len(layouts) * (5 + args.validate)
    results = []
    with tqdm(total=steps, desc="tune", unit="phase", file=sys.stderr) as bar:
        for tp, pp in layouts:
            results.append(_tune_layout(args, base, tp, pp, bar))
    best = max(results, key=lambda r: r["measured_tokens_per_s"])
    for r in results:
        r["doc"]["layout_search"] = [{"tensor_parallel_size": x["tp"], "pipeline_parallel_size": x["pp"],
                                      "measured_tokens_per_s": x["measured_tokens_per_s"]} for x in results]
        r["doc"]["best_layout"] = {"tensor_parallel_size": best["tp"], "pipeline_parallel_size": best["pp"]}
        r["doc"]["elapsed_s"] = time.monotonic() - started
        path = args.output if args.output and len(results) == 1 else tuned_config.default_path(r["doc"]["identity"])
        tuned_config.write(path, r["doc"])
        r["path"] = path
    for r in results:
        print(_report(r))
    if len(results) > 1:
        print(f"best layout for {args.gpus} GPUs: -tp {best['tp']} -pp {best['pp']} "
              f"({best['measured_tokens_per_s']:.0f} tok/s measured)")
    print(f"tuned in {time.monotonic() - started:.0f} s")
    return 0


def _tune_layout(args, base: ResolvedConfig, tp: int, pp: int, bar) -> dict[str, Any]:
    from nanoslg.entrypoints.debug import DebugClient
    from nanoslg.llm import LLM

    gpu = base.device_name != "cpu"
    max_running = args.max_running or (1024 if gpu else 64)
    max_tokens = base.max_num_batched_tokens  # the flag, else the default the engine runs without a tuned config
    # the engine allows the defaults' running target too: they are measured on it as they are
    fields = {**engine_fields(base), "tensor_parallel_size": tp, "pipeline_parallel_size": pp,
              "max_num_seqs": max(max_running, base.max_num_seqs), "max_num_batched_tokens": max_tokens,
              "running_target": None, "dense_batch_tokens": None, "nano_batches": 1, "enable_prefix_caching": False}
    bar.set_postfix_str(f"tp={tp} pp={pp}: starting the engine")
    with LLM(**fields) as llm, DebugClient(llm.config.run_dir, timeout_s=600) as debug:
        prompts, outputs = _workload(args, llm.config.model_spec.vocab_size, llm.config.max_model_len)
        mean_in, mean_out = sum(map(len, prompts)) / len(prompts), sum(outputs) / len(outputs)
        pages = debug.state()["kv_pages_total"]
        ps, max_len = llm.config.page_size, llm.config.max_model_len
        bar.update(1)
        bar.set_postfix_str(f"tp={tp} pp={pp}: timing operations")
        ops = _profile(debug, "ops", {**_op_shapes(gpu, max_tokens, pages, ps, max_len), "max_pages": pages})
        bar.update(1)
        bar.set_postfix_str(f"tp={tp} pp={pp}: timing whole steps")
        overlaps = ["network", "network+memory"] if tp > 1 else ["memory"]
        step_shapes = _step_shapes(mean_in, mean_out, max_running, pages, ps, max_len)
        variants = [[1, "none", False]] + [[2, o, False] for o in overlaps]
        if tp > 1:
            variants += [[1, "none", True], [2, "network", True]]
        steps = _profile(debug, "steps", {"steps": step_shapes, "variants": variants, "max_pages": pages})["steps"]
        bar.update(1)
        speedups, decisions = _nano_decisions(steps, gpu)
        model = CostModel.fit(ops, steps)
        # staggered requests hold about their mean size (the scheduler's pool forecast), not their final one
        mem_running = max(1, int(0.95 * pages * ps / (mean_in + mean_out / 2)))
        candidates = search(model, mean_in, mean_out, min(max_running, mem_running), max_tokens,
                            {k: v for k, v in speedups.items() if v >= 1.0 or k == (1, "none", False)})
        defaults = _defaults(base, model, mean_in, mean_out, mem_running)
        window = args.window or (10 if gpu else 2)
        run = lambda c: _measure(llm, debug, c, min(c.running_target, mem_running), prompts, outputs,  # noqa: E731
                                 window)
        bar.set_postfix_str(f"tp={tp} pp={pp}: measuring the defaults")
        defaults_runs = [run(defaults)]
        bar.update(1)
        checked: list[Candidate] = []
        seen: set[tuple[int, Optional[int]]] = {(defaults.running_target, defaults.dense_batch_tokens)}
        for c in candidates:
            if len(checked) >= args.validate:
                break
            if (c.running_target, c.dense_batch_tokens) in seen:
                continue
            seen.add((c.running_target, c.dense_batch_tokens))
            bar.set_postfix_str(f"tp={tp} pp={pp}: checking R={c.running_target} D={c.dense_batch_tokens or 'auto'}")
            c.measured_tokens_per_s = run(c)
            checked.append(c)
            bar.update(1)
        bar.set_postfix_str(f"tp={tp} pp={pp}: measuring the defaults again")
        defaults_runs.append(run(defaults))  # after the others: the spread of the two is the run's noise
        bar.update(1)
    verdict = decide(defaults_runs, checked)
    defaults.measured_tokens_per_s = verdict.defaults_tokens_per_s
    best = verdict.chosen
    if best is not None:
        decisions.append(f"running target {best.running_target}, dense batch {best.dense_batch_tokens or 'auto'}: "
                         f"{best.measured_tokens_per_s:.0f} tok/s measured, best of {len(checked)} checked "
                         f"(predicted {best.predicted_tokens_per_s:.0f}); memory holds {mem_running} staggered "
                         f"requests of {mean_in:.0f} + {mean_out:.0f} tokens")
    decisions.append(verdict.reason)
    ident = tuned_config.identity(base.model, llm.config.model_spec, base.device_name, tp, pp, base.quantization,
                                  base.kv_cache_dtype)
    engine = {} if best is None else {
        "max_num_seqs": best.running_target, "running_target": best.running_target,
        "max_num_batched_tokens": max_tokens, "dense_batch_tokens": best.dense_batch_tokens,
        "nano_batches": best.nano_batches, "nano_overlap": best.nano_overlap,
        "sequence_parallel": best.sequence_parallel}
    doc = {"identity": ident, "engine": engine,
           "workload": {"dataset": args.dataset, "mean_input_len": mean_in, "mean_output_len": mean_out},
           "decisions": decisions, "created": datetime.datetime.now().isoformat(timespec="seconds"),
           "defaults": {**dataclasses.asdict(defaults), "runs": defaults_runs, "noise": verdict.noise},
           "candidates": [dataclasses.asdict(c) for c in checked],
           "predicted_top": [dataclasses.asdict(c) for c in candidates[:10]],
           "profile": {"ops": ops, "steps": steps}}
    return {"tp": tp, "pp": pp, "doc": doc, "checked": checked, "defaults": defaults, "verdict": verdict,
            "measured_tokens_per_s": (best or defaults).measured_tokens_per_s or 0.0}


def _defaults(base: ResolvedConfig, model: CostModel, mean_in: float, mean_out: float, mem_running: int) -> Candidate:
    """The engine as it runs without a tuned config (its flags, else the built-in defaults), as a candidate."""
    r = base.running_target or base.max_num_seqs
    decodes, prefill, step, tps = steady_state(model, min(r, mem_running), base.dense_batch_tokens, mean_in,
                                               mean_out)
    return Candidate(r, base.dense_batch_tokens, base.nano_batches, base.nano_overlap, base.sequence_parallel, tps,
                     decodes, prefill, step)


def _profile(debug, kind: str, shapes: dict[str, Any]) -> dict[str, Any]:
    from nanoslg.protocol import DebugProfile

    reply = debug._call(DebugProfile(kind, shapes))
    if reply.get("error"):
        raise RuntimeError(f"profiling {kind} failed on the workers: {reply['error']}")
    return reply["timings"]


def _op_shapes(gpu: bool, max_tokens: int, pages: int, ps: int, max_len: int) -> dict[str, Any]:
    tokens = (16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192) if gpu else \
        (8, 16, 32, 64, 128, 256, 512)
    seqs = (1, 8, 32, 64, 128, 256, 512) if gpu else (1, 4, 16, 32)
    ctxs = (256, 1024, 2048, 4096) if gpu else (32, 128)
    fits = lambda b, c: c <= max_len and b * -(-c // ps) <= pages  # noqa: E731
    return {"tokens": [t for t in tokens if t <= max_tokens],
            "decode": [[b, c] for b in seqs for c in ctxs if fits(b, c)],
            "prefill": [[q, c] for q in ((64, 512, 2048) if gpu else (16, 64)) for c in ((0, 1024) if gpu else (0, 64))
                        if fits(1, q + c)]}


def _step_shapes(mean_in: float, mean_out: float, max_running: int, pages: int, ps: int, max_len: int
                 ) -> list[list[int]]:
    """Steady-state steps of the global batch at a few running sizes, and decode-only ones, that fit the pool."""
    ctx = min(max_len - 1, int(mean_in + mean_out / 2))
    out = []
    for r in sorted({max(1, max_running // 8), max(1, max_running // 4), max(1, max_running // 2), max_running}):
        if (r + 1) * -(-(ctx + int(r * mean_in / mean_out)) // ps) > pages:
            r = max(1, pages // (2 * -(-ctx // ps)))
        out += [[r, ctx, int(r * mean_in / mean_out)], [r, ctx, 0]]
    return [list(s) for s in dict.fromkeys(map(tuple, out))]


def _nano_decisions(steps: list[list[Any]], gpu: bool) -> tuple[dict[tuple[int, str, bool], float], list[str]]:
    """(speed-up of each variant (nano, overlap, sequence parallel) over the unsplit step on the mixed shapes, what
    was decided and why). A variant that does not beat the unsplit step is priced at 0: never picked."""
    base = {(d, c, p): ms for d, c, p, n, _, sp, ms, _ in steps if n == 1 and not sp}
    speedups, decisions = {(1, "none", False): 1.0}, []
    variants = {(n, o, sp) for _, _, _, n, o, sp, _, _ in steps} - {(1, "none", False)}
    for key in sorted(variants):
        ratios = sorted(base[(d, c, p)] / ms for d, c, p, n, o, sp, ms, _ in steps
                        if (n, o, sp) == key and p and (d, c, p) in base)
        if not ratios:
            continue
        speedup = ratios[len(ratios) // 2]
        what = (f"{OVERLAP_NAMES.get(key[1], key[1])} in {key[0]} nano-batches" if key[0] > 1 else "unsplit") + \
            (" with sequence parallelism" if key[2] else "")
        used = speedup >= 1.0 and (gpu or (key[0] == 1 and key[2]))
        if used:
            why = "used"
        elif speedup < 1.0:
            why = "slower than the unsplit step, not used" + (" on this GPU" if gpu else "")
        else:
            why = "not used (no CUDA streams on CPU)"
        decisions.append(f"{what}: {speedup:.2f}x measured on the real step, {why}")
        speedups[key] = speedup if used else 0.0
    return speedups, decisions


def _measure(llm, debug, c: Candidate, running: int, prompts: list[list[int]], outputs: list[int],
             window_s: float) -> float:
    """Tokens/s of the candidate in its steady state on the live engine: the window opens once `running` requests
    (what the candidate holds at once) have finished, i.e. the running set has turned over from the cold start,
    and closes after window_s and half a turnover more, with the queue still full; then everything is aborted."""
    from nanoslg.protocol import DebugSetTargets, GenerateRequest, token_ids
    from nanoslg.sampling_params import SamplingParams

    debug._call(DebugSetTargets(c.running_target, c.dense_batch_tokens))
    n = 3 * running + 32
    rids = [f"tune-{time.monotonic_ns()}-{i}" for i in range(n)]
    for i, rid in enumerate(rids):
        params = SamplingParams(max_tokens=outputs[i % len(outputs)], temperature=0, ignore_eos=True)
        llm.engine.submit(GenerateRequest(rid, params, prompt_ids=token_ids(prompts[i % len(prompts)])))
    tokens = lambda: sum(k["tokens"] for k in debug.state()["step_stats"]["counts"].values())  # noqa: E731
    live, finished, start = set(rids), 0, None
    try:
        while live:
            for d in llm.engine.poll_deltas(50):
                if d.finish_reason is not None and d.rid in live:
                    live.discard(d.rid)
                    finished += 1
                    if start is None and finished >= running:
                        start = (time.monotonic(), tokens(), finished)
            if start is not None and time.monotonic() - start[0] >= window_s and \
                    finished - start[2] >= max(1, running // 2):
                break
        # (every request may have finished before the window closed: then the rate until the last one finished)
        assert start is not None  # set once `running` of the 3 x running + 32 requests finished
        return (tokens() - start[1]) / max(1e-6, time.monotonic() - start[0])
    finally:
        # An aborted request sends no last delta: wait for the scheduler to empty instead (later deltas of these
        # requests are ignored by the next check, whose request ids differ).
        for rid in live:
            llm.engine.abort(rid)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            llm.engine.poll_deltas(50)
            state = debug.state()
            if not (state["running"] or state["waiting"] or state["steps_in_flight"]):
                break


def _report(r: dict[str, Any]) -> str:
    doc, verdict = r["doc"], r["verdict"]
    lines = [f"== tp={r['tp']} pp={r['pp']}: {r['path']}",
             f"{'':>9}{'R':>6}{'D':>8}{'nano':>6}{'SP':>4}{'predicted tok/s':>18}{'measured tok/s':>16}"]
    runs = doc["defaults"]["runs"]
    for name, c in [("defaults", r["defaults"])] + [("", c) for c in r["checked"]]:
        measured = f"{c.measured_tokens_per_s:.0f}" if name == "" else " / ".join(f"{x:.0f}" for x in runs)
        mark = "*" if c is (verdict.chosen or r["defaults"]) else ""
        lines.append(f"{name + mark:>9}{c.running_target:>6}{c.dense_batch_tokens or 'auto':>8}{c.nano_batches:>6}"
                     f"{'y' if c.sequence_parallel else 'n':>4}{c.predicted_tokens_per_s:>18.0f}{measured:>16}")
    lines += [f"- {d}" for d in doc["decisions"]]
    lines.append("engine: " + (json.dumps(doc["engine"]) if doc["engine"] else "the defaults (nothing set)"))
    return "\n".join(lines)
