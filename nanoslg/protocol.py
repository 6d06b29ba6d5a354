"""Every message exchanged between nanoslg processes, and their msgpack codec.

Each message is a slotted dataclass registered under a unique type tag. Token-id sequences travel as
``array('i')`` (packed int32 bytes on the wire). ``decode`` rejects unknown tags and oversized frames, so a
confused or hostile peer cannot make a process allocate without bound or act on a message it does not know.
Decoding fills a message's fields without running its constructor: what was validated where it entered the engine
(SamplingParams, at the API edge or in the offline API) is not validated again in every process it crosses.
"""
from __future__ import annotations

import dataclasses
from array import array
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, TypeVar

import msgpack
from typing_extensions import dataclass_transform

from nanoslg.sampling_params import SamplingParams

_T = TypeVar("_T")
MAX_FRAME_BYTES = 256 * 1024 * 1024

_EXT_MESSAGE = 1
_EXT_INT32 = 2

_TAGS: dict[str, type] = {}
# per message type: its field names, and for each a factory of its default (None: the field is required)
_FIELDS: dict[type, tuple[tuple[str, ...], tuple[Any, ...]]] = {}
# messages whose constructor validates, decoded without running it: a generated function assigns every field
_VALIDATING: dict[type, Any] = {}


def _field_setter(names: tuple[str, ...]) -> Any:
    args = ", ".join(names)
    body = "".join(f"    obj.{n} = {n}\n" for n in names)
    scope: dict[str, Any] = {}
    exec(f"def assign(obj, {args}):\n{body}    return obj\n", scope)  # noqa: S102 - names come from dataclasses
    return scope["assign"]


def _register(cls: type[_T]) -> type[_T]:
    tag = cls.__name__
    if tag in _TAGS:
        raise TypeError(f"duplicate message tag {tag}")
    _TAGS[tag] = cls
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]  # every message is a dataclass
    if hasattr(cls, "__post_init__"):
        _VALIDATING[cls] = _field_setter(tuple(f.name for f in fields))
    _FIELDS[cls] = (tuple(f.name for f in fields), tuple(
        (lambda v=f.default: v) if f.default is not dataclasses.MISSING else
        f.default_factory if f.default_factory is not dataclasses.MISSING else None for f in fields))
    return cls


@dataclass_transform()
def message(cls: type[_T]) -> type[_T]:
    """Register a dataclass as a wire message under its class name."""
    return _register(dataclass(slots=True)(cls))


# Defined beside its validation (sampling_params.py), sent as it is: one typed object from the edge to the sampler.
_register(SamplingParams)


def token_ids(ids: Iterable[int] = ()) -> array[int]:
    """The wire type for token-id sequences."""
    return ids if isinstance(ids, array) and ids.typecode == "i" else array("i", ids)


class ProtocolError(ValueError):
    pass


# ---------------------------------------------------------------- process lifecycle
@message
class Ready:
    name: str
    info: dict[str, Any] = field(default_factory=dict)  # free-form: what each process reports at startup (logged)


@message
class Failed:
    name: str
    error: str


@message
class Shutdown:
    reason: str = ""


# ---------------------------------------------------------------- node 0's launcher <-> other nodes (cluster.py)
@message
class NodeHello:
    node_rank: int
    config_digest: str  # cluster.config_digest: every node must run the same engine configuration


@message
class Heartbeat:
    node_rank: int


@message
class NodeDown:
    """A node lost a worker (or is stopping): node 0 fails the engine with this reason."""

    node_rank: int
    reason: str


# ---------------------------------------------------------------- client <-> tokenizer_proc
@message
class GenerateRequest:
    rid: str
    params: SamplingParams
    prompt: Optional[str] = None
    prompt_ids: Optional[array[int]] = None
    messages: Optional[list[dict[str, Any]]] = None  # chat conversation, rendered with the model's chat template
    chat_template_kwargs: Optional[dict[str, Any]] = None
    echo: bool = False  # send the prompt's text back with the first delta
    client: int = 0  # the API-server process that sent it, which gets its outputs (EngineConfig.client_inboxes)


@message
class AbortRequest:
    rid: str


@message
class ClientReset:
    """An API-server process (re)started: the requests it sent before are nobody's now, so they are aborted."""

    client: int


