import msgpack
import pytest

from nanoslg import protocol
from nanoslg.protocol import OutputBatch, OutputDelta, ProtocolError, SeqChunk, StepPlan, token_ids


def test_roundtrip_nested_messages_and_packed_token_ids():
    plan = StepPlan(7, [SeqChunk("a", token_ids([1, 2, 3]), 5, token_ids([0, 4]), True, {"temperature": 0.0})],
                    ["old"])
    frame = protocol.encode(plan)
    back = protocol.decode(frame)
    assert back == plan
    assert list(back.seqs[0].token_ids) == [1, 2, 3]
    # token ids travel as 4 bytes each, not as msgpack integers
    assert token_ids(range(1000)).tobytes() in protocol.encode(SeqChunk("x", token_ids(range(1000)), 0,
                                                                        token_ids(), False))


def test_unknown_tag_and_garbage_are_rejected():
    fake = msgpack.packb(msgpack.ExtType(1, msgpack.packb(["NoSuchMessage", 1])))
    with pytest.raises(ProtocolError, match="unknown message tag 'NoSuchMessage'"):
        protocol.decode(fake)
    with pytest.raises(ProtocolError):
        protocol.decode(b"\xc1garbage")
    with pytest.raises(ProtocolError, match="not a tagged message"):
        protocol.decode(msgpack.packb({"rid": "x"}))


def test_oversized_frame_is_rejected(monkeypatch):
    monkeypatch.setattr(protocol, "MAX_FRAME_BYTES", 100)
    frame = protocol.encode(OutputBatch([OutputDelta("r", text="x" * 200)]))
    with pytest.raises(ProtocolError, match="exceeds"):
        protocol.decode(frame)


def test_only_registered_messages_encode():
    with pytest.raises(TypeError):
        protocol.encode({"not": "a message"})


def test_lists_of_chunks_and_updates_travel_as_columns_and_come_back_equal():
    from nanoslg.protocol import RowSetup, SamplingParams, TokenBatch, TokenUpdate

    seqs = [SeqChunk(f"r{i}", token_ids(range(i)), 3 * i, token_ids(range(100 + i, 100 + 2 * i)), i % 2 == 0,
                     RowSetup(SamplingParams(temperature=0), i) if i == 3 else None, i % 2) for i in range(300)]
    plan = StepPlan(9, seqs, ["gone"])
    frame = protocol.encode(plan)
    back = protocol.decode(frame)
    assert back == plan and all(type(s.token_ids) is type(token_ids()) for s in back.seqs)
    # one joined buffer per token-id field: every chunk's ids and pages lie in the frame back to back
    assert b"".join(s.page_table.tobytes() for s in seqs) in frame
    assert b"".join(s.token_ids.tobytes() for s in seqs) in frame
    updates = TokenBatch([TokenUpdate(f"r{i}", token_ids([i]), "stop" if i == 5 else None, [[-0.5, []]] if i == 2
                                      else None, num_cached_tokens=i) for i in range(40)])
    assert protocol.decode(protocol.encode(updates)) == updates
    # what cannot travel as columns goes as the plain list, and still comes back equal
    for odd in ([], [SeqChunk("a", [1, 2], 0, token_ids([3]), True)], [seqs[0], OutputDelta("x")]):
        assert protocol.decode(protocol.encode(StepPlan(1, odd))).seqs == odd


@pytest.mark.parametrize("columns, problem", [
    (["SeqChunk", 2, ["a", "b"]], "columns for"),
    (["SeqChunk", 1, ["a", "b"], [b"", b""], [0], [b"\x00" * 4, b""], [True], [None], [0]], "not 1 values"),
    (["SeqChunk", 1, ["a"], [b"\x05\x00\x00\x00", b"\x01\x00\x00\x00"], [0], [b"", b""], [True], [None], [0]],
     "lengths do not match"),
    (["SeqChunk", 1, ["a"], [b"\x01\x00", b""], [0], [b"", b""], [True], [None], [0]], "not int32 bytes"),
    (["NoSuchMessage", 0], "unknown message tag"),
    (["DebugStateQuery", 5], "columns for"),  # no fields to make columns of: never sent so
    (["SeqChunk", True, ["a"], [b"\x00" * 4, b""], [0], [b"\x00" * 4, b""], [True], [None], [0]], "columns for"),
])
def test_malformed_columns_are_rejected(columns, problem):
    inner = msgpack.ExtType(3, msgpack.packb(columns))
    frame = msgpack.packb(msgpack.ExtType(1, msgpack.packb(["StepPlan", 1, inner, []])))
    with pytest.raises(ProtocolError, match=problem):
        protocol.decode(frame)
