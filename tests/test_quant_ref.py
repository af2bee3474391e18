"""The plain-torch quantizers and references of kiln.kernels.quant on the CPU: round trips,
scale rules, zero rows, and each ``*_ref`` against a naive element-by-element computation."""

from __future__ import annotations

import pytest
import torch

from kiln.kernels import quant
from kiln.kernels.activation import silu_and_mul_ref

BF, FP16, F32 = torch.bfloat16, torch.float16, torch.float32


def _randn(*shape, dtype=F32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


# ----------------------------------------------------------------------------------------------
# INT4 packing and round trips
# ----------------------------------------------------------------------------------------------


def test_pack_unpack_are_inverse():
    g = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (7, 64), generator=g, dtype=torch.uint8)
    packed = quant.pack_int4(q)
    assert packed.shape == (7, 32) and packed.dtype == torch.uint8
    assert torch.equal(quant.unpack_int4(packed), q)
    raw = torch.randint(0, 256, (5, 40), generator=g, dtype=torch.uint8)
    assert torch.equal(quant.pack_int4(quant.unpack_int4(raw)), raw)
    # column 2j is the low nibble of byte j, column 2j + 1 the high one
    assert quant.unpack_int4(torch.tensor([[0x3A]], dtype=torch.uint8)).tolist() == [[0xA, 0x3]]


