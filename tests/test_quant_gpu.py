"""The quantized-linear GPU paths (kiln.kernels.quant_triton) against the kiln.kernels.quant
references on a CUDA device: every path (Triton GEMV, Triton GEMM, torch._scaled_mm, the
unfused and fused gate/up products) for every M from 1 to 8 plus 64 and 300, N and K tails,
bias on and off, GPTQ's input permutation, CUDA-graph capture, ``tune`` and ``warmup``.

Tolerances: every path rounds where the reference does (x to E4M3 with the same scale,
exact weight values, float32 sums, one cast), so the float32 sums differ only in their order:
at most ~2^-20 of the sum of the terms' magnitudes, which can flip the final bfloat16 / float16
rounding by one unit in the last place. ``_check`` allows exactly that. The paths that feed E4M3
products to the tensor cores (``dot``, ``scaled_mm``) are the exception: Hopper's FP8 MMA adds
its products in a narrower accumulator before they reach float32 (the kernels promote every
32 products; cuBLAS splits K the same way), which on these shapes moved sums by up to about
2^-18 of their magnitude; those paths are held to 2^-16.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton"),
]

from kiln.kernels import quant  # noqa: E402
from kiln.kernels import quant_triton as qt  # noqa: E402
from kiln.kernels import quant_tune  # noqa: E402
from kiln.kernels.quant_dot import dot_configs, fp8_dot  # noqa: E402
from kiln.kernels.quant_gemm import quantize_fp8  # noqa: E402
from kiln.kernels.quant_gemv import q8_configs, q8_gemv  # noqa: E402
from kiln.kernels.quant_gemv4 import q4_configs, q4_gemv  # noqa: E402

DEV = "cuda"
BF, FP16, F32 = torch.bfloat16, torch.float16, torch.float32
MS = [1, 2, 3, 4, 5, 6, 7, 8, 64, 300]
ULP = {BF: 2.0 ** -7, FP16: 2.0 ** -10, F32: 0.0}  # one unit in the last place, relative (upper bound)
SUM_REL = 2.0 ** -20  # float32 sums in another order, relative to the sum of the terms' magnitudes
FP8_MMA_REL = 2.0 ** -16  # E4M3 products summed by the tensor cores (module docstring)
MMA_KINDS = ("dot", "scaled_mm")


@pytest.fixture(autouse=True)
def _no_tf32():
    """The float32 references must be true float32 products."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.fixture(autouse=True, scope="module")
def _clean_table():
    saved = qt.tuned_table()
    qt.clear_table()
    quant_tune.probe_scaled_mm(BF, DEV)
    quant_tune.probe_scaled_mm(FP16, DEV)
    yield
    qt.clear_table()
    qt.load_table(saved)


def _randn(*shape, dtype=BF, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(device=DEV, dtype=dtype)


def _weights(fmt, n, k, dtype, g=128, seed=0):
    w = torch.randn((n, k), generator=torch.Generator().manual_seed(seed)).to(DEV)
    if fmt == "fp8":
        q, s = quant.quantize_fp8_rows(w)
        return dict(weight=q, weight_scale=s)
    if fmt == "int8":
        q, s = quant.quantize_int8_rows(w)
        return dict(weight=q, weight_scale=s)
    q, s, z = quant.quantize_int4(w, g, dtype)
    return dict(qweight=q, scales=s, qzeros=z, group_size=g)


def _magnitude(op, x, t, input_scale=None):
    """sum_k |x_k * w_k| per output, in float32: the scale of the summation-order error."""
    fmt = qt.fmt_of(op)
    if fmt == "fp8":
        xq, sx = quant.quantize_fp8_act(x, input_scale)
        return (xq.float().abs() * sx[:, None]) @ (t["weight"].float().abs() * t["weight_scale"][:, None]).t()
    if fmt == "int8":
        return x.float().abs() @ (t["weight"].float().abs() * t["weight_scale"][:, None]).t()
    w = quant.dequantize_int4(t["qweight"], t["scales"], t["qzeros"], t["group_size"]).abs()
    return x.float().abs() @ w.t()


def _check(y, ref, mag, dtype, rel=SUM_REL):
    """|y - ref| within one ulp of the output dtype at ref plus ``rel`` of the magnitude sum."""
    assert y.dtype == dtype and y.shape == ref.shape, (y.dtype, y.shape, ref.shape)
    err = (y.float() - ref.float()).abs()
    allowed = ULP[dtype] * ref.float().abs() + rel * mag + 1e-30
    bad = err > allowed
    assert not bad.any(), f"{bad.sum().item()} of {bad.numel()} off; worst {(err - allowed).max().item():.3e}"


def _check_glu(y, ref, dtype):
    """The gate/up epilogue rounds where silu_and_mul_ref does (gate, up, silu(gate), product);
    a one-ulp flip of gate or up, and Triton's exp against torch's, move the result by at most
    about two ulps, plus cancellation in the gate/up sums near zero."""
    assert y.dtype == dtype and y.shape == ref.shape
    torch.testing.assert_close(y.float(), ref.float(), rtol=4 * ULP[dtype] if dtype != F32 else 1e-5,
                               atol=1e-4 * ref.float().abs().max().item())


# ----------------------------------------------------------------------------------------------
# Activation quantization: bit for bit
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [BF, FP16, F32])
@pytest.mark.parametrize("shape", [(1, 4096), (300, 14336), (7, 208), (3, 16400)])
@pytest.mark.parametrize("static", [False, True])
def test_quantize_fp8_exact(shape, static, dtype):
    x = _randn(*shape, dtype=dtype, seed=1, scale=3.0)
    x[0, :5] = torch.tensor([1e4, -1e-6, 0.0, 2.0 ** -12, -448.0], device=DEV).to(dtype)
    if shape[0] > 1:
        x[1] = 0
    xs = torch.tensor([quant.fp8_input_scale(2.0)], device=DEV) if static else None
    xq, s = quantize_fp8(x, xs)
    xq_ref, s_ref = quant.quantize_fp8_act(x, xs)
    assert torch.equal(s, s_ref)
    assert torch.equal(xq.float(), xq_ref.float())


