"""The one engine configuration: resolved from the CLI or the Python API, validated once, sent to every process."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Optional

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
DTYPES = ("auto", "float32", "bfloat16", "float16")


class ConfigError(ValueError):
    pass


@dataclass(slots=True)
class ModelSpec:
    """The parts of a Hugging Face config.json the Llama-family model needs, normalised across config versions."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    rope_theta: float
    rope_scaling: dict  # rope_type plus its parameters
    torch_dtype: str
    eos_token_ids: list = field(default_factory=list)

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelSpec":
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ConfigError(f"unsupported model architecture {archs or cfg.get('model_type')!r}; "
                              f"nanoslg supports {', '.join(SUPPORTED_ARCHITECTURES)}")
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
            rope_type = rope.get("rope_type") or rope.get("type") or "default"
            theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise ConfigError(f"unsupported rope scaling type {rope_type!r}; supported: "
                                  f"{', '.join(SUPPORTED_ROPE_TYPES)}")
            rope["rope_type"] = rope_type
            eos = cfg.get("eos_token_id")
            dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
            return cls(
                architecture=arch,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                qkv_bias=arch == "Qwen2ForCausalLM" or bool(cfg.get("attention_bias", False)),
                qk_norm=arch == "Qwen3ForCausalLM",
                rope_theta=float(theta),
                rope_scaling=rope,
                torch_dtype=str(dtype).replace("torch.", ""),
                eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
            )
        except KeyError as e:
            raise ConfigError(f"config.json lacks required field {e.args[0]!r}") from None

    @property
    def num_params(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = h * (self.num_heads + 2 * self.num_kv_heads) * self.head_dim + self.num_heads * self.head_dim * h
        per_layer = attn + 3 * h * i + 2 * h
        return self.num_layers * per_layer + v * h * (1 if self.tie_word_embeddings else 2) + h


@dataclass(slots=True)
class EngineConfig:
    model: Optional[str] = None  # HF folder, or a pulled model's name; None: the default model
    tokenizer: Optional[str] = None  # defaults to the model folder
    dtype: str = "auto"
    load_format: str = "auto"  # auto (safetensors) | dummy (random weights from config.json)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    max_model_len: Optional[int] = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    page_size: int = 16
    num_kv_pages: Optional[int] = None  # overrides sizing from memory
    kv_cache_memory_gb: float = 1.0  # KV budget on CPU; on GPU it comes from gpu_memory_utilization
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    attention_backend: str = "auto"
    enforce_eager: bool = False  # no CUDA graphs
    overlap_schedule: bool = True  # plan step N+1 while step N runs
    cuda_graph_max_batch: int = 512
    startup_timeout_s: float = 600.0
    log_level: str = "warning"
    # Filled in by resolve(); never set these by hand.
    model_spec: Optional[ModelSpec] = None
    run_dir: str = ""

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def resolve(self) -> "EngineConfig":
        """Fill in the model folder and its spec, and check every value; raises ConfigError naming the problem."""
        from nanoslg.model_registry import resolve_model_path

        self.model = resolve_model_path(self.model)
        cfg_path = os.path.join(self.model, "config.json")
        if not os.path.isfile(cfg_path):
            raise ConfigError(f"model folder {self.model!r} has no config.json")
        try:
            with open(cfg_path) as f:
                hf_cfg = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read {cfg_path}: {e}") from None
        self.model_spec = ModelSpec.from_hf_config(hf_cfg)
        self.tokenizer = self.tokenizer or self.model
        spec = self.model_spec
        if self.max_model_len is None:
            self.max_model_len = spec.max_position_embeddings
        checks = [
            (self.dtype in DTYPES, "dtype", f"must be one of {', '.join(DTYPES)}"),
            (self.load_format in ("auto", "dummy"), "load_format", "must be auto or dummy"),
            (self.device in ("auto", "cpu", "cuda"), "device", "must be auto, cpu or cuda"),
            (self.max_model_len >= 1, "max_model_len", "must be >= 1"),
            (self.max_num_seqs >= 1, "max_num_seqs", "must be >= 1"),
            (self.max_num_batched_tokens >= 1, "max_num_batched_tokens", "must be >= 1"),
            (self.page_size >= 1, "page_size", "must be >= 1"),
            (self.num_kv_pages is None or self.num_kv_pages >= 1, "num_kv_pages", "must be >= 1"),
            (0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization", "must be in (0, 1]"),
            (self.tensor_parallel_size >= 1, "tensor_parallel_size", "must be >= 1"),
            (self.pipeline_parallel_size >= 1, "pipeline_parallel_size", "must be >= 1"),
            (self.attention_backend in ("auto", "sdpa", "flashinfer"), "attention_backend",
             "must be auto, sdpa or flashinfer"),
        ]
        for ok, name, what in checks:
            if not ok:
                raise ConfigError(f"{name} {what}, got {getattr(self, name)!r}")
        if spec.num_heads % self.tensor_parallel_size:
            raise ConfigError(f"{spec.num_heads} attention heads do not split over "
                              f"tensor_parallel_size={self.tensor_parallel_size}")
        if spec.num_layers < self.pipeline_parallel_size:
            raise ConfigError(f"{spec.num_layers} layers cannot fill {self.pipeline_parallel_size} pipeline stages")
        return self

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["model_spec"] = dataclasses.asdict(self.model_spec) if self.model_spec else None
        return d

    def to_arg(self) -> str:
        """The config as one command-line argument for a child process."""
        return json.dumps(self.to_dict())

    @classmethod
    def from_arg(cls, arg: str) -> "EngineConfig":
        return cls.from_dict(json.loads(arg))

    @classmethod
    def from_dict(cls, d: dict) -> "EngineConfig":
        d = dict(d)
        spec = d.pop("model_spec", None)
        cfg = cls(**d)
        cfg.model_spec = ModelSpec(**spec) if spec else None
        return cfg
