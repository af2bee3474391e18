"""The quantized-linear Triton kernels (kiln.kernels.quant_gemv / quant_gemv4 / quant_gemm) against the
kiln.kernels.quant references on the CPU under Triton's interpreter, plus the CPU side of
kiln.kernels.quant_triton's dispatch table.

As test_gemv_interpret.py: run directly as ``TRITON_INTERPRET=1 pytest
tests/test_quant_interpret.py`` the kernel tests run in-process; in any other pytest run they
are skipped and ``test_interpreter_suite`` runs this file in a child process with the variable set.

The interpreter's float32 -> E4M3 cast mis-rounds (a carry out of the mantissa is lost), so
under it the kernels round to E4M3 with float arithmetic (``EMU``); the hardware conversion the
GPU uses is covered by tests/test_quant_gpu.py. E4M3 -> float32, uint8/int8 bit operations,
tl.join/reshape/split and tl.dot on float16 / bfloat16 tiles are interpreted faithfully.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
in_child = pytest.mark.skipif(not INTERPRET, reason="runs in the TRITON_INTERPRET=1 child process")

from kiln.kernels import quant  # noqa: E402
from kiln.kernels import quant_triton as qt  # noqa: E402
from kiln.kernels.quant_dot import DotConfig, dot_configs, dot_fits, fp8_dot  # noqa: E402
from kiln.kernels.quant_gemm import GemmConfig, gemm_configs, q_gemm, quantize_fp8  # noqa: E402
from kiln.kernels.quant_gemv import GemvConfig, q8_configs, q8_gemv  # noqa: E402
from kiln.kernels.quant_gemv4 import group_fits, q4_configs, q4_gemv  # noqa: E402

if INTERPRET:
    from test_kernels_interpret import _patch_interpreter  # the interpreter's loop-bound gap

    _patch_interpreter()


@pytest.mark.skipif(INTERPRET, reason="already in the interpreter process")
def test_interpreter_suite():
    from test_kernels_interpret import run_in_interpreter

    run_in_interpreter(__file__)


BF, FP16, F32 = torch.bfloat16, torch.float16, torch.float32


def _randn(*shape, dtype=F32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def _check(y, ref, dtype, casts=1):
    """Same rounding points as the reference, so only the float32 summation order differs;
    bfloat16/float16 results are ``casts`` roundings of that (one for a product; four for the
    gate/up epilogue: gate, up, silu(gate) and the product), which the interpreter truncates
    where the reference rounds to nearest: up to 2^-8 (bfloat16) or 2^-11 (float16) each."""
    assert y.dtype == dtype and y.shape == ref.shape, (y.dtype, y.shape, ref.shape)
    ref = ref.float()
    scale = ref.abs().mean().item()
    if dtype == F32:
        torch.testing.assert_close(y, ref, atol=1e-5 * scale, rtol=1e-5)
    else:
        rtol = casts * (1.6e-2 if dtype == BF else 2e-3)
        torch.testing.assert_close(y.float(), ref, atol=1e-2 * scale, rtol=rtol)


def _thin(m, dtype):
    """Every M for bfloat16; M = 1 and 3 (one row, and rows split unevenly) for the other dtypes,
    which share all code paths but the loads and the final cast (keeps the interpreted suite short)."""
    if dtype != BF and m not in (1, 3):
        pytest.skip("covered for bfloat16")


def _fp8_weight(n, k, seed):
    return quant.quantize_fp8_rows(_randn(n, k, seed=seed))


def _int8_weight(n, k, seed):
    return quant.quantize_int8_rows(_randn(n, k, seed=seed))


def _int4_weight(n, k, g, dtype, seed):
    return quant.quantize_int4(_randn(n, k, seed=seed), g, dtype if dtype != F32 else F32)


# Small tiles: N=37 leaves an N tail with every BLOCK_N; K=208 (a multiple of 16) a K tail with
# every BLOCK_K here; BLOCK_K=32/64 takes several K steps; rows=2/4 share a tile between x rows.
Q8_SMALL = [GemvConfig(4, 64, 4, 1, 1), GemvConfig(8, 128, 4, 2, 4), GemvConfig(16, 32, 4, 3, 2),
            GemvConfig(2, 64, 4, 4, 4)]


# ----------------------------------------------------------------------------------------------
# Activation quantization
# ----------------------------------------------------------------------------------------------


@in_child
@pytest.mark.parametrize("dtype", [BF, FP16, F32])
@pytest.mark.parametrize("k,one_tile_max_k", [(208, 16384), (4096, 16384), (4096, 1024), (208, 64)])
def test_quantize_fp8_dynamic_is_exact(k, one_tile_max_k, dtype):
    """One register tile per row, and the two-pass loop over chunks (rows wider than the tile)."""
    x = _randn(5, k, dtype=dtype, seed=1, scale=3.0)
    x[1] = 0  # a zero row keeps the smallest scale
    x[2, :7] = torch.tensor([448.0, -1e-3, 2.0 ** -12, 17.0, -17.0, 1e-30, -300.0]).to(dtype)
    xq, s = quantize_fp8(x, one_tile_max_k=one_tile_max_k)
    xq_ref, s_ref = quant.quantize_fp8_act(x)
    assert torch.equal(s, s_ref)
    assert torch.equal(xq.float(), xq_ref.float())


@in_child
@pytest.mark.parametrize("one_tile_max_k", [16384, 32])
def test_quantize_fp8_static_clamps(one_tile_max_k):
    x = _randn(3, 96, dtype=BF, seed=2, scale=10.0)
    x[0, 0], x[0, 1] = 1e30, -1e30  # far past 448 * s: the quotient overflows and clamps
    scale = torch.tensor([0.01])
    xq, s = quantize_fp8(x, scale, one_tile_max_k=one_tile_max_k)
    xq_ref, s_ref = quant.quantize_fp8_act(x, scale)
    assert torch.equal(s, s_ref) and torch.equal(xq.float(), xq_ref.float())
    assert xq[0, 0].float().item() == 448.0 and xq[0, 1].float().item() == -448.0


# ----------------------------------------------------------------------------------------------
# GEMV: FP8 / INT8
# ----------------------------------------------------------------------------------------------


@in_child
@pytest.mark.parametrize("dtype", [BF, F32])
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("cfg", Q8_SMALL, ids=lambda c: c.name)
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_fp8_gemv(mode, cfg, m, dtype):
    _thin(m, dtype)
    n, k = 37, 208
    x = _randn(m, k, dtype=dtype, seed=m, scale=2.0)
    w, ws = _fp8_weight(n, k, 10 + m)
    xs = torch.tensor([quant.fp8_input_scale(x.abs().max().item() * 0.7)]) if mode == "static" else None
    b = _randn(n, dtype=dtype, seed=3) if m % 2 else None
    y = q8_gemv(x, w, ws, cfg, fp8=True, input_scale=xs, bias=b)
    _check(y, quant.fp8_linear_ref(x, w, ws, xs, b).float(), dtype)


@in_child
def test_fp8_gemv_is_the_reference_expression():
    """float32 out: the kernel's x_q and products are the reference's, so only summation order
    differs (within a few float32 ulps of the sum of magnitudes)."""
    n, k = 24, 256
    x = _randn(3, k, seed=4, scale=5.0)
    w, ws = _fp8_weight(n, k, 5)
    y = q8_gemv(x, w, ws, GemvConfig(8, 64, 4, 2, 4), fp8=True)
    xq, sx = quant.quantize_fp8_act(x)
    mag = (xq.float().abs() @ w.float().abs().t()) * sx[:, None] * ws[None, :]
    ref = quant.fp8_linear_ref(x, w, ws)
    assert ((y - ref).abs() <= 1e-6 * mag + 1e-30).all()


@in_child
@pytest.mark.parametrize("m", [1, 3, 6])
@pytest.mark.parametrize("cfg", [Q8_SMALL[1], Q8_SMALL[2]], ids=lambda c: c.name)
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_fp8_gemv_prequantized(mode, cfg, m):
    """x quantized once by quantize_fp8, then the GEMV on x_q: bit for bit the in-kernel
    quantization (the same E4M3 values and scales, the same sums)."""
    n, k = 37, 208
    x = _randn(m, k, dtype=BF, seed=60 + m, scale=2.0)
    w, ws = _fp8_weight(n, k, 61)
    xs = torch.tensor([quant.fp8_input_scale(x.abs().max().item() * 0.7)]) if mode == "static" else None
    b = _randn(n, dtype=BF, seed=62) if m % 2 else None
    xq, sx = quantize_fp8(x, xs)
    y = q8_gemv(xq, w, ws, cfg, fp8=True, bias=b, x_scale=sx, out_dtype=BF)
    assert torch.equal(y, q8_gemv(x, w, ws, cfg, fp8=True, input_scale=xs, bias=b))
    _check(y, quant.fp8_linear_ref(x, w, ws, xs, b).float(), BF)
    if m == 1:
        glu = q8_gemv(xq, w[:36], ws[:36], cfg, fp8=True, glu=True, x_scale=sx, out_dtype=BF)
        assert torch.equal(glu, q8_gemv(x, w[:36], ws[:36], cfg, fp8=True, input_scale=xs, glu=True))


@in_child
@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("cfg", [Q8_SMALL[0], Q8_SMALL[2]], ids=lambda c: c.name)
def test_fp8_weight_only_gemv(cfg, m):
    """The weight-only FP8 GEMV: E4M3 weights widened, x as it is (int8_linear_ref's math), also
    fused gate/up; and it is not the activation-quantized product."""
    n, k = 37, 208
    x = _randn(m, k, dtype=BF, seed=70 + m, scale=2.0)
    w, ws = _fp8_weight(n, k, 71)
    b = _randn(n, dtype=BF, seed=72)
    y = q8_gemv(x, w, ws, cfg, fp8=True, bias=b, weight_only=True)
    _check(y, quant.int8_linear_ref(x, w, ws, b).float(), BF)
    assert not torch.equal(y, q8_gemv(x, w, ws, cfg, fp8=True, bias=b))
    glu = q8_gemv(x, w[:36], ws[:36], cfg, fp8=True, glu=True, weight_only=True)
    want = quant.int8_linear_silu_mul_ref(x, w[:36], ws[:36]).float()
    _check(glu, want, BF, casts=4)


@in_child
@pytest.mark.parametrize("dtype", [BF, FP16, F32])
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("cfg", Q8_SMALL, ids=lambda c: c.name)
def test_int8_gemv(cfg, m, dtype):
    _thin(m, dtype)
    n, k = 37, 208
    x = _randn(m, k, dtype=dtype, seed=20 + m)
    w, ws = _int8_weight(n, k, 30 + m)
    b = _randn(n, dtype=dtype, seed=6) if m % 2 == 0 else None
    y = q8_gemv(x, w, ws, cfg, fp8=False, bias=b)
    _check(y, quant.int8_linear_ref(x, w, ws, b).float(), dtype)


@in_child
def test_int8_gemv_extreme_codes_and_strided_rows():
    """Codes -128..127 (the 2^23 decode at both ends), x rows a view into a wider buffer, an
    output written in place, K a multiple of BLOCK_K."""
    n, k = 16, 256
    w = torch.arange(n * k).remainder(256).sub(128).to(torch.int8).reshape(n, k)
    ws = torch.rand(n, generator=torch.Generator().manual_seed(7)) + 0.5
    xs = _randn(2, k + 32, seed=8)[:, 16:16 + k]
    out = torch.full((2, n), float("nan"))
    y = q8_gemv(xs, w, ws, GemvConfig(4, 128, 4, 2, 2), fp8=False, out=out)
    assert y is out
    _check(y, quant.int8_linear_ref(xs, w, ws), F32)


@in_child
@pytest.mark.parametrize("fmt", ["fp8", "fp8-static", "int8"])
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("cfg", [GemvConfig(4, 64, 4, 1, 1), GemvConfig(8, 32, 4, 3, 4)], ids=lambda c: c.name)
def test_q8_gemv_glu(cfg, m, fmt):
    i, k = 19, 208
    x = _randn(m, k, dtype=BF, seed=40 + m)
    if fmt.startswith("fp8"):
        w, ws = _fp8_weight(2 * i, k, 41)
        xs = torch.tensor([quant.fp8_input_scale(x.abs().max().item())]) if fmt == "fp8-static" else None
        y = q8_gemv(x, w, ws, cfg, fp8=True, input_scale=xs, glu=True)
        ref = quant.fp8_linear_silu_mul_ref(x, w, ws, xs)
    else:
        w, ws = _int8_weight(2 * i, k, 42)
        y = q8_gemv(x, w, ws, cfg, fp8=False, glu=True)
        ref = quant.int8_linear_silu_mul_ref(x, w, ws)
    assert y.shape == (m, i)
    _check(y, ref.float(), BF, casts=2)


# ----------------------------------------------------------------------------------------------
# FP8 on the tensor cores for few rows (quant_dot)
# ----------------------------------------------------------------------------------------------

DOT_SMALL = [DotConfig(16, 64, 16, 4, 2), DotConfig(32, 32, 16, 4, 3), DotConfig(16, 128, 32, 4, 1)]


@in_child
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("cfg", DOT_SMALL, ids=lambda c: c.name)
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_fp8_dot(mode, cfg, m):
    """Rows of x and weight rows past a block, K with a tail (200 = 3 x 64 + 8), the bias."""
    n, k = 37, 200
    x = _randn(m, k, dtype=BF, seed=60 + m, scale=3.0)
    w, ws = _fp8_weight(n, k, 61 + m)
    xs = torch.tensor([quant.fp8_input_scale(x.abs().max().item() * 0.7)]) if mode == "static" else None
    b = _randn(n, dtype=BF, seed=62) if m % 2 else None
    _check(fp8_dot(x, w, ws, cfg, input_scale=xs, bias=b), quant.fp8_linear_ref(x, w, ws, xs, b).float(), BF)


@in_child
def test_fp8_dot_is_the_reference_expression():
    """float32 x and out: x_q and the products are the reference's, only the summation order
    differs (a few float32 ulps of the sum of magnitudes)."""
    n, k = 40, 256
    x = _randn(5, k, seed=64, scale=5.0)
    w, ws = _fp8_weight(n, k, 65)
    y = fp8_dot(x, w, ws, DotConfig(16, 64, 16, 4, 2))
    xq, sx = quant.quantize_fp8_act(x)
    mag = (xq.float().abs() @ w.float().abs().t()) * sx[:, None] * ws[None, :]
    assert ((y - quant.fp8_linear_ref(x, w, ws)).abs() <= 1e-6 * mag + 1e-30).all()


@in_child
@pytest.mark.parametrize("static", [False, True])
def test_fp8_dot_glu(static):
    i, k, m = 21, 160, 3
    x = _randn(m, k, dtype=BF, seed=66)
    w, ws = _fp8_weight(2 * i, k, 67)
    xs = torch.tensor([quant.fp8_input_scale(x.abs().max().item())]) if static else None
    y = fp8_dot(x, w, ws, DotConfig(16, 64, 16, 4, 2), input_scale=xs, glu=True)
    assert y.shape == (m, i)
    _check(y, quant.fp8_linear_silu_mul_ref(x, w, ws, xs).float(), BF, casts=2)


def test_dot_configs_fit():
    """Every listed config fits its limits; BLOCK_M never exceeds what the rows need."""
    for m in (1, 2, 8, 16, 17, 32):
        for glu in (False, True):
            cs = dot_configs(m, glu)
            assert cs and all(dot_fits(c, m, glu) for c in cs)
            assert all(c.block_m == 16 for c in cs) or m > 16
    assert DotConfig.parse(DotConfig(64, 256, 16, 4, 4).name) == DotConfig(64, 256, 16, 4, 4)
    assert qt.parse_choice("dot:n64k256m16w4s4") == ("dot", DotConfig(64, 256, 16, 4, 4))


# ----------------------------------------------------------------------------------------------
# GEMV: INT4
# ----------------------------------------------------------------------------------------------

# (group size, config): chunks inside one group (several steps per group), one group per chunk,
# several groups per chunk, and several groups per chunk with a K tail (K=192 with BLOCK_K=128).
Q4_CASES = [
    (64, GemvConfig(4, 32, 4, 1, 1)), (64, GemvConfig(8, 64, 4, 2, 4)), (32, GemvConfig(4, 128, 4, 3, 2)),
    (32, GemvConfig(16, 64, 4, 2, 1)),
]


@in_child
@pytest.mark.parametrize("dtype", [BF, FP16, F32])
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("case", Q4_CASES, ids=lambda c: f"g{c[0]}-{c[1].name}")
def test_int4_gemv(case, m, dtype):
    _thin(m, dtype)
    g, cfg = case
    n, k = 37, 192
    x = _randn(m, k, dtype=dtype, seed=50 + m)
    qw, s, z = _int4_weight(n, k, g, dtype, 60 + m)
    b = _randn(n, dtype=dtype, seed=9) if m != 2 else None
    y = q4_gemv(x, qw, s, z, g, cfg, bias=b)
    _check(y, quant.int4_linear_ref(x, qw, s, z, g, None, b).float(), dtype)


# (group size, config) of the exact-weight variant: chunks inside one group (2-D, several steps
# per group), one group per chunk, and several groups per chunk with a K tail.
Q4_ACC_CASES = [
    (64, GemvConfig(8, 32, 4, 1, 1)), (64, GemvConfig(4, 64, 4, 2, 4)), (32, GemvConfig(4, 128, 4, 3, 2)),
]


@in_child
@pytest.mark.parametrize("dtype", [BF, FP16, F32])
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("case", Q4_ACC_CASES, ids=lambda c: f"g{c[0]}-{c[1].name}")
def test_int4_gemv_exact_weights(case, m, dtype):
    _thin(m, dtype)
    g, cfg = case
    n, k = 37, 192
    x = _randn(m, k, dtype=dtype, seed=150 + m)
    qw, s, z = _int4_weight(n, k, g, dtype, 160 + m)
    b = _randn(n, dtype=dtype, seed=9) if m != 2 else None
    y = q4_gemv(x, qw, s, z, g, cfg, bias=b, acc=True)
    _check(y, quant.int4_linear_ref(x, qw, s, z, g, None, b).float(), dtype)
    if m == 1:
        glu = q4_gemv(x, qw[:36], s[:36], z[:36], g, cfg, glu=True, acc=True)
        _check(glu, quant.int4_linear_silu_mul_ref(x, qw[:36], s[:36], z[:36], g).float(), dtype, casts=2)


@in_child
def test_int4_gemv_every_code_and_zero():
    """Every nibble value against every zero point, scales in float16."""
    n, k, g = 16, 256, 16
    q = torch.arange(n * k).remainder(16).reshape(n, k)
    qw = quant.pack_int4(q)
    z = (torch.arange(n * (k // g)).remainder(16).reshape(n, k // g)).to(torch.uint8)
    s = (torch.rand(n, k // g, generator=torch.Generator().manual_seed(3)) + 0.1).to(FP16)
    x = _randn(2, k, dtype=FP16, seed=11)
    y = q4_gemv(x, qw, s, z, g, GemvConfig(8, 64, 4, 2, 2))
    _check(y, quant.int4_linear_ref(x, qw, s, z, g).float(), FP16)


@in_child
@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("case", Q4_CASES[:3], ids=lambda c: f"g{c[0]}-{c[1].name}")
def test_int4_gemv_glu(case, m):
    g, cfg = case
    i, k = 19, 192
    x = _randn(m, k, dtype=BF, seed=70 + m)
    qw, s, z = _int4_weight(2 * i, k, g, BF, 71)
    y = q4_gemv(x, qw, s, z, g, cfg, glu=True)
    _check(y, quant.int4_linear_silu_mul_ref(x, qw, s, z, g).float(), BF, casts=2)


# ----------------------------------------------------------------------------------------------
# GEMM
# ----------------------------------------------------------------------------------------------


@in_child
@pytest.mark.parametrize("dtype", [BF, FP16])
@pytest.mark.parametrize("m", [5, 33])
@pytest.mark.parametrize("fmt", ["fp8", "int8", "int4"])
def test_gemm(fmt, m, dtype):
    n, k, g = 40, 208 if fmt != "int4" else 192, 64
    cfg = GemmConfig(16, 32, 32 if fmt == "int4" else 64, 4, 2, 2)
    x = _randn(m, k, dtype=dtype, seed=80 + m)
    b = _randn(n, dtype=dtype, seed=12) if m == 5 else None
    if fmt == "fp8":
        w, ws = _fp8_weight(n, k, 81)
        xq, sx = quantize_fp8(x)
        y = q_gemm(xq, w, ws, cfg, fmt="fp8", x_scale=sx, bias=b, out_dtype=dtype)
        ref = quant.fp8_linear_ref(x, w, ws, None, b)
    elif fmt == "int8":
        w, ws = _int8_weight(n, k, 82)
        y = q_gemm(x, w, ws, cfg, fmt="int8", bias=b)
        ref = quant.int8_linear_ref(x, w, ws, b)
    else:
        qw, s, z = _int4_weight(n, k, g, dtype, 83)
        y = q_gemm(x, qw, s, cfg, fmt="int4", zeros=z, group_size=g, bias=b)
        ref = quant.int4_linear_ref(x, qw, s, z, g, None, b)
    _check(y, ref.float(), dtype)


@in_child
def test_gemm_fp8_float32_out():
    n, k = 32, 128
    x = _randn(17, k, seed=13)
    w, ws = _fp8_weight(n, k, 14)
    xq, sx = quantize_fp8(x)
    y = q_gemm(xq, w, ws, GemmConfig(16, 16, 32, 4, 2), fmt="fp8", x_scale=sx, out_dtype=F32)
    _check(y, quant.fp8_linear_ref(x, w, ws), F32)


# ----------------------------------------------------------------------------------------------
# CPU side: dispatch on CPU tensors, the table, configs
# ----------------------------------------------------------------------------------------------


def test_cpu_tensors_take_the_references():
    x = _randn(3, 64, dtype=BF, seed=15)
    w, ws = _fp8_weight(32, 64, 16)
    assert torch.equal(qt.fp8_linear(x, w, ws), quant.fp8_linear_ref(x, w, ws))
    w8, ws8 = _int8_weight(32, 64, 17)
    assert torch.equal(qt.int8_linear(x, w8, ws8), quant.int8_linear_ref(x, w8, ws8))
    qw, s, z = _int4_weight(32, 64, 32, BF, 18)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(1)).to(torch.int32)
    assert torch.equal(qt.int4_linear(x, qw, s, z, 32, perm), quant.int4_linear_ref(x, qw, s, z, 32, perm))
    assert torch.equal(qt.int4_linear_silu_mul(x, qw, s, z, 32), quant.int4_linear_silu_mul_ref(x, qw, s, z, 32))
    assert torch.equal(quant.int8_linear_silu_mul(x.view(3, 1, 64), w8, ws8).view(3, -1),
                       quant.int8_linear_silu_mul_ref(x, w8, ws8))


def test_table_round_trip_and_defaults():
    saved = qt.tuned_table()
    try:
        qt.clear_table()
        rows = [
            dict(op="fp8", shape=[1, 4096, 4096], dtype="bfloat16", group_size=0, choice="gemv:n8k2048w4s2r1", us=5.0),
            dict(op="fp8", shape=[64, 4096, 4096], dtype="bfloat16", group_size=0, choice="scaled_mm", us=9.0),
            dict(op="int4", shape=[64, 4096, 4096], dtype="bfloat16", group_size=128,
                 choice="gemm:m64n128k64w4s4g8", us=12.0),
            dict(op="int4-glu", shape=[2, 28672, 4096], dtype="float16", group_size=128, choice="unfused", us=30.0),
        ]
        qt.load_table(json.loads(json.dumps(rows)))
        assert qt.choose("fp8", 1, 4096, 4096, BF) == ("gemv", GemvConfig(8, 2048, 4, 2, 1))
        assert qt.choose("fp8", 64, 4096, 4096, BF) == ("scaled_mm", None)
        assert qt.choose("int4", 64, 4096, 4096, BF, 128) == ("gemm", GemmConfig(64, 128, 64, 4, 4, 8))
        assert qt.choose("int4-glu", 2, 28672, 4096, FP16, 128) == ("unfused", None)
        assert json.loads(json.dumps(qt.tuned_table())) == rows
        # untuned: GEMV up to four rows, then scaled_mm (bfloat16 FP8) or the GEMM, or the reference
        assert qt.choose("int8", 3, 4096, 4096, BF)[0] == "gemv"
        assert qt.choose("fp8", 8, 4096, 4096, BF)[0] == "scaled_mm"
        assert qt.choose("fp8", 8, 4096, 4096, FP16)[0] == "gemm"
        assert qt.choose("int8", 300, 4096, 4096, F32) == ("torch", None)
        assert qt.choose("int4-glu", 16, 4096, 4096, BF, 128) == ("unfused", None)
        qt.record_scaled_mm(BF, True, False)  # a probe found bias unsupported
        assert qt.choose("fp8", 64, 4096, 4096, BF, 0, has_bias=True)[0] == "gemm"
        assert qt.choose("fp8", 8, 4096, 4096, BF, 0, has_bias=True)[0] == "gemm"
        with pytest.raises(ValueError):
            qt.parse_choice("cublas")
    finally:
        qt._SCALED_MM_OK.clear()
        qt.clear_table()
        qt.load_table(saved)


def test_configs_respect_limits():
    for m in (1, 2, 3, 4, 8):
        cs = q8_configs(m)
        assert cs and len(set(cs)) == len(cs)
        for c in cs:
            assert c.rows == 1 or c.rows < 2 * m
            assert min(m, c.rows, 4) * c.block_n * c.block_k <= 128 * 32 * c.num_warps
            assert GemvConfig.parse(c.name) == c
        for g in (32, 64, 128, 4096, 14336):
            for acc in (False, True):
                c4 = q4_configs(m, g, acc=acc)
                assert c4, (m, g, acc)
                assert all(group_fits(c.block_k, g) for c in c4)
    assert not group_fits(128, 96) and group_fits(32, 96) and group_fits(256, 128) and group_fits(64, 128)
    assert {c.block_m for c in gemm_configs(16, "int8")} == {16}
    assert all(128 % c.block_k == 0 for c in gemm_configs(256, "int4", 128))
    assert gemm_configs(64, "int4", 16) == []
    assert GemmConfig.parse(GemmConfig(64, 128, 64, 4, 4).name) == GemmConfig(64, 128, 64, 4, 4, 8)
    assert qt.default_gemv("int4", 1, 14336) is not None and qt.default_gemm("int4", 64, 16) is None


# ----------------------------------------------------------------------------------------------
# The tuner's plumbing on CPU tensors (its CUDA-graph timer replaced by a stub)
# ----------------------------------------------------------------------------------------------


def _small_tensors(op, n, k, g, dtype):
    from kiln.kernels import quant_tune

    t = quant_tune.make_weights(op, n, k, g, dtype, "cpu", torch.Generator().manual_seed(5))
    if g:
        t["group_size"] = g
    return t


@in_child
@pytest.mark.parametrize("op", ["fp8", "fp8-static", "int8", "int4", "fp8-glu", "int8-glu", "int4-glu"])
def test_run_every_kind(op):
    """quant_tune.run / reference for each kind the tuner can choose (all but scaled_mm, which
    needs CUDA), on CPU tensors through the interpreted kernels."""
    from kiln.kernels import quant_tune

    fmt, g = qt.fmt_of(op), 64 if "int4" in op else 0
    n, k = (32, 128)
    t = _small_tensors(op, n, k, g, BF)
    for m in (2, 5):
        x = _randn(m, k, dtype=BF, seed=90 + m)
        xs = torch.tensor([quant.fp8_input_scale(x.abs().max().item())]) if "static" in op else None
        ref = quant_tune.reference(op, x, t, xs).float()
        kinds = [("gemv", GemvConfig(4, 64, 4, 2, 2)), ("torch", None)]
        kinds += [("gemv-pre", GemvConfig(4, 64, 4, 2, 2)), ("dot", DotConfig(16, 64, 16, 4, 2))] if fmt == "fp8" else []
        kinds += [("gemv-acc", GemvConfig(8, 32, 4, 2, 2))] if fmt == "int4" else []
        kinds += [("unfused", None)] if op.endswith("-glu") else [("gemm", GemmConfig(16, 16, 32, 4, 2))]
        for kind, cfg in kinds:
            _check(quant_tune.run(op, kind, cfg, x, t, xs), ref, BF, casts=2 if op.endswith("-glu") else 1)
    assert torch.equal(quant_tune.dispatch(op, x, t, xs), ref.to(BF))  # CPU tensors: the reference


@in_child
def test_tune_spec_records_the_fastest(monkeypatch):
    """_tune_spec on the CPU with a stub timer: every candidate is checked against the
    reference, the fastest kept in the table, and rows carry the documented fields."""
    from kiln.kernels import quant_tune

    fake_us = {}

    def fake_time(fns, reps):
        for f in fns:
            f()
        return fake_us.setdefault(len(fake_us), 10.0 + (len(fake_us) * 7) % 5)

    cands = [("gemv", GemvConfig(4, 64, 4, 1, 1)), ("gemv", GemvConfig(8, 64, 4, 2, 2)),
             ("gemm", GemmConfig(16, 16, 64, 4, 2))]
    monkeypatch.setattr(quant_tune, "_time_calls", fake_time)
    monkeypatch.setattr(quant_tune, "candidates", lambda op, m, dtype, g, full=False: cands)
    saved = qt.tuned_table()
    try:
        qt.clear_table()
        rows = quant_tune._tune_spec("int8", 40, 128, 0, BF, "cpu", torch.Generator().manual_seed(0), (1, 5),
                                     False, 1, 1 << 10, False, False)
        assert [r["shape"] for r in rows] == [[1, 40, 128], [5, 40, 128]]
        for r in rows:
            assert r["configs_timed"] == 3 and r["weight_copies"] >= 2
            assert r["us"] == min(r["gemv_us"], r["gemm_us"])
            assert qt.choice_name(*qt.choose("int8", r["shape"][0], 40, 128, BF)) == r["choice"]
        assert qt.tuned_table() == rows
    finally:
        qt.clear_table()
        qt.load_table(saved)


def test_candidates_and_specs():
    from kiln.kernels import quant_tune

    assert quant_tune.parse_spec(("int4", 4096, 4096, 128)) == ("int4", 4096, 4096, 128)
    assert quant_tune.parse_spec(("fp8-static-glu", 28672, 4096)) == ("fp8-static-glu", 28672, 4096, 0)
    with pytest.raises(ValueError):
        quant_tune.parse_spec(("int4", 4096, 4096))
    with pytest.raises(ValueError):
        quant_tune.parse_spec(("nf4", 4096, 4096))
    kinds = lambda *a: {kind for kind, _ in quant_tune.candidates(*a)}  # noqa: E731
    assert kinds("int8", 1, BF, 0) == {"gemv"}
    assert kinds("int8", 8, BF, 0) == {"gemv", "gemm"}
    assert kinds("int8", 64, F32, 0) == set()
    assert kinds("fp8", 2, BF, 0) == {"gemv", "gemv-pre", "gemv-wo", "gemm"}  # weight-only GEMV up to WO_MAX_M
    assert kinds("fp8", 3, BF, 0) == {"gemv", "gemv-pre", "gemm"}
    assert kinds("fp8", 16, BF, 0) == {"gemv", "gemv-pre", "dot", "gemm"}
    assert kinds("fp8", 64, BF, 0) == {"gemm"}
    assert kinds("fp8-glu", 8, BF, 0) == {"gemv", "gemv-pre", "dot", "unfused"}
    assert kinds("int4-glu", 64, BF, 128) == {"unfused"}
    assert kinds("int4-glu", 2, BF, 128) == {"gemv", "gemv-acc", "unfused"}
    qt.record_scaled_mm(BF, False, True)
    try:
        assert "scaled_mm" in kinds("fp8", 64, BF, 0) and "scaled_mm" not in kinds("fp8", 64, FP16, 0)
    finally:
        qt._SCALED_MM_OK.clear()
        qt._DEFAULT.clear()
