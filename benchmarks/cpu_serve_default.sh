#!/usr/bin/env bash
# The default `nanoslg serve` on this machine's CPU, measured as a user meets it (issue 11): the pulled SmolLM2,
# no flags but those given here, then `nanoslg bench serve` with 16 random prompts of 128 tokens and 128 output
# tokens sent at once. Usage: benchmarks/cpu_serve_default.sh OUT.json [serve flags...]
# With NANOSLG_SRC=/path/to/an/older/checkout the server runs that checkout's code (a before/after comparison).
set -euo pipefail
out=$1; shift
model=$(python3 -m nanoslg.entrypoints.cli pull smollm2-135m-instruct 2>/dev/null | tail -1)
port=$((20000 + RANDOM % 20000))
log=${out%.json}.serve.log
# python -m puts the working directory first on sys.path: run the server from the checkout it should use
(cd "${NANOSLG_SRC:-.}" && exec python3 -m nanoslg.entrypoints.cli serve "$model" --port "$port" "$@") 2> "$log" &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
until curl -sf "http://127.0.0.1:$port/health" > /dev/null; do
    kill -0 $server 2>/dev/null || { cat "$log"; exit 1; }
    sleep 1
done
python3 -m nanoslg.entrypoints.cli bench serve --base-url "http://127.0.0.1:$port" --dataset random \
    --num-prompts 16 --input-len 128 --output-len 128 --num-warmups 1 --seed 0 --result-json "$out"
grep -E "dtype auto|torch threads" "$log" || true
