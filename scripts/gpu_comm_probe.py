"""What the GPUs of this machine can exchange, at the sizes a Llama-3.1-8B step moves between TP ranks or PP stages:
all-reduce latency (NCCL eager, NCCL inside a CUDA graph, PyTorch symmetric memory one-shot and two-shot, never
multicast) and point-to-point bandwidth. One process per GPU:  python3 scripts/gpu_comm_probe.py [hidden_size]"""
from __future__ import annotations

import json
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TOKENS = [1, 16, 64, 256, 512, 2048, 8192]


def _time_ms(fn, reps: int = 30, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    dist.barrier()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def _graphed(fn, inner: int = 10):
    """fn captured `inner` times in one CUDA graph; returns a replay function timed per fn call."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    return graph, inner


def _worker(rank: int, world: int, port: int, hidden: int, out: dict) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            device_id=torch.device("cuda", rank))
    group = dist.group.WORLD
    rows = {}
    symm = None
    try:
        import torch.distributed._symmetric_memory as symm_mem

        symm = symm_mem.empty(max(TOKENS) * hidden, dtype=torch.bfloat16, device="cuda")
        handle = symm_mem.rendezvous(symm, group)
        rows["symm_mem"] = f"ok (multicast ptr {'set' if handle.multicast_ptr else 'none'})"
    except Exception as e:  # report, then measure what works
        rows["symm_mem"] = f"unavailable: {type(e).__name__}: {e}"
        symm = None
    for tokens in TOKENS:
        x = torch.randn(tokens, hidden, dtype=torch.bfloat16, device="cuda")
        mb = x.numel() * 2 / 2 ** 20
        row = {"MiB": round(mb, 3), "nccl_eager_us": 1000 * _time_ms(lambda: dist.all_reduce(x, group=group))}
        graph, inner = _graphed(lambda: dist.all_reduce(x, group=group))
        row["nccl_graph_us"] = 1000 * _time_ms(graph.replay) / inner
        if symm is not None:
            name = group.group_name
            n = x.numel()
            flat = x.view(-1)
            outbuf = torch.empty_like(flat)
            try:
                one = lambda: torch.ops.symm_mem.one_shot_all_reduce_copy_out(symm, flat, "sum", name, outbuf)  # noqa
                graph, inner = _graphed(one)
                row["symm_one_shot_graph_us"] = 1000 * _time_ms(graph.replay) / inner
                expect = flat.float() * world  # every rank holds the same random x (same seed)
                one()
                torch.cuda.synchronize()
                row["one_shot_ok"] = bool(torch.allclose(outbuf.float(), expect, rtol=2e-2, atol=2e-2))
            except Exception as e:
                row["symm_one_shot"] = f"{type(e).__name__}: {str(e)[:120]}"

            def two():
                symm[:n].copy_(flat)
                torch.ops.symm_mem.two_shot_all_reduce_(symm[:n], "sum", name)
                outbuf.copy_(symm[:n])
            try:
                graph, inner = _graphed(two)
                row["symm_two_shot_graph_us"] = 1000 * _time_ms(graph.replay) / inner
            except Exception as e:
                row["symm_two_shot"] = f"{type(e).__name__}: {str(e)[:120]}"
        rows[f"tokens={tokens}"] = row
    for mb in (4, 64):
        buf = torch.empty(mb * 2 ** 20 // 2, dtype=torch.bfloat16, device="cuda")

        def p2p():
            if rank == 0:
                dist.send(buf, 1)
            elif rank == 1:
                dist.recv(buf, 0)
        ms = _time_ms(p2p, reps=10)
        rows[f"p2p_{mb}MiB_GBps"] = mb * 2 ** 20 / (ms / 1000) / 1e9
    if rank == 0:
        out.update(rows)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    hidden = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
    world = torch.cuda.device_count()
    if world < 2:
        print(json.dumps({"error": f"needs 2+ GPUs, found {world}"}))
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.manual_seed(0)
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_seeded, args=(world, port, hidden, out), nprocs=world)
        print("COMM " + json.dumps(dict(out), indent=1))


def _seeded(rank, world, port, hidden, out):
    torch.manual_seed(0)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # the machine sets it; never turn multicast on
    _worker(rank, world, port, hidden, out)


if __name__ == "__main__":
    main()
