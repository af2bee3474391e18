"""Quantized engines end to end on the CPU: each method's engine against transformers' own model
code running the same (dequantized) weights, tensor parallelism against one rank, engine.json's
record, and the refusals."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from kiln.kernels import quant as q
from kiln.runtime import LLM, SamplingParams
from kiln.runtime.builder import BuildError, build_engine
from kiln.runtime.config import BuildConfig

from conftest import make_hf_model

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [100, 200, 300], list(range(20, 60))]
STEPS = 8


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("q-llama")
    m = make_hf_model("llama")
    m.save_pretrained(d)
    return str(d), m


def _build(src: str, out: str, **kw) -> str:
    build = BuildConfig(dtype="float32", max_seq_len=256, **kw)
    return build_engine(src, out, build, device_class="cpu", progress=False)


def _dequantized(tensors: dict, prefix: str, quant: dict) -> torch.Tensor:
    m = quant["linear"]["method"]
    if m == "none":
        return tensors[prefix + ".weight"].float()
    if m in ("fp8", "int8-weight"):
        return tensors[prefix + ".weight"].float() * tensors[prefix + ".weight_scale"][:, None]
    g = quant["linear"]["group_size"]
    # int4, written out element by element: column 2j is the low nibble of byte j, 2j+1 the high one
    packed = tensors[prefix + ".qweight"].to(torch.int32)
    vals = torch.empty(packed.shape[0], packed.shape[1] * 2)
    vals[:, 0::2] = (packed & 15).float()
    vals[:, 1::2] = (packed >> 4).float()
    cols = torch.arange(vals.shape[1]) // g
    return (vals - tensors[prefix + ".qzeros"].float()[:, cols]) * tensors[prefix + ".scales"].float()[:, cols]


def reference_model(engine: str, hf_model):
    """transformers' model with the engine's weights (quantized ones dequantized), and for FP8
    engines every projection's input quantized to E4M3 per token (or with its static scale)."""
    import copy

    cfg = json.load(open(os.path.join(engine, "engine.json")))
    quant = cfg["quantization"] or {"linear": {"method": "none"}}
    t = load_file(os.path.join(engine, "rank0.safetensors"))
    mc = cfg["model"]
    d, nh, nkv, inter = mc["head_dim"], mc["num_attention_heads"], mc["num_key_value_heads"], mc["intermediate_size"]
    ref = copy.deepcopy(hf_model)
    sd = {}
    for name, p in ref.state_dict().items():
        if name in t:
            sd[name] = t[name].float()
    for i in range(mc["num_hidden_layers"]):
        p = f"model.layers.{i}."
        qkv = _dequantized(t, p + "self_attn.qkv_proj", quant)
        sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"], sd[p + "self_attn.v_proj.weight"] = \
            qkv.split([nh * d, nkv * d, nkv * d])
        sd[p + "self_attn.o_proj.weight"] = _dequantized(t, p + "self_attn.o_proj", quant)
        gu = _dequantized(t, p + "mlp.gate_up_proj", quant)
        sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"] = gu.split([inter, inter])
        sd[p + "mlp.down_proj.weight"] = _dequantized(t, p + "mlp.down_proj", quant)
    missing = set(ref.state_dict()) - set(sd)
    assert not missing, missing
    ref.load_state_dict(sd)
    if quant["linear"]["method"] == "fp8":
        static = quant["linear"]["static_activations"]
        for name, mod in ref.named_modules():
            if isinstance(mod, torch.nn.Linear) and name != "lm_head":
                layer = name.split(".")[2]
                fused = {"q_proj": "self_attn.qkv_proj", "k_proj": "self_attn.qkv_proj", "v_proj": "self_attn.qkv_proj",
                         "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_up_proj", "up_proj": "mlp.gate_up_proj",
                         "down_proj": "mlp.down_proj"}[name.rsplit(".", 1)[1]]
                scale = t[f"model.layers.{layer}.{fused}.input_scale"] if static else None
                mod.register_forward_pre_hook(_fp8_input_hook(scale))
    return ref


def _fp8_input_hook(scale):
    def hook(mod, args):
        x = args[0].float()
        s = scale.expand(*x.shape[:-1], 1) if scale is not None else (x.abs().amax(-1, keepdim=True) / 448).clamp(min=1e-12)
        return ((x / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s,)
    return hook


def generate(engine: str, **kw):
    sp = SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True, logprobs=3)
    with LLM(engine, **kw) as llm:
        return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in llm.generate(PROMPTS, sp)]


def check_against(ref, got, atol: float) -> None:
    for prompt, (toks, lps) in zip(PROMPTS, got):
        with torch.no_grad():
            logits = ref(torch.tensor([prompt + toks])).logits[0, len(prompt) - 1 : len(prompt) - 1 + len(toks)]
        want = torch.log_softmax(logits.float(), -1)
        assert toks == want.argmax(-1).tolist()
        for i, entry in enumerate(lps):
            for tok, lp in entry.items():
                assert abs(lp.logprob - float(want[i, tok])) <= atol, (i, tok, lp.logprob, float(want[i, tok]))


