"""16-bit products on a CPU (``kiln.kernels.cpu_linear``) against float64 references."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_linear_widened_is_a_float32_accumulated_product(dtype, monkeypatch):
    """Where float32 products are faster, a 16-bit CPU product is float32 over the exact widened
    operands, rounded once; below MIN_ROWS rows, or where native is faster, it is F.linear."""
    from kiln.kernels import cpu_linear

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, 64, generator=g).to(dtype)
    w = torch.randn(48, 64, generator=g).to(dtype)
    b = torch.randn(48, generator=g).to(dtype)
    ref = (x.double() @ w.double().t() + b.double()).to(dtype)
    for fast in (True, False):
        monkeypatch.setitem(cpu_linear._WIDEN, dtype, fast)
        y = cpu_linear.linear(x, w, b)
        assert y.dtype == dtype and y.shape == (3, 40, 48)
        if fast:
            assert torch.equal(y, torch.nn.functional.linear(x.float(), w.float(), b.float()).to(dtype))
            # one rounding of a float32 sum: at most one ulp from the exact product
            assert ((y.float() - ref.float()).abs() <= ref.float().abs() * 2 ** -7 + 1e-3).all()
        else:
            assert torch.equal(y, torch.nn.functional.linear(x, w, b))
    small = x[0, : cpu_linear.MIN_ROWS - 1]
    assert torch.equal(cpu_linear.linear(small, w), torch.nn.functional.linear(small, w))
    assert isinstance(cpu_linear.widen(dtype), bool)