# ----------------------------------------------------------------------------------------------
# Every path, every M
# ----------------------------------------------------------------------------------------------

# N=1008 and K=1040 (multiples of 16 that no BLOCK_N / BLOCK_K above 16 divides); int4 K=1152
# (9 groups of 128: a K tail for BLOCK_K 256 and above).
PATHS = [
    ("fp8", "gemv"), ("fp8", "gemv-pre"), ("fp8", "dot"), ("fp8", "gemm"), ("fp8", "scaled_mm"), ("fp8", "torch"),
    ("fp8-static", "gemv"), ("fp8-static", "gemv-pre"), ("fp8-static", "gemm"), ("fp8-static", "scaled_mm"),
    ("int8", "gemv"), ("int8", "gemm"), ("int4", "gemv"), ("int4", "gemv-acc"), ("int4", "gemm"),
]


def _config(op, kind, m, g=128):
    fmt = qt.fmt_of(op)
    if kind in ("gemv", "gemv-pre"):
        return qt.default_gemv(fmt, min(m, 4), g)
    if kind == "gemv-acc":
        return q4_configs(min(m, 4), g, acc=True)[0]
    if kind == "dot":
        return dot_configs(min(m, 32))[0]
    if kind == "gemm":
        return qt.default_gemm(fmt, m, g)
    return None


def _case(op, m, dtype, with_bias, seed=0):
    fmt = qt.fmt_of(op)
    n, k = 1008, 1152 if fmt == "int4" else 1040
    t = _weights(fmt, n, k, dtype, seed=seed)
    x = _randn(m, k, dtype=dtype, seed=seed + m, scale=2.0)
    xs = torch.tensor([quant.fp8_input_scale(x.abs().max().item() * 0.8)], device=DEV) if op == "fp8-static" else None
    b = _randn(n, dtype=dtype, seed=seed + 7) if with_bias else None
    return t, x, xs, b


@pytest.mark.parametrize("dtype", [BF, FP16])
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("op,kind", PATHS)
def test_path_vs_reference(op, kind, m, dtype):
    if kind == "scaled_mm" and not qt._SCALED_MM_OK.get((dtype, m % 2 == 1), False):
        pytest.skip(f"torch._scaled_mm does not serve {dtype} (bias={m % 2 == 1}) here")
    t, x, xs, b = _case(op, m, dtype, with_bias=m % 2 == 1, seed=10)
    y = quant_tune.run(op, kind, _config(op, kind, m), x, t, xs, b)
    ref = quant_tune.reference(op, x, t, xs, b)
    mag = _magnitude(op, x, t, xs)
    if b is not None:
        mag = mag + b.float().abs()
    _check(y, ref, mag, dtype, FP8_MMA_REL if kind in MMA_KINDS else SUM_REL)


@pytest.mark.parametrize("m", [1, 3, 64])
@pytest.mark.parametrize("op", ["fp8", "int8", "int4"])
def test_float32_activations(op, m):
    """float32 x: the GEMV for few rows, the FP8 GEMM or the reference for many."""
    t, x, xs, b = _case(op, m, F32, with_bias=True, seed=20)
    y = quant_tune.dispatch(op, x, t, xs, b)
    _check(y, quant_tune.reference(op, x, t, xs, b), _magnitude(op, x, t, xs) + b.abs(), F32)


