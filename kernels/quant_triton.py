"""The GPU paths of kiln's quantized linears (``kiln.kernels.quant`` dispatches here for CUDA
tensors). Every function takes x [M, K] (bfloat16, float16 or float32) and returns [M, N] in
x's dtype with the semantics of the matching ``quant.*_ref``:

* ``fp8_linear(x, weight, weight_scale, input_scale=None, bias=None)``
* ``int8_linear(x, weight, weight_scale, bias=None)``
* ``int4_linear(x, qweight, scales, qzeros, group_size, input_perm=None, bias=None)``
* ``fp8_linear_silu_mul`` / ``int8_linear_silu_mul`` / ``int4_linear_silu_mul``: the same for a
  fused [2I, K] gate/up weight followed by ``silu_and_mul`` -> [M, I].

Each call takes one of these paths, by the tuned table (``tune``) or, for shapes not tuned,
by a default rule:

* ``gemv``: the Triton GEMV of ``kiln.kernels.quant_gemv`` / ``quant_gemv4`` (default for
  M <= 4; for the ``*_silu_mul`` ops its fused gate/up variant);
* ``gemv-pre`` (FP8): ``quantize_fp8`` once, then the GEMV on x_q (no per-program quantization);
* ``gemv-wo`` (FP8, M <= ``WO_MAX_M``, tuned only): the weight-only GEMV, E4M3 weights widened
  and multiplied with x unquantized (``quant.int8_linear_ref``'s math on FP8 weights): at batch
  1-2 the product is bound by the weight read and quantizing x buys nothing;
* ``gemv-acc`` (INT4): the GEMV variant that accumulates the exact dequantized weights;
* ``dot`` (FP8, M <= ``quant_dot.DOT_MAX_M``, tuned only): ``kiln.kernels.quant_dot``, the
  weight tile straight into the tensor cores against the x rows quantized in the kernel (also
  fused gate/up);
* ``gemm``: ``quant_gemm.q_gemm`` on tensor cores (FP8 through ``quantize_fp8``; INT8/INT4
  with 16-bit x; default for M > 4 where ``scaled_mm`` does not apply);
* ``scaled_mm``: FP8 only, ``quantize_fp8`` then ``torch._scaled_mm`` (default for M > 4 with
  bfloat16 x, unless the probe run by ``tune``/``warmup`` found it unusable for that case);
* ``unfused``: ``*_silu_mul`` as the linear and then ``silu_and_mul``;
* ``torch``: the reference itself, on the device (float32 x where no kernel takes it, weights
  not in a kernel's layout, ``KILN_QUANT_TRITON=0``).

The dispatch reads only the table and tensor metadata: no synchronisation and no allocation
beyond outputs and scratch, so every path can be captured in a CUDA graph. Nothing compiles
at request time once ``warmup`` (``kiln.kernels.quant_tune``) has run each M the engine uses.
Table keys are (op, M, N, K, dtype, group size), op one of ``OPS`` (N: the weight's rows, so
2I for the fused gate/up ops).
"""

from __future__ import annotations

import os

import torch

from kiln.kernels import quant, triton_ops
from kiln.kernels.quant_dot import DotConfig, fp8_dot
from kiln.kernels.quant_gemm import GEMM_CONFIGS, GemmConfig, gemm_fits, q_gemm, quantize_fp8, scaled_mm
from kiln.kernels.quant_gemv import GemvConfig, q8_fits, q8_gemv
from kiln.kernels.quant_gemv4 import group_fits, q4_configs, q4_fits, q4_gemv

BASE_OPS = ("fp8", "fp8-static", "int8", "int4")
OPS = BASE_OPS + tuple(f"{o}-glu" for o in BASE_OPS)
KINDS = ("gemv", "gemv-pre", "gemv-wo", "gemv-acc", "dot", "gemm", "scaled_mm", "unfused", "torch")
GEMV_KINDS = ("gemv", "gemv-pre", "gemv-wo", "gemv-acc")
WO_MAX_M = 2  # the largest M for which the weight-only FP8 GEMV is a candidate
GEMV_DEFAULT_MAX_M = 4

_CHOICE: dict[tuple, tuple] = {}  # key -> (kind, config or None)
_ROWS: dict[tuple, dict] = {}
_DEFAULT: dict[tuple, tuple] = {}
_SCALED_MM_OK: dict[tuple, bool] = {}  # (x dtype, has bias) -> whether torch._scaled_mm serves it


def _enabled() -> bool:
    return os.environ.get("KILN_QUANT_TRITON", "1") != "0"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def fmt_of(op: str) -> str:
    """"fp8", "int8" or "int4": the weight format of an op."""
    return op.removesuffix("-glu").removesuffix("-static")


