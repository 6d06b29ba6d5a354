"""Tiny random Hugging Face models (fp32) for the transformers oracle."""
from __future__ import annotations

import os

import torch

VOCAB = 512

ARCH_CONFIGS = {
    "llama": dict(cls="LlamaConfig", extra=dict(rope_scaling={"rope_type": "llama3", "factor": 8.0,
                  "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                  tie_word_embeddings=False)),
    "mistral": dict(cls="MistralConfig", extra=dict(sliding_window=None, tie_word_embeddings=False)),
    "qwen2": dict(cls="Qwen2Config", extra=dict(tie_word_embeddings=True)),
    "qwen3": dict(cls="Qwen3Config", extra=dict(head_dim=16, tie_word_embeddings=True)),
}


def make_tiny_model(arch: str, folder: str, num_layers: int = 3, seed: int = 0, vocab_size: int = VOCAB,
                    dtype: torch.dtype = torch.float32, **overrides) -> str:
    """Save a random tiny model of `arch` to `folder` (once) and return the folder. overrides change the config
    (e.g. hidden_size=512, num_attention_heads=4, head_dim=128 for FlashInfer's prebuilt head size)."""
    import transformers

    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    spec = ARCH_CONFIGS[arch]
    fields = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, **spec["extra"])
    fields.update(overrides)
    config = getattr(transformers, spec["cls"])(**fields)
    torch.manual_seed(seed)
    model_cls = getattr(transformers, spec["cls"].replace("Config", "ForCausalLM"))
    model = model_cls(config).to(torch.float32)
    # Random init gives near-uniform logits; scale up so greedy choices are decisive, not rounding noise.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(4.0)
    model.to(dtype).save_pretrained(folder)
    return folder


def hf_greedy(folder: str, prompts: list, max_new_tokens: int) -> list:
    """Greedy continuation of each prompt (token-id lists) by transformers, one prompt at a time (no padding)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
            outs.append(gen[0, len(p):].tolist())
    return outs
