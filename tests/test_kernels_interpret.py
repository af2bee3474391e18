"""The Triton kernels against their plain-torch references, on the CPU under Triton's interpreter.

Triton decides at import time whether kernels are compiled or interpreted, so these checks need a
process where ``TRITON_INTERPRET=1`` was set before Triton was first imported. Run directly as
``TRITON_INTERPRET=1 pytest tests/test_kernels_interpret.py`` the tests below run in-process;
in any other pytest run they are skipped and ``test_interpreter_suite`` runs this file in a child
process with the variable set, failing if any check there fails.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
in_child = pytest.mark.skipif(not INTERPRET, reason="runs in the TRITON_INTERPRET=1 child process")

from kiln.kernels.activation import silu_and_mul_ref  # noqa: E402
from kiln.kernels.moe import moe_forward_ref, route  # noqa: E402
from kiln.kernels.moe_triton import align, moe_forward_fused, moe_forward_gemv  # noqa: E402
from kiln.kernels.attention import KV_FP8_DTYPE, paged_attention_ref, quantize_kv, rotary_write_kv_ref  # noqa: E402
from kiln.kernels.norm import add_rms_norm_ref, rms_norm_ref  # noqa: E402

from kernel_cases import fused_qkv_views, make_paged_case, make_rotary_kv_case  # noqa: E402



def _patch_interpreter():
    """Three gaps of Triton's interpreter, closed for this process only:
    it turns loop bounds into ints with ``int(array)``, which NumPy 2 refuses for the one-element
    arrays that hold its scalars (take the element instead); its ``tl.dot`` multiplies the raw
    bits of bfloat16 operands (widen them to float32 first, as the tensor cores do); and its
    float32 -> float8e4nv cast is not round-to-nearest-even (a mantissa that rounds up past 0b111
    loses the carry, 124.9 becomes 64, and ties round away from zero), so that cast goes through
    torch's, which rounds as the GPU's ``cvt.rn.satfinite`` does for the clamped values the
    kernels store. Widening float8e4nv to 16 or 32 bits is exact in the interpreter as it is."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    if getattr(interpreter, "_kiln_patched", False):
        return
    original_patch = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original_patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    def widen(h):
        if h.dtype.scalar != tl.bfloat16:
            return h
        data = interpreter._convert_float(h.data, tl.bfloat16, tl.float32, None).view(np.float32)
        return interpreter.TensorHandle(data, tl.float32)

    builder_cls = type(interpreter.interpreter_builder)
    original_dot = builder_cls.create_dot

    def create_dot(self, a, b, d, *args):
        return original_dot(self, widen(a), widen(b), d, *args)

    original_fp_to_fp = builder_cls.create_fp_to_fp

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.float8e4nv:
            x = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
            data = x.to(torch.float8_e4m3fn).view(torch.uint8).numpy().reshape(src.data.shape)
            return interpreter.TensorHandle(data, tl.float8e4nv)
        return original_fp_to_fp(self, src, dst_type, rounding_mode)

    interpreter._patch_lang_tensor = patch_lang_tensor
    builder_cls.create_dot = create_dot
    builder_cls.create_fp_to_fp = create_fp_to_fp
    interpreter._kiln_patched = True


if INTERPRET:
    _patch_interpreter()
    from kiln.kernels import triton_attention as attn
    from kiln.kernels import triton_ops as ops


