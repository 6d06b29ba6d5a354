"""The one engine configuration: resolved from the CLI or the Python API, validated once, sent to every process."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

from nanoslg import tuned_config
from nanoslg.model_registry import resolve_model_path
from nanoslg.model_spec import ConfigError, ModelSpec
from nanoslg.quantization import QuantScheme, kv_cache_dtype, quant_scheme

log = logging.getLogger("nanoslg.config")

DTYPES = ("auto", "float32", "bfloat16", "float16")
# Ports above --dist-init-addr's: torch.distributed's store takes PORT itself, ZeroMQ the next ones (cluster.py).
CLUSTER_PORTS = 4


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: Optional[str] = None  # HF folder, or a pulled model's name; None: the default model
    tokenizer: Optional[str] = None  # defaults to the model folder
    dtype: str = "auto"
    # fp8: FP8 weights (quantized at load from a bf16 checkpoint); None: as the checkpoint is (an FP8 checkpoint's
    # quantization_config is read either way). resolve() sets it to what runs (nanoslg/quantization.py).
    quantization: Optional[str] = None
    kv_cache_dtype: str = "auto"  # auto: the model's dtype | fp8 (e4m3, half the bytes of bf16 per token)
    load_format: str = "auto"  # auto (safetensors) | dummy (random weights from config.json)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    max_model_len: Optional[int] = None
    # Caps on a step (per micro-batch with pipeline parallelism); None: the tuned config's, else the defaults below.
    max_num_seqs: Optional[int] = None
    max_num_batched_tokens: Optional[int] = None
    # NanoFlow's global batch: the running set's target (R) and the tokens a step carries (D); None: the tuned
    # config's, else R = max_num_seqs and D derived from the traffic (scheduler_proc/global_batch.py).
    running_target: Optional[int] = None
    dense_batch_tokens: Optional[int] = None
    # Nano-batching: each step's batch split in this many parts whose operations of the overlap classes run on
    # their own CUDA streams beside the others' (gpu_workers/nano_batch.py); None: the tuned config's, else 1.
    nano_batches: Optional[int] = None
    nano_overlap: Optional[str] = None  # none | network | memory | network+memory; None: tuned, else by layout
    # With TP: norms and residual adds on 1/TP of the tokens between a reduce-scatter and an all-gather
    # (gpu_workers/sequence_parallel.py); None: the tuned config's, else off.
    sequence_parallel: Optional[bool] = None
    tuned_config: Optional[str] = None  # a tuned config file; None: the one `nanoslg tune` wrote for this engine
    use_tuned_config: bool = True  # False: ignore tuned configs (--no-tuned-config)
    op_timing_every: int = 0  # time each operation class on every Nth step (bench throughput --breakdown)
    page_size: int = 16
    num_kv_pages: Optional[int] = None  # overrides sizing from memory
    kv_cache_memory_gb: float = 1.0  # KV budget per rank on CPU; on GPU it comes from gpu_memory_utilization
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: Optional[str] = None  # HOST:PORT on node 0, for every node (multi-node only)
    node_join_timeout_s: float = 120.0  # how long node 0 waits for another node to say hello
    cluster_secret_file: Optional[str] = None  # else $NANOSLG_CLUSTER_SECRET (multi-node only)
    attention_backend: str = "auto"
    enforce_eager: bool = False  # no CUDA graphs
    overlap_schedule: bool = True  # plan step N+1 while step N runs
    enable_prefix_caching: bool = True  # share the KV pages of common prompt prefixes between requests
    cuda_graph_max_batch: int = 512
    # steps up to this many tokens that the decode graphs do not take run as CUDA graphs around the attention
    cuda_graph_max_tokens: int = 4096
    startup_timeout_s: float = 600.0
    log_level: str = "info"
    log_format: str = "text"  # text | json (one object per line)
    # The inboxes (ipc addresses) of the API-server processes after the first (`serve --api-server-count`):
    # GenerateRequest.client k > 0 gets its outputs at client_inboxes[k - 1], client 0 at the run dir's.
    client_inboxes: list[str] = dataclasses.field(default_factory=list)
    # Filled in by resolve(); never set these by hand.
    model_spec: Optional[ModelSpec] = None
    device_name: str = ""  # "cpu" or the GPU's name, the key of tuned configs
    tuned_config_path: str = ""  # the tuned config applied, "" if none
    run_dir: str = ""

    @property
    def quant_scheme(self) -> Optional[QuantScheme]:
        """How the linear layers are quantized (None: they are not)."""
        return quant_scheme(self.model_spec.quantization_config if self.model_spec else None, self.quantization)

    @property
    def storage_dtypes(self) -> tuple[str, str]:
        """(weights, KV cache) dtypes as configured, for start lines and /metrics (auto: config.json's dtype; the
        workers' READY info says what a CPU actually runs)."""
        model_dtype = self.dtype if self.dtype != "auto" or self.model_spec is None else self.model_spec.torch_dtype
        return ("fp8" if self.quantization else model_dtype), ("fp8" if self.kv_cache_dtype == "fp8" else model_dtype)

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def ranks_per_node(self) -> int:
        return self.world_size // self.nnodes

    def node_of(self, rank: int) -> int:
        return rank // self.ranks_per_node

    @property
    def local_ranks(self) -> range:
        """The worker ranks this node runs (rank = pp_rank * tp_size + tp_rank)."""
        return range(self.node_rank * self.ranks_per_node, (self.node_rank + 1) * self.ranks_per_node)

    @property
    def max_steps_in_flight(self) -> int:
        """Plans the scheduler keeps in flight. One stage: the running step plus, with overlap, the next one chained
        on its tokens. Several stages: one micro-batch per stage over disjoint requests, plus (with overlap) one
        more, so that the first stage has work while a finished micro-batch's tokens travel back to the scheduler."""
        pp = self.pipeline_parallel_size
        if pp == 1:
            return 2 if self.overlap_schedule else 1
        return pp + 1 if self.overlap_schedule else pp

    @property
    def dist_host_port(self) -> tuple[str, int]:
        host, _, port = (self.dist_init_addr or "").rpartition(":")
        return host.strip("[]"), int(port)

    def resolve(self) -> "ResolvedConfig":
        """The config every process runs on: the model folder and its spec filled in, every setting left unset
        taken from the tuned config or the defaults, and every value checked (this one is left as it is); raises
        ConfigError naming the problem."""
        model = resolve_model_path(self.model)
        cfg_path = os.path.join(model, "config.json")
        if not os.path.isfile(cfg_path):
            raise ConfigError(f"model folder {model!r} has no config.json")
        try:
            with open(cfg_path) as f:
                hf_cfg = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read {cfg_path}: {e}") from None
        spec = ModelSpec.from_hf_config(hf_cfg)
        scheme = quant_scheme(spec.quantization_config, self.quantization)
        settings = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        settings.update(model=model, model_spec=spec, tokenizer=self.tokenizer or model,
                        max_model_len=self.max_model_len or spec.max_position_embeddings,
                        quantization="fp8" if scheme else None, kv_cache_dtype=kv_cache_dtype(self.kv_cache_dtype))
        settings.update(self._tuned_settings(model, spec, settings["quantization"], settings["kv_cache_dtype"]))
        return ResolvedConfig(**settings)._checked()

    def _tuned_settings(self, model: str, spec: ModelSpec, quantization: Optional[str],
                        kv_dtype: str) -> dict[str, Any]:
        """The settings left unset, from the tuned config for this model, device and layout (or the file given),
        then from the built-in defaults."""
        device_name = tuned_config.device_name(self.device)
        out: dict[str, Any] = {"device_name": device_name}
        ident = tuned_config.identity(model, spec, device_name, self.tensor_parallel_size,
                                      self.pipeline_parallel_size, quantization, kv_dtype)
        tuned: dict[str, Any] = {}
        if self.use_tuned_config:
            path = self.tuned_config or tuned_config.default_path(ident)
            if self.tuned_config or os.path.isfile(path):
                tuned = tuned_config.load(path, ident)
                out["tuned_config_path"] = path
        applied = {key: value for key, value in tuned.items() if getattr(self, key) is None and value is not None}
        out.update(applied)
        if "tuned_config_path" in out:
            said = ", ".join(f"{k}={v}" for k, v in applied.items()) or \
                ("every value set by hand" if tuned else "the defaults (tune found nothing faster)")
            log.info("tuned config %s: %s", out["tuned_config_path"], said)
        # On a GPU, vLLM's defaults for large GPUs: the predicted-memory admission keeps the running set to what the
        # KV pool holds, and a larger running set gives the dense batch's GEMMs more rows.
        gpu = device_name != "cpu"
        defaults = {"max_num_seqs": 1024 if gpu else 256, "max_num_batched_tokens": 8192 if gpu else 2048,
                    "nano_batches": 1, "sequence_parallel": False,
                    "nano_overlap": "network" if self.tensor_parallel_size > 1 else "memory"}
        for key, value in defaults.items():
            if getattr(self, key) is None and key not in out:
                out[key] = value
        return out

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["model_spec"] = dataclasses.asdict(self.model_spec) if self.model_spec else None
        return d

    def to_arg(self) -> str:
        """The config as one command-line argument for a child process."""
        return json.dumps(self.to_dict())

    @staticmethod
    def from_arg(arg: str) -> "EngineConfig":
        return EngineConfig.from_dict(json.loads(arg))

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "EngineConfig":
        """The config to_dict() wrote: a ResolvedConfig when it was one."""
        d = dict(d)
        spec = d.pop("model_spec", None)
        if spec and all(d.get(name) is not None for name in _RESOLVED_SETTINGS):
            return ResolvedConfig(**d, model_spec=ModelSpec(**spec))
        return EngineConfig(**d)


@dataclass(frozen=True, slots=True)
class ResolvedConfig(EngineConfig):
    """An EngineConfig after resolve(), the one every process gets: the settings that may be left unset in an
    EngineConfig are known here (keyword-only and without defaults, so none can be forgotten)."""

    model: str = dataclasses.field(kw_only=True)
    tokenizer: str = dataclasses.field(kw_only=True)
    max_model_len: int = dataclasses.field(kw_only=True)
    max_num_seqs: int = dataclasses.field(kw_only=True)
    max_num_batched_tokens: int = dataclasses.field(kw_only=True)
    nano_batches: int = dataclasses.field(kw_only=True)
    nano_overlap: str = dataclasses.field(kw_only=True)
    sequence_parallel: bool = dataclasses.field(kw_only=True)
    model_spec: ModelSpec = dataclasses.field(kw_only=True)

    def _checked(self) -> "ResolvedConfig":
        checks = [
            (self.dtype in DTYPES, "dtype", f"must be one of {', '.join(DTYPES)}"),
            (self.load_format in ("auto", "dummy"), "load_format", "must be auto or dummy"),
            (self.device in ("auto", "cpu", "cuda"), "device", "must be auto, cpu or cuda"),
            (self.max_model_len >= 1, "max_model_len", "must be >= 1"),
            (self.max_num_seqs >= 1, "max_num_seqs", "must be >= 1"),
            (self.max_num_batched_tokens >= 1, "max_num_batched_tokens", "must be >= 1"),
            (self.running_target is None or self.running_target >= 1, "running_target", "must be >= 1"),
            (self.dense_batch_tokens is None or self.dense_batch_tokens >= 1, "dense_batch_tokens", "must be >= 1"),
            (self.nano_batches >= 1, "nano_batches", "must be >= 1"),
            (self.nano_overlap in tuned_config.NANO_OVERLAPS, "nano_overlap",
             f"must be one of {', '.join(tuned_config.NANO_OVERLAPS)}"),
            (self.op_timing_every >= 0, "op_timing_every", "must be >= 0"),
            (self.page_size >= 1, "page_size", "must be >= 1"),
            (self.cuda_graph_max_batch >= 1, "cuda_graph_max_batch", "must be >= 1"),
            (self.cuda_graph_max_tokens >= 0, "cuda_graph_max_tokens", "must be >= 0 (0: eager)"),
            (self.num_kv_pages is None or self.num_kv_pages >= 1, "num_kv_pages", "must be >= 1"),
            (0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization", "must be in (0, 1]"),
            (self.tensor_parallel_size >= 1, "tensor_parallel_size", "must be >= 1"),
            (self.pipeline_parallel_size >= 1, "pipeline_parallel_size", "must be >= 1"),
            (self.nnodes >= 1, "nnodes", "must be >= 1"),
            (self.node_join_timeout_s > 0, "node_join_timeout_s", "must be > 0"),
            (self.log_format in ("text", "json"), "log_format", "must be text or json"),
            (self.attention_backend in ("auto", "sdpa", "flashinfer"), "attention_backend",
             "must be auto, sdpa or flashinfer"),
        ]
        for ok, name, what in checks:
            if not ok:
                raise ConfigError(f"{name} {what}, got {getattr(self, name)!r}")
        self.check_layout()
        return self

    def check_layout(self) -> None:
        """Refuse at startup any parallel layout the model cannot be split into, rather than compute nonsense."""
        spec, tp, pp = self.model_spec, self.tensor_parallel_size, self.pipeline_parallel_size
        if spec.num_heads % tp:
            raise ConfigError(f"{spec.num_heads} attention heads do not split over tensor_parallel_size={tp}")
        if spec.num_kv_heads % tp and tp % spec.num_kv_heads:
            raise ConfigError(f"{spec.num_kv_heads} KV heads can neither be split over nor replicated onto "
                              f"tensor_parallel_size={tp} (one must divide the other)")
        if spec.intermediate_size % tp:
            raise ConfigError(f"intermediate size {spec.intermediate_size} does not split over "
                              f"tensor_parallel_size={tp}")
        if spec.num_layers < pp:
            raise ConfigError(f"{spec.num_layers} layers cannot fill {pp} pipeline stages")
        if not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(f"node_rank must be in [0, {self.nnodes}), got {self.node_rank}")
        if self.world_size % self.nnodes:
            raise ConfigError(f"tensor_parallel_size x pipeline_parallel_size = {self.world_size} workers do not "
                              f"split evenly over {self.nnodes} nodes")
        if self.nnodes > 1:
            try:
                host, port = self.dist_host_port
            except ValueError:
                host, port = "", 0
            if not host or not 0 < port <= 65535 - CLUSTER_PORTS:
                raise ConfigError(f"--nnodes {self.nnodes} needs --dist-init-addr HOST:PORT (node 0's address, a "
                                  f"port below {65535 - CLUSTER_PORTS}), got {self.dist_init_addr!r}")

    @staticmethod
    def from_arg(arg: str) -> "ResolvedConfig":
        """The config a parent process passed with to_arg()."""
        return ResolvedConfig.from_dict(json.loads(arg))

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "ResolvedConfig":
        cfg = EngineConfig.from_dict(d)
        if not isinstance(cfg, ResolvedConfig):
            raise ConfigError("a child process needs a resolved engine config")
        return cfg


# the settings an EngineConfig may leave unset and a ResolvedConfig always has (besides model_spec)
_RESOLVED_SETTINGS = tuple(f.name for f in dataclasses.fields(ResolvedConfig) if f.kw_only and f.name != "model_spec")