@pytest.mark.parametrize("op", ["fp8", "fp8-static", "int8", "int4"])
@pytest.mark.parametrize("m", [1, 2, 4])
def test_every_gemv_config(op, m):
    t, x, xs, b = _case(op, m, BF, with_bias=False, seed=30)
    ref = quant_tune.reference(op, x, t, xs)
    mag = _magnitude(op, x, t, xs)
    fmt = qt.fmt_of(op)
    if fmt == "int4":
        for acc in (False, True):
            for cfg in q4_configs(m, 128, acc=acc):
                _check(q4_gemv(x, t["qweight"], t["scales"], t["qzeros"], 128, cfg, acc=acc), ref, mag, BF)
        return
    xq, sx = quantize_fp8(x, xs) if fmt == "fp8" else (None, None)
    for cfg in q8_configs(m):
        y = q8_gemv(x, t["weight"], t["weight_scale"], cfg, fp8=fmt == "fp8", input_scale=xs)
        _check(y, ref, mag, BF)
        if op == "fp8" and m <= qt.WO_MAX_M:  # weight-only: int8_linear_ref's math on the FP8 weight
            wo = q8_gemv(x, t["weight"], t["weight_scale"], cfg, fp8=True, weight_only=True)
            wref = quant_tune.reference_for("gemv-wo", op, x, t)
            _check(wo, wref, (x.float().abs() @ t["weight"].float().abs().t()) * t["weight_scale"], BF)
        if fmt == "fp8":  # the pre-quantized variant: the same values, bit for bit
            y2 = q8_gemv(xq, t["weight"], t["weight_scale"], cfg, fp8=True, x_scale=sx, out_dtype=BF)
            assert torch.equal(y2, y)


@pytest.mark.parametrize("m", [1, 2, 5, 16, 32])
@pytest.mark.parametrize("op", ["fp8", "fp8-static", "fp8-glu"])
def test_every_dot_config(op, m):
    """The tensor-core FP8 kernel of few rows (hardware E4M3 rounding, FP8 MMA) at every config
    the tuner may pick, bias on odd M, N and K with tails."""
    glu = op.endswith("-glu")
    t, x, xs, b = _case(op.removesuffix("-glu"), m, BF, with_bias=m % 2 == 1 and not glu, seed=35)
    if glu:
        t = _weights("fp8", 2000, 1040, BF, seed=36)
    ref = quant_tune.reference(op, x, t, xs, b)
    mag = None if glu else _magnitude(op, x, t, xs) + (b.float().abs() if b is not None else 0)
    for cfg in dot_configs(m, glu):
        y = fp8_dot(x, t["weight"], t["weight_scale"], cfg, input_scale=xs, bias=b, glu=glu)
        if glu:
            _check_glu(y, ref, BF)
        else:
            _check(y, ref, mag, BF, FP8_MMA_REL)


@pytest.mark.parametrize("dtype", [BF, FP16])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 8, 64])
@pytest.mark.parametrize("op", ["fp8-glu", "fp8-static-glu", "int8-glu", "int4-glu"])
def test_glu_vs_reference(op, m, dtype):
    """The fused gate/up product ([2I, K] weight, I = 1000) by the dispatch (the fused GEMV up
    to four rows, then the unfused product) and by the fused GEMV at every M."""
    fmt = qt.fmt_of(op)
    k = 1152 if fmt == "int4" else 1040
    t = _weights(fmt, 2000, k, dtype, seed=40)
    x = _randn(m, k, dtype=dtype, seed=41 + m)
    xs = torch.tensor([quant.fp8_input_scale(x.abs().max().item())], device=DEV) if "static" in op else None
    ref = quant_tune.reference(op, x, t, xs)
    _check_glu(quant_tune.dispatch(op, x, t, xs), ref, dtype)
    _check_glu(quant_tune.run(op, "gemv", _config(op, "gemv", m), x, t, xs), ref, dtype)
    variant = {"fp8": "gemv-pre", "int4": "gemv-acc"}.get(fmt)
    if variant:
        _check_glu(quant_tune.run(op, variant, _config(op, variant, m), x, t, xs), ref, dtype)


@pytest.mark.parametrize("m", [1, 4, 64])
def test_int4_input_perm(m):
    t = _weights("int4", 1024, 2048, BF, seed=50)
    perm = torch.randperm(2048, generator=torch.Generator().manual_seed(51)).to(device=DEV, dtype=torch.int32)
    x = _randn(m, 2048, seed=52)
    y = qt.int4_linear(x, t["qweight"], t["scales"], t["qzeros"], 128, perm)
    ref = quant.int4_linear_ref(x, t["qweight"], t["scales"], t["qzeros"], 128, perm)
    _check(y, ref, _magnitude("int4", x.index_select(1, perm.long()), t), BF)


LLAMA = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]