# ----------------------------------------------------------------------------------------------
# Choices: names, defaults, the table
# ----------------------------------------------------------------------------------------------


def choice_name(kind: str, cfg=None) -> str:
    return kind if cfg is None else f"{kind}:{cfg.name}"


def parse_choice(name: str) -> tuple:
    kind, _, cfg = name.partition(":")
    if kind not in KINDS:
        raise ValueError(f"not a quantized-linear choice: {name!r}")
    if kind in GEMV_KINDS:
        return kind, GemvConfig.parse(cfg)
    if kind == "gemm":
        return kind, GemmConfig.parse(cfg)
    if kind == "dot":
        return kind, DotConfig.parse(cfg)
    return kind, None


_GEMV_DEFAULT = {
    "q8": {1: GemvConfig(4, 2048, 4, 2, 1), 2: GemvConfig(4, 2048, 4, 1, 2), 4: GemvConfig(4, 1024, 4, 1, 4)},
    "q4": {1: GemvConfig(4, 2048, 4, 2, 1), 2: GemvConfig(4, 2048, 8, 1, 2), 4: GemvConfig(4, 1024, 4, 1, 4)},
}


def default_gemv(fmt: str, m: int, group_size: int = 0):
    """The GEMV config used for M rows where nothing is tuned (None if none fits the group size)."""
    c = _GEMV_DEFAULT["q4" if fmt == "int4" else "q8"][1 if m <= 1 else 2 if m == 2 else 4]
    if fmt != "int4":
        return c if q8_fits(c, m) else None
    if q4_fits(c, m, group_size):
        return c
    fits = q4_configs(m, group_size)
    return fits[0] if fits else None


def default_gemm(fmt: str, m: int, group_size: int = 0):
    """The GEMM config used for M rows where nothing is tuned (None if none fits)."""
    target = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
    fits = [c for c in GEMM_CONFIGS if gemm_fits(c, m, fmt, group_size)]
    same = [c for c in fits if c.block_m == target]
    return (same or fits or [None])[0]


def _default(op: str, m: int, dtype: torch.dtype, g: int, has_bias: bool) -> tuple:
    key = (op, m, dtype, g, has_bias)
    hit = _DEFAULT.get(key)
    if hit is not None:
        return hit
    fmt, glu = fmt_of(op), op.endswith("-glu")
    out = None
    if m <= GEMV_DEFAULT_MAX_M:
        cfg = default_gemv(fmt, m, g)
        if cfg is not None:
            out = ("gemv", cfg)
    if out is None and glu:
        out = ("unfused", None)
    if out is None and fmt == "fp8" and dtype == torch.bfloat16 and _SCALED_MM_OK.get((dtype, has_bias), True):
        out = ("scaled_mm", None)
    if out is None and (fmt == "fp8" or dtype != torch.float32):
        cfg = default_gemm(fmt, m, g)
        if cfg is not None:
            out = ("gemm", cfg)
    if out is None:
        out = ("torch", None)
    _DEFAULT[key] = out
    return out


def choose(op: str, m: int, n: int, k: int, dtype: torch.dtype, group_size: int = 0, has_bias: bool = False) -> tuple:
    """(kind, config) for this call: the tuned choice, else the default rule."""
    hit = _CHOICE.get((op, m, n, k, dtype, group_size))
    if hit is not None:
        if hit[0] == "scaled_mm" and not _SCALED_MM_OK.get((dtype, has_bias), True):
            return "gemm", default_gemm("fp8", m)
        return hit
    return _default(op, m, dtype, group_size, has_bias)


def tuned_table() -> list[dict]:
    """One row per tuned (op, M, N, K, dtype, group size): op, shape [M, N, K], dtype,
    group_size, choice (e.g. "gemv:n4k2048w4s2r1", "gemv-pre:n8k2048w4s1r1",
    "gemm:m64n128k64w4s4g8", "scaled_mm", "unfused", "torch"), us, weight_gb_s, and the best time
    of each kind tried (``<kind>_us``, ``<kind>_config``)."""
    return [dict(r) for r in _ROWS.values()]


def load_table(rows) -> None:
    """Puts back rows of ``tuned_table()``."""
    for r in rows:
        m, n, k = (int(v) for v in r["shape"])
        key = (r["op"], m, n, k, getattr(torch, r["dtype"]), int(r.get("group_size") or 0))
        _CHOICE[key] = parse_choice(r["choice"])
        _ROWS[key] = dict(r)


def clear_table() -> None:
    _CHOICE.clear()
    _ROWS.clear()
    _DEFAULT.clear()