def run_in_interpreter(test_file: str) -> None:
    """Runs a test file's kernel tests in a child process with TRITON_INTERPRET=1."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(test_file))],
        cwd=Path(test_file).resolve().parents[1], env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]


@pytest.mark.skipif(INTERPRET, reason="already in the interpreter process")
def test_interpreter_suite():
    run_in_interpreter(__file__)


def test_attention_kernels_do_not_specialize_on_batch_shape():
    """Triton compiles a variant for an int argument equal to 1 and for one divisible by 16. The
    block-table row stride (the longest sequence's block count, eager steps) and the split count
    vary with each batch, so the kernels must not specialize on them, or a request of a new length
    compiles a kernel on its path (the load-time warm-up runs one-block tables)."""
    import importlib

    ta = importlib.import_module("kiln.kernels.triton_attention")
    for kernel, names in ((ta._decode_kernel, {"num_splits", "s_bt"}), (ta._prefill_kernel, {"s_bt"}),
                          (ta._decode_reduce_kernel, {"num_splits"})):
        if not hasattr(kernel, "do_not_specialize"):
            pytest.skip("no Triton here")
        assert names <= set(kernel.do_not_specialize), (kernel, kernel.do_not_specialize)


BF = torch.bfloat16


def _close(a, b, tol):
    # the interpreter truncates float32 -> bfloat16 casts (the GPU rounds to nearest), so bfloat16
    # results may sit a unit in the last place or two below the reference
    torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


def _randn(*shape, dtype=BF, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


@in_child
@pytest.mark.parametrize("dtype", [BF, torch.float32])
@pytest.mark.parametrize("shape", [(5, 48), (3, 128)])
def test_rms_norm(shape, dtype):
    x = _randn(*shape, dtype=dtype, seed=1) * 3
    w = _randn(shape[-1], dtype=dtype, seed=2)
    tol = 2e-2 if dtype == BF else 1e-5
    _close(ops.rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6), tol)


@in_child
def test_rms_norm_strided_heads():
    q, k, _ = fused_qkv_views(6, 4, 2, 32, BF, "cpu", seed=3)
    w = _randn(32, seed=4)
    assert not q.is_contiguous()
    _close(ops.rms_norm(q, w, 1e-5), rms_norm_ref(q, w, 1e-5), 2e-2)
    _close(ops.rms_norm(k, w, 1e-5), rms_norm_ref(k, w, 1e-5), 2e-2)


@in_child
@pytest.mark.parametrize("dtype", [BF, torch.float32])
def test_add_rms_norm(dtype):
    x = _randn(7, 96, dtype=dtype, seed=5)
    r = _randn(7, 96, dtype=dtype, seed=6)
    w = _randn(96, dtype=dtype, seed=7)
    y, s = ops.add_rms_norm(x, r, w, 1e-6)
    y_ref, s_ref = add_rms_norm_ref(x, r, w, 1e-6)
    tol = 2e-2 if dtype == BF else 1e-5
    _close(s, s_ref, 1e-2 if dtype == BF else 1e-6)
    _close(y, y_ref, tol)


@in_child
@pytest.mark.parametrize("shape", [(5, 80), (2, 3, 64)])
def test_silu_and_mul(shape):
    x = _randn(*shape, seed=8) * 2
    _close(ops.silu_and_mul(x), silu_and_mul_ref(x), 2e-2)


@in_child
@pytest.mark.parametrize("hq,hk,d,bs", [(4, 2, 32, 16), (3, 1, 64, 8)])
def test_rotary_write_kv(hq, hk, d, bs):
    """Rotary and the cache write in one kernel: q as apply_rotary_ref's, the cache as
    write_kv_ref's of the rotated k and of v (strided views of one fused projection; padding
    slots untouched)."""
    t, nb = 9, 5
    case = make_rotary_kv_case(t, hq, hk, d, bs, nb, BF, "cpu", max_pos=256, theta=10000.0, pad=[2, 6], seed=14)
    qo, kc, vc = case.run(attn.rotary_write_kv)
    q_ref, kc_ref, vc_ref = case.run(rotary_write_kv_ref)
    _close(qo, q_ref, 2e-2)
    _close(kc, kc_ref, 2e-2)
    assert torch.equal(vc, vc_ref)
    untouched = torch.ones(nb * bs, dtype=torch.bool)
    untouched[case.slots[case.slots >= 0]] = False
    assert torch.equal(kc.view(nb * bs, hk, d)[untouched], kc_ref.view(nb * bs, hk, d)[untouched])


def _attn(case, **kw):
    out = attn.paged_attention(case.q, case.k_cache, case.v_cache, case.meta, case.scale, **case.scales, **kw)
    ref = paged_attention_ref(case.q, case.k_cache, case.v_cache, case.meta, case.scale, **case.scales)
    return out, ref


@in_child
@pytest.mark.parametrize("splits", [None, 1, 3])
@pytest.mark.parametrize("hq,hk,d,bs", [(4, 2, 32, 16), (4, 1, 32, 32), (2, 2, 64, 16)])
def test_decode(hq, hk, d, bs, splits):
    seq_lens = [1, 37, 700, 129]
    case = make_paged_case(seq_lens, [1] * 4, hq, hk, d, bs, BF, "cpu", seed=14)
    out, ref = _attn(case, num_splits=splits)
    _close(out, ref, 2e-2)


@in_child
def test_decode_sliding_window_and_loose_bound():
    case = make_paged_case([5, 90, 333], [1, 1, 1], 4, 2, 32, 16, BF, "cpu", sliding_window=40,
                           seed=15, max_seq_len=2048, table_width=130)
    out, ref = _attn(case)
    _close(out, ref, 2e-2)
    out, ref = _attn(case, num_splits=4)
    _close(out, ref, 2e-2)


@in_child
def test_decode_float32():
    case = make_paged_case([3, 150], [1, 1], 4, 2, 32, 16, torch.float32, "cpu", seed=16)
    out, ref = _attn(case, num_splits=2)
    _close(out, ref, 1e-4)


@in_child
@pytest.mark.parametrize("window", [None, 19])
@pytest.mark.parametrize("hq,hk,d,bs", [(4, 2, 32, 16), (3, 1, 32, 32), (2, 2, 64, 16)])
def test_mixed_batch(hq, hk, d, bs, window):
    seq_lens = [40, 77, 70, 1, 45]
    query_lens = [40, 1, 23, 1, 5]
    case = make_paged_case(seq_lens, query_lens, hq, hk, d, bs, BF, "cpu", sliding_window=window, seed=17)
    out, ref = _attn(case)
    _close(out, ref, 2e-2)


@in_child
def test_prefill_small_tiles():
    seq_lens, query_lens = [50, 33], [30, 33]
    case = make_paged_case(seq_lens, query_lens, 8, 2, 32, 16, BF, "cpu", seed=18)
    out = torch.empty_like(case.q)
    attn.launch_prefill(case.q, case.k_cache, case.v_cache, out, case.meta, case.scale, skip_decodes=False,
                       block_m=16)
    ref = paged_attention_ref(case.q, case.k_cache, case.v_cache, case.meta, case.scale)
    _close(out, ref, 2e-2)


@in_child
def test_mixed_float32():
    case = make_paged_case([20, 9], [6, 1], 2, 1, 32, 16, torch.float32, "cpu", seed=19)
    out, ref = _attn(case)
    _close(out, ref, 1e-4)


# ----------------------------------------------------------------------------------------------
# float8_e4m3fn caches
# ----------------------------------------------------------------------------------------------

F8 = KV_FP8_DTYPE


def _bytes(x):
    return x.view(torch.uint8)


@in_child
@pytest.mark.parametrize("hq,hk,d,bs", [(4, 2, 32, 16), (3, 1, 64, 8)])
def test_rotary_write_kv_fp8(hq, hk, d, bs):
    """The kernel's e4m3 keys are quantize_kv of the keys it rotates (the same rotation it stores
    in a bfloat16 cache), its values are the reference's byte for byte, and padding slots keep
    their bytes."""
    t, nb = 9, 5
    case = make_rotary_kv_case(t, hq, hk, d, bs, nb, BF, "cpu", max_pos=256, theta=10000.0, pad=[2, 6], seed=14,
                               cache_dtype=F8)
    qo, kc, vc = case.run(attn.rotary_write_kv)
    q_ref, kc_ref, vc_ref = case.run(rotary_write_kv_ref)
    zeros = torch.zeros(kc.shape, dtype=BF)
    _, kc_bf, _ = case.run(attn.rotary_write_kv, k_cache=zeros, v_cache=zeros)
    _close(qo, q_ref, 2e-2)
    assert kc.dtype == F8 and vc.dtype == F8
    assert torch.equal(_bytes(vc), _bytes(vc_ref))
    rows = (nb * bs, hk, d)
    slots = case.slots[case.slots >= 0]
    assert torch.equal(_bytes(kc).view(rows)[slots], _bytes(quantize_kv(kc_bf.view(rows)[slots], case.k_scale)))
    # against the reference, in dequantized units: the bfloat16 test's absolute tolerance for the
    # interpreter's truncating rotation, plus one e4m3 step (1/8) where that crosses a rounding edge
    torch.testing.assert_close(kc.float() * case.k_scale, kc_ref.float() * case.k_scale, atol=2e-2, rtol=0.13)
    untouched = torch.ones(nb * bs, dtype=torch.bool)
    untouched[slots] = False
    assert torch.equal(_bytes(kc).view(rows)[untouched], _bytes(case.k_cache).view(rows)[untouched])
    assert torch.equal(_bytes(vc).view(rows)[untouched], _bytes(case.v_cache).view(rows)[untouched])


@in_child
@pytest.mark.parametrize("splits", [None, 1, 3])
@pytest.mark.parametrize("hq,hk,d,bs", [(4, 2, 32, 16), (4, 1, 32, 32), (2, 2, 64, 16)])
def test_decode_fp8(hq, hk, d, bs, splits):
    case = make_paged_case([1, 37, 700, 129], [1] * 4, hq, hk, d, bs, BF, "cpu", seed=14, cache_dtype=F8)
    out, ref = _attn(case, num_splits=splits)
    _close(out, ref, 2e-2)


@in_child
@pytest.mark.parametrize("splits", [None, 1, 3])
@pytest.mark.parametrize("hq,hk,d,bs", [(4, 2, 32, 16), (2, 2, 64, 16)])
@pytest.mark.parametrize("config", [(128, 4), (256, 8)])
def test_decode_fp8_wide_tile(hq, hk, d, bs, splits, config):
    """The FP8-KV decode kernel with the longer context tiles ``tune_decode`` may choose."""
    from kiln.kernels import triton_attention as ta

    case = make_paged_case([1, 37, 700, 129], [1] * 4, hq, hk, d, bs, BF, "cpu", seed=15, cache_dtype=F8)
    ta.set_decode_config(torch.device("cpu"), d, config)
    try:
        assert ta._decode_config({"block_d": max(16, d), "ieee": False, "fp8": True}, torch.device("cpu")) == config
        out, ref = _attn(case, num_splits=splits)
    finally:
        ta.set_decode_config(torch.device("cpu"), d, None)
    _close(out, ref, 2e-2)


def test_decode_tile_choice_guards():
    from kiln.kernels import triton_attention as ta

    with pytest.raises(ValueError, match=r"config \(96, 4\)"):
        ta.set_decode_config(torch.device("cpu"), 128, (96, 4))
    case = make_paged_case([40], [1], 4, 2, 32, 16, BF, "cpu", seed=3, cache_dtype=F8)
    assert ta.tune_decode(case.k_cache, case.v_cache, case.k_scale, case.v_scale, 4, BF) is None  # a GPU-only timing


@in_child
def test_decode_fp8_sliding_window():
    case = make_paged_case([5, 90, 333], [1, 1, 1], 4, 2, 32, 16, BF, "cpu", sliding_window=40, seed=15,
                           max_seq_len=2048, table_width=130, cache_dtype=F8)
    out, ref = _attn(case, num_splits=4)
    _close(out, ref, 2e-2)


@in_child
@pytest.mark.parametrize("window", [None, 19])
@pytest.mark.parametrize("hq,hk,d,bs", [(4, 2, 32, 16), (3, 1, 32, 32)])
def test_mixed_batch_fp8(hq, hk, d, bs, window):
    case = make_paged_case([40, 77, 70, 1, 45], [40, 1, 23, 1, 5], hq, hk, d, bs, BF, "cpu", sliding_window=window,
                           seed=17, cache_dtype=F8)
    out, ref = _attn(case)
    _close(out, ref, 2e-2)


@in_child
def test_prefill_small_tiles_fp8():
    case = make_paged_case([50, 33], [30, 33], 8, 2, 32, 16, BF, "cpu", seed=18, cache_dtype=F8)
    out = torch.empty_like(case.q)
    attn.launch_prefill(case.q, case.k_cache, case.v_cache, out, case.meta, case.scale, skip_decodes=False,
                        block_m=16, **case.scales)
    _close(out, paged_attention_ref(case.q, case.k_cache, case.v_cache, case.meta, case.scale, **case.scales), 2e-2)


@in_child
def test_fp8_cache_float32_queries():
    case = make_paged_case([20, 9, 150], [6, 1, 1], 2, 1, 32, 16, torch.float32, "cpu", seed=19, cache_dtype=F8)
    out, ref = _attn(case, num_splits=2)
    _close(out, ref, 1e-4)


@in_child
def test_fp8_scales_read_at_run_time():
    """The kernels take the scales from their tensors: changing one in place changes the result
    as it changes the reference's."""
    case = make_paged_case([3, 150], [3, 1], 4, 2, 32, 16, BF, "cpu", seed=20, cache_dtype=F8)
    first, _ = _attn(case)
    case.k_scale.mul_(0.5)
    case.v_scale.mul_(2.0)
    out, ref = _attn(case)
    _close(out, ref, 2e-2)
    assert (out.float() - first.float()).abs().max() > 0.1


