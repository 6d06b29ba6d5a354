"""The message codec's cost on a 256-sequence step: a decode plan, a plan of 256 first chunks (each carrying its
request's RowSetup and SamplingParams) and a step result, encoded and decoded (best of 5 x 200, microseconds).

    PYTHONPATH=. python3 benchmarks/message_codec.py
"""
import timeit

from nanoslg import protocol
from nanoslg.protocol import RowSetup, SeqChunk, StepPlan, StepResult, token_ids
from nanoslg.sampling_params import SamplingParams


def main() -> None:
    pages = token_ids(range(100))
    setup = [RowSetup(SamplingParams(max_tokens=512, temperature=0.7, top_p=0.9, seed=i), 1024) for i in range(256)]
    messages = {
        "decode plan x256": StepPlan(1, [SeqChunk(f"req-{i}", token_ids(), 1500, pages, True, None, 1)
                                         for i in range(256)]),
        "first chunks x256": StepPlan(2, [SeqChunk(f"req-{i}", token_ids(range(32)), 0, pages, True, setup[i])
                                          for i in range(256)]),
        "result x256": StepResult(1, [f"req-{i}" for i in range(256)], token_ids(range(256))),
    }
    for name, msg in messages.items():
        frame = protocol.encode(msg)
        n = 200
        enc = min(timeit.repeat(lambda: protocol.encode(msg), number=n, repeat=5)) / n
        dec = min(timeit.repeat(lambda: protocol.decode(frame), number=n, repeat=5)) / n
        print(f"{name:<20} encode {enc * 1e6:7.0f} us  decode {dec * 1e6:7.0f} us  {len(frame)} bytes")


if __name__ == "__main__":
    main()
