"""Build-time calibration (``kiln.runtime.calibrate``): the layer-by-layer run equals transformers'
own model (hidden states, projection inputs, rotated keys and values), AWQ scales fold without
changing the full-precision model, the AWQ search never loses to round-to-nearest and wins on
outlier channels, and the built-in model calibrates on the shipped text."""

from __future__ import annotations

import os
import re

import pytest
import torch

from kiln.kernels.quant import dequantize_int4, fake_quant_int4, quantize_int4
from kiln.kernels.rotary import cos_sin_cache
from kiln.parallel.mapping import Mapping
from kiln.parallel.partition import ReadOnce, rank_slice
from kiln.runtime import calibrate as C
from kiln.runtime.checkpoint import HFReader, open_checkpoint
from kiln.runtime.model import DecoderModel

from conftest import make_hf_model

HELDOUT = os.path.join(os.path.dirname(__file__), "data", "heldout.txt")
ARCHS = ["llama", "llama-mha-tied", "qwen2", "qwen3", "mixtral"]


def seqs(n: int = 4, length: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 512, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors run fastest, and steadiest on a shared machine, on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """arch -> (HFReader, transformers model)."""
    out = {}
    for arch in ARCHS:
        d = tmp_path_factory.mktemp(f"cal-{arch}")
        m = make_hf_model(arch)
        m.save_pretrained(d)
        out[arch] = (HFReader(str(d)), m)
    return out


def hf_capture(model, ids: torch.Tensor):
    """transformers' hidden states, past keys/values, and per layer the inputs of q_proj,
    o_proj, gate_proj and down_proj, through forward pre-hooks."""
    inputs: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        mods = {"qkv": layer.self_attn.q_proj, "o": layer.self_attn.o_proj}
        if hasattr(layer.mlp, "gate_proj"):
            mods.update(gate_up=layer.mlp.gate_proj, down=layer.mlp.down_proj)
        for g, mod in mods.items():
            hooks.append(mod.register_forward_pre_hook(
                lambda _m, args, key=(i, g): inputs.__setitem__(key, args[0].detach().reshape(-1, args[0].shape[-1]))))
    try:
        with torch.no_grad():
            out = model(ids, output_hidden_states=True, use_cache=True)
    finally:
        for h in hooks:
            h.remove()
    return out, inputs


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mixtral"])
def test_layers_match_transformers(arch, tiny):
    reader, hf = tiny[arch]
    cfg = reader.config
    ids = seqs()
    out, inputs = hf_capture(hf, ids)

    hidden = C.embed(reader.get, ids.tolist(), "cpu", torch.float32)
    rope = cos_sin_cache(cfg.head_dim, ids.shape[1], cfg.rope_theta, cfg.rope_scaling)
    with torch.no_grad():
        for i in range(cfg.num_hidden_layers):
            C.run_layer(C.load_layer(reader.get, cfg, i, "cpu", torch.float32), cfg, hidden, rope)
            got = torch.stack(hidden)
            if i == cfg.num_hidden_layers - 1:  # transformers' last entry is after the final norm
                got = hf.model.norm(got)
            torch.testing.assert_close(got, out.hidden_states[i + 1], atol=2e-5, rtol=1e-5)

    cal = C.calibrate(reader, device="cpu", dtype=torch.float32, sequences=ids.tolist(), awq=False, kv=True,
                      activations=True, progress=False)
    groups = ["qkv", "o"] + ([] if cfg.is_moe else ["gate_up", "down"])
    assert len(cal.input_amax) == len(groups) * cfg.num_hidden_layers
    for i in range(cfg.num_hidden_layers):
        for g in groups:
            want = float(inputs[(i, g)].abs().max())
            assert cal.input_amax[f"model.layers.{i}.{C.PROJECTIONS[g]}"] == pytest.approx(want, rel=1e-5)
        cache = out.past_key_values.layers[i]
        k_amax, v_amax = cal.kv_amax[i]
        assert k_amax == pytest.approx(float(cache.keys.abs().max()), rel=1e-5)
        assert v_amax == pytest.approx(float(cache.values.abs().max()), rel=1e-5)
    assert cal.num_tokens == ids.numel() and cal.num_sequences == ids.shape[0]


def engine_logits(get, cfg, ids: list[int]) -> torch.Tensor:
    """Logits of kiln's whole decoder, its tensors cut from ``get`` as the builder cuts them."""
    model = DecoderModel(cfg)
    fetch = ReadOnce(get)
    model.load_weights({n: rank_slice(n, fetch, cfg, Mapping()).float() for n in model.engine_state_names()})
    t = len(ids)
    meta = C.prefill_metadata(t, "cpu", cfg.sliding_window)
    shape = (meta.block_tables.shape[1], C.BLOCK_SIZE, cfg.num_key_value_heads, cfg.head_dim)
    caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(cfg.num_hidden_layers)]
    with torch.no_grad():
        h, _ = model(torch.tensor(ids), torch.arange(t), caches, meta)
        return model.compute_logits(h)