# ----------------------------------------------------------------------------------------------
# Fused MoE of decode-sized batches (kiln.kernels.moe_triton) against the reference loop
# ----------------------------------------------------------------------------------------------

E, H, I, K = 8, 48, 40, 2


def _weights(dtype, seed, num_local=E):
    g = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(num_local, 2 * I, H, generator=g) / H**0.5).to(dtype)
    w2 = (torch.randn(num_local, H, I, generator=g) / I**0.5).to(dtype)
    return w13, w2


@pytest.mark.parametrize("t,first_expert,num_local,block_m", [(1, 0, 8, 16), (5, 0, 8, 4), (7, 2, 4, 4), (33, 4, 4, 16)])
def test_align_places_every_local_row_once(t, first_expert, num_local, block_m):
    g = torch.Generator().manual_seed(t)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(t)])
    rows, bexp = align(ids, num_local, first_expert, block_m)
    r = t * K
    assert rows.numel() % block_m == 0 and bexp.numel() == rows.numel() // block_m
    assert rows.numel() >= r + num_local * (block_m - 1)  # room for the worst padding
    flat = ids.reshape(-1) - first_expert
    local = [i for i in range(r) if 0 <= flat[i] < num_local]
    placed = [int(x) for x in rows if x < r]
    assert sorted(placed) == local  # every local row once, no other row
    for b, e in enumerate(bexp.tolist()):
        block = [int(x) for x in rows[b * block_m : (b + 1) * block_m] if x < r]
        if e < 0:
            assert not block
        else:
            assert block and all(int(flat[i]) == e for i in block)  # a block holds one expert's rows
    used = [e for e in bexp.tolist() if e >= 0]
    assert used == sorted(used) and set(used) == {int(flat[i]) for i in local}


