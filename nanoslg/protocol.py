"""Every message exchanged between nanoslg processes: slotted dataclasses registered under a unique type tag, which
the codec (codec.py) encodes and decodes. Token-id sequences are ``array('i')``.
"""
from __future__ import annotations

from array import array
from dataclasses import field
from typing import Any, Iterable, Optional

from nanoslg import codec
from nanoslg.codec import ProtocolError as ProtocolError
from nanoslg.codec import encode as encode
from nanoslg.codec import columns, message, register
from nanoslg.sampling_params import SamplingParams

MAX_FRAME_BYTES = 256 * 1024 * 1024  # a larger frame is refused before it is unpacked


def decode(frame: bytes) -> Any:
    return codec.decode(frame, MAX_FRAME_BYTES)

# Defined beside its validation (sampling_params.py), sent as it is: one typed object from the edge to the sampler.
register(SamplingParams)


def token_ids(ids: Iterable[int] = ()) -> array[int]:
    """The wire type for token-id sequences."""
    return ids if isinstance(ids, array) and ids.typecode == "i" else array("i", ids)


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
    # the OpenAI API's rule: prompt + max_tokens must fit in max_model_len, else the request is refused (offline,
    # a request stops at max_model_len instead)
    strict_max_tokens: bool = False


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
    deltas: list[OutputDelta] = columns()


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
    updates: list[TokenUpdate] = columns()


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
    seqs: list[SeqChunk] = columns()
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
