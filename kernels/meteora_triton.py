"""The MeteoRA adapter term written in Triton and called through `jax_triton.triton_call` (GPU only).

Same operation, organisations and backward as `kernels.meteora_pallas` (read its docstring): the forward is
a one-launch decode kernel for a few tokens, else shrink `P [N, E*r] = x @ a_wide` (chosen experts'
columns only) and expand `delta = (coef * P) @ b_wide`; the backward's six products run through the same
generic tiled kernel. Only the kernels differ: here they are Triton functions (`_mm_kernel`,
`_decode_kernel`), and the orchestration and `custom_vjp` are shared with the Pallas file through its
`Impl` hook.

Needs `triton` and `jax_triton` (the `gpu` extra; jax-triton 0.3.1) and a CUDA GPU: `available()` says
whether they are all there, and `meteora_triton` raises a clear error where they are not.
"""

import types

import jax
import jax.numpy as jnp

from kernels import meteora_pallas as mp

try:
    import triton
    import triton.language as tl
except ImportError:  # no triton: the kernels below are defined but never compiled
    triton = None
    tl = types.SimpleNamespace(constexpr=None)

try:
    import jax_triton
except ImportError:
    jax_triton = None


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


def available() -> bool:
    """Triton, jax-triton and a GPU backend are all present."""
    return triton is not None and jax_triton is not None and jax.default_backend() == "gpu"


