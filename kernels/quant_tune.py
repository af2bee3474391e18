"""Load-time tuning and compilation for ``kiln.kernels.quant_triton``.

A shape spec is a tuple ``(op, N, K)`` or ``(op, N, K, group_size)``: op one of
``quant_triton.OPS`` ("fp8", "fp8-static", "int8", "int4", and each with "-glu" for the fused
gate/up product of an [N = 2I, K] weight), N the weight's rows, K its columns, group_size the
int4 group (required for int4).

* ``tune(shapes, dtype, device, m_values)`` times, for each spec and M, every candidate path
  (GEMV configs of each variant, GEMM configs, ``torch._scaled_mm``, the unfused gate/up
  product) as CUDA-graph
  replays over rotating weight copies that together exceed L2 (``min_bytes``), skips those whose
  result strays from the reference, and keeps the fastest in the table the dispatch reads. The
  reference path is timed only where nothing else ran.
* ``warmup(shapes, dtype, device, max_m)`` runs the dispatch for every M in 1..max_m (with and
  or without bias, as asked), so that each kernel variant it can pick is compiled at load.

Both first probe ``torch._scaled_mm`` on this device and dtype (``probe_scaled_mm``).
"""

from __future__ import annotations

import math

import torch

from kiln.kernels import quant, triton_ops
from kiln.kernels import quant_triton as qt
from kiln.kernels.gemv import _time_calls
from kiln.kernels.quant_dot import DOT_MAX_M, dot_configs
from kiln.kernels.quant_gemm import gemm_configs
from kiln.kernels.quant_gemv import q8_configs
from kiln.kernels.quant_gemv4 import q4_configs

GEMV_MAX_M = 16  # the largest M for which GEMV configs are tried
GEMM_MIN_M = 2  # the smallest M for which GEMM configs are tried
DOT_MIN_M = 8  # the tensor-core FP8 kernel of few rows: slower than the GEMVs at 1 row on an H100 (16 vs 8 us, 4096^2)


def parse_spec(spec) -> tuple[str, int, int, int]:
    """(op, N, K, group_size) of a spec tuple (group_size 0 for fp8/int8)."""
    op, n, k, *rest = spec
    if op not in qt.OPS:
        raise ValueError(f"unknown quantized op {op!r}: one of {qt.OPS}")
    g = int(rest[0]) if rest else 0
    if qt.fmt_of(op) == "int4" and g <= 0:
        raise ValueError(f"an int4 spec needs a group size: {spec!r}")
    return op, int(n), int(k), g if qt.fmt_of(op) == "int4" else 0


