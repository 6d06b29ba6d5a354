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
