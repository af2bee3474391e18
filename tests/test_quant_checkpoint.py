"""Quantized Hugging Face checkpoints read into kiln's canonical layout.

compressed-tensors checkpoints are compressed by the compressed-tensors library itself and
kiln's weights must equal the library's own decompression. AutoAWQ and GPTQ checkpoints are
packed here from the formats' documented layouts (their libraries need a GPU) and checked
against the int4 values, zero points and scales that went in.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from kiln.runtime.checkpoint import CheckpointError, CheckpointReader, HFReader, RandomReader, open_checkpoint
from kiln.runtime.quant_checkpoint import CheckpointQuant, dequantize_canonical, detect_quantization

from conftest import build_small

transformers = pytest.importorskip("transformers")

LLAMA = dict(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, initializer_range=0.05)
PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i of an AutoAWQ word holds column AWQ_ORDER[i] of its 8


def _llama(seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.to(dtype)


def _prefixes(layers: int = LLAMA["num_hidden_layers"]) -> list[str]:
    return [f"model.layers.{i}.{p}" for i in range(layers) for p in PROJ]


# ---------------------------------------------------------------------------------------------
# compressed-tensors, compressed by the library
# ---------------------------------------------------------------------------------------------

CT_CASES = {
    "fp8-static-tensor": dict(weights=dict(num_bits=8, type="float", strategy="tensor", symmetric=True),
                              input_activations=dict(num_bits=8, type="float", strategy="tensor", symmetric=True,
                                                     dynamic=False)),
    "fp8-dynamic-channel": dict(weights=dict(num_bits=8, type="float", strategy="channel", symmetric=True),
                                input_activations=dict(num_bits=8, type="float", strategy="token", symmetric=True,
                                                       dynamic=True)),
    "w4a16-sym-g64": dict(weights=dict(num_bits=4, type="int", strategy="group", group_size=64, symmetric=True)),
    "w4a16-asym-g32": dict(weights=dict(num_bits=4, type="int", strategy="group", group_size=32, symmetric=False)),
}


def _ct_checkpoint(folder: str, case: str, dtype=torch.float32):
    """A tiny llama quantized and compressed by compressed-tensors; returns the source model."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    from compressed_tensors.quantization import apply_quantization_config
    from compressed_tensors.quantization.utils import calculate_qparams

    model = _llama(dtype=dtype)
    spec = {k: QuantizationArgs(**v) for k, v in CT_CASES[case].items()}
    scheme = QuantizationScheme(targets=["Linear"], **spec)
    config = QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"])
    apply_quantization_config(model, config, show_progress=False)
    gen = torch.Generator().manual_seed(1)
    for _, module in model.named_modules():
        args = getattr(getattr(module, "quantization_scheme", None), "weights", None)
        if args is None:
            continue
        w = module.weight.data
        if args.strategy == "group":
            groups = w.unflatten(-1, (-1, args.group_size))
            lo, hi = groups.amin(-1), groups.amax(-1)
        elif args.strategy == "channel":
            lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        else:
            lo, hi = w.min().reshape(1), w.max().reshape(1)
        scale, zero = calculate_qparams(lo, hi, args)
        module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data.copy_(zero.reshape(module.weight_zero_point.shape))
        if hasattr(module, "input_scale"):
            module.input_scale.data.fill_(float(torch.rand((), generator=gen)) * 0.01 + 0.005)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(folder)
    compressor.update_config(folder)
    return model