def random_scales(cfg, seed: int = 0) -> C.Calibration:
    """Log-normal scales for every group (the o scales tied across each kv group)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda k: torch.exp(torch.randn(k, generator=g))  # noqa: E731
    cal = C.Calibration()
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        cal.awq_scales[f"{p}.qkv"] = rnd(cfg.hidden_size)
        cal.awq_scales[f"{p}.o"] = C.tied_o_mean(rnd(cfg.num_attention_heads * cfg.head_dim), cfg)
        if not cfg.is_moe:
            cal.awq_scales[f"{p}.gate_up"] = rnd(cfg.hidden_size)
            cal.awq_scales[f"{p}.down"] = rnd(cfg.intermediate_size)
    return cal


@pytest.mark.parametrize("arch", ["llama", "llama-mha-tied", "qwen2", "qwen3", "mixtral"])
def test_awq_folding_is_neutral(arch, tiny):
    reader, hf = tiny[arch]
    cfg = reader.config
    ids = seqs(1, 24, seed=5)[0].tolist()
    ref = engine_logits(reader.get, cfg, ids)
    with torch.no_grad():
        torch.testing.assert_close(ref, hf(torch.tensor([ids])).logits[0], atol=1e-4, rtol=1e-4)
    cal = C.calibrate(reader, device="cpu", dtype=torch.float32, sequences=seqs().tolist(), awq=True, group_size=32,
                      kv=False, activations=False, progress=False)
    assert set(cal.awq_scales) == set(random_scales(cfg).awq_scales)
    for calib in (cal, random_scales(cfg)):
        folded = engine_logits(C.apply_awq_scales(reader.get, cfg, calib), cfg, ids)
        torch.testing.assert_close(folded, ref, atol=1e-4, rtol=0)
    # The folded tensors really change.
    name = "model.layers.0.self_attn.v_proj.weight"
    assert not torch.allclose(C.apply_awq_scales(reader.get, cfg, random_scales(cfg))(name), reader.get(name))


def awq_error(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, g: int) -> float:
    """The output error of int4 weights w * s on inputs x / s, with the kernel's own quantizer."""
    return float(((x / s) @ fake_quant_int4(w * s, g, torch.float32).t() - x @ w.t()).double().square().sum())


@pytest.fixture(scope="module")
def outlier(tmp_path_factory):
    """A llama whose layer 1 sees a few input channels 20x larger (scaled input_layernorm)."""
    m = make_hf_model("llama", seed=3)
    with torch.no_grad():
        m.model.layers[1].input_layernorm.weight[[3, 17, 40, 41]] *= 20.0
    d = tmp_path_factory.mktemp("cal-outlier")
    m.save_pretrained(d)
    return HFReader(str(d)), m


@pytest.fixture(scope="module")
def outlier_cal(outlier):
    """The outlier model's AWQ calibration (group 32) and the HF inputs of each projection group."""
    reader, hf = outlier
    ids = seqs(4, 32, seed=2)
    cal = C.calibrate(reader, device="cpu", dtype=torch.float32, sequences=ids.tolist(), awq=True, group_size=32,
                      kv=False, activations=False, progress=False, awq_tokens=ids.numel())
    _, inputs = hf_capture(hf, ids)
    return reader, hf, cal, inputs