def set_choice(op: str, m: int, n: int, k: int, dtype: torch.dtype, group_size: int, choice: str, row=None) -> None:
    key = (op, m, n, k, dtype, int(group_size))
    _CHOICE[key] = parse_choice(choice)
    _ROWS[key] = dict(row) if row is not None else dict(
        op=op, shape=[m, n, k], dtype=_dtype_name(dtype), group_size=int(group_size), choice=choice)


def record_scaled_mm(dtype: torch.dtype, has_bias: bool, ok: bool) -> None:
    """Notes whether ``torch._scaled_mm`` serves x of this dtype (with or without bias)."""
    _SCALED_MM_OK[(dtype, has_bias)] = bool(ok)
    _DEFAULT.clear()


# ----------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _usable(x, *tensors) -> bool:
    """Whether the Triton paths take these tensors: CUDA, Triton there, unit stride along K."""
    if not (x.is_cuda and _enabled() and triton_ops.available() and x.dtype in (torch.bfloat16, torch.float16,
                                                                                 torch.float32)):
        return False
    return all(t.dim() == 2 and t.stride(-1) == 1 and t.device == x.device for t in tensors)


def _bias_ok(bias) -> bool:
    return bias is None or (bias.dim() == 1 and bias.is_contiguous())


def _vec_ok(v) -> bool:
    return v.dim() == 1 and v.is_contiguous() and v.dtype == torch.float32


def run_fp8(kind, cfg, x, weight, weight_scale, input_scale=None, bias=None, glu=False) -> torch.Tensor:
    """One FP8 path, chosen by the caller (tests, tuning)."""
    if kind == "gemv":
        return q8_gemv(x, weight, weight_scale, cfg, fp8=True, input_scale=input_scale, bias=bias, glu=glu)
    if kind == "gemv-wo":
        return q8_gemv(x, weight, weight_scale, cfg, fp8=True, bias=bias, glu=glu, weight_only=True)
    if kind == "dot":
        return fp8_dot(x, weight, weight_scale, cfg, input_scale=input_scale, bias=bias, glu=glu)
    if kind == "gemv-pre":
        xq, sx = quantize_fp8(x, input_scale)
        return q8_gemv(xq, weight, weight_scale, cfg, fp8=True, bias=bias, glu=glu, x_scale=sx, out_dtype=x.dtype)
    if glu:
        return _silu_mul(run_fp8(kind, cfg, x, weight, weight_scale, input_scale) if kind != "unfused"
                         else fp8_linear(x, weight, weight_scale, input_scale))
    if kind in ("scaled_mm", "gemm"):
        xq, sx = quantize_fp8(x, input_scale)
        if kind == "scaled_mm":
            return scaled_mm(xq, sx, weight, weight_scale, bias, x.dtype)
        return q_gemm(xq, weight, weight_scale, cfg, fmt="fp8", x_scale=sx, bias=bias, out_dtype=x.dtype)
    return quant.fp8_linear_ref(x, weight, weight_scale, input_scale, bias)


def run_int8(kind, cfg, x, weight, weight_scale, bias=None, glu=False) -> torch.Tensor:
    """One INT8 path, chosen by the caller."""
    if kind == "gemv":
        return q8_gemv(x, weight, weight_scale, cfg, fp8=False, bias=bias, glu=glu)
    if glu:
        return _silu_mul(run_int8(kind, cfg, x, weight, weight_scale) if kind != "unfused"
                         else int8_linear(x, weight, weight_scale))
    if kind == "gemm":
        return q_gemm(x, weight, weight_scale, cfg, fmt="int8", bias=bias)
    return quant.int8_linear_ref(x, weight, weight_scale, bias)


def run_int4(kind, cfg, x, qweight, scales, qzeros, group_size, bias=None, glu=False) -> torch.Tensor:
    """One INT4 path, chosen by the caller; x already permuted (``input_perm`` applied)."""
    if kind in ("gemv", "gemv-acc"):
        return q4_gemv(x, qweight, scales, qzeros, group_size, cfg, bias=bias, glu=glu, acc=kind == "gemv-acc")
    if glu:
        return _silu_mul(run_int4(kind, cfg, x, qweight, scales, qzeros, group_size) if kind != "unfused"
                         else int4_linear(x, qweight, scales, qzeros, group_size))
    if kind == "gemm":
        return q_gemm(x, qweight, scales, cfg, fmt="int4", zeros=qzeros, group_size=group_size, bias=bias)
    return quant.int4_linear_ref(x, qweight, scales, qzeros, group_size, None, bias)


def _silu_mul(y: torch.Tensor) -> torch.Tensor:
    from kiln.kernels.activation import silu_and_mul

    return silu_and_mul(y)