@pytest.mark.parametrize("scale_dtype", [FP16, BF, F32])
@pytest.mark.parametrize("g", [16, 64])
def test_int4_exact_on_the_grid(g, scale_dtype):
    """Weights already of the form (q - z) * s quantize back to the same q, and dequantize to
    themselves exactly, given their s and z."""
    n, k = 6, 128
    gen = torch.Generator().manual_seed(2)
    q = torch.randint(0, 16, (n, k), generator=gen)
    z = torch.randint(0, 16, (n, k // g), generator=gen, dtype=torch.uint8)
    s = (torch.rand((n, k // g), generator=gen) * 0.1 + 1e-3).to(scale_dtype)
    w = (q.float() - z.float().repeat_interleave(g, 1)) * s.float().repeat_interleave(g, 1)
    qw, s2, z2 = quant.quantize_int4(w, g, scale_dtype, scales=s, zeros=z)
    assert torch.equal(quant.unpack_int4(qw), q.to(torch.uint8))
    assert s2 is s and z2 is z
    assert torch.equal(quant.dequantize_int4(qw, s, z, g), w)


@pytest.mark.parametrize("scale_dtype", [FP16, BF, F32])
def test_int4_round_to_nearest_params(scale_dtype):
    g = 32
    w = _randn(8, 256, seed=3)
    s, z = quant.int4_group_params(w, g, scale_dtype)
    assert s.dtype == scale_dtype and z.dtype == torch.uint8 and s.shape == z.shape == (8, 8)
    assert (s.float() > 0).all() and (z <= 15).all()
    err = (quant.fake_quant_int4(w, g, scale_dtype) - w).abs()
    # within half a step of the grid, plus the clipping of the rounded scale at the range's ends
    bound = s.float().repeat_interleave(g, 1) * 0.5 + 2.0 ** -7 * w.abs().amax()
    assert (err <= bound).all()
    with pytest.raises(ValueError):
        quant.int4_group_params(w[:, :100], g, scale_dtype)


@pytest.mark.parametrize("scale_dtype", [FP16, BF, F32])
def test_int4_zero_groups_dequantize_to_zero(scale_dtype):
    w = _randn(3, 64, seed=4)
    w[1] = 0
    w[2, :32] = 0
    deq = quant.fake_quant_int4(w, 32, scale_dtype)
    assert torch.equal(deq[1], torch.zeros(64)) and torch.equal(deq[2, :32], torch.zeros(32))
    s, _ = quant.int4_group_params(w, 32, scale_dtype)
    if scale_dtype != FP16:  # MIN_SCALE (1e-12) is below float16's range: that scale is 0 there
        assert (s.float() > 0).all()


# ----------------------------------------------------------------------------------------------
# FP8 and INT8 scale rules
# ----------------------------------------------------------------------------------------------


def test_fp8_weight_scales():
    w = _randn(5, 96, seed=5, scale=3.0)
    w[2] = 0
    q, s = quant.quantize_fp8_rows(w)
    assert q.dtype == quant.FP8 and s.dtype == F32
    amax = w.abs().amax(1)
    assert torch.equal(s[[0, 1, 3, 4]], amax[[0, 1, 3, 4]] / 448.0)
    assert s[2].item() == pytest.approx(quant.MIN_SCALE) and torch.equal(q[2].float(), torch.zeros(96))
    # each row's largest magnitude lands on +-448; nothing is NaN
    assert torch.equal(q.float().abs().amax(1)[[0, 1, 3, 4]], torch.full((4,), 448.0))
    assert not q.float().isnan().any()
    # E4M3 keeps 3 mantissa bits: relative error at most 2^-4 for normal values
    deq = q.float() * s[:, None]
    big = w.abs() > 2.0 ** -6 * s[:, None]
    assert ((deq - w).abs()[big] <= 2.0 ** -4 * w.abs()[big]).all()


def test_fp8_activation_scales():
    x = _randn(4, 64, dtype=BF, seed=6, scale=10.0)
    x[3] = 0
    xq, s = quant.quantize_fp8_act(x)
    amax = x.float().abs().amax(1)
    assert torch.equal(s[:3], amax[:3] / 448.0) and s[3].item() == pytest.approx(quant.MIN_SCALE)
    assert torch.equal(xq, quant.to_fp8(x, s[:, None]))
    st = torch.tensor([quant.fp8_input_scale(5.0)])
    xq2, s2 = quant.quantize_fp8_act(x, st)
    assert torch.equal(s2, st.expand(4)) and s2.shape == (4,)
    assert xq2.float().abs().max().item() == 448.0  # values past 5.0 clamp
    assert quant.fp8_input_scale(0.0) == quant.MIN_SCALE and quant.fp8_input_scale(448.0) == 1.0
    # to_fp8 divides in float32, clamps, then rounds to nearest even
    assert quant.to_fp8(torch.tensor([1e6, -1e6, 0.5 * (1 + 1.125)]), torch.tensor(1.0)).float().tolist() == \
        [448.0, -448.0, 1.0]


def test_int8_scales_and_round_trip():
    w = _randn(4, 80, seed=7, scale=2.0)
    w[1] = 0
    q, s = quant.quantize_int8_rows(w)
    assert q.dtype == torch.int8 and s.dtype == F32
    assert torch.equal(q.abs().amax(1)[[0, 2, 3]], torch.full((3,), 127, dtype=torch.int8))
    assert torch.equal(q[1], torch.zeros(80, dtype=torch.int8)) and s[1].item() == pytest.approx(quant.MIN_SCALE)
    assert ((q.float() * s[:, None] - w).abs() <= s[:, None] * 0.5 * (1 + 1e-6)).all()
    # values already on the grid come back exactly
    q2, s2 = quant.quantize_int8_rows(q.float() * s[:, None])
    assert torch.equal(q2[[0, 2, 3]], q[[0, 2, 3]])


# ----------------------------------------------------------------------------------------------
# References against naive element-wise computations (float64 sums)
# ----------------------------------------------------------------------------------------------


def _naive_fp8(x, w, ws, input_scale, bias):
    m, k = x.shape
    n = w.shape[0]
    xf = x.double()
    y = torch.zeros(m, n, dtype=torch.float64)
    for i in range(m):
        s = float(input_scale) if input_scale is not None else max(xf[i].abs().max().item() / 448.0, 1e-12)
        s = float(torch.tensor(s, dtype=F32))  # the float32 scale
        xq = [float(torch.tensor(min(max(float(torch.tensor(xf[i, j].item() / s, dtype=F32)), -448.0), 448.0))
                    .to(quant.FP8).float()) for j in range(k)]
        for c in range(n):
            acc = sum(xq[j] * float(w[c, j].float()) for j in range(k))
            y[i, c] = acc * s * float(ws[c]) + (float(bias[c]) if bias is not None else 0.0)
    return y


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fp8_ref_matches_naive(static, with_bias):
    x = _randn(3, 48, dtype=BF, seed=8, scale=4.0)
    w, ws = quant.quantize_fp8_rows(_randn(10, 48, seed=9))
    xs = torch.tensor([quant.fp8_input_scale(9.0)]) if static else None
    b = _randn(10, dtype=BF, seed=10) if with_bias else None
    y = quant.fp8_linear_ref(x, w, ws, xs, b)
    assert y.dtype == BF
    ref = _naive_fp8(x, w, ws, xs, b)
    torch.testing.assert_close(y.double(), ref.to(BF).double(), atol=1e-2 * ref.abs().mean().item(), rtol=8e-3)


def test_int8_ref_matches_naive():
    x = _randn(3, 40, dtype=FP16, seed=11)
    w, ws = quant.quantize_int8_rows(_randn(9, 40, seed=12))
    b = _randn(9, dtype=FP16, seed=13)
    y = quant.int8_linear_ref(x, w, ws, b)
    ref = torch.zeros(3, 9, dtype=torch.float64)
    for i in range(3):
        for c in range(9):
            ref[i, c] = sum(float(x[i, j]) * int(w[c, j]) for j in range(40)) * float(ws[c]) + float(b[c])
    assert y.dtype == FP16
    torch.testing.assert_close(y.double(), ref.to(FP16).double(), atol=1e-3 * ref.abs().mean().item(), rtol=1e-3)


@pytest.mark.parametrize("with_perm", [False, True])
def test_int4_ref_matches_naive(with_perm):
    n, k, g = 7, 64, 16
    x = _randn(2, k, dtype=BF, seed=14)
    qw, s, z = quant.quantize_int4(_randn(n, k, seed=15), g, BF)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(16)).to(torch.int32) if with_perm else None
    b = _randn(n, dtype=BF, seed=17)
    y = quant.int4_linear_ref(x, qw, s, z, g, perm, b)
    ref = torch.zeros(2, n, dtype=torch.float64)
    for i in range(2):
        for c in range(n):
            acc = 0.0
            for j in range(k):
                byte = int(qw[c, j // 2])
                q = (byte >> 4) if j % 2 else (byte & 15)
                xj = float(x[i, int(perm[j]) if perm is not None else j])
                acc += xj * (q - int(z[c, j // g])) * float(s[c, j // g])
            ref[i, c] = acc + float(b[c])
    torch.testing.assert_close(y.double(), ref.to(BF).double(), atol=1e-2 * ref.abs().mean().item(), rtol=8e-3)


def test_silu_mul_refs_and_cpu_dispatch():
    x = _randn(2, 3, 32, dtype=BF, seed=18)
    w, ws = quant.quantize_fp8_rows(_randn(20, 32, seed=19))
    w8, ws8 = quant.quantize_int8_rows(_randn(20, 32, seed=20))
    qw, s, z = quant.quantize_int4(_randn(20, 32, seed=21), 16, BF)
    x2 = x.reshape(6, 32)
    assert torch.equal(quant.fp8_linear_silu_mul_ref(x2, w, ws), silu_and_mul_ref(quant.fp8_linear_ref(x2, w, ws)))
    assert torch.equal(quant.int8_linear_silu_mul_ref(x2, w8, ws8),
                       silu_and_mul_ref(quant.int8_linear_ref(x2, w8, ws8)))
    assert torch.equal(quant.int4_linear_silu_mul_ref(x2, qw, s, z, 16),
                       silu_and_mul_ref(quant.int4_linear_ref(x2, qw, s, z, 16)))
    # the dispatchers keep leading dimensions and run the references on the CPU
    assert quant.fp8_linear(x, w, ws).shape == (2, 3, 20)
    assert torch.equal(quant.fp8_linear_silu_mul(x, w, ws).reshape(6, 10), quant.fp8_linear_silu_mul_ref(x2, w, ws))
    assert torch.equal(quant.int4_linear(x, qw, s, z, 16).reshape(6, 20), quant.int4_linear_ref(x2, qw, s, z, 16))
    assert torch.equal(quant.int8_linear(x, w8, ws8).reshape(6, 20), quant.int8_linear_ref(x2, w8, ws8))
