"""What nanoslg needs to know about a model, read from its Hugging Face config.json, and the error every
configuration check raises."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


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
    rope_scaling: dict[str, Any]  # rope_type plus its parameters
    torch_dtype: str
    eos_token_ids: list[int] = field(default_factory=list)
    # config.json's quantization_config as written ({}: not quantized); nanoslg/quantization.py reads it
    quantization_config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "ModelSpec":
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
                # older llm-compressor exports name it compression_config
                quantization_config=cfg.get("quantization_config") or cfg.get("compression_config") or {},
            )
        except KeyError as e:
            raise ConfigError(f"config.json lacks required field {e.args[0]!r}") from None

    @property
    def linear_params(self) -> int:
        """Parameters of the decoder layers' projections (what FP8 quantizes)."""
        h = self.hidden_size
        attn = h * (self.num_heads + 2 * self.num_kv_heads) * self.head_dim + self.num_heads * self.head_dim * h
        return self.num_layers * (attn + 3 * h * self.intermediate_size)

    @property
    def num_params(self) -> int:
        h, v = self.hidden_size, self.vocab_size
        return self.linear_params + self.num_layers * 2 * h + v * h * (1 if self.tie_word_embeddings else 2) + h