def _fp8_call(x, weight, weight_scale, input_scale, bias, glu):
    x = _rows(x)
    m, k = x.shape
    n = weight.shape[0]
    ok = (_usable(x, weight) and weight.dtype == torch.float8_e4m3fn and _vec_ok(weight_scale) and _bias_ok(bias)
          and (input_scale is None or (input_scale.dtype == torch.float32 and input_scale.numel() == 1)))
    op = ("fp8" if input_scale is None else "fp8-static") + ("-glu" if glu else "")
    kind, cfg = choose(op, m, n, k, x.dtype, 0, bias is not None) if ok else ("torch", None)
    if kind == "torch" and glu:
        return quant.fp8_linear_silu_mul_ref(x, weight, weight_scale, input_scale)
    return run_fp8(kind, cfg, x, weight, weight_scale, input_scale, bias, glu)


def fp8_linear(x, weight, weight_scale, input_scale=None, bias=None) -> torch.Tensor:
    """``quant.fp8_linear_ref`` on the GPU paths."""
    return _fp8_call(x, weight, weight_scale, input_scale, bias, False)


def fp8_linear_silu_mul(x, weight, weight_scale, input_scale=None) -> torch.Tensor:
    """``quant.fp8_linear_silu_mul_ref`` (a fused [2I, K] gate/up weight) on the GPU paths."""
    return _fp8_call(x, weight, weight_scale, input_scale, None, True)


def _int8_call(x, weight, weight_scale, bias, glu):
    x = _rows(x)
    m, k = x.shape
    n = weight.shape[0]
    ok = _usable(x, weight) and weight.dtype == torch.int8 and _vec_ok(weight_scale) and _bias_ok(bias)
    kind, cfg = choose("int8-glu" if glu else "int8", m, n, k, x.dtype, 0, bias is not None) if ok else ("torch", None)
    if kind == "torch" and glu:
        return quant.int8_linear_silu_mul_ref(x, weight, weight_scale)
    return run_int8(kind, cfg, x, weight, weight_scale, bias, glu)


def int8_linear(x, weight, weight_scale, bias=None) -> torch.Tensor:
    """``quant.int8_linear_ref`` on the GPU paths."""
    return _int8_call(x, weight, weight_scale, bias, False)


def int8_linear_silu_mul(x, weight, weight_scale) -> torch.Tensor:
    """``quant.int8_linear_silu_mul_ref`` on the GPU paths."""
    return _int8_call(x, weight, weight_scale, None, True)


def _int4_call(x, qweight, scales, qzeros, group_size, input_perm, bias, glu):
    x = _rows(x)
    g = int(group_size)
    if input_perm is not None:
        x = x.index_select(1, input_perm)
    m, k = x.shape
    n = qweight.shape[0]
    ok = (_usable(x, qweight, scales, qzeros) and qweight.dtype == torch.uint8 and qzeros.dtype == torch.uint8
          and _bias_ok(bias) and k % g == 0 and 2 * qweight.shape[1] == k)
    kind, cfg = choose("int4-glu" if glu else "int4", m, n, k, x.dtype, g, bias is not None) if ok else ("torch", None)
    if (kind in ("gemv", "gemv-acc") and not group_fits(cfg.block_k, g)) or (kind == "gemm" and g % cfg.block_k):
        kind, cfg = "torch", None
    if kind == "torch" and glu:
        return quant.int4_linear_silu_mul_ref(x, qweight, scales, qzeros, g)
    return run_int4(kind, cfg, x, qweight, scales, qzeros, g, bias, glu)


def int4_linear(x, qweight, scales, qzeros, group_size, input_perm=None, bias=None) -> torch.Tensor:
    """``quant.int4_linear_ref`` on the GPU paths (``input_perm`` applied to x once, first)."""
    return _int4_call(x, qweight, scales, qzeros, group_size, input_perm, bias, False)


def int4_linear_silu_mul(x, qweight, scales, qzeros, group_size, input_perm=None) -> torch.Tensor:
    """``quant.int4_linear_silu_mul_ref`` on the GPU paths."""
    return _int4_call(x, qweight, scales, qzeros, group_size, input_perm, None, True)


def tune(shapes, dtype=torch.bfloat16, device="cuda", m_values=(1, 2, 4, 8, 16, 64, 256), **kw) -> list[dict]:
    """Times the candidate paths of each shape at each M and keeps the fastest in the table;
    see ``kiln.kernels.quant_tune.tune``."""
    from kiln.kernels import quant_tune

    return quant_tune.tune(shapes, dtype, device, m_values, **kw)


def warmup(shapes, dtype=torch.bfloat16, device="cuda", max_m: int = 8, **kw) -> int:
    """Compiles every kernel variant the dispatch picks for M = 1..max_m; see
    ``kiln.kernels.quant_tune.warmup``."""
    from kiln.kernels import quant_tune

    return quant_tune.warmup(shapes, dtype, device, max_m, **kw)