def _ct_reference(folder: str) -> dict[str, torch.Tensor]:
    """Every projection's weight as compressed-tensors itself decompresses it from the saved file."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    with open(os.path.join(folder, "config.json")) as f:
        qconfig = QuantizationConfig.model_validate(json.load(f)["quantization_config"])
    scheme = qconfig.config_groups["group_0"]
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    stored = load_file(os.path.join(folder, "model.safetensors"))
    out = {}
    for prefix in _prefixes():
        local = {n[len(prefix) + 1:]: t for n, t in stored.items() if n.startswith(prefix + ".")}
        out[prefix] = compressor.decompress(local, scheme)["weight"]
    return out


@pytest.fixture(scope="module")
def ct_checkpoints(tmp_path_factory):
    out = {}
    for case in CT_CASES:
        folder = str(tmp_path_factory.mktemp(f"ct-{case}"))
        out[case] = (folder, _ct_checkpoint(folder, case))
    return out


@pytest.mark.parametrize("case", list(CT_CASES))
def test_compressed_tensors_matches_library(case, ct_checkpoints):
    folder, _ = ct_checkpoints[case]
    reader = open_checkpoint(folder)
    quant = reader.quant
    fp8 = case.startswith("fp8")
    assert quant is not None and quant.ignored == ["lm_head"]
    if fp8:
        assert (quant.format, quant.method, quant.group_size) == ("compressed-tensors-fp8", "fp8", None)
        assert quant.activation == ("static" if "static" in case else "dynamic")
    else:
        assert (quant.format, quant.method, quant.activation) == ("compressed-tensors-w4a16", "int4", None)
        assert quant.group_size == int(case[-2:]) and quant.symmetric == ("-sym" in case)
    ref = _ct_reference(folder)
    stored = load_file(os.path.join(folder, "model.safetensors"))
    for prefix in _prefixes():
        name = prefix + ".weight"
        assert reader.is_quantized(prefix) and name in reader.names()
        w = reader.get(name)
        assert w.dtype == torch.float32 and tuple(w.shape) == reader.shape(name) == tuple(ref[prefix].shape)
        assert torch.equal(w, ref[prefix].float()), prefix
        canon = reader.get_quantized(prefix)
        n, k = w.shape
        if fp8:
            assert set(canon) == ({"weight", "weight_scale", "input_scale"} if "static" in case else {"weight", "weight_scale"})
            assert canon["weight"].dtype == torch.float8_e4m3fn
            assert torch.equal(canon["weight"].view(torch.uint8), stored[name].view(torch.uint8))
            assert canon["weight_scale"].dtype == torch.float32 and canon["weight_scale"].shape == (n,)
            assert torch.equal(canon["weight_scale"], stored[prefix + ".weight_scale"].float().reshape(-1).expand(n))
            if "static" in case:
                assert canon["input_scale"].shape == (1,)
                assert torch.equal(canon["input_scale"], stored[prefix + ".input_scale"].float())
        else:
            g = quant.group_size
            assert set(canon) == {"qweight", "scales", "qzeros"}
            assert canon["qweight"].dtype == torch.uint8 and canon["qweight"].shape == (n, k // 2)
            assert canon["scales"].dtype == stored[prefix + ".weight_scale"].dtype and canon["scales"].shape == (n, k // g)
            assert canon["qzeros"].dtype == torch.uint8 and canon["qzeros"].shape == (n, k // g)
            assert int(canon["qzeros"].max()) <= 15
            if quant.symmetric:
                assert bool((canon["qzeros"] == 8).all())
            else:
                assert int(canon["qzeros"].min()) < 8 or int(canon["qzeros"].max()) > 8
        assert torch.equal(dequantize_canonical(canon, quant.group_size), w)
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.layers.1.input_layernorm.weight"):
        assert not reader.is_quantized(name[: -len(".weight")])
        assert torch.equal(reader.get(name), stored[name])


def test_compressed_tensors_bfloat16_scales(tmp_path):
    """Scales stay in the checkpoint's dtype; the float32 weight rounds to the library's bf16 one."""
    folder = str(tmp_path / "ct")
    _ct_checkpoint(folder, "w4a16-asym-g32", dtype=torch.bfloat16)
    reader = HFReader(folder)
    ref = _ct_reference(folder)
    for prefix in _prefixes()[:7]:
        assert reader.get_quantized(prefix)["scales"].dtype == torch.bfloat16
        assert ref[prefix].dtype == torch.bfloat16
        assert torch.equal(reader.get(prefix + ".weight").to(torch.bfloat16), ref[prefix])


# ---------------------------------------------------------------------------------------------
# AutoAWQ GEMM and GPTQ, packed here from their documented layouts
# ---------------------------------------------------------------------------------------------


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit words held in int64 -> the int32 tensors checkpoints store."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _pack_awq(v: torch.Tensor) -> torch.Tensor:
    """[R, C] values 0..15 -> AutoAWQ int32 [R, C/8]: nibble i of word c holds column 8c + AWQ_ORDER[i]."""
    words = torch.zeros(v.shape[0], v.shape[1] // 8, dtype=torch.int64)
    for i, col in enumerate(AWQ_ORDER):
        words |= v[:, col::8].long() << (4 * i)
    return _to_int32(words)


def _pack_along_rows(v: torch.Tensor) -> torch.Tensor:
    """[R, C] -> int32 [R/8, C]: nibble j of word (r, c) is v[8r + j, c] (GPTQ's qweight)."""
    words = torch.zeros(v.shape[0] // 8, v.shape[1], dtype=torch.int64)
    for j in range(8):
        words |= v[j::8, :].long() << (4 * j)
    return _to_int32(words)


def _pack_along_cols(v: torch.Tensor) -> torch.Tensor:
    """[R, C] -> int32 [R, C/8]: nibble j of word (r, c) is v[r, 8c + j] (GPTQ's qzeros)."""
    return _pack_along_rows(v.t().contiguous()).t().contiguous()


def _int4_values(n: int, k: int, g: int, gen: torch.Generator, symmetric: bool):
    """Random int4 values [N, K], zero points [N, K/G] (8 when symmetric) and fp16 scales [N, K/G]."""
    q = torch.randint(0, 16, (n, k), generator=gen)
    zeros = torch.full((n, k // g), 8) if symmetric else torch.randint(0, 16, (n, k // g), generator=gen)
    if not symmetric:
        zeros[0, 0] = 0  # the GPTQ v1 corner: a zero point of 0 is stored as 15
        zeros[-1, -1] = 15
    scales = (torch.rand(n, k // g, generator=gen) * 0.004 + 0.001).to(torch.float16)
    return q, zeros, scales


def _plain_dequant(q, zeros, scales, group_of) -> torch.Tensor:
    """w[n, k] = (q[n, k] - zeros[n, group_of[k]]) * scales[n, group_of[k]], written out per element."""
    n, k = q.shape
    w = torch.empty(n, k, dtype=torch.float32)
    zf, sf = zeros.tolist(), scales.float().tolist()
    qf = q.tolist()
    for c in range(k):
        gi = int(group_of[c])
        for r in range(n):
            w[r, c] = (qf[r][c] - zf[r][gi]) * sf[r][gi]
    return w


def _write_int4_checkpoint(folder: str, fmt: str, qconfig: dict, *, g: int, symmetric: bool, act_order: bool = False,
                           v1: bool = True, arch: str = "llama", side_file: str | None = None, seed: int = 0):
    """A tiny checkpoint whose 2-D linears (experts included) are replaced by packed int4 tensors.

    Returns (transformers model, {prefix: reference float32 weight}, {prefix: g_idx or None})."""
    if arch == "llama":
        model = _llama(seed)
    else:
        torch.manual_seed(seed)
        cfg = transformers.MixtralConfig(**{**LLAMA, "num_local_experts": 2, "num_experts_per_tok": 1})
        model = transformers.MixtralForCausalLM(cfg).eval()
    model.save_pretrained(folder)
    path = os.path.join(folder, "model.safetensors")
    stored = load_file(path)
    gen = torch.Generator().manual_seed(seed + 7)
    truth, gidx, orders = {}, {}, {}
    for name in sorted(stored):
        if not name.startswith("model.layers.") or not name.endswith(("_proj.weight", ".w1.weight", ".w2.weight", ".w3.weight")):
            continue
        prefix = name[: -len(".weight")]
        n, k = stored.pop(name).shape
        q, zeros, scales = _int4_values(n, k, g, gen, symmetric)
        if act_order:  # linears fed the same input (q/k/v, gate/up, w1/w3) share GPTQ's Hessian order
            shared = prefix.replace("k_proj", "q_proj").replace("v_proj", "q_proj").replace("up_proj", "gate_proj")
            order = orders.setdefault(shared.replace(".w3", ".w1"), torch.randperm(k, generator=gen))
            group_of = torch.empty(k, dtype=torch.int64)
            group_of[order] = torch.arange(k) // g  # act-order: the i-th column quantized joins group i // g
        else:
            group_of = torch.arange(k) // g
        truth[prefix] = _plain_dequant(q, zeros, scales, group_of)
        gidx[prefix] = group_of if act_order else None
        if fmt == "awq":
            stored[prefix + ".qweight"] = _pack_awq(q.t().contiguous())
            stored[prefix + ".qzeros"] = _pack_awq(zeros.t().contiguous())
        else:
            stored[prefix + ".qweight"] = _pack_along_rows(q.t().contiguous())
            stored_zeros = (zeros - 1) & 15 if v1 else zeros
            stored[prefix + ".qzeros"] = _pack_along_cols(stored_zeros.t().contiguous())
            stored[prefix + ".g_idx"] = group_of.to(torch.int32)
        stored[prefix + ".scales"] = scales.t().contiguous()
    save_file(stored, path, metadata={"format": "pt"})
    cfg_path = os.path.join(folder, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    if side_file is None:
        cfg["quantization_config"] = qconfig
    else:
        with open(os.path.join(folder, side_file), "w") as f:
            json.dump(qconfig, f)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    return model, truth, gidx


def _check_packed_element(folder: str, fmt: str, prefix: str, w: torch.Tensor, g: int, v1: bool) -> None:
    """A few elements read straight from the stored int32 words with the format's formula."""
    st = load_file(os.path.join(folder, "model.safetensors"))
    qw, qz = (st[f"{prefix}.{p}"].long() & 0xFFFFFFFF for p in ("qweight", "qzeros"))
    scales = st[f"{prefix}.scales"].float()
    n, k = w.shape
    for r, c in [(0, 0), (n - 1, k - 1), (n // 3, k // 2 + 5), (7, 9)]:
        if fmt == "awq":
            grp = c // g
            qv = (qw[c, r // 8] >> (4 * AWQ_ORDER.index(r % 8))) & 15
            zv = (qz[grp, r // 8] >> (4 * AWQ_ORDER.index(r % 8))) & 15
        else:
            grp = int(st[f"{prefix}.g_idx"][c])
            qv = (qw[c // 8, r] >> (4 * (c % 8))) & 15
            zv = (qz[grp, r // 8] >> (4 * (r % 8))) & 15
            zv = (zv + 1) & 15 if v1 else zv
        assert float(w[r, c]) == float((qv - zv).float() * scales[grp, r]), (prefix, r, c)


AWQ_CASES = {
    "awq-g32": dict(config={"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm",
                            "modules_to_not_convert": None}, g=32, side_file=None),
    "awq-side-file-g64": dict(config={"zero_point": True, "q_group_size": 64, "w_bit": 4, "version": "GEMM"}, g=64,
                              side_file="quant_config.json"),
}
GPTQ_CASES = {
    "gptq-v1-actorder-asym-g32": dict(g=32, desc_act=True, sym=False, fmt="gptq"),
    "gptq-v1-sym-g64": dict(g=64, desc_act=False, sym=True, fmt="gptq"),
    "gptq-v2-actorder-sym-g32": dict(g=32, desc_act=True, sym=True, fmt="gptq_v2"),
}


def _gptq_config(c: dict) -> dict:
    return {"quant_method": "gptq", "bits": 4, "group_size": c["g"], "desc_act": c["desc_act"], "sym": c["sym"],
            "checkpoint_format": c["fmt"], "lm_head": False, "true_sequential": True}


def _check_int4_reader(reader, truth: dict, gidx: dict, g: int, act_order: bool) -> None:
    for prefix, ref in truth.items():
        name = prefix + ".weight"
        assert reader.is_quantized(prefix) and name in reader.names() and reader.shape(name) == tuple(ref.shape)
        w = reader.get(name)
        assert w.dtype == torch.float32 and torch.equal(w, ref), prefix
        canon = reader.get_quantized(prefix)
        n, k = ref.shape
        assert canon["qweight"].dtype == torch.uint8 and canon["qweight"].shape == (n, k // 2)
        assert canon["scales"].dtype == torch.float16 and canon["scales"].shape == (n, k // g)
        assert canon["qzeros"].dtype == torch.uint8 and canon["qzeros"].shape == (n, k // g)
        assert torch.equal(dequantize_canonical(canon, g), ref)
        if act_order:
            perm = canon["input_perm"]
            assert perm.dtype == torch.int32 and perm.shape == (k,)
            assert torch.equal(torch.sort(perm.long()).values, torch.arange(k))
            assert torch.equal(gidx[prefix][perm.long()], torch.arange(k) // g)  # groups are contiguous
            plain = {key: v for key, v in canon.items() if key != "input_perm"}
            w_perm = dequantize_canonical(plain, g)
            assert torch.equal(w_perm, ref[:, perm.long()])
            x = torch.randn(3, k, dtype=torch.float64)
            torch.testing.assert_close(x[:, perm.long()] @ w_perm.double().t(), x @ ref.double().t())
        else:
            assert "input_perm" not in canon


@pytest.mark.parametrize("case", list(AWQ_CASES))
def test_awq_gemm(case, tmp_path):
    c = AWQ_CASES[case]
    folder = str(tmp_path / "awq")
    _, truth, gidx = _write_int4_checkpoint(folder, "awq", c["config"], g=c["g"], symmetric=False, side_file=c["side_file"])
    reader = open_checkpoint(folder)
    assert reader.quant == CheckpointQuant(format="awq", method="int4", group_size=c["g"], symmetric=False)
    assert sorted(truth) == sorted(_prefixes())
    _check_int4_reader(reader, truth, gidx, c["g"], act_order=False)
    _check_packed_element(folder, "awq", "model.layers.1.mlp.down_proj", truth["model.layers.1.mlp.down_proj"], c["g"], False)


@pytest.mark.parametrize("case", list(GPTQ_CASES))
def test_gptq(case, tmp_path):
    c = GPTQ_CASES[case]
    folder = str(tmp_path / "gptq")
    _, truth, gidx = _write_int4_checkpoint(folder, "gptq", _gptq_config(c), g=c["g"], symmetric=c["sym"],
                                            act_order=c["desc_act"], v1=c["fmt"] == "gptq")
    reader = HFReader(folder)
    quant = reader.quant
    assert (quant.format, quant.method, quant.group_size, quant.desc_act, quant.symmetric) == (
        "gptq", "int4", c["g"], c["desc_act"], c["sym"])
    assert quant.zero_offset == (1 if c["fmt"] == "gptq" else 0) and quant.ignored == ["lm_head"]
    _check_int4_reader(reader, truth, gidx, c["g"], act_order=c["desc_act"])
    for prefix in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        _check_packed_element(folder, "gptq", prefix, truth[prefix], c["g"], c["fmt"] == "gptq")
    assert not any(n.endswith(("qweight", "qzeros", "scales", "g_idx")) for n in reader.names())


def test_gptq_desc_act_must_match_g_idx(tmp_path):
    """desc_act with g_idx already in order gives the identity input_perm; a shuffled g_idx under
    a config without desc_act is refused rather than read in the wrong order."""
    folder = str(tmp_path / "ordered")
    c = dict(g=32, desc_act=True, sym=True, fmt="gptq")
    _, truth, _ = _write_int4_checkpoint(folder, "gptq", _gptq_config(c), g=32, symmetric=True, act_order=False)
    reader = HFReader(folder)
    canon = reader.get_quantized("model.layers.0.mlp.down_proj")
    assert torch.equal(canon["input_perm"], torch.arange(LLAMA["intermediate_size"], dtype=torch.int32))
    assert torch.equal(reader.get("model.layers.0.mlp.down_proj.weight"), truth["model.layers.0.mlp.down_proj"])
    folder = str(tmp_path / "shuffled")
    c = dict(g=32, desc_act=False, sym=True, fmt="gptq")
    _write_int4_checkpoint(folder, "gptq", _gptq_config(c), g=32, symmetric=True, act_order=True)
    with pytest.raises(CheckpointError, match="desc_act"):
        HFReader(folder).get("model.layers.0.self_attn.q_proj.weight")


def test_gptq_mixtral_experts_dequantized(tmp_path):
    """Quantized experts (and the dense projections) of a Mixtral come back dequantized under kiln names."""
    folder = str(tmp_path / "gptq-moe")
    c = dict(g=32, desc_act=True, sym=False, fmt="gptq")
    _, truth, _ = _write_int4_checkpoint(folder, "gptq", _gptq_config(c), g=32, symmetric=False, act_order=True,
                                         arch="mixtral")
    reader = HFReader(folder)
    renamed = {p.replace("block_sparse_moe.", "mlp.").replace(".w1", ".gate_proj").replace(".w2", ".down_proj")
               .replace(".w3", ".up_proj"): w for p, w in truth.items()}
    assert "model.layers.0.mlp.experts.1.down_proj" in renamed
    for prefix, ref in renamed.items():
        assert reader.is_quantized(prefix)
        assert torch.equal(reader.get(prefix + ".weight"), ref), prefix
    assert reader.get("model.layers.0.mlp.gate.weight").shape == (2, LLAMA["hidden_size"])


# ---------------------------------------------------------------------------------------------
# Unsupported formats, plain readers
# ---------------------------------------------------------------------------------------------

UNSUPPORTED = {
    "bitsandbytes": {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "hqq": {"quant_method": "hqq", "nbits": 4},
    "'fp8'": {"quant_method": "fp8", "weight_block_size": [128, 128]},
    "bits=3": {"quant_method": "gptq", "bits": 3, "group_size": 128, "desc_act": False},
    "bits=8": {"quant_method": "gptq", "bits": 8, "group_size": 128},
    "marlin": {"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"},
    "group_size -1": {"quant_method": "gptq", "bits": 4, "group_size": -1},
    "gemv": {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv", "zero_point": True},
    "nvfp4-pack-quantized": {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized", "config_groups": {
        "group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "float", "strategy": "tensor_group",
                                                        "group_size": 16}}}},
    "int-quantized": {"quant_method": "compressed-tensors", "format": "int-quantized", "config_groups": {
        "group_0": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "int", "strategy": "channel"},
                    "input_activations": {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}}}},
    "block strategy": {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {
        "group_0": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "block",
                                                        "block_structure": [128, 128]},
                    "input_activations": {"num_bits": 8, "type": "float", "strategy": "group", "group_size": 128,
                                          "dynamic": True}}}},
}


@pytest.mark.parametrize("found", list(UNSUPPORTED))
def test_unsupported_formats_raise_one_line(found):
    with pytest.raises(CheckpointError) as err:
        detect_quantization({"model_type": "llama", "quantization_config": UNSUPPORTED[found]})
    msg = str(err.value)
    assert "\n" not in msg and found in msg
    for supported in ("compressed-tensors FP8", "compressed-tensors W4A16", "AutoAWQ GEMM", "GPTQ"):
        assert supported in msg


def test_unsupported_checkpoint_folder_and_plain_readers(tmp_path):
    model = _llama()
    plain = str(tmp_path / "plain")
    model.save_pretrained(plain)
    reader = HFReader(plain)
    assert reader.quant is None and not reader.is_quantized("model.layers.0.self_attn.q_proj")
    with pytest.raises(CheckpointError):
        reader.get_quantized("model.layers.0.self_attn.q_proj")
    assert RandomReader(reader.config).quant is None
    assert detect_quantization({"model_type": "llama"}) is None
    with open(os.path.join(plain, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = UNSUPPORTED["bitsandbytes"]
    with open(os.path.join(plain, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(CheckpointError, match="bitsandbytes"):
        open_checkpoint(plain)
    # Packed tensors without any quantization config are named, not reported as missing weights.
    folder = str(tmp_path / "noconfig")
    _write_int4_checkpoint(folder, "gptq", _gptq_config(GPTQ_CASES["gptq-v1-sym-g64"]), g=64, symmetric=True)
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    del cfg["quantization_config"]
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(CheckpointError, match="qweight"):
        HFReader(folder)


# ---------------------------------------------------------------------------------------------
# Engines built from quantized checkpoints
# ---------------------------------------------------------------------------------------------


class _Dequantized(CheckpointReader):
    """A quantized checkpoint seen as an ordinary one: every weight through ``get`` (dequantized)."""

    def __init__(self, reader: CheckpointReader):
        self.inner, self.config, self.source = reader, reader.config, reader.source
        self._names, self._shapes = reader.names(), {n: reader.shape(n) for n in reader.names()}

    def get(self, name: str) -> torch.Tensor:
        return self.inner.get(name)

    def save_tokenizer(self, out_dir: str):
        return self.inner.save_tokenizer(out_dir)


def _hf_with(model, weights: dict[str, torch.Tensor]):
    """A float32 transformers model of ``model``'s config holding ``weights`` for its projections."""
    state = {k: v.float() for k, v in model.state_dict().items() if k.endswith(("norm.weight", "embed_tokens.weight",
                                                                                "lm_head.weight"))}
    state.update({f"{p}.weight": w.float() for p, w in weights.items()})
    ref = transformers.LlamaForCausalLM(model.config).eval()
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and all(m.endswith("rotary_emb.inv_freq") for m in missing)
    return ref


def _quantized_case(kind: str, tmp_path, ct_checkpoints):
    """(folder, transformers model holding the checkpoint's dequantized weights)."""
    if kind == "ct-fp8":
        folder = ct_checkpoints["fp8-dynamic-channel"][0]
        return folder, _hf_with(_llama(), _ct_reference(folder))  # _llama(): the model before compression
    folder = str(tmp_path / "gptq")
    c = GPTQ_CASES["gptq-v1-actorder-asym-g32"]
    model, weights, _ = _write_int4_checkpoint(folder, "gptq", _gptq_config(c), g=32, symmetric=False, act_order=True)
    return folder, _hf_with(model, weights)


def _run(engine_dir: str, hf, prompt: list[int], tol: float, exact_tokens: bool) -> None:
    from kiln.runtime.engine import LLMEngine
    from kiln.runtime.sampling_params import SamplingParams

    engine = LLMEngine(engine_dir, num_kv_blocks=64)
    runner = engine.executor.runner
    runner.keep_logits = True
    engine.add_request("r", prompt, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    engine.step()
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0]
    assert float((runner.last_logits - ref).abs().max() / ref.abs().max()) < tol
    out = []
    while not out:
        out = [o for o in engine.step() if o.finished]
    tokens = out[0].outputs[0].token_ids
    assert len(tokens) == 8
    if exact_tokens:
        with torch.no_grad():
            gen = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert tokens == gen[0, len(prompt):].tolist()


PROMPT = torch.randint(3, LLAMA["vocab_size"], (11,), generator=torch.Generator().manual_seed(3)).tolist()


@pytest.mark.parametrize("kind", ["gptq-actorder", "ct-fp8"])
def test_dequantized_16bit_engine_matches_transformers(kind, tmp_path, ct_checkpoints):
    """Dequantized weights (``get``) build an ordinary float32 engine equal to transformers'."""
    from kiln.runtime.builder import build_engine
    from kiln.runtime.config import BuildConfig

    folder, hf = _quantized_case(kind, tmp_path, ct_checkpoints)
    reader = _Dequantized(open_checkpoint(folder))
    out = build_engine(folder, str(tmp_path / "eng"), BuildConfig(dtype="float32", max_seq_len=256, tokens_per_block=4),
                       reader=reader, device_class="cpu", progress=False)
    with open(os.path.join(out, "engine.json")) as f:
        assert json.load(f).get("quantization") is None
    _run(out, hf, PROMPT, 1e-4, exact_tokens=True)


@pytest.mark.parametrize("kind", ["gptq-actorder", "ct-fp8"])
def test_quantized_checkpoint_builds_and_generates(kind, tmp_path, ct_checkpoints):
    """The plain build of a quantized checkpoint keeps its quantized tensors, loads and generates;
    int4 weight-only matches transformers on the dequantized weights, FP8 (dynamic activations) is close."""
    folder, hf = _quantized_case(kind, tmp_path, ct_checkpoints)
    out = build_small(folder, str(tmp_path / "eng"), tokens_per_block=4)
    with open(os.path.join(out, "engine.json")) as f:
        info = json.load(f)["quantization"]
    fmt = "gptq" if kind == "gptq-actorder" else "compressed-tensors-fp8"
    assert info["source"] == f"checkpoint:{fmt}"
    assert info["linear"]["method"] == ("int4" if kind == "gptq-actorder" else "fp8")
    _run(out, hf, PROMPT, 1e-4 if kind == "gptq-actorder" else 0.1, exact_tokens=kind == "gptq-actorder")
