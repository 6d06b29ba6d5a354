"""`nanoslg debug`: talk to a running scheduler's debug socket: submit raw token-id requests, print its state."""
from __future__ import annotations

import glob
import json
import os
import sys
import tempfile
import time
from typing import Any

import zmq

from nanoslg import ipc, protocol
from nanoslg.protocol import DebugStateQuery, DebugSubmit, token_ids


class DebugClient:
    def __init__(self, run_dir: str, timeout_s: float = 10.0):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(ipc.address(run_dir, ipc.DEBUG))
        self.timeout_ms = int(timeout_s * 1000)

    def _call(self, msg) -> dict[str, Any]:
        self.sock.send(protocol.encode(msg))
        if not self.sock.poll(self.timeout_ms):
            raise TimeoutError("the scheduler did not answer on its debug socket")
        return protocol.decode(self.sock.recv()).state

    def state(self) -> dict[str, Any]:
        return self._call(DebugStateQuery())

    def submit(self, prompt_ids: list[int], **params) -> str:
        """params: SamplingParams' fields (validated here, the debug socket's edge)."""
        from nanoslg.sampling_params import SamplingParams

        reply = self._call(DebugSubmit(token_ids(prompt_ids), SamplingParams(**params)))
        if "error" in reply:
            raise ValueError(reply["error"])
        return reply["rid"]

    def close(self) -> None:
        # Close the socket before the context: a context collected while its socket is open blocks in term().
        if not self.sock.closed:
            self.sock.close(linger=0)
            self.ctx.term()

    def __enter__(self) -> "DebugClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()


def find_run_dir() -> str:
    """The newest run directory of this user that has a debug socket."""
    socks = glob.glob(os.path.join(tempfile.gettempdir(), "nanoslg-*", f"{ipc.DEBUG}.sock"))
    if not socks:
        raise FileNotFoundError("no running nanoslg engine found; pass --run-dir")
    return os.path.dirname(max(socks, key=os.path.getmtime))


def add_debug_arguments(parser) -> None:
    parser.add_argument("--run-dir", help="the engine's run directory (default: the newest running engine)")
    sub = parser.add_subparsers(dest="debug_command", required=True)
    sub.add_parser("state", help="print waiting/running/preempted counts, KV pages and the last step")
    submit = sub.add_parser("submit", help="submit a raw token-id request")
    submit.add_argument("prompt_ids", nargs="+", type=int)
    submit.add_argument("--max-tokens", type=int, default=16)
    submit.add_argument("--temperature", type=float, default=0.0)
    submit.add_argument("--ignore-eos", action="store_true")
    submit.add_argument("--wait", action="store_true", help="follow the request until it finishes")


def run_debug(args) -> int:
    client = DebugClient(args.run_dir or find_run_dir())
    try:
        if args.debug_command == "state":
            print(json.dumps(client.state(), indent=2))
            return 0
        print("before:", json.dumps(_summary(client.state())))
        rid = client.submit(args.prompt_ids, max_tokens=args.max_tokens, temperature=args.temperature,
                            ignore_eos=args.ignore_eos)
        print("submitted:", rid)
        while args.wait:
            state = client.state()
            record = state["debug_requests"].get(rid)
            if record is None or record["finish_reason"] is not None:
                print("finished:", json.dumps({"rid": rid, **(record or {})}))
                print("after:", json.dumps(_summary(state)))
                break
            print("running:", json.dumps(_summary(state)))
            time.sleep(0.2)
        return 0
    except (TimeoutError, ValueError) as e:
        print(f"nanoslg debug: {e}", file=sys.stderr)
        return 1
    finally:
        client.close()


def _summary(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if k != "debug_requests"}
