"""Two "nodes" on one 2-GPU machine (each sees one GPU, PP=2 across them, control links over tcp on loopback):
1. greedy tokens of a tiny fp32 model equal one node's PP=2 and Hugging Face's;
2. offline throughput (Llama-3.1-8B shape, dummy weights) against single-node PP=2 with the same flags.

    python3 scripts/gpu_two_nodes.py OUT_DIR [NUM_PROMPTS]
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
os.environ.setdefault("NANOSLG_CLUSTER_SECRET", "two-nodes-on-one-machine-secret")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node1(args: list, port: int) -> subprocess.Popen:
    """Node 1 on GPU 1: the same command with --node-rank 1."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "1"}
    return subprocess.Popen([sys.executable, "-m", "nanoslg", *args, "--nnodes", "2", "--node-rank", "1",
                             "--dist-init-addr", f"127.0.0.1:{port}"], env=env)


def tokens_check() -> dict:
    import torch

    from conftest import random_prompts
    from nanoslg import LLM, SamplingParams
    from tiny_models import hf_greedy, make_tiny_model

    folder = make_tiny_model("llama", "/tmp/two-nodes-tiny", num_layers=4, vocab_size=1024, dtype=torch.float32,
                             hidden_size=512, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=2,
                             head_dim=128)
    prompts = random_prompts(16, seed=40)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    engine = dict(max_model_len=512, pipeline_parallel_size=2, attention_backend="sdpa")
    with LLM(folder, **engine) as llm:
        one_node = [o.token_ids for o in llm.generate(prompts, params)]
    port = free_port()
    remote = node1(["serve", folder, "-pp", "2", "--max-model-len", "512", "--attention-backend", "sdpa"], port)
    os.environ["CUDA_VISIBLE_DEVICES"] = "0"
    try:
        with LLM(folder, nnodes=2, node_rank=0, dist_init_addr=f"127.0.0.1:{port}", **engine) as llm:
            two_nodes = [o.token_ids for o in llm.generate(prompts, params)]
    finally:
        del os.environ["CUDA_VISIBLE_DEVICES"]
        remote.wait(60)
    hf = hf_greedy(folder, prompts, 24)
    return {"two_nodes_equal_one_node": two_nodes == one_node, "one_node_equal_hf_fp32": one_node == hf,
            "node1_exit": remote.returncode}


def throughput(out: str, num_prompts: int) -> dict:
    bench = ["bench", "throughput", os.path.join(ROOT, "benchmarks", "configs", "llama-3.1-8b"), "--load-format",
             "dummy", "--max-model-len", "4096", "-pp", "2", "--input-len", "1024", "--output-len", "512",
             "--num-prompts", str(num_prompts), "--max-num-seqs", os.environ.get("TWO_NODE_SEQS", "384"),
             "--max-num-batched-tokens", "8192"]
    single = os.path.join(out, "pp2-one-node.json")
    subprocess.run([sys.executable, "-m", "nanoslg", *bench, "--output-json", single], check=True)
    port = free_port()
    remote = node1(bench + ["--no-peak"], port)
    split = os.path.join(out, "pp2-two-nodes.json")
    subprocess.run([sys.executable, "-m", "nanoslg", *bench, "--nnodes", "2", "--node-rank", "0", "--dist-init-addr",
                    f"127.0.0.1:{port}", "--output-json", split], check=True,
                   env={**os.environ, "CUDA_VISIBLE_DEVICES": "0"})
    remote.wait(60)
    a, b = (json.load(open(p))["total_tokens_per_s"] for p in (single, split))
    return {"pp2_one_node_tok_s": a, "pp2_two_nodes_tok_s": b, "two_nodes_vs_one_node": b / a}


def main() -> None:
    out = sys.argv[1] if len(sys.argv) > 1 else "/tmp"
    result = tokens_check()
    if len(sys.argv) > 2:
        result.update(throughput(out, int(sys.argv[2])))
    print("TWO-NODES " + json.dumps(result))
    with open(os.path.join(out, "two-nodes.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
