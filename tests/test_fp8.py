"""FP8 on the CPU: the quantization math against a reference, FP8 checkpoints of every supported layout loading to
Hugging Face's tokens on their dequantized weights (one rank, TP=2 and PP=2), `--quantization fp8` as the model
its per-channel rounding makes, and every quantization_config nanoslg cannot run refused at startup by name."""
import json
import os
import shutil
import sys

import pytest
import torch

from conftest import random_prompts
from fp8_checkpoints import LAYOUTS, quantize_weight, write_fake_quantized, write_fp8_checkpoint
from gpu_workers.layers import fp8
from nanoslg import LLM, SamplingParams
from nanoslg.config import EngineConfig
from nanoslg.entrypoints.debug import DebugClient
from nanoslg.model_spec import ConfigError
from nanoslg.quantization import quant_scheme

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
PROMPTS = random_prompts(6, seed=11)


def _tokens(folder, **engine_args):
    with LLM(folder, max_model_len=128, **engine_args) as llm:
        outs = llm.generate(PROMPTS, GREEDY)
    assert all(o.error is None for o in outs)
    return [o.token_ids for o in outs]


@pytest.fixture(scope="module")
def fp8_models(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    return lambda arch, layout: write_fp8_checkpoint(tiny_model_dir(arch), str(root / arch), layout)


# --- the math -------------------------------------------------------------------------------------------------------

def test_per_row_quantization_maps_each_row_max_to_448_and_rounds_to_nearest():
    w = torch.randn(16, 40) * torch.logspace(-3, 2, 16)[:, None]
    w[3] = 0.0  # an all-zero row keeps a finite scale
    q, scale = fp8.quantize_rows(w)
    assert q.dtype == fp8.FP8 and scale.shape == (16,)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    rows = [r for r in range(16) if r != 3]
    assert torch.equal(q.float().abs().amax(dim=1)[rows], torch.full((15,), 448.0))
    assert torch.equal(q[3].float(), torch.zeros(40))
    # e4m3 keeps 3 mantissa bits: round to nearest is within 1/16 of the value (or of 2^-6 near zero), in units
    units = w / scale[:, None]
    err = (q.float() - units).abs()
    assert (err <= torch.maximum(units.abs() / 16, torch.full_like(units, 2.0 ** -10))).all()
    # and it is the nearest representable value: the reference cast of the same units gives the same bytes
    assert torch.equal(q.view(torch.uint8), units.clamp(-448, 448).to(fp8.FP8).view(torch.uint8))


def test_values_beyond_the_range_clamp_to_448_not_nan():
    x = torch.tensor([1e6, -1e6, 448.0, 449.0, 1e-9])
    assert fp8.to_fp8(x).float().tolist()[:4] == [448.0, -448.0, 448.0, 448.0]
    assert fp8.to_fp8(x, scale=1e4).float()[0].item() == 96.0  # 100 lies halfway between 96 and 104: to even


def test_per_token_activation_scales_match_the_row_reference():
    x = torch.randn(5, 64)
    q, s = fp8.quantize_tokens(x)
    assert s.shape == (5, 1)
    ref = x.abs().amax(dim=1, keepdim=True) / 448.0
    assert torch.allclose(s, ref)
    assert torch.allclose(q.float() * s, x, rtol=1 / 16, atol=1e-3)


def test_silu_and_mul_quantized_for_the_down_projection():
    """fp8.silu_mul_quantize (the fused kernel's contract; the kernel itself: tests/gpu/test_gpu_fp8.py)."""
    gate_up = torch.randn(6, 2 * 40) * 3
    q, s = fp8.silu_mul_quantize(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    y = torch.nn.functional.silu(gate) * up
    assert q.dtype == fp8.FP8 and q.shape == (6, 40) and s.shape == (6, 1)
    assert torch.allclose(s, y.abs().amax(dim=1, keepdim=True) / 448.0)
    assert torch.allclose(q.float() * s, y, rtol=1 / 16, atol=1e-3)


@pytest.mark.parametrize("with_residual", [True, False])
def test_residual_add_and_rms_norm_quantized_for_the_next_gemm(with_residual):
    """fp8.add_rms_norm_quantize (the fused kernel's contract; the kernel itself: tests/gpu/test_gpu_fp8.py): the
    residual becomes x + residual in place, and the norm of that sum comes out quantized per token."""
    torch.manual_seed(3)
    x, residual, weight = torch.randn(5, 48) * 4, torch.randn(5, 48), torch.rand(48) + 0.5
    summed = x + residual if with_residual else x.clone()
    res_in = residual.clone() if with_residual else None
    q, s, res_out = fp8.add_rms_norm_quantize(x, res_in, weight, 1e-6)
    assert torch.equal(res_out, summed) and (res_out is res_in if with_residual else res_out is x)
    normed = summed * torch.rsqrt(summed.pow(2).mean(-1, keepdim=True) + 1e-6) * weight
    rq, rs = fp8.quantize_rows(normed)
    assert q.dtype == fp8.FP8 and s.shape == (5, 1)
    assert torch.allclose(s[:, 0], rs) and torch.equal(q.float(), rq.float())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])  # qwen2: a QKV bias