def test_awq_never_worse_than_rtn_and_wins_on_outliers(outlier_cal):
    reader, hf, cal, inputs = outlier_cal
    for key, (rtn, best) in cal.awq_loss.items():
        assert best <= rtn, key
    for i, layer in enumerate(hf.model.layers):
        a, mlp = layer.self_attn, layer.mlp
        groups = {
            "qkv": torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
            "o": a.o_proj.weight, "gate_up": torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
            "down": mlp.down_proj.weight,
        }
        for g, w in groups.items():
            x, s = inputs[(i, g)], cal.awq_scales[f"model.layers.{i}.{g}"]
            rtn, got = awq_error(x, w.detach(), torch.ones_like(s), 32), awq_error(x, w.detach(), s, 32)
            assert got <= rtn * (1 + 1e-6), (i, g)
            assert cal.awq_loss[f"model.layers.{i}.{g}"] == pytest.approx((rtn, got), rel=1e-3)
    rtn, best = cal.awq_loss["model.layers.1.qkv"]
    assert best < 0.8 * rtn
    s = cal.awq_scales["model.layers.1.qkv"]
    assert s[[3, 17, 40, 41]].min() > s.median()


def test_clip_applies_through_the_quantizer(outlier_cal):
    reader, hf, cal, inputs = outlier_cal
    cfg = reader.config
    get = C.apply_awq_scales(reader.get, cfg, cal)
    names = {"self_attn.v_proj": "qkv", "self_attn.o_proj": "o", "mlp.gate_proj": "gate_up", "mlp.up_proj": "gate_up",
             "mlp.down_proj": "down"}
    for i in range(cfg.num_hidden_layers):
        for proj, g in names.items():
            name = f"model.layers.{i}.{proj}.weight"
            w, clip = get(name), cal.awq_clip[name]
            assert clip.shape == (w.shape[0], w.shape[1] // 32)
            sc, z = C.clip_int4_params(w, clip, 32, torch.float32)
            wq = dequantize_int4(*quantize_int4(w, 32, torch.float32, scales=sc, zeros=z), 32)
            assert torch.equal(wq, C.fake_quant(w, 32, torch.float32, sc, z))
            # The grid spans the clipped range, shifted by at most one step by the rounded zero point.
            assert bool((wq.abs().view(w.shape[0], -1, 32).amax(-1) <= clip + sc.float() * (1 + 1e-5)).all())
            x = inputs[(i, g)] / cal.awq_scales[f"model.layers.{i}.{g}"]
            err = lambda q: float((x @ (q - w).t()).double().square().sum())  # noqa: E731
            assert err(wq) <= 1.02 * err(fake_quant_int4(w, 32, torch.float32)), name
        fused = C.fused_clip(cal, f"model.layers.{i}.self_attn.qkv_proj.weight", cfg)
        q_rows = cfg.num_attention_heads * cfg.head_dim
        assert fused.shape == (q_rows + 2 * cfg.num_key_value_heads * cfg.head_dim, cfg.hidden_size // 32)
        assert torch.isinf(fused[: fused.shape[0] - cfg.num_key_value_heads * cfg.head_dim]).all()
        w = rank_slice(f"model.layers.{i}.self_attn.qkv_proj.weight", ReadOnce(get), cfg, Mapping())
        sc, z = C.clip_int4_params(w, fused, 32, torch.float32)
        plain = C.clip_int4_params(w[:q_rows], None, 32, torch.float32)
        assert torch.equal(sc[:q_rows], plain[0]) and torch.equal(z[:q_rows], plain[1])


def test_fake_quant_equals_the_kernel_quantizer():
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 4, 256)
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        assert torch.equal(C.fake_quant(w, 64, dt), fake_quant_int4(w, 64, dt))
        c = w.view(96, 4, 64).abs().amax(-1) * 0.6
        sc, z = C.clip_int4_params(w, c, 64, dt)
        assert torch.equal(C.fake_quant(w, 64, dt, sc, z), dequantize_int4(*quantize_int4(w, 64, dt, sc, z), 64))


def sentences(text: str) -> set[str]:
    parts = re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
    return {p.strip().lower() for p in parts if len(p.split()) >= 5}


def test_texts_ship_and_differ():
    name, text = C.calibration_text()
    assert name == "kiln:calibration.txt"
    _, held = C.calibration_text(HELDOUT)
    assert 3800 <= len(text.split()) <= 5000
    assert 3000 <= len(held.split()) <= 4500
    assert not sentences(text) & sentences(held)
    assert C.calibration_text("some words.") == ("<text>", "some words.")


@pytest.fixture(scope="module")
def smollm_tokenizer():
    from transformers import AutoTokenizer

    from kiln.runtime.checkpoint import builtin_gguf_path

    path = builtin_gguf_path()
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def test_builtin_model_calibrates(smollm_tokenizer):
    tok = smollm_tokenizer
    assert len(tok.encode(C.calibration_text(HELDOUT)[1], add_special_tokens=False)) > 3000
    seq = C.calibration_token_ids(tok, num_sequences=4, seq_len=256)
    assert [len(s) for s in seq] == [256] * 4
    text_ids = tok.encode(C.calibration_text()[1], add_special_tokens=False)
    assert sum(seq, []) == text_ids[: 4 * 256]
    assert len(C.calibration_token_ids(tok, num_sequences=100, seq_len=512)) == len(text_ids) // 512

    reader = open_checkpoint("smollm2-135m-instruct")
    cfg = reader.config
    cal = C.calibrate(reader, device="cpu", dtype=torch.float32, sequences=seq, awq=False, kv=True, activations=True,
                      progress=False, text_name="kiln:calibration.txt")
    assert cal.num_tokens == 1024 and cal.text == "kiln:calibration.txt"
    assert len(cal.input_amax) == 4 * cfg.num_hidden_layers and len(cal.kv_amax) == cfg.num_hidden_layers
    assert all(0 < v < 1e5 for v in cal.input_amax.values())
    assert all(0 < k < 1e4 and 0 < v < 1e4 for k, v in cal.kv_amax.values())

    class FirstLayers:
        """The built-in model's first four layers: AWQ and clip searches on real weights."""
        config = cfg.model_copy(update={"num_hidden_layers": 4})
        get = staticmethod(reader.get)

    awq = C.calibrate(FirstLayers(), device="cpu", dtype=torch.float32, sequences=seq, awq=True, group_size=64,
                      kv=False, activations=False, progress=False)
    assert len(awq.awq_scales) == 4 * 4 and len(awq.awq_clip) == 4 * 5
    assert all(best <= rtn for rtn, best in awq.awq_loss.values())
    assert sum(b for _, b in awq.awq_loss.values()) < sum(r for r, _ in awq.awq_loss.values())


# ----------------------------------------------------------------------------------------------
# GPTQ rounding of FP8 weights
# ----------------------------------------------------------------------------------------------


def gptq_plain(w: torch.Tensor, h: torch.Tensor, round_col, damp: float = 0.01, order=None) -> torch.Tensor:
    """GPTQ as first written (optimal brain quantization in column order): round one column, move
    its error onto the remaining columns through the inverse Hessian's row, then remove that
    column from the inverse by one step of Gaussian elimination. float64, no Cholesky, no blocks.
    ``round_col(col, j)`` gives column j's codes and their values; returns the codes (float64)."""
    w = w.double().clone()
    k = w.shape[1]
    h = h.double() + damp * torch.diag(h.double()).mean() * torch.eye(k, dtype=torch.float64)
    order = list(range(k)) if order is None else order
    hinv = torch.linalg.inv(h[order][:, order])
    w = w[:, order]
    out = torch.empty_like(w)
    for i in range(k):
        out[:, i], value = round_col(w[:, i], order[i])
        e = (w[:, i] - value) / hinv[i, i]
        w[:, i:] -= e[:, None] * hinv[i, i:][None, :]
        hinv = hinv - hinv[:, i : i + 1] @ hinv[i : i + 1, :] / hinv[i, i]
    back = torch.empty_like(out)
    back[:, order] = out
    return back


def gptq_fp8_plain(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, order=None) -> torch.Tensor:
    """``gptq_plain`` onto E4M3 with the row scales ``scale``."""
    s = scale.double()

    def round_col(col, j):
        code = (col / s).clamp(-448, 448).to(torch.float8_e4m3fn).double()
        return code, code * s

    return gptq_plain(w, h, round_col, order=order)


def correlated_inputs(k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, 24, generator=g) @ torch.randn(24, k, generator=g) + 0.2 * torch.randn(2048, k, generator=g)
    return x * (torch.rand(k, generator=g) ** 3 * 8 + 0.1)  # channels of very different energy


@pytest.mark.parametrize("act_order", [False, True], ids=["columns", "act-order"])
def test_gptq_fp8_equals_the_plain_algorithm_and_beats_rounding(act_order):
    from kiln.kernels.quant import quantize_fp8_rows

    k = 200  # not a multiple of the 128-column block
    w = torch.randn(48, k, generator=torch.Generator().manual_seed(5))
    x = correlated_inputs(k, 6)
    h = x.t() @ x / x.shape[0]
    q, scale = C.gptq_fp8(w, h, act_order=act_order)
    rtn, rtn_scale = quantize_fp8_rows(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape and torch.equal(scale, rtn_scale)
    order = torch.argsort(torch.diag(h), descending=True, stable=True).tolist() if act_order else None
    codes = gptq_fp8_plain(w, h, scale, order=order)
    # the same algorithm in another arithmetic: an error carried in float32 can flip a rounding
    # near a tie, which moves that code by one step and the later columns by a little
    same = (q.double() == codes).double().mean()
    assert same > 0.995, float(same)
    step = torch.maximum(codes.abs(), torch.full_like(codes, 2.0 ** -6)) * 2.0 ** -2
    assert ((q.double() - codes).abs() <= step).double().mean() > 0.995
    s = scale.double()[:, None]

    def err(codes_):
        return C.output_error(w.double(), codes_ * s, h.double())

    assert err(q.double()) < 0.2 * err(rtn.double())
    assert abs(err(q.double()) - err(codes)) < 0.01 * err(codes)


def test_gptq_fp8_diagonal_inputs_round_to_nearest_and_dead_inputs_pass_nothing():
    from kiln.kernels.quant import quantize_fp8_rows

    w = torch.randn(32, 96, generator=torch.Generator().manual_seed(7))
    rtn, _ = quantize_fp8_rows(w)
    diag = torch.diag(torch.rand(96, generator=torch.Generator().manual_seed(8)) + 0.5)
    for act_order in (False, True):
        q, _ = C.gptq_fp8(w, diag, act_order=act_order)
        assert torch.equal(q.view(torch.uint8), rtn.view(torch.uint8))
    x = correlated_inputs(96, 9)
    x[:, 10:20] = 0  # channels that never carry input
    q, _ = C.gptq_fp8(w, x.t() @ x / x.shape[0], act_order=False)
    assert torch.isfinite(q.float()).all()
    with pytest.raises(ValueError, match="second moment of shape"):
        C.gptq_fp8(w, torch.eye(95))


def test_calibrate_gptq_rounds_every_projection(tiny):
    """calibrate(gptq="fp8") on a tiny llama: every projection of every layer gets E4M3 weights
    with round-to-nearest's scales, GPTQ's output error on transformers' own inputs to each
    projection is below round-to-nearest's, and the recorded losses are those errors."""
    from kiln.kernels.quant import quantize_fp8_rows

    reader, hf = tiny["llama"]
    ids = seqs(4, 32, seed=4)
    cal = C.calibrate(reader, device="cpu", dtype=torch.float32, sequences=ids.tolist(), awq=False, kv=False,
                      activations=False, gptq="fp8", progress=False)
    _, inputs = hf_capture(hf, ids)
    parts = {"qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "o": ["self_attn.o_proj"],
             "gate_up": ["mlp.gate_proj", "mlp.up_proj"], "down": ["mlp.down_proj"]}
    for i in range(reader.config.num_hidden_layers):
        for g, names in parts.items():
            x = inputs[(i, g)].double()
            h = x.t() @ x / x.shape[0]
            total_rtn = total_gptq = 0.0
            for n in names:
                w = reader.get(f"model.layers.{i}.{n}.weight").float()
                q, scale = cal.fp8_weights[f"model.layers.{i}.{n}"]
                rq, rs = quantize_fp8_rows(w)
                assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape and torch.equal(scale, rs)
                total_gptq += C.output_error(w.double(), q.double() * scale.double()[:, None], h)
                total_rtn += C.output_error(w.double(), rq.double() * rs.double()[:, None], h)
            assert total_gptq < total_rtn, (i, g)
            assert cal.gptq_loss[f"model.layers.{i}.{g}"] == pytest.approx((total_rtn, total_gptq), rel=1e-3)


def gptq_int4_plain(w: torch.Tensor, h: torch.Tensor, scales, zeros, g: int, order=None) -> torch.Tensor:
    """``gptq_plain`` onto fixed int4 groups."""
    sc, z = scales.double(), zeros.double()

    def round_col(col, j):
        code = torch.round(col / sc[:, j // g] + z[:, j // g]).clamp(0, 15)
        return code, (code - z[:, j // g]) * sc[:, j // g]

    return gptq_plain(w, h, round_col, order=order)


def test_gptq_int4_equals_the_plain_algorithm_and_keeps_the_groups():
    from kiln.kernels.quant import int4_group_params, pack_int4, quantize_int4, unpack_int4

    g, k = 32, 160
    w = torch.randn(40, k, generator=torch.Generator().manual_seed(11))
    x = correlated_inputs(k, 12)
    h = x.t() @ x / x.shape[0]
    scales, zeros = int4_group_params(w, g, torch.float32)
    rtn = unpack_int4(quantize_int4(w, g, torch.float32, scales, zeros)[0])
    for act_order in (False, True):
        codes = C.gptq_int4(w, h, scales, zeros, g, act_order=act_order)
        assert codes.dtype == torch.uint8 and codes.shape == w.shape and int(codes.max()) <= 15
        order = torch.argsort(torch.diag(h), descending=True, stable=True).tolist() if act_order else None
        want = gptq_int4_plain(w, h, scales, zeros, g, order=order)
        assert (codes.double() == want).double().mean() > 0.995
        deq = dequantize_int4(pack_int4(codes), scales, zeros, g)
        assert C.output_error(w, deq, h) < 0.5 * C.output_error(w, dequantize_int4(pack_int4(rtn), scales, zeros, g), h)
    diag = torch.diag(torch.rand(k, generator=torch.Generator().manual_seed(13)) + 0.5)
    assert torch.equal(C.gptq_int4(w, diag, scales, zeros, g), rtn)
    with pytest.raises(ValueError, match="group parameters"):
        C.gptq_int4(w, h, scales[:, :2], zeros[:, :2], g)


def test_calibrate_awq_then_gptq_int4(tiny):
    """calibrate(awq=True, gptq="int4"): the AWQ scales as without GPTQ, no clip search, and
    every projection's int4 codes on the folded weight's round-to-nearest groups with a lower
    output error than plain rounding on the folded inputs x / s."""
    from kiln.kernels.quant import int4_group_params, unpack_int4

    reader, hf = tiny["llama"]
    ids = seqs(4, 32, seed=4)
    kw = dict(device="cpu", dtype=torch.float32, sequences=ids.tolist(), awq=True, group_size=32, kv=False,
              activations=False, progress=False, awq_tokens=ids.numel())
    awq = C.calibrate(reader, **kw)
    both = C.calibrate(reader, gptq="int4", **kw)
    assert not both.awq_clip and both.awq_scales.keys() == awq.awq_scales.keys()
    for key in awq.awq_scales:
        assert torch.equal(both.awq_scales[key], awq.awq_scales[key])
    folded = C.apply_awq_scales(reader.get, reader.config, both)
    for name, (qw, scales, zeros) in both.int4_weights.items():
        w = folded(name + ".weight").float()
        want_s, want_z = int4_group_params(w, 32, torch.float32)
        assert torch.equal(scales, want_s) and torch.equal(zeros, want_z)
        assert qw.shape == (w.shape[0], w.shape[1] // 2)
        assert unpack_int4(qw).shape == w.shape
    assert len(both.int4_weights) == 7 * reader.config.num_hidden_layers
    for key, (rtn, got) in both.gptq_loss.items():
        assert got < rtn, key
    with pytest.raises(ValueError, match="gptq must be"):
        C.calibrate(reader, **{**kw, "awq": False}, gptq="int4")