@in_child
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,first_expert,num_local", [(1, 0, E), (3, 0, E), (6, 2, 4), (20, 4, 4)])
def test_fused_equals_the_reference(t, first_expert, num_local, dtype):
    """Decode sizes (one token, a few, more rows than a block), all experts local or an
    expert-parallel rank's share (rows routed elsewhere contribute nothing), renormalized top-k."""
    g = torch.Generator().manual_seed(10 + t)
    x = torch.randn(t, H, generator=g).to(dtype)
    logits = torch.randn(t, E, generator=g)
    w13, w2 = _weights(dtype, 11 + t, num_local)
    for renormalize in (True, False):
        got = moe_forward_fused(x, logits, w13, w2, K, renormalize, first_expert)
        ref = moe_forward_ref(x, logits, w13, w2, K, renormalize, first_expert)
        assert got.dtype == dtype and got.shape == ref.shape
        if dtype == torch.float32:
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        else:  # the slot sum in float32 against the reference's bfloat16 index_add, truncating casts
            torch.testing.assert_close(got.float(), ref.float(), atol=3e-2, rtol=3e-2)


@in_child
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,first_expert,num_local,block_n,block_k", [(1, 0, E, 32, 128), (3, 2, 4, 16, 32), (8, 4, 4, 32, 16)])
def test_gemv_path_equals_the_reference(t, first_expert, num_local, block_n, block_k, dtype):
    """The two GEMV kernels of the fewest rows: one token or a few, all experts local or an
    expert-parallel rank's share (other ranks' rows add nothing), column and K tails, both
    renormalisations. The slot sum runs in float32 against the reference's index_add."""
    g = torch.Generator().manual_seed(20 + t)
    x = torch.randn(t, H, generator=g).to(dtype)
    logits = torch.randn(t, E, generator=g)
    w13, w2 = _weights(dtype, 21 + t, num_local)
    for renormalize in (True, False):
        got = moe_forward_gemv(x, logits, w13, w2, K, renormalize, first_expert, block_n=block_n, block_k=block_k)
        ref = moe_forward_ref(x, logits, w13, w2, K, renormalize, first_expert)
        assert got.dtype == dtype and got.shape == ref.shape
        if dtype == torch.float32:
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        else:
            torch.testing.assert_close(got.float(), ref.float(), atol=3e-2, rtol=3e-2)
    if num_local < E:  # a token routed only to other ranks' experts gets zeros
        lg = torch.full((1, E), -10.0)
        lg[0, (first_expert + num_local) % E], lg[0, (first_expert + num_local + 1) % E] = 5.0, 4.0
        assert torch.equal(moe_forward_gemv(x[:1], lg, w13, w2, K, True, first_expert), torch.zeros(1, H, dtype=dtype))


@in_child
def test_fused_rows_of_other_ranks_stay_zero():
    """A token whose experts all live on other ranks gets zeros."""
    x = torch.randn(2, H)
    logits = torch.full((2, E), -10.0)
    logits[0, 6], logits[0, 7] = 5.0, 4.0  # token 0: experts 6 and 7, outside [0, 4)
    logits[1, 1], logits[1, 6] = 5.0, 4.0  # token 1: expert 1 here, 6 elsewhere
    w13, w2 = _weights(torch.float32, 3, 4)
    got = moe_forward_fused(x, logits, w13, w2, K, True, 0)
    assert torch.equal(got[0], torch.zeros(H))
    torch.testing.assert_close(got, moe_forward_ref(x, logits, w13, w2, K, True, 0), atol=1e-5, rtol=1e-5)
    w, ids = route(logits, K, True)
    assert ids[0].tolist() == [6, 7]