@_jit
def _off(i, j, KIND: tl.constexpr, LD: tl.constexpr, D: tl.constexpr, R: tl.constexpr):
    """Offsets of a tile (rows i [BI, 1], cols j [1, BJ]) of a matrix read through a layout (see mp.Rows...)."""
    if KIND == 0:  # Rows: row-major, LD columns
        off = i * LD + j
    elif KIND == 1:  # Cols: a row-major [cols, LD] buffer read transposed
        off = j * LD + i
    elif KIND == 2:  # Wide: a [E, D, R] read as [D, E*R]
        off = (j // R) * (D * R) + i * R + j % R
    else:  # Wide transposed: a [E, D, R] read as [E*R, D]
        off = (i // R) * (D * R) + j * R + i % R
    return off


@_jit
def _mm_kernel(lhs_ptr, rhs_ptr, e_ptr, w_ptr, s_ptr, out_ptr,
               M: tl.constexpr, N: tl.constexpr, K: tl.constexpr, KS: tl.constexpr,
               LK: tl.constexpr, LLD: tl.constexpr, RK: tl.constexpr, RLD: tl.constexpr,
               OK: tl.constexpr, OLD: tl.constexpr, D: tl.constexpr, R: tl.constexpr,
               TOPK: tl.constexpr, SKIP: tl.constexpr, SCALE: tl.constexpr, ATOMIC: tl.constexpr,
               IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """out[i, j] (+)= sum_t lhs[i, t] rhs[t, j] over this program's K share (KS). With routing (TOPK > 0):
    SKIP a column tile none of whose experts (column // R) a token of the row block picked; SCALE the result
    by coef[i, j] = sum_t w[i, t] s[e] [experts[i, t] == j // R]."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    rmask = rows < M
    cmask = cols < N
    ce = cols // R
    klimit = K  # SKIP: 0 when no token of the block picked an expert of the tile (all loads masked off)
    if SKIP:
        picked = tl.zeros([BM, BN], dtype=tl.int32)
        for j in tl.static_range(TOPK):
            e = tl.load(e_ptr + rows * TOPK + j, mask=rmask, other=-1)
            picked = tl.maximum(picked, (e[:, None] == ce[None, :]).to(tl.int32))
        picked = tl.where(cmask[None, :], picked, 0)
        klimit = tl.where(tl.max(tl.max(picked, axis=1), axis=0) > 0, K, 0)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for t in range(0, (KS + BK - 1) // BK):
        kk = pid_s * KS + t * BK + tl.arange(0, BK)
        kmask = kk < klimit
        x = tl.load(lhs_ptr + _off(rows[:, None], kk[None, :], LK, LLD, D, R), mask=rmask[:, None] & kmask[None, :],
                    other=0.0)
        w = tl.load(rhs_ptr + _off(kk[:, None], cols[None, :], RK, RLD, D, R), mask=kmask[:, None] & cmask[None, :],
                    other=0.0)
        if IEEE:
            acc += tl.dot(x.to(w.dtype), w, input_precision="ieee")
        else:
            acc += tl.dot(x.to(w.dtype), w)
    if SCALE:
        coef = tl.zeros([BM, BN], dtype=tl.float32)
        for j in tl.static_range(TOPK):
            e = tl.load(e_ptr + rows * TOPK + j, mask=rmask, other=-1)
            wj = tl.load(w_ptr + rows * TOPK + j, mask=rmask, other=0.0)
            coef += tl.where(e[:, None] == ce[None, :], wj[:, None], 0.0)
        s = tl.load(s_ptr + ce, mask=cmask, other=0.0)
        acc = acc * coef * s[None, :]
    off = _off(rows[:, None], cols[None, :], OK, OLD, D, R)
    omask = rmask[:, None] & cmask[None, :]
    if ATOMIC:
        tl.atomic_add(out_ptr + off, acc, mask=omask)
    else:
        tl.store(out_ptr + off, acc.to(out_ptr.dtype.element_ty), mask=omask)


@_jit
def _decode_kernel(x_ptr, a_ptr, b_ptr, s_ptr, e_ptr, w_ptr, o_ptr,
                   NT: tl.constexpr, D: tl.constexpr, R: tl.constexpr, NO: tl.constexpr, TOPK: tl.constexpr,
                   PP: tl.constexpr, RP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """All (token, slot) pairs p of a few tokens at once: h[p] = x[tok p] @ a[e_p] (matrix-vector, chosen
    experts only), then this program's output tile: sum_p c_p h[p] @ b[e_p][:, tile]."""
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    cmask = cols < NO
    p = tl.arange(0, PP)
    pmask = p < NT * TOPK
    tok = p // TOPK
    e = tl.load(e_ptr + p, mask=pmask, other=0)
    c = tl.load(w_ptr + p, mask=pmask, other=0.0) * tl.load(s_ptr + e, mask=pmask, other=0.0)
    rr = tl.arange(0, RP)
    rmask = rr < R
    h = tl.zeros([PP, RP], dtype=tl.float32)
    for t in range(0, (D + BK - 1) // BK):
        dd = t * BK + tl.arange(0, BK)
        dmask = dd < D
        xv = tl.load(x_ptr + tok[:, None] * D + dd[None, :], mask=pmask[:, None] & dmask[None, :], other=0.0)
        amask = pmask[:, None, None] & dmask[None, :, None] & rmask[None, None, :]
        av = tl.load(a_ptr + e[:, None, None] * (D * R) + dd[None, :, None] * R + rr[None, None, :], mask=amask,
                     other=0.0)
        h += tl.sum(xv.to(tl.float32)[:, :, None] * av.to(tl.float32), axis=1)
    h = (h * c[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
    bmask = pmask[:, None, None] & rmask[None, :, None] & cmask[None, None, :]
    bv = tl.load(b_ptr + e[:, None, None] * (R * NO) + rr[None, :, None] * NO + cols[None, None, :], mask=bmask,
                 other=0.0)
    contrib = tl.sum(h[:, :, None] * bv.to(tl.float32), axis=1)  # [PP, BN]
    for i in tl.static_range(NT):
        row = tl.sum(tl.where((tok == i)[:, None], contrib, 0.0), axis=0)
        tl.store(o_ptr + i * NO + cols, row.to(o_ptr.dtype.element_ty), mask=cmask)


def _triton_call(*args, **kwargs):
    """`jax_triton.triton_call` (a seam: CPU checks substitute an emulation that runs Triton's interpreter)."""
    return jax_triton.triton_call(*args, **kwargs)


def _cdiv(a, b):
    return -(-a // b)


def _code(layout):
    """(KIND, LD) of a layout from `kernels.meteora_pallas`."""
    if isinstance(layout, mp.Rows):
        return 0, layout.ld
    if isinstance(layout, mp.Cols):
        return 1, layout.ld
    return (3 if layout.transpose else 2), 1


def _matmul(lhs_arr, rhs_arr, *, m, n, kdim, lhs, rhs, out, out_dtype, dtype, bm, bn, bk, split=1, route=None,
            routing=(), num_warps=4, num_stages=3, interpret=False, name="meteora_mm"):
    """Drop-in for `meteora_pallas._matmul` (same arguments) running `_mm_kernel`."""
    del interpret, dtype  # operands are rounded to the rhs dtype in-kernel
    wide = [lay for lay in (lhs, rhs, out) if isinstance(lay, mp.Wide)]
    d, r = (wide[0].d, wide[0].r) if wide else (1, route.r if route else 1)
    if not routing:
        routing = (jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.float32), jnp.zeros((1,), jnp.float32))
    (lk, lld), (rk, rld), (ok, old) = _code(lhs), _code(rhs), _code(out)
    ks = _cdiv(_cdiv(kdim, bk), split) * bk
    atomic = split > 1
    return _triton_call(
        lhs_arr.reshape(-1), rhs_arr.reshape(-1), *routing, kernel=_mm_kernel,
        out_shape=jax.ShapeDtypeStruct((m * n,), jnp.float32 if atomic else out_dtype),
        grid=(_cdiv(m, bm), _cdiv(n, bn), split), num_warps=num_warps, num_stages=num_stages,
        zeroed_outputs=(0,) if atomic else (), name=name,
        M=m, N=n, K=kdim, KS=ks, LK=lk, LLD=lld, RK=rk, RLD=rld, OK=ok, OLD=old, D=d, R=r,
        TOPK=route.k if route else 0, SKIP=bool(route and route.skip), SCALE=bool(route and route.scale),
        ATOMIC=atomic,
        IEEE=bool(rhs_arr.dtype == jnp.float32), BM=bm, BN=bn, BK=bk)


def _decode(x, a, b, scaling, experts, weights, bs, interpret):
    """Drop-in for `meteora_pallas._decode` running `_decode_kernel`."""
    del interpret
    n_tok, d = x.shape
    _, _, r = a.shape
    o, k = b.shape[-1], experts.shape[1]
    pp, rp, bk, bn = mp.decode_tiles(bs, n_tok * k, r)
    e, w, s = mp._routing(experts, weights, scaling)
    out = _triton_call(
        x.reshape(-1), a.reshape(-1), b.reshape(-1), s, e, w, kernel=_decode_kernel,
        out_shape=jax.ShapeDtypeStruct((n_tok * o,), x.dtype), grid=(_cdiv(o, bn),), num_warps=bs.decode_warps,
        num_stages=bs.num_stages, name="meteora_decode",
        NT=n_tok, D=d, R=r, NO=o, TOPK=k, PP=pp, RP=rp, BN=bn, BK=bk)
    return out.reshape(n_tok, o)


IMPL = mp.Impl(matmul=_matmul, decode=_decode, interpret=False)


def meteora_triton(x, a, b, scaling, experts, weights, *, block_sizes: mp.BlockSizes | None = None):
    """The adapter term `[N, O]` in x's dtype through the Triton kernels; differentiable like `meteora_fused`."""
    if not available():
        missing = [n for n, ok in (("triton", triton is not None), ("jax_triton", jax_triton is not None),
                                   ("a GPU backend", jax.default_backend() == "gpu")) if not ok]
        raise RuntimeError(f"strategy 'triton' needs {', '.join(missing)} (install the 'gpu' extra: "
                           "pip install 'meteora-jax[gpu]'); use strategy 'fused' (Pallas) instead")
    mp.check_args(x, a, b, scaling, experts, weights)
    return mp.fused_apply(x, a, b, scaling, experts, weights, block_sizes or mp.BlockSizes.get_default(), IMPL)


def meteora_triton_reference(x, a, b, scaling, experts, weights):
    """Pure JAX reference (the one in `kernels.meteora_pallas`)."""
    return mp.meteora_reference(x, a, b, scaling, experts, weights)