@message
class OutputDelta:
    """What one request produced since its last delta. ``error`` set means the request failed."""

    rid: str
    text: str = ""
    token_ids: array[int] = field(default_factory=token_ids)
    finish_reason: Optional[str] = None
    logprobs: Optional[list[Any]] = None  # per new token: [token_logprob, [[id, logprob], ...top-k]]
    num_prompt_tokens: int = 0
    prompt_ids: Optional[array[int]] = None  # on the first delta only
    error: Optional[str] = None
    prompt_text: Optional[str] = None  # on the first delta, when the request asked for echo
    logprob_texts: Optional[list[Any]] = None  # per new token with logprobs: [text, [top-k texts]]
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    queue_time: Optional[float] = None  # on the first token: seconds queued in the scheduler (TokenUpdate)
    prefill_time: Optional[float] = None  # on the first token: seconds from first scheduled to first token
    error_code: Optional[str] = None  # with a rejection: its OpenAI error code (errors.py)


@message
class OutputBatch:
    deltas: list[OutputDelta]


# ---------------------------------------------------------------- tokenizer_proc <-> scheduler_proc
@message
class TokenizedRequest:
    rid: str
    prompt_ids: array[int]
    params: SamplingParams
    stop_token_ids: list[int]  # EOS ids (unless ignore_eos) plus the user's stop_token_ids


@message
class TokenUpdate:
    rid: str
    token_ids: array[int]
    finish_reason: Optional[str] = None
    logprobs: Optional[list[Any]] = None
    error: Optional[str] = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    queue_time: Optional[float] = None  # on the first token only, see OutputDelta
    prefill_time: Optional[float] = None
    error_code: Optional[str] = None  # see OutputDelta


@message
class TokenBatch:
    updates: list[TokenUpdate]


# ---------------------------------------------------------------- scheduler_proc <-> workers
@message
class RowSetup:
    """What a worker keeps for a request, sent with its first chunk: its sampling parameters and what they apply
    to."""

    params: SamplingParams
    prompt_len: int
    prefix_ids: Optional[array[int]] = None  # a prompt prefix served from the prefix cache (penalties count it)
    stop_token_ids: list[int] = field(default_factory=list)  # what ends the request: a grammar ends on it too


@message
class SeqChunk:
    """One request's slice of a step: compute KV for ``token_ids`` at positions start_pos.. and, when
    ``sample`` is set, sample the next token from the last one. With overlap scheduling a decode chunk is planned
    before the token it consumes is known: ``pending`` = 1 and no token_ids; the worker takes the token it sampled
    for this request in the previous step from its own device buffer."""

    rid: str
    token_ids: array[int]
    start_pos: int
    page_table: array[int]  # physical KV page ids covering positions [0, start_pos + number of tokens)
    sample: bool
    setup: Optional[RowSetup] = None  # sent once, on the request's first chunk in a worker's lifetime
    pending: int = 0


@message
class StepPlan:
    step_id: int
    seqs: list[SeqChunk]
    released: list[str] = field(default_factory=list)  # rids whose worker-side state can be dropped


@message
class StepResult:
    step_id: int
    rids: list[str]
    token_ids: array[int]
    logprobs: Optional[list[Any]] = None  # aligned with rids; None entries where not asked
    error: Optional[str] = None  # the step failed as a whole (e.g. out of memory)
    gpu_ms: float = 0.0  # the driver rank's device time for the step (CUDA events around it; 0 on CPU)
    op_ms: Optional[dict[str, float]] = None  # on sampled steps: device ms per operation class (gemm, attention, ...)
    grammar_ended: Optional[list[str]] = None  # rids whose structured output is complete with this step's token
    # [rid, error, finish reason, error code] of rows that failed alone: "rejected" (a grammar this model's
    # vocabulary cannot continue: the client's request is at fault) or "error" (a grammar that broke)
    row_errors: Optional[list[list[Any]]] = None


@message
class GrammarCompile:
    """Sent on the plan feed before any request with this structured output is scheduled: the sampling ranks
    compile it in the background (structured_outputs.py form); the driver answers GrammarCompiled."""

    key: str
    spec: dict[str, Any]  # structured_outputs.normalize form: one key, whose value is a schema, regex or grammar


@message
class GrammarCompiled:
    """The driver's grammar for key is compiled (error unset) or cannot be (its requests are rejected)."""

    key: str
    error: Optional[str] = None


@message
class ProfileRequest:
    """Sent on the plan feed (every rank runs it, in plan order, so collectives match): time this rank's real
    operations at the shapes asked for. kind: "ops" (GEMMs, attention, collectives) or "step" (whole steps)."""

    kind: str
    shapes: dict[str, Any]  # free-form: the profile kind decides the shapes it takes (op_profiler.py)


