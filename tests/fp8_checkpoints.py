"""Tiny FP8 checkpoints in the layouts published ones use, written from a tiny fp32 model with a reference
quantization written here (not the engine's), and beside each the Hugging Face model of its dequantized weights: the
oracle an FP8 checkpoint's greedy tokens must equal on the CPU (where nanoslg dequantizes at load)."""
from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

FP8 = torch.float8_e4m3fn
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

def _compressed_tensors(weights: str, activations: str, dynamic: bool) -> dict:
    """A compressed-tensors float-quantized config as llm-compressor writes it: FP8 weights with `weights` scales,
    FP8 activations with `activations` scales."""
    fp8 = {"num_bits": 8, "type": "float", "symmetric": True}
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {
        "group_0": {"targets": ["Linear"], "weights": {**fp8, "strategy": weights, "dynamic": False},
                    "input_activations": {**fp8, "strategy": activations, "dynamic": dynamic}}},
        "ignore": ["lm_head"], "quantization_status": "compressed"}


# name -> (quantization_config, weight scale layout); block sizes that leave partial blocks on the tiny shapes
LAYOUTS = {
    "ct-channel": (_compressed_tensors("channel", "token", dynamic=True), "channel"),
    "ct-tensor": (_compressed_tensors("tensor", "tensor", dynamic=False), "tensor"),
    "fp8-block": ({"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                   "weight_block_size": [48, 32]}, "block"),
    # real models' 128x128: on the tiny shapes one partial block per weight, split mid-block by TP=2
    "fp8-block-128": ({"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                       "weight_block_size": [128, 128]}, "block"),
}


def ref_quantize(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """w / scale (scale broadcast against w), rounded to e4m3 after clamping to its range."""
    return (w / scale).clamp(-448.0, 448.0).to(FP8)


def quantize_weight(w: torch.Tensor, layout: str, block=(48, 32)) -> tuple[torch.Tensor, torch.Tensor,
                                                                             torch.Tensor]:
    """(e4m3 weight, scale tensor as the checkpoint stores it, dequantized float32 weight)."""
    w = w.float()
    if layout == "channel":
        scale = w.abs().amax(dim=1, keepdim=True) / 448.0  # [out, 1], as compressed-tensors writes it
        q = ref_quantize(w, scale)
        return q, scale, q.float() * scale
    if layout == "tensor":
        scale = w.abs().max() / 448.0
        q = ref_quantize(w, scale)
        return q, scale.reshape(1), q.float() * scale
    br, bc = block
    rows, cols = w.shape
    nr, nc = -(-rows // br), -(-cols // bc)
    scale = torch.empty(nr, nc)
    q = torch.empty(rows, cols, dtype=FP8)
    deq = torch.empty(rows, cols)
    for i in range(nr):
        for j in range(nc):
            part = w[i * br:(i + 1) * br, j * bc:(j + 1) * bc]
            s = part.abs().max() / 448.0
            scale[i, j] = s
            q[i * br:(i + 1) * br, j * bc:(j + 1) * bc] = ref_quantize(part, s)
            deq[i * br:(i + 1) * br, j * bc:(j + 1) * bc] = ref_quantize(part, s).float() * s
    return q, scale, deq


def _copy_model_files(src: str, dst: str) -> None:
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        if not name.endswith(".safetensors") and name != "config.json":
            shutil.copy(os.path.join(src, name), dst)


def write_fp8_checkpoint(src: str, root: str, name: str) -> tuple[str, str]:
    """(FP8 checkpoint folder, folder of its dequantized weights in fp32) for the tiny model at src."""
    quant_config, layout = LAYOUTS[name]
    fp8_dir, deq_dir = os.path.join(root, f"{name}-fp8"), os.path.join(root, f"{name}-dequantized")
    if os.path.isfile(os.path.join(fp8_dir, "config.json")):
        return fp8_dir, deq_dir
    tensors = load_file(os.path.join(src, "model.safetensors"))
    quantized, dequantized = {}, {}
    for key, value in tensors.items():
        module = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and module.rsplit(".", 1)[-1] in LINEARS:
            q, scale, deq = quantize_weight(value, layout, tuple(quant_config.get("weight_block_size", (48, 32))))
            quantized[key] = q
            # compressed-tensors writes scales in the model's dtype (bf16 in the real ones)
            quantized[f"{module}.weight_scale_inv" if layout == "block" else f"{module}.weight_scale"] = \
                scale.to(torch.bfloat16) if name == "ct-channel" else scale
            if name == "ct-tensor":
                quantized[f"{module}.input_scale"] = torch.tensor([0.05])
            dequantized[key] = deq
        else:
            quantized[key] = dequantized[key] = value
    if name == "ct-channel":  # so that the reference dequantizes with the scales as stored
        for key in list(dequantized):
            scale = quantized.get(key.replace(".weight", ".weight_scale"))
            if scale is not None and key.endswith(".weight"):
                dequantized[key] = quantized[key].float() * scale.float()
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    for folder, weights, extra in ((fp8_dir, quantized, {"quantization_config": quant_config}),
                                   (deq_dir, dequantized, {})):
        _copy_model_files(src, folder)
        save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(folder, "model.safetensors"),
                  metadata={"format": "pt"})
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump({**config, **extra}, f)
    return fp8_dir, deq_dir


def write_fake_quantized(src: str, dst: str) -> str:
    """The model `--quantization fp8` runs on the CPU: every linear weight quantized per output channel and
    dequantized again (fp32), a plain checkpoint for Hugging Face."""
    if os.path.isfile(os.path.join(dst, "config.json")):
        return dst
    tensors = load_file(os.path.join(src, "model.safetensors"))
    out = {}
    for key, value in tensors.items():
        module = key.rsplit(".", 1)[0]
        out[key] = quantize_weight(value, "channel")[2] if key.endswith(".weight") and \
            module.rsplit(".", 1)[-1] in LINEARS else value
    _copy_model_files(src, dst)
    shutil.copy(os.path.join(src, "config.json"), dst)
    save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return dst