def test_fused_quantizing_norms_and_silu_feed_the_gemms_what_they_quantize(arch, tiny_model_dir, tmp_path,
                                                                           monkeypatch):
    """NANOSLG_FP8_FUSED_NORM / _SILU wired through the decoder layer, on the CPU: with every GEMM taking FP8 input
    (its product emulated in fp32 on the dequantized weight), the engine's teacher-forced logits equal Hugging Face's
    on the rounded weights with the inputs of q/k/v, gate/up and down rounded per token to e4m3 (o_proj's stays
    unfused), to fp32 rounding; the unfused engine is far from that emulation, so the fused path really ran."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "gpu"))
    import bf16_oracle as oracle
    from gpu_workers.layers.linear_methods import Fp8LinearMethod

    folder = tiny_model_dir(arch)
    if arch == "qwen2":  # random QKV biases (a new model's are zero): the fused path must add them
        from safetensors.torch import load_file, save_file

        biased = str(tmp_path / "biased")
        shutil.copytree(folder, biased)
        tensors = load_file(os.path.join(biased, "model.safetensors"))
        torch.manual_seed(2)
        tensors.update({k: torch.randn_like(v) for k, v in tensors.items() if k.endswith("_proj.bias")})
        save_file(tensors, os.path.join(biased, "model.safetensors"), metadata={"format": "pt"})
        folder = biased
    rounded = write_fake_quantized(folder, str(tmp_path / "rounded"))
    prompts = random_prompts(4, seed=8)
    hf = oracle.hf_model(rounded, torch.float32)
    theirs, _ = oracle.hf_greedy(hf, prompts, 6)

    def round_input(module, args):
        q, scale = fp8.quantize_rows(args[0].reshape(-1, args[0].shape[-1]))
        return (fp8.dequantize_rows(q, scale, args[0].dtype).reshape(args[0].shape),)
    hooks = [m.register_forward_pre_hook(round_input) for name, m in hf.named_modules()
             if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj",
                                                                             "gate_proj", "up_proj", "down_proj")]
    emulated = oracle.hf_forced(hf, prompts, theirs)
    for hook in hooks:
        hook.remove()
    _, unfused = oracle.engine_logits(folder, "sdpa", prompts, 6, forced=theirs, quantization="fp8")
    monkeypatch.setattr(fp8, "FUSED_NORM", True)
    monkeypatch.setattr(fp8, "FUSED_SILU", True)
    monkeypatch.setattr(Fp8LinearMethod, "takes_fp8_input", lambda self, layer, rows: True)
    monkeypatch.setattr(Fp8LinearMethod, "apply_fp8", lambda self, layer, xq, xs, bias, out_dtype: (
        (xq.float() * xs) @ layer.weight.float().t() + (0 if bias is None else bias.float())).to(out_dtype))
    _, fused = oracle.engine_logits(folder, "sdpa", prompts, 6, forced=theirs, quantization="fp8")
    assert float(oracle.forced_errors(fused, emulated).max()) < 1e-4
    assert float(oracle.forced_errors(unfused, emulated).median()) > 1e-3


def test_block_scales_dequantize_with_partial_edge_blocks():
    w = torch.randn(70, 50)
    q, scale, reference = quantize_weight(w, "block", (32, 16))  # 3 x 4 blocks, the last row and column partial
    assert scale.shape == (3, 4)
    rows = fp8.expand_block_rows(scale, 0, 70, 32)
    assert torch.equal(fp8.dequantize_blocks(q, rows, 16), reference)
    # a tensor-parallel rank's rows [40, 70) start inside block row 1: the grid it is given starts there
    part = fp8.expand_block_rows(scale[1:], 40, 30, 32)
    assert torch.equal(fp8.dequantize_blocks(q[40:], part, 16), reference[40:])
    assert (reference - w).abs().max() <= w.abs().max() / 16


# --- configs --------------------------------------------------------------------------------------------------------

def _with_quant_config(src, dst, quant_config):
    shutil.copytree(src, dst, dirs_exist_ok=True)
    with open(os.path.join(dst, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = quant_config
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    return dst


@pytest.mark.parametrize("quant_config, named", [
    ({"quant_method": "awq", "bits": 4}, "'awq'"),
    ({"quant_method": "gptq", "bits": 4}, "'gptq'"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "'bitsandbytes'"),
    ({"load_in_8bit": True}, "None"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "group"}}}}, "'pack-quantized'"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {}}, "config_groups"),
    ({**LAYOUTS["ct-channel"][0], "config_groups": {"g": {"targets": ["Linear"], "weights": {
        "num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True}}}}, "'int'"),
    ({**LAYOUTS["ct-channel"][0], "config_groups": {"g": {"targets": ["Linear"], "weights": {
        "num_bits": 8, "type": "float", "strategy": "group", "symmetric": True}}}}, "'group'"),
    ({"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": [128, 128]}, "'static'"),
    ({"quant_method": "fp8", "activation_scheme": "dynamic"}, "weight_block_size"),
    ({"quant_method": "fp8", "weight_block_size": [128]}, "weight_block_size"),
    ("fp8", "not an object"),
])
def test_a_quantization_config_nanoslg_cannot_run_is_a_startup_error_naming_it(quant_config, named, tiny_model_dir,
                                                                                tmp_path):
    folder = _with_quant_config(tiny_model_dir("llama"), str(tmp_path / "m"), quant_config)
    with pytest.raises(ConfigError, match="quantization_config|compressed-tensors|quant_method") as e:
        EngineConfig(model=folder).resolve()
    assert named in str(e.value)


def test_schemes_of_the_published_layouts():
    ct = quant_scheme(LAYOUTS["ct-channel"][0], None)
    assert (ct.source, ct.weight_scales, ct.static_input_scales) == ("compressed-tensors", "channel", False)
    assert not ct.quantizes("lm_head") and ct.quantizes("model.layers.0.mlp.down_proj")
    static = quant_scheme(LAYOUTS["ct-tensor"][0], "fp8")
    assert (static.weight_scales, static.static_input_scales) == ("tensor", True)
    block = quant_scheme(LAYOUTS["fp8-block"][0], None)
    assert (block.source, block.block, block.scale_name) == ("fp8", (48, 32), "weight_scale_inv")
    assert quant_scheme({}, "fp8").source == "online" and quant_scheme(None, None) is None
    group = LAYOUTS["ct-channel"][0]["config_groups"]["group_0"]
    mixed = quant_scheme({**LAYOUTS["ct-channel"][0], "format": "mixed",
                          "config_groups": {"group_0": {**group, "format": "float-quantized"}}}, None)
    assert mixed.weight_scales == "channel"  # newer writers name the format per group
    ignore = quant_scheme({**LAYOUTS["ct-channel"][0], "ignore": ["lm_head", "re:.*layers\\.1\\..*"]}, None)
    assert not ignore.quantizes("model.layers.1.mlp.up_proj") and ignore.quantizes("model.layers.0.mlp.up_proj")


def _edited_checkpoint(fp8_dir, folder, edit):
    from safetensors.torch import load_file, save_file

    shutil.copytree(fp8_dir, folder)
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_a_checkpoint_that_says_fp8_but_holds_other_weights_fails_naming_the_dtype(fp8_models, tmp_path):
    """The scales are there, one weight is fp32: a silent cast to FP8 would load garbage."""
    name = "model.layers.1.mlp.down_proj.weight"
    folder = _edited_checkpoint(fp8_models("llama", "ct-channel")[0], str(tmp_path / "m"),
                                lambda t: t.update({name: t[name].float()}))
    with pytest.raises(RuntimeError, match="down_proj.weight.*says FP8, but the checkpoint's weight is F32"):
        _tokens(folder)


def test_a_checkpoint_without_its_scales_fails_naming_them(fp8_models, tmp_path):
    name = "model.layers.2.self_attn.k_proj.weight_scale"
    folder = _edited_checkpoint(fp8_models("llama", "ct-channel")[0], str(tmp_path / "m"), lambda t: t.pop(name))
    with pytest.raises(RuntimeError, match=f"lacks {name}"):
        _tokens(folder)


# --- checkpoints against Hugging Face -------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fp8_checkpoint_gives_the_dequantized_models_tokens(arch, layout, fp8_models, hf_reference):
    fp8_dir, deq_dir = fp8_models(arch, layout)
    assert _tokens(fp8_dir) == hf_reference(deq_dir, PROMPTS, 10)


PARALLEL_CASES = [("llama", "ct-channel", "tp2"), ("qwen3", "ct-tensor", "tp2"), ("llama", "fp8-block", "tp2"),
                  ("qwen3", "fp8-block-128", "tp2"),
                  ("qwen3", "ct-channel", "pp2"), ("llama", "ct-tensor", "pp2"), ("qwen3", "fp8-block", "pp2")]


@pytest.mark.slow  # two gloo ranks per case
@pytest.mark.parametrize("arch, layout, parallel", PARALLEL_CASES)
def test_fp8_checkpoint_split_over_ranks(arch, layout, parallel, fp8_models, hf_reference):
    fp8_dir, deq_dir = fp8_models(arch, layout)
    layout_args = {"tp2": dict(tensor_parallel_size=2), "pp2": dict(pipeline_parallel_size=2)}[parallel]
    assert _tokens(fp8_dir, **layout_args) == hf_reference(deq_dir, PROMPTS, 10)


@pytest.mark.parametrize("arch, parallel", [("llama", {}), ("qwen3", {}), ("qwen2", {"tensor_parallel_size": 2})])
def test_quantization_fp8_runs_the_per_channel_rounded_model(arch, parallel, tiny_model_dir, tmp_path_factory,
                                                             hf_reference):
    src = tiny_model_dir(arch)
    fake = write_fake_quantized(src, str(tmp_path_factory.mktemp("fake-fp8") / arch))
    ours = _tokens(src, quantization="fp8", **parallel)
    assert ours == hf_reference(fake, PROMPTS, 10)
    assert ours != hf_reference(src, PROMPTS, 10)  # the rounding is real: some token moved


# --- the FP8 KV cache -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_fp8_kv_cache_leaves_transformers_only_at_ties_and_holds_four_times_fp32s_pages(arch, tiny_model_dir):
    """The tie-aware rule of tests/gpu/bf16_oracle.py with FP8's own error: teacher-forced logits within e4m3's
    rounding of fp32 Hugging Face, and the engine's greedy tokens (chunked prefill, mixed steps, a prefix hit) leave
    Hugging Face's only where its margin is within that error."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "gpu"))
    import bf16_oracle as oracle

    folder = tiny_model_dir(arch)
    prompts = random_prompts(6, seed=5)
    prompts[5] = prompts[0] + prompts[5]  # shares a prefix with the first: a prefix-cache hit
    hf = oracle.hf_model(folder, torch.float32)
    theirs, their_logits = oracle.hf_greedy(hf, prompts, 16)
    forced = oracle.hf_forced(hf, prompts, theirs)
    _, ours_forced = oracle.engine_logits(folder, "sdpa", prompts, 16, forced=theirs, kv_cache_dtype="fp8")
    err = oracle.forced_errors(ours_forced, forced)
    assert float(err.median()) < 1 / 16 and float(err.max()) < 0.15  # e4m3 keeps 3 mantissa bits
    assert float(err.median()) > 1e-3  # and the cache really is FP8 (fp32 gives 1e-6)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    with LLM(folder, max_model_len=128, kv_cache_dtype="fp8", max_num_batched_tokens=24) as llm:
        outs = llm.generate(prompts[:5], params) + llm.generate(prompts[5:], params)
        with DebugClient(llm.config.run_dir) as debug:
            fp8_pages = debug.state()["kv_pages_total"]
    ours = [o.token_ids for o in outs]
    for prompt, step, margin, allowed in oracle.divergences(ours, theirs, their_logits, float(err.median())):
        assert margin <= allowed, f"prompt {prompt} left Hugging Face at step {step} by {margin:.3f} > {allowed:.3f}"
    with LLM(folder, max_model_len=128, kv_cache_memory_gb=0.01) as llm, DebugClient(llm.config.run_dir) as debug:
        fp32_pages = debug.state()["kv_pages_total"]
    with LLM(folder, max_model_len=128, kv_cache_memory_gb=0.01, kv_cache_dtype="fp8") as llm, \
            DebugClient(llm.config.run_dir) as debug:
        assert debug.state()["kv_pages_total"] // 4 == fp32_pages  # the same bytes (rounded down to pages)
    assert fp8_pages > 0