@message
class ProfileResult:
    """The driver rank's timings for a ProfileRequest (error set if it could not run)."""

    kind: str
    timings: dict[str, Any]  # free-form: per profile kind (op_profiler.py)
    error: Optional[str] = None


# ---------------------------------------------------------------- debug socket
@message
class DebugSubmit:
    prompt_ids: array[int]
    params: SamplingParams


@message
class DebugStateQuery:
    pass


@message
class DebugReply:
    state: dict[str, Any]  # free-form: a JSON report for people and tools (nanoslg debug state)


@message
class DebugSetTargets:
    """Change the global batch's running target and dense batch on a live engine (nanoslg tune)."""

    running_target: Optional[int] = None
    dense_batch_tokens: Optional[int] = None


@message
class DebugProfile:
    """Ask the workers, through the scheduler, to run a ProfileRequest; the reply carries the ProfileResult."""

    kind: str
    shapes: dict[str, Any]  # as ProfileRequest.shapes


# ---------------------------------------------------------------- the API server's first process -> the others
@message
class ServerState:
    """Published by the process that owns the engine to the other API-server processes within 0.1 s of a change of
    state, run directory or restarts, and twice a second: state (running, restarting, draining, stopped), the
    engine's run directory (it changes on a restart), why it is down, the restarts so far and the pids of the
    server's processes by name (for /metrics)."""

    state: str
    run_dir: str
    detail: str = ""
    num_restarts: int = 0
    pids: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------- codec
def _default(obj: Any) -> msgpack.ExtType:
    if isinstance(obj, array):
        if obj.typecode != "i":
            raise TypeError(f"only int32 arrays travel, got typecode {obj.typecode!r}")
        return msgpack.ExtType(_EXT_INT32, obj.tobytes())
    cls = type(obj)
    layout = _FIELDS.get(cls)
    if layout is not None:
        return msgpack.ExtType(_EXT_MESSAGE, _pack([cls.__name__, *[getattr(obj, n) for n in layout[0]]]))
    raise TypeError(f"cannot encode {cls.__name__}")


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _EXT_INT32:
        out = array("i")
        out.frombytes(data)
        return out
    if code == _EXT_MESSAGE:
        tag, *values = msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
        cls = _TAGS.get(tag)
        if cls is None:
            raise ProtocolError(f"unknown message tag {tag!r}")
        assign = _VALIDATING.get(cls)
        if assign is None:  # a plain dataclass constructor only assigns: the quickest way in
            try:
                return cls(*values)
            except TypeError as e:
                raise ProtocolError(f"malformed {tag}: {e}") from None
        names, defaults = _FIELDS[cls]
        if len(values) == len(names):
            return assign(object.__new__(cls), *values)
        if len(values) > len(names):
            raise ProtocolError(f"malformed {tag}: {len(values)} fields, it has {len(names)}")
        msg: Any = object.__new__(cls)
        for i, name in enumerate(names):
            if i < len(values):
                value = values[i]
            elif defaults[i] is None:
                raise ProtocolError(f"malformed {tag}: no {name}")
            else:
                value = defaults[i]()
            object.__setattr__(msg, name, value)
        return msg
    raise ProtocolError(f"unknown extension type {code}")


# a Packer per nesting level in use: making one per nested message costs more than packing
_idle_packers: list[msgpack.Packer] = []


def _pack(obj: Any) -> bytes:
    packer = _idle_packers.pop() if _idle_packers else msgpack.Packer(default=_default, use_bin_type=True)
    try:
        packed: bytes = packer.pack(obj)
        return packed
    except BaseException:
        packer.reset()
        raise
    finally:
        _idle_packers.append(packer)


def encode(msg: Any) -> bytes:
    if type(msg) not in _FIELDS:
        raise TypeError(f"{type(msg).__name__} is not a registered message")
    return _pack(msg)


def decode(frame: bytes) -> Any:
    if len(frame) > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {len(frame)} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
    try:
        msg = msgpack.unpackb(frame, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except ProtocolError:
        raise
    except Exception as e:
        raise ProtocolError(f"undecodable frame: {e}") from None
    if type(msg) not in _FIELDS:
        raise ProtocolError(f"frame is not a tagged message: {type(msg).__name__}")
    return msg