@pytest.mark.parametrize("m", [1, 2, 64])
@pytest.mark.parametrize("n,k", LLAMA)
@pytest.mark.parametrize("op", ["fp8", "int8", "int4"])
def test_llama_shapes_default_dispatch(op, n, k, m):
    t = _weights(qt.fmt_of(op), n, k, BF, seed=60)
    x = _randn(m, k, seed=61)
    mma = op == "fp8" and m > 4  # the default dispatch's torch._scaled_mm
    _check(quant_tune.dispatch(op, x, t), quant_tune.reference(op, x, t), _magnitude(op, x, t), BF,
           FP8_MMA_REL if mma else SUM_REL)


def test_scaled_mm_serves_bfloat16_on_hopper():
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("rowwise _scaled_mm is a Hopper-and-later path")
    assert quant_tune.probe_scaled_mm(BF, DEV)[False]


# ----------------------------------------------------------------------------------------------
# CUDA graphs, tune, warmup
# ----------------------------------------------------------------------------------------------


def _capture_and_replay(fns, inputs, fresh):
    """Captures ``fns`` (each reading the static ``inputs``), replays after copying ``fresh``
    in, and returns the outputs and what eager calls give on the fresh inputs."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [f() for f in fns]
    for dst, src in zip(inputs, fresh):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    return outs, [f() for f in fns]


@pytest.mark.parametrize("m", [1, 3, 8, 64])
def test_cuda_graph_capture(m):
    """Every op through the dispatch inside one captured graph, replayed on new inputs: the
    replay equals eager calls (same kernels, so bit for bit)."""
    specs = [("fp8", 1008, 1040), ("fp8-static", 1008, 1040), ("int8", 1008, 1040), ("int4", 1008, 1152, 128),
             ("fp8-glu", 2000, 1040), ("int8-glu", 2000, 1040), ("int4-glu", 2000, 1152, 128)]
    fns, inputs, fresh = [], [], []
    for i, spec in enumerate(specs):
        op, n, k, *g = spec
        t = _weights(qt.fmt_of(op), n, k, BF, seed=70 + i)
        x = _randn(m, k, seed=80 + i)
        xs = torch.tensor([0.01], device=DEV) if "static" in op else None
        b = None if op.endswith("-glu") else _randn(n, seed=90 + i)
        fns.append(lambda op=op, x=x, t=t, xs=xs, b=b: quant_tune.dispatch(op, x, t, xs, b))
        inputs.append(x)
        fresh.append(_randn(m, k, seed=100 + i))
    outs, eager = _capture_and_replay(fns, inputs, fresh)
    for y, e in zip(outs, eager):
        assert torch.equal(y, e)


def test_tune_then_dispatch_and_capture():
    specs = [("fp8", 1024, 2048), ("int8", 1024, 2048), ("int4", 1024, 2048, 128), ("int4-glu", 2048, 2048, 128)]
    rows = qt.tune(specs, BF, DEV, m_values=(1, 4, 64), reps=3, min_bytes=32 << 20)
    try:
        assert len(rows) == len(specs) * 3
        for r in rows:
            assert r["choice"] and r["us"] > 0 and r["weight_gb_s"] > 0
            qt.parse_choice(r["choice"])
        table = qt.tuned_table()
        qt.clear_table()
        qt.load_table(table)
        for spec in specs:
            op, n, k, g = quant_tune.parse_spec(spec)
            t = _weights(qt.fmt_of(op), n, k, BF, g or 128, seed=110)
            for m in (1, 4, 64):
                x = _randn(m, k, seed=111 + m)
                kind, cfg = qt.choose(op, m, n, k, BF, g)
                assert qt.choice_name(kind, cfg) == next(
                    r["choice"] for r in rows if r["op"] == op and r["shape"] == [m, n, k])
                y = quant_tune.dispatch(op, x, t)
                assert torch.equal(y, quant_tune.run(op, kind, cfg, x, t))
                if op.endswith("-glu"):
                    _check_glu(y, quant_tune.reference(op, x, t), BF)
                else:
                    _check(y, quant_tune.reference(op, x, t), _magnitude(op, x, t), BF,
                           FP8_MMA_REL if kind in MMA_KINDS else SUM_REL)
        calls = qt.warmup(specs, BF, DEV, max_m=8, bias="both")
        assert calls == 8 * (2 * 3 + 1)
        x1 = _randn(4, 2048, seed=120)
        t8 = _weights("int8", 1024, 2048, BF, seed=121)
        outs, eager = _capture_and_replay([lambda: qt.int8_linear(x1, t8["weight"], t8["weight_scale"])], [x1],
                                          [_randn(4, 2048, seed=122)])
        assert torch.equal(outs[0], eager[0])
    finally:
        qt.clear_table()


def test_warmup_default_table():
    qt.clear_table()
    n = qt.warmup([("fp8", 1024, 1024), ("int4", 1024, 1024, 64), ("fp8-static-glu", 2048, 1024)], FP16, DEV,
                  max_m=6)
    assert n == 6 * 3
