"""Fast GPU paths written in Triton. ``available()`` is False where Triton or CUDA is missing.

Every op takes the same arguments as its plain-torch reference and returns the same thing:

* ``rms_norm`` / ``add_rms_norm``: one program per row (the last dimension), float32 sums.
* ``silu_and_mul``: [.., 2I] -> [.., I].

The attention layer's kernels (the fused rotary embedding + KV-cache write and paged attention,
16-bit or float8_e4m3fn caches) are in ``kiln.kernels.triton_attention``; their names are also
reachable here (``triton_ops.paged_attention`` and so on) for older callers.

The launchers also work on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``).

On Hopper and later every kernel here is launched with programmatic dependent launch (PDL):
the next kernel in the stream may start while the current one drains, and waits
(``griddepcontrol.wait``) before it touches anything the current one writes. Each kernel calls
``_gdc_enter`` before its first load of an activation (the GEMV loads its first weight tiles
before it), so a chain of kernels, or a CUDA graph of them, overlaps one kernel's tail with the
next one's launch. Every program of every kernel waits, even one that returns early, so a
kernel finishes only after its predecessor has. ``KILN_PDL=0`` turns it off.

``KILN_LOG_COMPILES=1`` prints a line to stderr for every kernel Triton compiles in the process
(name, specialization, time), so a compilation on a request's path shows in the server log.
"""

import functools
import os

import torch

try:
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
    _jit = triton.jit
except ImportError:  # the kernels below are then never launched
    triton = None
    _HAVE_TRITON = False

    class tl:  # noqa: N801 - stands in for triton.language so the signatures still parse
        constexpr = None

    def _jit(fn):
        return fn


def _jit_runtime_ints(*names):
    """``triton.jit`` that does not specialize the integer arguments ``names`` (Triton would
    otherwise compile a variant for a value of 1 and for multiples of 16): a kernel whose launch
    passes a length-dependent count there compiles once, at load, not on a request's path."""
    if not _HAVE_TRITON:
        return _jit
    return triton.jit(do_not_specialize=list(names))


@functools.lru_cache(maxsize=None)
def available() -> bool:
    if not _HAVE_TRITON:
        return False
    try:
        return torch.cuda.is_available()
    except Exception:
        return False


_LOG2E = 1.4426950408889634


def _log_compiles() -> None:
    import sys
    import time

    def specialization(kw) -> str:
        """The argument types and the values or properties Triton compiled this variant for."""
        try:
            names = list(kw["fn"].jit_function.arg_names)
            comp = kw["compile"]
            sig = comp.get("signature") or {}
            parts = [f"{k}:{v}" for k, v in (sig.items() if isinstance(sig, dict) else [])]
            consts = comp.get("constants") or {}
            parts += [f"{names[k[0]] if isinstance(k, tuple) and k and isinstance(k[0], int) else k}={v}"
                      for k, v in consts.items()]
            for attrs in (comp.get("configs") or [{}])[:1]:
                for k, v in (attrs.items() if isinstance(attrs, dict) else []):
                    arg = names[k[0]] if isinstance(k, tuple) and k and isinstance(k[0], int) else k
                    parts.append(f"{arg}~{v}")
            return " ".join(parts)
        except Exception as exc:  # noqa: BLE001 - a log line must never break a compile
            return f"(specialization unavailable: {type(exc).__name__})"

    def hook(*args, **kw):
        if not kw.get("is_manual_warmup", False):
            print(f"kiln: triton compiled at {time.time():.3f}: {kw.get('repr', '?')[:200]} | {specialization(kw)[:1500]}",
                  file=sys.stderr, flush=True)
        return False

    try:
        triton.knobs.runtime.jit_post_compile_hook = hook
    except AttributeError:  # a Triton without knobs
        triton.runtime.jit.JITFunction.compiled_hook = hook


if _HAVE_TRITON and os.environ.get("KILN_LOG_COMPILES") == "1":
    _log_compiles()


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def _sm_count(index) -> int:
    if index is None:
        return 8
    return torch.cuda.get_device_properties(index).multi_processor_count


_PDL_ENV = os.environ.get("KILN_PDL", "1") != "0"