def make_weights(op: str, n: int, k: int, g: int, dtype: torch.dtype, device, gen=None, random: bool = True) -> dict:
    """The weight tensors of one spec, quantized from a random normal matrix (``random``) or
    left uninitialised (enough to compile)."""
    fmt = qt.fmt_of(op)
    if not random:
        if fmt == "int4":
            return dict(qweight=torch.zeros((n, k // 2), dtype=torch.uint8, device=device),
                        scales=torch.ones((n, k // g), dtype=dtype, device=device),
                        qzeros=torch.zeros((n, k // g), dtype=torch.uint8, device=device))
        w = torch.zeros((n, k), dtype=torch.float8_e4m3fn if fmt == "fp8" else torch.int8, device=device)
        return dict(weight=w, weight_scale=torch.ones(n, dtype=torch.float32, device=device))
    w = torch.randn((n, k), device=device, dtype=torch.float32, generator=gen)
    if fmt == "fp8":
        q, s = quant.quantize_fp8_rows(w)
        out = dict(weight=q, weight_scale=s)
    elif fmt == "int8":
        q, s = quant.quantize_int8_rows(w)
        out = dict(weight=q, weight_scale=s)
    else:
        q, s, z = quant.quantize_int4(w, g, dtype)
        out = dict(qweight=q, scales=s, qzeros=z)
    del w
    return out


def weight_bytes(t: dict) -> int:
    return sum(v.numel() * v.element_size() for v in t.values())


def _input_scale(op: str, x: torch.Tensor):
    if op.startswith("fp8-static"):
        return torch.tensor([quant.fp8_input_scale(x.abs().max().item())], dtype=torch.float32, device=x.device)
    return None


def run(op: str, kind: str, cfg, x, t: dict, input_scale=None, bias=None) -> torch.Tensor:
    """One path of one op on the tensors ``t`` of ``make_weights``."""
    fmt, glu = qt.fmt_of(op), op.endswith("-glu")
    if fmt == "fp8":
        return qt.run_fp8(kind, cfg, x, t["weight"], t["weight_scale"], input_scale, bias, glu)
    if fmt == "int8":
        return qt.run_int8(kind, cfg, x, t["weight"], t["weight_scale"], bias, glu)
    return qt.run_int4(kind, cfg, x, t["qweight"], t["scales"], t["qzeros"], t["group_size"], bias, glu)


def dispatch(op: str, x, t: dict, input_scale=None, bias=None) -> torch.Tensor:
    """The public op of ``quant_triton`` for this spec (what the model calls)."""
    fmt, glu = qt.fmt_of(op), op.endswith("-glu")
    if fmt == "fp8":
        if glu:
            return qt.fp8_linear_silu_mul(x, t["weight"], t["weight_scale"], input_scale)
        return qt.fp8_linear(x, t["weight"], t["weight_scale"], input_scale, bias)
    if fmt == "int8":
        if glu:
            return qt.int8_linear_silu_mul(x, t["weight"], t["weight_scale"])
        return qt.int8_linear(x, t["weight"], t["weight_scale"], bias)
    if glu:
        return qt.int4_linear_silu_mul(x, t["qweight"], t["scales"], t["qzeros"], t["group_size"])
    return qt.int4_linear(x, t["qweight"], t["scales"], t["qzeros"], t["group_size"], None, bias)


def reference(op: str, x, t: dict, input_scale=None, bias=None) -> torch.Tensor:
    """The ``quant.*_ref`` result for this spec (float32 math on x's device)."""
    fmt, glu = qt.fmt_of(op), op.endswith("-glu")
    if fmt == "fp8":
        if glu:
            return quant.fp8_linear_silu_mul_ref(x, t["weight"], t["weight_scale"], input_scale)
        return quant.fp8_linear_ref(x, t["weight"], t["weight_scale"], input_scale, bias)
    if fmt == "int8":
        if glu:
            return quant.int8_linear_silu_mul_ref(x, t["weight"], t["weight_scale"])
        return quant.int8_linear_ref(x, t["weight"], t["weight_scale"], bias)
    if glu:
        return quant.int4_linear_silu_mul_ref(x, t["qweight"], t["scales"], t["qzeros"], t["group_size"])
    return quant.int4_linear_ref(x, t["qweight"], t["scales"], t["qzeros"], t["group_size"], None, bias)


def reference_for(kind: str, op: str, x, t: dict, input_scale=None, bias=None) -> torch.Tensor:
    """What path ``kind`` computes: the op's reference, or for the weight-only FP8 GEMV the
    product with the widened weights and x as it is (``int8_linear_ref``'s math)."""
    if kind != "gemv-wo":
        return reference(op, x, t, input_scale, bias)
    if op.endswith("-glu"):
        return quant.int8_linear_silu_mul_ref(x, t["weight"], t["weight_scale"])
    return quant.int8_linear_ref(x, t["weight"], t["weight_scale"], bias)


def candidates(op: str, m: int, dtype: torch.dtype, g: int, full: bool = False) -> list[tuple]:
    """The (kind, config) pairs ``tune`` tries for this op at M rows."""
    fmt, glu = qt.fmt_of(op), op.endswith("-glu")
    out = []
    if m <= GEMV_MAX_M:
        cfgs = q4_configs(m, g, full) if fmt == "int4" else q8_configs(m, full)
        out += [("gemv", c) for c in cfgs]
        if fmt == "fp8":
            out += [("gemv-pre", c) for c in cfgs]
            if m <= qt.WO_MAX_M:
                out += [("gemv-wo", c) for c in cfgs]
        if fmt == "int4":
            out += [("gemv-acc", c) for c in q4_configs(m, g, full, acc=True)]
    if fmt == "fp8" and DOT_MIN_M <= m <= DOT_MAX_M:
        out += [("dot", c) for c in dot_configs(m, glu, full)]
    if glu:
        return out + [("unfused", None)]
    if m >= GEMM_MIN_M and (fmt == "fp8" or dtype != torch.float32):
        out += [("gemm", c) for c in gemm_configs(m, fmt, g, full)]
    if fmt == "fp8" and qt._SCALED_MM_OK.get((dtype, False), False):
        out.append(("scaled_mm", None))
    return out


def probe_scaled_mm(dtype: torch.dtype, device) -> dict:
    """Whether ``torch._scaled_mm`` (rowwise scales) runs and matches the reference for x of
    ``dtype``, without and with a bias; recorded for the dispatch."""
    from kiln.kernels.quant_gemm import quantize_fp8, scaled_mm

    gen = torch.Generator(device=device).manual_seed(1)
    w, ws = quant.quantize_fp8_rows(torch.randn((64, 128), device=device, generator=gen))
    x = torch.randn((32, 128), device=device, generator=gen).to(dtype)
    b = torch.randn(64, device=device, generator=gen).to(dtype)
    res = {}
    for bias in (None, b):
        try:
            xq, sx = quantize_fp8(x)
            y = scaled_mm(xq, sx, w, ws, bias, dtype)
            ref = quant.fp8_linear_ref(x, w, ws, None, bias)
            ok = bool(y.dtype == dtype and _rel_err(y, ref.float()) < 1e-2)
        except Exception:  # noqa: BLE001 - an unsupported case raises before any launch
            ok = False
        qt.record_scaled_mm(dtype, bias is not None, ok)
        res[bias is not None] = ok
    return res


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def tune(shapes, dtype: torch.dtype = torch.bfloat16, device="cuda", m_values=(1, 2, 4, 8, 16, 64, 256), *,
         full: bool = False, reps: int = 20, min_bytes: int = 256 << 20, baseline: bool = False,
         verbose: bool = False) -> list[dict]:
    """Tunes each spec of ``shapes`` at each M of ``m_values`` (see the module docstring).
    ``full`` tries every fitting config instead of the default candidates; ``baseline`` also
    times the 16-bit ``F.linear`` of the same shape (cuBLAS) for comparison. Returns the rows
    added to ``quant_triton.tuned_table()``."""
    device = torch.device(device)
    assert device.type == "cuda" and triton_ops.available(), "tuning needs a CUDA device and triton"
    assert not torch.cuda.is_current_stream_capturing(), "tune() cannot run inside a CUDA-graph capture"
    specs = sorted({parse_spec(s) for s in shapes}, key=lambda s: (s[0].endswith("-glu"), s))
    rows = []
    with torch.cuda.device(device):
        if any(qt.fmt_of(s[0]) == "fp8" for s in specs):
            probe_scaled_mm(dtype, device)
        gen = torch.Generator(device=device).manual_seed(0)
        for op, n, k, g in specs:
            rows += _tune_spec(op, n, k, g, dtype, device, gen, m_values, full, reps, min_bytes, baseline, verbose)
            torch.cuda.empty_cache()
    return rows


def _tune_spec(op, n, k, g, dtype, device, gen, m_values, full, reps, min_bytes, baseline, verbose) -> list[dict]:
    import torch.nn.functional as F

    from kiln.kernels.activation import silu_and_mul

    glu = op.endswith("-glu")
    t0 = make_weights(op, n, k, g, dtype, device, gen)
    if g:
        t0["group_size"] = g
    tensors = {key: v for key, v in t0.items() if torch.is_tensor(v)}
    wbytes = weight_bytes(tensors)
    copies = [t0] + [dict(t0, **{key: v.clone() for key, v in tensors.items()})
                     for _ in range(max(2, math.ceil(min_bytes / wbytes)) - 1)]
    w16 = None
    if baseline:
        n16 = max(2, math.ceil(min_bytes / (n * k * dtype.itemsize)))
        w16 = [torch.randn((n, k), device=device, dtype=dtype, generator=gen) for _ in range(n16)]
    rows = []
    for m in m_values:
        m = int(m)
        x = torch.randn((m, k), device=device, dtype=dtype, generator=gen)
        xs = _input_scale(op, x)
        refs = {}
        best: dict[str, tuple] = {}
        tried = 0
        cands = candidates(op, m, dtype, g, full)
        for kind, cfg in cands + [("torch", None)]:
            if kind == "torch" and best:
                continue
            try:
                if kind not in refs:
                    refs[kind] = reference_for(kind, op, x, t0, xs)
                err = _rel_err(run(op, kind, cfg, x, t0, xs), refs[kind])
                if not err < 1e-2:
                    if verbose:
                        print(f"  {op} M={m} {qt.choice_name(kind, cfg)}: relative error {err:.2e}, skipped")
                    continue
                us = _time_calls([lambda t=t: run(op, kind, cfg, x, t, xs) for t in copies], reps)
            except Exception as e:  # noqa: BLE001 - a config out of resources, say
                if verbose:
                    print(f"  {op} M={m} {qt.choice_name(kind, cfg)}: {type(e).__name__}: {str(e)[:160]}")
                continue
            tried += 1
            if verbose:
                print(f"  {op} M={m} N={n} K={k} {qt.choice_name(kind, cfg)}: {us:.2f} us")
            if kind not in best or us < best[kind][1]:
                best[kind] = (cfg, us)
        if not best:
            raise RuntimeError(f"no path of {op} ran for M={m} N={n} K={k}")
        kind, (cfg, us) = min(best.items(), key=lambda kv: kv[1][1])
        row = dict(op=op, shape=[m, n, k], dtype=qt._dtype_name(dtype), group_size=g,
                   choice=qt.choice_name(kind, cfg), us=round(us, 2), weight_bytes=wbytes,
                   weight_gb_s=round(wbytes / us / 1e3, 1), configs_timed=tried, weight_copies=len(copies))
        for kd, (c, t_us) in best.items():
            row[f"{kd}_us"] = round(t_us, 2)
            if c is not None:
                row[f"{kd}_config"] = c.name
        if w16 is not None:
            if glu:
                fns = [lambda w=w: silu_and_mul(F.linear(x, w)) for w in w16]
            else:
                fns = [lambda w=w: F.linear(x, w) for w in w16]
            row["bf16_us" if dtype == torch.bfloat16 else "dense_us"] = round(_time_calls(fns, reps), 2)
        qt.set_choice(op, m, n, k, dtype, g, row["choice"], row)
        rows.append(row)
        if verbose:
            print(row)
    del copies, w16
    return rows


def warmup(shapes, dtype: torch.dtype = torch.bfloat16, device="cuda", max_m: int = 8, *, bias=False,
           m_values=None) -> int:
    """Runs the dispatch of each spec for every M in 1..max_m (or ``m_values``), so that every
    kernel variant it can pick is compiled before serving. ``bias``: False, True or "both"
    (projections with a bias compile their own variants). Returns the number of calls made."""
    device = torch.device(device)
    if device.type != "cuda" or not triton_ops.available():
        return 0
    assert not torch.cuda.is_current_stream_capturing(), "warmup() cannot run inside a CUDA-graph capture"
    specs = sorted({parse_spec(s) for s in shapes})
    biases = (False, True) if bias == "both" else (bool(bias),)
    ms = sorted({int(m) for m in (m_values if m_values is not None else range(1, int(max_m) + 1))})
    calls = 0
    with torch.cuda.device(device):
        if any(qt.fmt_of(s[0]) == "fp8" for s in specs) and (dtype, False) not in qt._SCALED_MM_OK:
            probe_scaled_mm(dtype, device)
        for op, n, k, g in specs:
            t = make_weights(op, n, k, g, dtype, device, random=False)
            if g:
                t["group_size"] = g
            glu = op.endswith("-glu")
            for m in ms:
                x = torch.randn((m, k), device=device, dtype=dtype)
                xs = torch.ones(1, dtype=torch.float32, device=device) if op.startswith("fp8-static") else None
                for with_bias in ((False,) if glu else biases):
                    b = torch.zeros(n, dtype=dtype, device=device) if with_bias else None
                    dispatch(op, x, t, xs, b)
                    calls += 1
            del t
        torch.cuda.synchronize(device)
    return calls