# --- what must never load silently ----------------------------------------------------------------------------------

def _with_config(fp8_dir, folder, change):
    shutil.copytree(fp8_dir, folder)
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    change(config)
    with open(path, "w") as f:
        json.dump(config, f)
    return folder


def test_an_older_exports_compression_config_is_read_as_its_quantization(fp8_models, hf_reference, tmp_path):
    fp8_dir, deq_dir = fp8_models("llama", "ct-channel")
    folder = _with_config(fp8_dir, str(tmp_path / "m"),
                          lambda c: c.update(compression_config=c.pop("quantization_config")))
    assert _tokens(folder) == hf_reference(deq_dir, PROMPTS, 10)


@pytest.mark.parametrize("change, error", [
    # no quantization_config at all: the FP8 weights would be cast to the model's dtype without their scales
    (lambda c: c.pop("quantization_config"), "holds it in FP8"),
    # an ignore list that leaves the MLPs plain while the file holds them in FP8
    (lambda c: c["quantization_config"].update(ignore=["lm_head", "re:.*mlp"]), "holds it in FP8"),
])
def test_fp8_tensors_never_go_into_a_plain_layer(change, error, fp8_models, tmp_path):
    folder = _with_config(fp8_models("llama", "ct-channel")[0], str(tmp_path / "m"), change)
    with pytest.raises(RuntimeError, match=error):
        _tokens(folder)


def test_block_scales_made_for_other_blocks_are_refused(fp8_models, tmp_path):
    folder = _with_config(fp8_models("qwen3", "fp8-block")[0], str(tmp_path / "m"),
                          lambda c: c["quantization_config"].update(weight_block_size=[96, 64]))
    with pytest.raises(RuntimeError, match="96x64-block weight scales of shape"):
        _tokens(folder)


def test_a_quantized_lm_head_is_refused_at_startup(fp8_models, tmp_path):
    folder = _with_config(fp8_models("llama", "ct-channel")[0], str(tmp_path / "m"),
                          lambda c: c["quantization_config"].update(ignore=[]))
    with pytest.raises(ConfigError, match="quantizes lm_head"):
        EngineConfig(model=folder).resolve()