@functools.lru_cache(maxsize=None)
def _pdl_capable(index) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl(t: torch.Tensor) -> bool:
    """Whether kernels on t's device launch with programmatic dependent launch (sm_90 and later,
    not under the interpreter, not with ``KILN_PDL=0``)."""
    return _PDL_ENV and t.is_cuda and _pdl_capable(t.device.index)


def launch_opts(t: torch.Tensor) -> dict:
    """The keyword arguments of a launch on t's device: the kernel's PDL flag and Triton's."""
    on = pdl(t)
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


@_jit
def _gdc_enter(PDL: tl.constexpr):
    """Waits until the previous kernel in the stream has finished and its writes are visible,
    then lets the next kernel launch. A no-op without PDL."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


# ----------------------------------------------------------------------------------------------
# RMSNorm
# ----------------------------------------------------------------------------------------------


@_jit
def _rms_norm_kernel(
    x_ptr, r_ptr, w_ptr, out_ptr, res_out_ptr, n_cols, n_inner,
    sx0, sx1, sr0, sr1, eps,
    HAS_RES: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False,
):
    _gdc_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    i0 = row // n_inner
    i1 = row % n_inner
    cols = tl.arange(0, BLOCK)
    m = cols < n_cols
    x = tl.load(x_ptr + i0 * sx0 + i1 * sx1 + cols, mask=m, other=0.0)
    if HAS_RES:
        r = tl.load(r_ptr + i0 * sr0 + i1 * sr1 + cols, mask=m, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * n_cols + cols, x, mask=m)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    y = (xf * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, (y * w).to(out_ptr.dtype.element_ty), mask=m)


def _rows(x: torch.Tensor):
    """(tensor, rows per outer index, outer stride, inner stride) addressing the rows of x."""
    if x.stride(-1) != 1 or x.dim() > 3:
        x = x.contiguous()
    if x.dim() == 1:
        x = x.unsqueeze(0)
    if x.dim() == 2:
        return x, 1, x.stride(0), 0
    return x, x.shape[1], x.stride(0), x.stride(1)


def _norm_warps(block: int) -> int:
    return min(16, max(1, block // 512))


def _rms_norm_launch(x, residual, weight, eps):
    h = x.shape[-1]
    res_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    out_dtype = torch.promote_types(weight.dtype, res_dtype)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    res_out = torch.empty(x.shape, dtype=res_dtype, device=x.device) if residual is not None else out
    if x.numel() == 0:
        return out, res_out
    xr, inner, sx0, sx1 = _rows(x)
    if residual is not None:
        rr, _, sr0, sr1 = _rows(residual.expand(x.shape))
    else:
        rr, sr0, sr1 = xr, 0, 0
    block = _pow2(h)
    _rms_norm_kernel[(x.numel() // h,)](
        xr, rr, weight.contiguous(), out, res_out, h, inner, sx0, sx1, sr0, sr1, float(eps),
        HAS_RES=residual is not None, BLOCK=block, num_warps=_norm_warps(block), **launch_opts(x),
    )
    return out, res_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _rms_norm_launch(x, None, weight, eps)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    return _rms_norm_launch(x, residual, weight, eps)


# ----------------------------------------------------------------------------------------------
# SiLU and multiply
# ----------------------------------------------------------------------------------------------


@_jit
def _silu_mul_kernel(x_ptr, out_ptr, n, sx, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    _gdc_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < n
    g = tl.load(x_ptr + row * sx + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * sx + n + cols, mask=m, other=0.0)
    s = (g / (1.0 + tl.exp(-g))).to(u.dtype).to(tl.float32)
    tl.store(out_ptr + row * n + cols, (s * u.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=m)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[-1] // 2
    out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    x2 = x.reshape(-1, 2 * n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    block = min(_pow2(n), 2048)
    _silu_mul_kernel[(x2.shape[0], _cdiv(n, block))](x2, out, n, x2.stride(0), BLOCK=block, num_warps=4, **launch_opts(x2))
    return out


_ATTENTION_NAMES = frozenset({"rotary_write_kv", "paged_attention", "launch_decode", "launch_prefill",
                              "decode_num_splits"})


def __getattr__(name):
    """The attention launchers, which live in ``kiln.kernels.triton_attention`` (imported on first
    use, since that module itself imports this one)."""
    if name in _ATTENTION_NAMES:
        from kiln.kernels import triton_attention

        return getattr(triton_attention, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