# FP8 activations: a float32 op-order difference of one ulp before the E4M3 rounding can move
# one input element to the neighbouring E4M3 value, so the logprobs agree to about 1e-3 there;
# weight-only methods compute the same float32 products and agree to float32 accuracy.
CASES = {
    "fp8": (dict(quant="fp8"), 5e-3),
    "fp8-static": (dict(quant="fp8", activation_scales="static"), 5e-3),
    "int8-weight": (dict(quant="int8-weight"), 1e-4),
    "int4-awq": (dict(quant="int4-awq", group_size=32), 1e-4),
    "int4-rtn": (dict(quant="int4-awq", group_size=32, int4_search="rtn"), 1e-4),
}


@pytest.mark.parametrize("case", list(CASES))
def test_quantized_engine_matches_transformers_on_its_weights(case, llama, tmp_path):
    src, hf = llama
    kw, atol = CASES[case]
    eng = _build(src, str(tmp_path / case), **kw)
    check_against(reference_model(eng, hf), generate(eng), atol)


def test_engine_json_records_the_quantization(llama, tmp_path):
    src, _ = llama
    full = _build(src, str(tmp_path / "f32"))
    awq = _build(src, str(tmp_path / "awq"), quant="int4-awq", group_size=32)
    info = json.load(open(os.path.join(awq, "engine.json")))["quantization"]
    assert info["linear"]["method"] == "int4" and info["linear"]["group_size"] == 32
    assert info["source"] == "build" and info["search"] == "awq+gptq"
    assert info["calibration"]["tokens"] > 0 and info["calibration"]["awq_search"]
    assert json.load(open(os.path.join(full, "engine.json")))["quantization"] is None
    t = load_file(os.path.join(awq, "rank0.safetensors"))
    assert t["model.layers.0.self_attn.qkv_proj.qweight"].dtype == torch.uint8
    assert t["model.layers.0.self_attn.qkv_proj.scales"].shape == (128, 64 // 32)
    assert "model.layers.0.self_attn.qkv_proj.weight" not in t
    assert os.path.getsize(os.path.join(awq, "rank0.safetensors")) < os.path.getsize(os.path.join(full, "rank0.safetensors"))


def test_awq_folding_keeps_the_full_precision_function(llama, tmp_path):
    """AWQ's scales are folded into the norms and up rows: only int4 rounding differs, so the
    AWQ engine stays at least as close to the float32 model as round-to-nearest on the text."""
    src, hf = llama
    awq = _build(src, str(tmp_path / "awq"), quant="int4-awq", group_size=32)
    t = load_file(os.path.join(awq, "rank0.safetensors"))
    # the norm weights moved: the search chose scales other than 1 somewhere
    assert not torch.allclose(t["model.layers.0.input_layernorm.weight"], hf.state_dict()["model.layers.0.input_layernorm.weight"])


@pytest.mark.parametrize("kw", [dict(quant="fp8"), dict(quant="int4-awq", group_size=32)], ids=["fp8", "int4-awq"])
def test_tp2_equals_tp1(kw, llama, tmp_path):
    """Greedy tokens are the same up to near-ties. Both layouts hold the same quantized weights;
    with dynamic FP8 activations a row-parallel projection's rank scales its half of each row by
    that half's own maximum, so FP8 logprobs differ at the E4M3 rounding level (int4 only by
    summation order), and where the random model's two best tokens are that close the choice may
    differ: the sequences are compared up to such a tie, which must be one."""
    src, _ = llama
    tol = 2e-2 if kw["quant"] == "fp8" else 1e-4
    one = generate(_build(src, str(tmp_path / "tp1"), **kw))
    two = generate(_build(src, str(tmp_path / "tp2"), tp=2, **kw))
    compared = 0
    for (t1, l1), (t2, l2) in zip(one, two):
        for i, (a, b) in enumerate(zip(l1, l2)):
            assert t1[i] in b and t2[i] in a and len(set(a) & set(b)) >= 2  # top-3 may swap a near-tied third
            for tok in set(a) & set(b):
                assert abs(a[tok].logprob - b[tok].logprob) <= tol
            compared += 1
            if t1[i] != t2[i]:
                assert abs(a[t1[i]].logprob - a[t2[i]].logprob) <= 2 * tol, (i, t1, t2)
                break
        else:
            assert t1 == t2
    assert compared >= len(PROMPTS) * STEPS // 2


def test_refusals(llama, tmp_path):
    src, _ = llama
    with pytest.raises(ValueError, match="activation_scales 'static' applies to --quant fp8"):
        BuildConfig(quant="int8-weight", activation_scales="static")
    with pytest.raises(ValueError, match="group_size applies"):
        BuildConfig(quant="fp8", group_size=64)
    with pytest.raises(ValueError, match="fp8_rounding applies to --quant fp8 only"):
        BuildConfig(quant="int4-awq", fp8_rounding="rtn")
    with pytest.raises(BuildError, match="int4 group size 128"):
        _build(src, str(tmp_path / "g"), quant="int4-awq")  # K = 64 is not a multiple of 128
    with pytest.raises(BuildError, match="--calibration-text applies only"):
        build_engine(src, str(tmp_path / "c"), BuildConfig(dtype="float32", quant="int8-weight"), device_class="cpu",
                     progress=False, calibration_text=__file__)


def test_fp8_weights_gptq_rounded_by_default_and_rtn_on_request(llama, tmp_path):
    """The default fp8 build rounds with GPTQ on the calibration text: the same row scales as
    round-to-nearest, other E4M3 codes where that lowers the output error, recorded in
    engine.json; ``fp8_rounding="rtn"`` stores exactly ``quantize_fp8_rows`` of the checkpoint."""
    src, hf = llama
    gptq = _build(src, str(tmp_path / "gptq"), quant="fp8")
    rtn = _build(src, str(tmp_path / "rtn"), quant="fp8", fp8_rounding="rtn")
    info = {n: json.load(open(os.path.join(e, "engine.json")))["quantization"] for n, e in (("gptq", gptq), ("rtn", rtn))}
    assert info["gptq"]["search"] == "gptq" and info["gptq"]["calibration"]["gptq"]
    assert info["rtn"]["search"] == "rtn" and info["rtn"]["calibration"] is None
    tg = load_file(os.path.join(gptq, "rank0.safetensors"))
    tr = load_file(os.path.join(rtn, "rank0.safetensors"))
    sd = hf.state_dict()
    moved = 0
    for i in range(hf.config.num_hidden_layers):
        p = f"model.layers.{i}."
        w = sd[p + "mlp.down_proj.weight"].float()
        want, want_scale = q.quantize_fp8_rows(w)
        assert torch.equal(tr[p + "mlp.down_proj.weight"].view(torch.uint8), want.view(torch.uint8))
        assert torch.equal(tr[p + "mlp.down_proj.weight_scale"], want_scale)
        assert torch.equal(tg[p + "mlp.down_proj.weight_scale"], want_scale)
        moved += int((tg[p + "mlp.down_proj.weight"].view(torch.uint8) != want.view(torch.uint8)).sum())
        for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj"):
            assert torch.equal(tg[p + name + ".weight_scale"], tr[p + name + ".weight_scale"])
    assert moved > 0


def test_fp8_kv_scales_keep_headroom_over_the_calibration():
    """A layer's k_scale / v_scale is KV_HEADROOM x its calibrated largest |k| / |v| over 448."""
    from kiln.runtime.calibrate import Calibration
    from kiln.runtime.config import LinearQuant
    from kiln.runtime.quantize import KV_HEADROOM, QuantizedSource

    cal = Calibration(kv_amax={0: (4.48, 8.96), 1: (0.0, 1.0)})
    src = QuantizedSource(lambda n: torch.zeros(1), LinearQuant(kv_fp8=True), torch.float32, cal)
    assert KV_HEADROOM == 2.0
    assert float(src("model.layers.0.self_attn.k_scale")) == pytest.approx(0.02)
    assert float(src("model.layers.0.self_attn.v_scale")) == pytest.approx(0.04)
    assert float(src("model.layers.1.self_attn.v_scale")) == pytest.approx(2 / 448)
    assert float(src("model.layers.1.self_attn.k_scale")) > 0  # a layer of all-zero keys still divides
    uncalibrated = QuantizedSource(lambda n: torch.zeros(1), LinearQuant(kv_fp8=True), torch.float32, None)
    assert float(uncalibrated("model.layers.0.self_attn.k_scale")) == 1.0


def test_reference_linears_round_where_the_format_does():
    torch.manual_seed(0)
    w, x = torch.randn(48, 64), torch.randn(3, 64)
    qw, ws = q.quantize_fp8_rows(w)
    xs = x.abs().amax(-1) / 448
    xq = (x / xs[:, None]).to(torch.float8_e4m3fn).float()
    want = (xq @ qw.float().t()) * xs[:, None] * ws[None, :]
    assert torch.allclose(q.fp8_linear_ref(x, qw, ws), want, atol=1e-5)
    p, s, z = q.quantize_int4(w, 32)
    deq = q.dequantize_int4(p, s, z, 32)
    assert (deq - w).abs().max() <= s.float().max() * 0.5 + 1e-6
    assert torch.equal(q.dequantize_int4(*q.quantize_int4(deq, 32, scales=s, zeros=z), 32), deq)
