"""The skinny-matrix Triton kernel (kiln.kernels.gemv) against the float32 product, on the CPU
under Triton's interpreter, plus the CPU side of its dispatch table.

As in test_kernels_interpret.py: run directly as ``TRITON_INTERPRET=1 pytest
tests/test_gemv_interpret.py`` the kernel tests run in-process; in any other pytest run they are
skipped and ``test_interpreter_suite`` runs this file in a child process with the variable set.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
import torch.nn.functional as F

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
in_child = pytest.mark.skipif(not INTERPRET, reason="runs in the TRITON_INTERPRET=1 child process")

from kiln.kernels import gemv  # noqa: E402
from kiln.kernels.activation import silu_and_mul_ref  # noqa: E402
from kiln.kernels.gemv import GemvConfig  # noqa: E402

if INTERPRET:
    from test_kernels_interpret import _patch_interpreter  # the interpreter's loop-bound gap

    _patch_interpreter()


@pytest.mark.skipif(INTERPRET, reason="already in the interpreter process")
def test_interpreter_suite():
    from test_kernels_interpret import run_in_interpreter

    run_in_interpreter(__file__)


BF = torch.bfloat16


def _randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def _check(y, x, w, bias=None):
    ref = gemv.gemv_ref(x, w, bias)
    assert y.dtype == x.dtype and y.shape == ref.shape
    if x.dtype == torch.float32:
        torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)
    else:
        # float32 sums rounded once to bfloat16 (the interpreter truncates that cast): within
        # two units in the last place, plus a little absolute slack for results near zero
        scale = ref.abs().mean().item()
        torch.testing.assert_close(y.float(), ref, atol=1e-2 * scale, rtol=1.6e-2)


# Tiles small enough for the interpreter; K=200 leaves a K tail with every BLOCK_K here, N=37 an
# N tail with every BLOCK_N, and BLOCK_K=64 takes several K steps.
SMALL = [GemvConfig(4, 64, 4, 1), GemvConfig(8, 256, 4, 2), GemvConfig(16, 128, 8, 3, rows=2)]


@in_child
@pytest.mark.parametrize("dtype", [torch.float32, BF])
@pytest.mark.parametrize("m", [1, 2, 3])
@pytest.mark.parametrize("cfg", SMALL, ids=lambda c: c.name)
def test_gemv_tails(cfg, m, dtype):
    n, k = 37, 200
    x = _randn(m, k, dtype=dtype, seed=m)
    w = _randn(n, k, dtype=dtype, seed=10 + m)
    _check(gemv.gemv(x, w, cfg), x, w)


@in_child
@pytest.mark.parametrize("dtype", [torch.float32, BF])
def test_gemv_even_k_bias_and_row_strides(dtype):
    """K a multiple of BLOCK_K (the unmasked loads), a bias, x and w rows strided (views into
    wider tensors), and the output written into a given buffer."""
    n, k = 19, 256
    xs = _randn(2, k + 40, dtype=dtype, seed=1)[:, 8 : 8 + k]
    ws = _randn(n, k + 24, dtype=dtype, seed=2)[:, :k]
    b = _randn(n, dtype=dtype, seed=3)
    out = torch.full((2, n), float("nan"), dtype=dtype)
    y = gemv.gemv(xs, ws, GemvConfig(8, 128, 4, 1), bias=b, out=out)
    assert y is out
    _check(y, xs, ws, b)


@in_child
@pytest.mark.parametrize("rows", [1, 2, 4])
@pytest.mark.parametrize("m", [4, 7])
def test_gemv_rows_split_over_programs(m, rows):
    """x rows shared out over several programs per weight tile, the last one partly past M."""
    n, k = 21, 96
    x = _randn(m, k, seed=4)
    w = _randn(n, k, seed=5)
    _check(gemv.gemv(x, w, GemvConfig(8, 32, 4, 4, rows)), x, w)


@in_child
@pytest.mark.parametrize("dtype", [torch.float32, BF])
@pytest.mark.parametrize("m", [1, 2, 3])
@pytest.mark.parametrize("cfg", SMALL + [GemvConfig(2, 64, 4, 2, 1)], ids=lambda c: c.name)
def test_gemv_glu(cfg, m, dtype):
    """The fused gate/up product: silu(x @ gate.T) * (x @ up.T) from one [2I, K] weight, with an
    I (37) that no BLOCK_N / 2 divides and a K tail."""
    i, k = 37, 200
    x = _randn(m, k, dtype=dtype, seed=20 + m)
    w = _randn(2 * i, k, dtype=dtype, seed=30 + m)
    y = gemv.gemv(x, w, cfg, glu=True)
    assert y.shape == (m, i) and y.dtype == dtype
    ref = silu_and_mul_ref(gemv.gemv_ref(x, w))
    if dtype == torch.float32:
        torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)
    else:  # as _check: the float32 result rounded once to bfloat16
        torch.testing.assert_close(y.float(), ref, atol=1e-2 * ref.abs().mean().item(), rtol=1.6e-2)


def test_linear_silu_mul_on_cpu_is_the_two_ops():
    x, w = _randn(3, 64, seed=9), _randn(80, 64, seed=10)
    assert torch.equal(gemv.linear_silu_mul(x, w), silu_and_mul_ref(F.linear(x, w)))


def test_linear_on_cpu_is_f_linear():
    x, w, b = _randn(3, 2, 64, seed=6), _randn(40, 64, seed=7), _randn(40, seed=8)
    assert torch.equal(gemv.linear(x, w, b), F.linear(x, w, b))


def test_configs_respect_limits():
    for m in (1, 2, 3, 4):
        for dtype, full in [(BF, False), (torch.float32, False), (BF, True)]:
            cs = gemv.configs(m, dtype, full=full)
            assert cs and len(set(cs)) == len(cs)
            if full:
                assert {c.num_stages for c in cs} == {1, 2, 3, 4}
            else:
                assert set(cs) <= set(gemv.CONFIGS)
            for c in cs:
                assert 2 <= c.block_n <= 32 and 256 <= c.block_k <= 2048
                assert c.num_warps in (4, 8) and 1 <= c.num_stages <= 4
                assert c.rows in (1, 2, 4) and (c.rows == 1 or c.rows < 2 * m)
                assert min(m, c.rows) * c.block_n * c.block_k <= 128 * 32 * c.num_warps
                assert GemvConfig.parse(c.name) == c
    assert {c.rows for c in gemv.configs(1, BF)} == {1}
    assert {c.rows for c in gemv.configs(4, BF)} == {1, 2, 4}
    assert GemvConfig.parse("n8k1024w4s2") == GemvConfig(8, 1024, 4, 2, 4)
    with pytest.raises(ValueError):
        GemvConfig.parse("cublas")


def test_table_round_trip():
    saved = gemv.tuned_table()
    try:
        gemv.clear_table()
        rows = [
            dict(shape=[1, 4096, 4096], dtype="bfloat16", choice="n8k1024w4s2r2", us=12.0, gb_s=2800.0,
                 cublas_us=20.0),
            dict(shape=[2, 4096, 4096], dtype="bfloat16", choice="cublas", us=15.0, gb_s=2200.0,
                 cublas_us=15.0),
            dict(shape=[1, 4096, 4096], dtype="bfloat16", op="glu", choice="n4k512w4s1r1", us=13.0,
                 gb_s=2600.0, cublas_us=22.0),
        ]
        gemv.load_table(json.loads(json.dumps(rows)))
        assert gemv.choice(1, 4096, 4096, BF) == GemvConfig(8, 1024, 4, 2, 2)
        assert gemv.choice(2, 4096, 4096, BF) is None
        assert gemv.choice(1, 4096, 4096, torch.float16) is None
        assert gemv.choice(1, 4096, 4096, BF, glu=True) == GemvConfig(4, 512, 4, 1, 1)
        assert gemv.choice(2, 4096, 4096, BF, glu=True) is None
        assert json.loads(json.dumps(gemv.tuned_table())) == rows
    finally:
        gemv.clear_table()
        gemv.load_table(saved)
