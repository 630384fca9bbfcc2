"""The MeteoRA adapter term as Pallas kernels (Triton backend on GPU, interpret mode on CPU), with a backward pass.

    delta[n] = sum_j  w[n, j] * s[e] * (x[n] @ a[e]) @ b[e],     e = experts[n, j]

    x [N, D]   a [E, D, R]   b [E, R, O]   s [E] f32   experts [N, k] int32   w [N, k] f32   ->   delta [N, O]

No weight is gathered per token. Two organisations, picked by the number of tokens:

* decode (N <= `BlockSizes.decode_max_tokens`, forward only): one launch, a grid over output tiles; each
  program forms h = x[n] @ a[e] for its tokens' k experts as matrix-vector products (reading only the chosen
  experts' A from L2) and adds `c * h @ b[e][:, tile]`.
* expert columns (everything else, and every backward): the k chosen experts of a token are k blocks of R
  columns of the "wide" matrix `a` viewed as `[D, E*R]` (column c is expert c // R, rank c % R; the view is
  indexed inside the kernel, nothing is transposed or copied). Two launches:
    shrink   H [N, E*R] f32 = coef * (x @ a_wide),  coef[n, c] = sum_j w[n, j] s[e] [experts[n, j] == c // R]
             built in-kernel from the routing and applied in the epilogue (0 for experts a token did not
             pick). With small row blocks, a column tile none of whose experts the block picked is skipped
             whole (no loads, no products). Split over D with atomic adds when there are too few row blocks
             to fill the GPU.
    expand   delta = H @ b_wide,  b_wide = b.reshape(E*R, O): a plain tiled product.
  The dense E*R work is cheap while E*R << O (Llama sizes: 224 vs 4096); its merit is one read of x and
  full tensor-core tiles with vectorised loads and no sort of tokens by expert.

Backward (`jax.custom_vjp`; its forward keeps P = x @ a_wide unscaled), with g = d delta [N, O]:
    dH = g @ b_wide^T ("no,co->nc")      dcoef[n, e] = sum_r dH[n, eR+r] P[n, eR+r]
    dw[n, j] = dcoef[n, e] s[e]      ds[e] = sum_n dcoef[n, e] sum_j w[n, j] [e_nj == e]
    dP = coef * dH      dx = dP @ a_wide^T      da = x^T @ dP  (written straight into [E, D, R])
    db = (coef * P)^T @ g
All six products are one generic tiled kernel (`_matmul`) parameterised by how each operand is laid out.

Routed pair (`meteora_routed`, what `MeteoraLinear(strategy="fused")` runs for N <= 16 tokens): the gate product,
top-k routing and adapter term of a MeteoRA linear in two launches, added into the base output in place (see
the section "routed decode" below); with the routing given, the same pair serves `decode_kernel="split"` and
`meteora_fused_add`. `meteora_routed_packed` runs one pair for several linears on the same input (packed q/k/v
or gate/up, `meteora_jax.packed`). `meteora_routed_expand` is the expand half alone, for when one XLA product
`x @ [W | G | A]` has already given the base output, the gate logits and the shrink (packing mode "extended",
what a packed model decodes with on a GPU); with `glu=True` it serves a Llama MLP's packed gate/up and writes
silu(gate) * up.

Model for the file: jax's `jax/experimental/pallas/ops/gpu/attention.py` (block sizes, kernel, jitted wrapper
with `interpret=`, custom_vjp, and the pure-JAX reference at the bottom).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (powers of two; dot tiles at least 16). `None` fields are picked from the shapes."""

    decode_max_tokens: int = 1  # a forward of N <= this many tokens uses the one-launch decode kernel
    decode_block_out: int = 128
    decode_block_in: int = 512
    decode_max_elems: int = 8192  # cap on the decode kernel's [pairs, block_in, r] tile
    decode_warps: int = 4
    decode_kernel: str = "matvec"  # for N <= decode_max_tokens: "matvec" (one launch) or "split" (the routed pair)
    shrink_block_tokens: int = 64
    shrink_block_cols: int | None = None  # None: 32 for N <= 256 (finer skipping), else all E*r (<= 256)
    shrink_block_in: int = 64
    shrink_split: int | None = None  # split of the reduction; None: enough programs for `target_programs`
    skip_max_picks: int = 64  # skip unpicked column tiles when a row block holds <= this many (token, slot)s
    expand_block_tokens: int | None = None  # None: N rounded up (16..64) for N <= 256, else 128
    expand_block_out: int | None = None  # None: 64 for N <= 64, else 128
    expand_block_cols: int = 32
    weight_block_rows: int = 64  # da [in, E*r] and db [E*r, out] tiles
    weight_block_cols: int = 64
    weight_block_out: int = 128
    weight_block_tokens: int = 64
    target_programs: int = 132  # one wave of an H100
    routed_max_tokens: int = 16  # the MeteoRA linear runs gate + adapter term in two launches for N <= this
    routed_block_in: int = 64  # routed shrink: D rows per step
    routed_splits: int = 256  # routed shrink: at most this many programs (each adds its D range atomically)
    # routed expand: output columns per program. None: 32 for a linear (or packed group) of fewer than 4096 output
    # columns, else 128. H100 decode loops: packed mode extended, SmolLM2's step 1.47x the packed base's at 32
    # against 1.54x at 128; Llama-3-8B's 1.27x at 64 and 128, 1.28x at 32 (experiments/results/compile_and_blocks);
    # the routed pair (packed mode routed, strategy fused) in experiments/results/decode_parts
    routed_block_out: int | None = None
    routed_block_cols: int = 256  # routed shrink: columns of A per program
    routed_block_gate: int = 128  # routed shrink: gate columns per program
    routed_one_launch: bool = False  # shrink and expand in one launch, the expand waiting on a counter
    routed_warps: int | None = None  # warps per program of the routed shrink / expand; None: 4 for <= 16 tokens, else 8
    # packed gate/up, mode extended, decode: the expand writes silu(gate) * up (`meteora_routed_expand(glu=True)`),
    # one launch less per layer; off: no faster in the H100's decode loop (experiments/results/decode_glu)
    routed_glu: bool = False
    # mode extended, decode: the expand reads all E*r rows of its B tile, not only the picked experts' rows, so
    # that load waits on nothing (no logits, no top-k) and is issued with the first; more bytes (E/k times B's
    # picked rows), one dependent load less. Off: no faster in the H100's decode loop, slower for Llama-3-8B at
    # batch 1 (experiments/results/decode_product)
    routed_dense_b: bool = False
    # mode extended, decode: the product x @ [W | G | A] gives z in the model's compute dtype (bf16 for a bf16
    # model) instead of f32: Llama-3-8B shapes at batch 1 on the H100 decode in 1.15x the packed base's step
    # instead of 1.26x (experiments/results/decode_product). But the gate logits are then rounded to bf16 (about
    # 3 significant digits), so near-ties can route differently from the unpacked model's f32 logits: opt-in.
    # (The PyTorch original's gate is cast to the model's dtype, so its bf16 models route on bf16 logits too.)
    routed_z_low: bool = False
    gemv_max_tokens: int = 64  # `meteora_gemv` (base product + adapter term in one launch) takes N <= this
    gemv_dense_from: int = 2  # ... and from this many tokens shrinks every expert with tensor-core tiles
    gemv_block_out: int = 8  # its output rows per program for one token (matrix-vector products)
    gemv_block_out_tokens: int = 32  # ... and for 2..gemv_max_tokens tokens (tensor-core products)
    gemv_block_in: int = 512  # its D columns per step for one token
    gemv_block_in_tokens: int = 256  # ... and for more
    gemv_shrink_splits: int = 16  # its shrink programs (each adds one D range of h atomically)
    gemv_shrink_block_in: int = 64  # D columns per shrink step
    gemv_shrink_pairs: int = 4  # (token, slot) pairs per shrink program (more pairs: more programs)
    gemv_warps: int = 4
    gemv_stages: int = 4  # software pipelining depth for one token
    gemv_stages_tokens: int = 3  # ... and for more
    # `meteora_linear` (base product and expand as one reduction, [x | H] @ [W ; b_wide]). MeteoraLinear(strategy=
    # "fused") uses it for linear_min_tokens <= N <= linear_max_tokens: off by default. On the H200 (4096 -> 4096,
    # E = 28, r = 8) it beat `dense` at T = 4096 (1.34x the base against 1.43x) and lost at 1024 and 16384
    # (experiments/results/h200/README.md); not yet measured in the model or at other shapes
    linear_min_tokens: int = 4096
    linear_max_tokens: int = 0
    linear_shrink_split: int = 1  # its shrink's split of D (split with atomics: 1.86x against 1.34x at T = 4096)
    linear_block_tokens: int = 128
    linear_block_out: int = 256
    linear_block_in: int = 64  # halved for 4-byte operands (shared memory)
    linear_warps: int = 8
    linear_stages: int = 4  # at most 3 for 4-byte operands
    num_warps: int | None = None  # None: 8 for tiles of >= 64 x 256 elements, else 4
    num_stages: int = 3

    @classmethod
    def get_default(cls) -> BlockSizes:
        """The class defaults, or what `set_default_block_sizes` set."""
        return _DEFAULT_OVERRIDE[0] or cls()

    def warps(self, bm: int, bn: int) -> int:
        return self.num_warps or (8 if bm * bn >= 64 * 256 else 4)

    def routed_out_block(self, ld: int) -> int:
        """Output columns per program of the routed expand (the packed decode expand's or the routed pair's) for a
        linear or packed group of `ld` output columns."""
        return self.routed_block_out or (32 if ld < 4096 else 128)

    def routed_warps_for(self, bm: int) -> int:
        """Warps per program of the routed kernels for a token block of `bm` rows."""
        return self.routed_warps or (4 if bm <= 16 else 8)


_DEFAULT_OVERRIDE: list[BlockSizes | None] = [None]


def set_default_block_sizes(bs: BlockSizes | None) -> None:
    """Make `bs` what `BlockSizes.get_default()` returns (None: back to the class defaults), for calls that pass no
    block sizes (the model's). They are read at trace time, so when they change, JAX's compiled programs are
    dropped (`jax.clear_caches()`): a jitted function called before (generation's decode loop, cached by model
    structure) is traced again with the new ones instead of silently keeping the old."""
    if bs is not None and not isinstance(bs, BlockSizes):
        raise TypeError(f"set_default_block_sizes: expected a BlockSizes or None, got {type(bs).__name__}")
    if (bs or BlockSizes()) != BlockSizes.get_default():  # new values: drop what was traced with the old
        jax.clear_caches()
    _DEFAULT_OVERRIDE[0] = bs


@contextlib.contextmanager
def block_sizes_with(**fields):
    """Within the block: the default BlockSizes with `fields` replaced (`set_default_block_sizes`); after it, the
    defaults as they were."""
    before = _DEFAULT_OVERRIDE[0]
    set_default_block_sizes(dataclasses.replace(BlockSizes.get_default(), **fields))
    try:
        yield
    finally:
        set_default_block_sizes(before)


def _p2(n: int, lo: int = 16, hi: int | None = None) -> int:
    v = max(lo, 1 << max(0, math.ceil(math.log2(max(n, 1)))))
    return min(v, hi) if hi is not None else v


# ------------------------------------------------------------------------------------------------ launches
# Every kernel launch goes through `_launch`: one jitted function whose static arguments are the kernel (a
# functools.partial of a module-level kernel) and the pallas_call's settings. A model launches the same kernel at
# the same shapes in each of its layers; through one jitted function, JAX traces those launches once and lowers
# them once per program (a call of one shared function), instead of once per layer. The Triton lowering alone
# takes tens of ms per launch: SmolLM2's packed decode loop has 120 launches.

class _Frozen(tuple):
    """A dict, or a functools.partial without positional arguments, as a hashable value (`_freeze`)."""


def _freeze(v):
    if isinstance(v, dict):
        return _Frozen(("dict", tuple((k, _freeze(x)) for k, x in sorted(v.items()))))
    if isinstance(v, functools.partial) and not v.args:
        return _Frozen(("partial", v.func, _freeze(v.keywords)))
    return v


def _thaw(v):
    if isinstance(v, _Frozen):
        return {k: _thaw(x) for k, x in v[1]} if v[0] == "dict" else functools.partial(v[1], **_thaw(v[2]))
    return v


@functools.partial(jax.jit, static_argnums=(0, 1))
def _launch_jit(kernel, settings, *args):
    return pl.pallas_call(_thaw(kernel), **_thaw(settings))(*args)


def _launch(kernel, args, **settings):
    """`pl.pallas_call(kernel, **settings)(*args)`, traced and lowered once per kernel, settings and argument
    shapes (see above); a kernel or setting that cannot be hashed is launched on its own."""
    key = _freeze(kernel), _freeze(settings)
    try:
        hash(key)
    except TypeError:
        return pl.pallas_call(kernel, **settings)(*args)
    return _launch_jit(*key, *args)


def _zeroed_out(*refs, kernel):
    """`kernel` for a launch whose last input is a zeroed buffer aliased to its output: that input's ref dropped."""
    return kernel(*refs[:-2], refs[-1])


# ----------------------------------------------------------------------------------------------- layouts
# A layout maps a tile's row indices i [BI, 1] and column indices j [1, BJ] of a logical matrix to offsets
# into the operand's flat buffer.

@dataclasses.dataclass(frozen=True)
class Rows:
    """Row-major matrix with `ld` columns: off = i * ld + j."""

    ld: int

    def off(self, i, j):
        return i * self.ld + j


@dataclasses.dataclass(frozen=True)
class Cols:
    """A row-major `[cols, ld]` buffer read as its transpose: off = j * ld + i."""

    ld: int

    def off(self, i, j):
        return j * self.ld + i


@dataclasses.dataclass(frozen=True)
class Wide:
    """`a [E, D, R]` read as `[D, E*R]` (transpose=False) or `[E*R, D]` (transpose=True)."""

    d: int
    r: int
    transpose: bool = False

    def off(self, i, j):
        d, c = (j, i) if self.transpose else (i, j)
        return lax.div(c, self.r) * (self.d * self.r) + d * self.r + lax.rem(c, self.r)


@dataclasses.dataclass(frozen=True)
class Route:
    """How the routing enters a `_matmul` whose rows are tokens and columns wide (c belongs to expert c // r)."""

    k: int
    r: int
    skip: bool = False  # skip a column tile none of whose experts a token of the row block picked
    scale: bool = False  # multiply the result by coef[n, c] = sum_j w_j s_e [e_j == c // r]


def _iota(n):
    return lax.broadcasted_iota(jnp.int32, (n,), 0)


def _load(ref, off, mask, interpret):
    if interpret:  # jnp gathers clamp; keep masked lanes off valid elements
        off = jnp.where(mask, off, 0)
    return plgpu.load(ref.at[off], mask=mask, other=jnp.zeros((), ref.dtype))


def _store(ref, off, val, mask, interpret, atomic=False):
    """Store (or atomically add, returning the old values) `val` at `off` where `mask`."""
    if interpret:  # the emulated scatter drops out-of-range lanes: send masked ones there
        off = jnp.where(mask, off, ref.shape[0])
        if atomic:
            return plgpu.atomic_add(ref, off, val)
        plgpu.store(ref.at[off], val)
    elif atomic:
        return plgpu.atomic_add(ref, off, val, mask=mask)
    else:
        plgpu.store(ref.at[off], val, mask=mask)
    return None


def _dot(a, b):
    prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jnp.dot(a, b, preferred_element_type=jnp.float32, precision=prec)


def _count(buf_ref, at, old, interpret):
    """+1 on the counter buf[at] once this program's atomic adds are done: the sum below needs every lane's
    returned value `old`. (Atomics are acquire-release at GPU scope, as every Pallas atomic.)"""
    token = jnp.sum(jnp.where(old > 3e38, 1.0, 0.0)) * 0.0
    _store(buf_ref, at, jnp.ones((1,), jnp.float32) + token, at >= 0, interpret, atomic=True)


def _wait(buf_ref, at, total, interpret):
    """Spin until the counter buf[at] reaches `total`; returns an int32 0 to add to later offsets into buf, which
    orders those loads after the wait."""
    zero = jnp.zeros((1,), jnp.float32)
    poll = lambda: jnp.sum(_store(buf_ref, at, zero, at >= 0, interpret, atomic=True))  # noqa: E731
    seen = lax.while_loop(lambda v: v < total, lambda v: poll(), poll())
    return (seen < 0).astype(jnp.int32)


def _pair_shrink(x_ref, a_ref, tok, e, pmask, rr, rmask, start, steps, bk, *, d, r, interpret):
    """h [pairs, rp] f32: x[tok p, D range] @ a[e_p][D range] for each (token, slot) pair p, as matrix-vector
    products over `steps` D tiles of bk from `start` (the chosen experts' A only)."""
    def body(t, h):
        dd = start + t * bk + _iota(bk)
        dmask = dd < d
        xv = _load(x_ref, tok[:, None] * d + dd[None, :], pmask[:, None] & dmask[None, :], interpret)
        amask = pmask[:, None, None] & dmask[None, :, None] & rmask[None, None, :]
        av = _load(a_ref, e[:, None, None] * (d * r) + dd[None, :, None] * r + rr[None, None, :], amask, interpret)
        return h + jnp.sum(xv.astype(jnp.float32)[:, :, None] * av.astype(jnp.float32), axis=1)

    return lax.fori_loop(0, steps, body, jnp.zeros((tok.shape[0], rr.shape[0]), jnp.float32))


def _pair_expand(h, c, e, b_ref, pmask, rr, rmask, cols, cmask, *, r, o, dtype, interpret):
    """[pairs, bn] f32: c_p h[p] (rounded to `dtype`) @ b[e_p][:, cols] for each pair p."""
    h = (h * c[:, None]).astype(dtype).astype(jnp.float32)
    bmask = pmask[:, None, None] & rmask[None, :, None] & cmask[None, None, :]
    bv = _load(b_ref, e[:, None, None] * (r * o) + rr[None, :, None] * o + cols[None, None, :], bmask, interpret)
    return jnp.sum(h[:, :, None] * bv.astype(jnp.float32), axis=1)


# ------------------------------------------------------------------------------------------ the matmul
def _matmul_kernel(*refs, m, n, kdim, bm, bn, bk, ks, split, lhs, rhs, out, route, second, dtype, interpret):
    """out[i, j] (+)= sum_t lhs[i, t] rhs[t, j] over this program's share of t; see `_matmul`."""
    if second is not None:
        lhs_ref, rhs_ref, lhs2_ref, rhs2_ref, out_ref = refs[:5]
    elif route is None:
        lhs_ref, rhs_ref, out_ref = refs[:3]
    else:
        lhs_ref, rhs_ref, e_ref, w_ref, s_ref, out_ref = refs[:6]
    pid_m, pid_n, pid_s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows = pid_m * bm + _iota(bm)
    cols = pid_n * bn + _iota(bn)
    rmask, cmask = rows < m, cols < n
    xrows, wcols = rmask, cmask  # load masks; a skipped tile turns them all off (no memory traffic)

    if route is not None:
        ce = lax.div(cols, route.r)  # expert of each column
        hits = []  # per slot j: [bm, bn] token picked the column's expert; weights [bm]
        for j in range(route.k):
            e = _load(e_ref, rows * route.k + j, rmask, interpret)
            hits.append(((e[:, None] == ce[None, :]) & rmask[:, None], _load(w_ref, rows * route.k + j, rmask,
                                                                              interpret)))
        if route.skip:  # no token of the block picked an expert of this tile
            picked = functools.reduce(jnp.logical_or, [h for h, _ in hits]) & cmask[None, :]
            live = jnp.max(picked.astype(jnp.int32)) > 0
            xrows, wcols = rmask & live, cmask & live

    def body(t, acc):
        kk = pid_s * ks + t * bk + _iota(bk)
        kmask = kk < kdim
        x = _load(lhs_ref, lhs.off(rows[:, None], kk[None, :]), xrows[:, None] & kmask[None, :], interpret)
        w = _load(rhs_ref, rhs.off(kk[:, None], cols[None, :]), kmask[:, None] & wcols[None, :], interpret)
        return acc + _dot(x.astype(dtype), w.astype(dtype))

    acc = lax.fori_loop(0, pl.cdiv(ks, bk), body, jnp.zeros((bm, bn), jnp.float32))
    if second is not None:  # the same tile of a second product, lhs2 [m, kdim2] @ rhs2 [kdim2, n], added on
        kdim2, lhs2, rhs2, bk2 = second

        def body2(t, acc):
            kk = t * bk2 + _iota(bk2)
            kmask = kk < kdim2
            x = _load(lhs2_ref, lhs2.off(rows[:, None], kk[None, :]), rmask[:, None] & kmask[None, :], interpret)
            w = _load(rhs2_ref, rhs2.off(kk[:, None], cols[None, :]), kmask[:, None] & cmask[None, :], interpret)
            return acc + _dot(x.astype(dtype), w.astype(dtype))

        acc = lax.fori_loop(0, pl.cdiv(kdim2, bk2), body2, acc)
    if route is not None and route.scale:
        s = _load(s_ref, ce, cmask, interpret)
        coef = functools.reduce(jnp.add, [jnp.where(h, w[:, None], 0.0) for h, w in hits])
        acc = acc * (coef * s[None, :])
    off = out.off(rows[:, None], cols[None, :])
    _store(out_ref, off, acc.astype(out_ref.dtype), rmask[:, None] & cmask[None, :], interpret, atomic=split > 1)


def _matmul(lhs_arr, rhs_arr, *, m, n, kdim, lhs, rhs, out, out_dtype, dtype, bm, bn, bk, split=1, route=None,
            routing=(), second=None, num_warps=4, num_stages=3, interpret=False, name="meteora_mm"):
    """`out[m, n] = lhs[m, kdim] @ rhs[kdim, n]` over flat buffers read through layouts; f32 accumulation,
    operands rounded to `dtype`.

    The reduction is cut into `split` ranges whose programs add atomically into a zeroed f32 output.
    `routing = (experts [N*k], weights [N*k], scaling [E])` when `route` is given (rows are then tokens).
    `second = (lhs2_arr, rhs2_arr, kdim2, lhs2, rhs2, bk2)` adds a second product lhs2 [m, kdim2] @ rhs2 [kdim2, n]
    to every tile (one reduction over both: `[lhs | lhs2] @ [rhs ; rhs2]` with nothing concatenated; no split or
    route then).
    Returns the flat output buffer of `m * n` elements (in `out`'s layout).
    """
    ks = pl.cdiv(pl.cdiv(kdim, bk), split) * bk
    grid = (pl.cdiv(m, bm), pl.cdiv(n, bn), split)
    extra = []
    if second is not None:
        if split > 1 or route is not None:
            raise ValueError("_matmul: a second product takes neither split nor route")
        lhs2_arr, rhs2_arr, *second = second
        extra = [lhs2_arr.reshape(-1), rhs2_arr.reshape(-1)]
        second = tuple(second)
    kernel = functools.partial(_matmul_kernel, m=m, n=n, kdim=kdim, bm=bm, bn=bn, bk=bk, ks=ks, split=split,
                               lhs=lhs, rhs=rhs, out=out, route=route, second=second, dtype=dtype,
                               interpret=interpret)
    args = [lhs_arr.reshape(-1), rhs_arr.reshape(-1), *extra, *routing]
    aliases = {}
    if split > 1:
        out_dtype = jnp.float32
        args.append(jnp.zeros((m * n,), out_dtype))
        aliases = {len(args) - 1: 0}
        kernel = functools.partial(_zeroed_out, kernel=kernel)  # the zeroed input aliases the output ref
    return _launch(
        kernel, args, grid=grid, out_shape=jax.ShapeDtypeStruct((m * n,), out_dtype), input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret, name=name)


# -------------------------------------------------------------------------------------------- decode
def _decode_kernel(x_ref, a_ref, b_ref, s_ref, e_ref, w_ref, o_ref, *, n_tok, d, r, o, k, pp, rp, bn, bk,
                   interpret):
    """All (token, slot) pairs p at once: h[p] = x[tok p] @ a[e_p] as matrix-vector products (chosen experts
    only), then this program's output tile: sum_p c_p h[p] @ b[e_p][:, tile]."""
    cols = pl.program_id(0) * bn + _iota(bn)
    cmask = cols < o
    p = _iota(pp)
    pmask = p < n_tok * k
    tok = lax.div(p, k)
    e = _load(e_ref, p, pmask, interpret)
    c = _load(w_ref, p, pmask, interpret) * _load(s_ref, e, pmask, interpret)
    rr = _iota(rp)
    rmask = rr < r
    h = _pair_shrink(x_ref, a_ref, tok, e, pmask, rr, rmask, 0, pl.cdiv(d, bk), bk, d=d, r=r, interpret=interpret)
    contrib = _pair_expand(h, c, e, b_ref, pmask, rr, rmask, cols, cmask, r=r, o=o, dtype=x_ref.dtype,
                           interpret=interpret)  # [pp, bn]
    for i in range(n_tok):
        row = jnp.sum(jnp.where((tok == i)[:, None], contrib, 0.0), axis=0)
        _store(o_ref, i * o + cols, row.astype(o_ref.dtype), cmask, interpret)


def decode_tiles(bs: BlockSizes, pairs: int, r: int) -> tuple[int, int, int, int]:
    """(pp, rp, bk, bn) of the decode kernel: pairs and rank rounded up to powers of two, and the D / output
    tiles capped so that the [pp, bk, rp] and [pp, rp, bn] products stay in registers."""
    pp, rp = _p2(pairs, 1), _p2(r, 1)
    cap = max(16, bs.decode_max_elems // (pp * rp))
    return pp, rp, min(bs.decode_block_in, cap), min(bs.decode_block_out, cap)


def _decode(x, a, b, scaling, experts, weights, bs: BlockSizes, interpret: bool):
    n_tok, d = x.shape
    _, _, r = a.shape
    o, k = b.shape[-1], experts.shape[1]
    pp, rp, bk, bn = decode_tiles(bs, n_tok * k, r)
    kernel = functools.partial(_decode_kernel, n_tok=n_tok, d=d, r=r, o=o, k=k, pp=pp, rp=rp, bn=bn, bk=bk,
                               interpret=interpret)
    experts, weights, scaling = _routing(experts, weights, scaling)
    out = _launch(
        kernel, [x.reshape(-1), a.reshape(-1), b.reshape(-1), scaling, experts, weights], grid=(pl.cdiv(o, bn),),
        out_shape=jax.ShapeDtypeStruct((n_tok * o,), x.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=bs.decode_warps, num_stages=bs.num_stages),
        interpret=interpret, name="meteora_decode")
    return out.reshape(n_tok, o)


# ------------------------------------------------------------------------------- forward / backward
def _shrink(lhs_arr, w_arr, w_layout, kdim, r, c, routing, bs, impl, scale):
    """[N, C] = (coef *) lhs [N, kdim] @ W [kdim, C] (wide columns; unpicked column tiles skipped); f32 unless
    scaled and unsplit (then lhs's dtype).

    Forward: x @ a_wide (`Wide(D, r)`); backward: g @ b_wide^T (b [E, r, O] read as [O, E*r]: `Cols(O)`).
    """
    n_tok = lhs_arr.shape[0]
    k = routing[0].shape[0] // n_tok
    bm = _p2(n_tok, 16, bs.shrink_block_tokens)
    bc = bs.shrink_block_cols or (32 if n_tok <= 256 else _p2(c, 16, 256))
    bk = bs.shrink_block_in
    progs = pl.cdiv(n_tok, bm) * pl.cdiv(c, bc)
    split = bs.shrink_split or max(1, min(pl.cdiv(kdim, bk) // 2, pl.cdiv(bs.target_programs, progs)))
    route = Route(k=k, r=r, skip=min(bm, n_tok) * k <= bs.skip_max_picks, scale=scale)
    out_dtype = lhs_arr.dtype if scale else jnp.float32  # H feeds the expand in the compute dtype; P stays f32
    flat = impl.matmul(lhs_arr, w_arr, m=n_tok, n=c, kdim=kdim, lhs=Rows(kdim), rhs=w_layout, out=Rows(c),
                       out_dtype=out_dtype, dtype=lhs_arr.dtype, bm=bm, bn=bc, bk=bk, split=split, route=route,
                       routing=routing, num_warps=bs.warps(bm, bc), num_stages=bs.num_stages,
                       interpret=impl.interpret, name="meteora_shrink")
    return flat.reshape(n_tok, c)


def _expand(h, w_arr, w_layout, n_out, dtype, bs, impl):
    """[N, n_out] = h [N, C] @ W [C, n_out] (h rounded to `dtype`).

    Forward: H @ b_wide (`Rows(O)`); backward: dP @ a_wide^T (`Wide(D, r, transpose=True)`).
    """
    n_tok, c = h.shape
    bm = bs.expand_block_tokens or (_p2(n_tok, 16, 64) if n_tok <= 256 else 128)
    bn = bs.expand_block_out or (64 if n_tok <= 64 else 128)
    flat = impl.matmul(h, w_arr, m=n_tok, n=n_out, kdim=c, lhs=Rows(c), rhs=w_layout, out=Rows(n_out),
                       out_dtype=dtype, dtype=dtype, bm=bm, bn=bn, bk=bs.expand_block_cols,
                       num_warps=bs.warps(bm, bn), num_stages=bs.num_stages, interpret=impl.interpret,
                       name="meteora_expand")
    return flat.reshape(n_tok, n_out)


def _routing(experts, weights, scaling):
    return (experts.astype(jnp.int32).reshape(-1), weights.astype(jnp.float32).reshape(-1),
            scaling.astype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class Impl:
    """The kernels a fused path is built from: `matmul` as `_matmul`, `decode` as `_decode`
    (`kernels.meteora_triton` supplies Triton ones)."""

    matmul: Callable
    decode: Callable
    interpret: bool = False


def _coef(experts, weights, scaling, r):
    """coef [N, E*r] f32 (each expert's sum_j w_j s_e repeated over its r columns), wsum [N, E], one-hot."""
    onehot = jax.nn.one_hot(experts, scaling.shape[0], dtype=jnp.float32)  # [N, k, E]
    wsum = jnp.einsum("nk,nke->ne", weights.astype(jnp.float32), onehot)
    return jnp.repeat(wsum * scaling.astype(jnp.float32), r, axis=1), wsum, onehot


def _forward(x, a, b, scaling, experts, weights, bs, impl, keep_p=False):
    e_num, d, r = a.shape
    routing = _routing(experts, weights, scaling)
    if keep_p:  # for the backward: P unscaled, H = coef * P
        p = _shrink(x, a, Wide(d, r), d, r, e_num * r, routing, bs, impl, scale=False)
        h = _coef(experts, weights, scaling, r)[0] * p
    else:
        p = None
        h = _shrink(x, a, Wide(d, r), d, r, e_num * r, routing, bs, impl, scale=True)
    delta = _expand(h, b, Rows(b.shape[-1]), b.shape[-1], x.dtype, bs, impl)
    return delta, p


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def fused_apply(x, a, b, scaling, experts, weights, bs: BlockSizes, impl: Impl):
    """The adapter term through `impl`'s kernels (no argument checks; see `meteora_fused`)."""
    if x.shape[0] <= bs.decode_max_tokens:
        if bs.decode_kernel == "split" and impl.matmul is _matmul:
            return _routed_forward(x, None, None, a, b, scaling, experts, weights, None, bs, impl.interpret)
        return impl.decode(x, a, b, scaling, experts, weights, bs, impl.interpret)
    return _forward(x, a, b, scaling, experts, weights, bs, impl)[0]


def _fused_fwd(x, a, b, scaling, experts, weights, bs, impl):
    delta, p = _forward(x, a, b, scaling, experts, weights, bs, impl, keep_p=True)
    return delta, (x, a, b, scaling, experts, weights, p)


def _fused_bwd(bs, impl, res, g):
    x, a, b, scaling, experts, weights, p = res
    n_tok, d = x.shape
    e_num, _, r = a.shape
    o, c = b.shape[-1], e_num * r
    g = g.astype(x.dtype)
    routing = _routing(experts, weights, scaling)
    s32 = scaling.astype(jnp.float32)
    dh = _shrink(g, b, Cols(o), o, r, c, routing, bs, impl, scale=False)  # g @ b_wide^T  [N, C] f32
    coef, wsum, onehot = _coef(experts, weights, scaling, r)
    dcoef = (dh * p).reshape(n_tok, e_num, r).sum(-1)  # [N, E]: d loss / d (w s) per expert
    dw = jnp.einsum("ne,nke->nk", dcoef, onehot) * s32[experts]
    ds = jnp.einsum("ne,ne->e", dcoef, wsum)
    dp = (coef * dh).astype(x.dtype)  # [N, C]
    h = (coef * p).astype(x.dtype)
    dx = _expand(dp, a, Wide(d, r, transpose=True), d, x.dtype, bs, impl)
    mm = functools.partial(impl.matmul, dtype=x.dtype, bm=bs.weight_block_rows,
                           bk=_p2(n_tok, 16, bs.weight_block_tokens), num_stages=bs.num_stages,
                           interpret=impl.interpret)
    bw, bo = bs.weight_block_cols, bs.weight_block_out
    da = mm(x, dp, m=d, n=c, kdim=n_tok, lhs=Cols(d), rhs=Rows(c), out=Wide(d, r), out_dtype=a.dtype, bn=bw,
            num_warps=bs.warps(bs.weight_block_rows, bw), name="meteora_da")  # x^T @ dP, written as [E, D, r]
    db = mm(h, g, m=c, n=o, kdim=n_tok, lhs=Cols(c), rhs=Rows(o), out=Rows(o), out_dtype=b.dtype, bn=bo,
            num_warps=bs.warps(bs.weight_block_rows, bo), name="meteora_db")  # (coef P)^T @ g
    return (dx, da.reshape(a.shape), db.reshape(b.shape), ds.astype(scaling.dtype), None,
            dw.astype(weights.dtype))


fused_apply.defvjp(_fused_fwd, _fused_bwd)


def meteora_fused(x, a, b, scaling, experts, weights, *, block_sizes: BlockSizes | None = None,
                  interpret: bool | None = None):
    """The adapter term `[N, O]` in x's dtype; differentiable in x, a, b, scaling and weights.

    Operands are used in x's dtype (cast a, b beforehand); experts must lie in [0, E).
    `interpret=None` runs the kernels in Pallas interpret mode when no GPU backend is present.
    """
    check_args(x, a, b, scaling, experts, weights)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    impl = Impl(matmul=_matmul, decode=_decode, interpret=bool(interpret))
    return fused_apply(x, a, b, scaling, experts, weights, block_sizes or BlockSizes.get_default(), impl)


# --------------------------------------------------------- base product and adapter term as one reduction
# `meteora_linear`: y = x @ W + H @ b_wide with H = coef * (x @ a_wide) from the shrink above (here reading a
# contiguous copy of a_wide, unsplit: both measured faster at T = 4096), the expand folded into the base product's
# reduction: each output tile runs its K loop over x / W and then over H / b_wide
# (`_matmul`'s `second`), so the adapter term costs the shrink plus E*r / in more reduction, with no delta written
# and no separate add. The backward is the adapter term's (`_fused_bwd`) plus g @ W^T and x^T @ g in XLA.

def _linear_forward(x, w, a, b, scaling, experts, weights, bs, interpret, keep_p=False):
    n_tok, d = x.shape
    e_num, _, r = a.shape
    c, o = e_num * r, w.shape[1]
    impl = Impl(matmul=_matmul, decode=_decode, interpret=interpret)
    routing = _routing(experts, weights, scaling)
    a_wide = a.transpose(1, 0, 2).reshape(d, c)  # contiguous rows for the shrink's tiles (a copy of E*D*r elements)
    sbs = dataclasses.replace(bs, shrink_split=bs.linear_shrink_split)
    p = None
    if keep_p:  # for the backward: P unscaled
        p = _shrink(x, a_wide, Rows(c), d, r, c, routing, sbs, impl, scale=False)
        h = (_coef(experts, weights, scaling, r)[0] * p).astype(x.dtype)
    else:
        h = _shrink(x, a_wide, Rows(c), d, r, c, routing, sbs, impl, scale=True)
    wide = x.dtype.itemsize > 2  # f32 tiles: half the K step and at most 3 stages fit the shared memory
    bk = bs.linear_block_in // 2 if wide else bs.linear_block_in
    y = _matmul(x, w, m=n_tok, n=o, kdim=d, lhs=Rows(d), rhs=Rows(o), out=Rows(o), out_dtype=x.dtype, dtype=x.dtype,
                bm=bs.linear_block_tokens, bn=bs.linear_block_out, bk=bk,
                second=(h, b, c, Rows(c), Rows(o), min(bk, _p2(c))), num_warps=bs.linear_warps,
                num_stages=min(bs.linear_stages, 3) if wide else bs.linear_stages, interpret=interpret,
                name="meteora_linear")
    return y.reshape(n_tok, o), p


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _linear_apply(x, w, a, b, scaling, experts, weights, bs, interpret):
    return _linear_forward(x, w, a, b, scaling, experts, weights, bs, interpret)[0]


def _linear_fwd(x, w, a, b, scaling, experts, weights, bs, interpret):
    y, p = _linear_forward(x, w, a, b, scaling, experts, weights, bs, interpret, keep_p=True)
    return y, (x, w, a, b, scaling, experts, weights, p)


def _linear_bwd(bs, interpret, res, g):
    x, w, a, b, scaling, experts, weights, p = res
    g = g.astype(x.dtype)
    impl = Impl(matmul=_matmul, decode=_decode, interpret=interpret)
    dx, da, db, ds, _, dwt = _fused_bwd(bs, impl, (x, a, b, scaling, experts, weights, p), g)
    prec = lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    dx = (dx.astype(jnp.float32) + jnp.dot(g, w.T, preferred_element_type=jnp.float32, precision=prec)).astype(x.dtype)
    dw = jnp.dot(x.T, g, preferred_element_type=jnp.float32, precision=prec).astype(w.dtype)  # unused: XLA drops it
    return dx, dw, da, db, ds, None, dwt


_linear_apply.defvjp(_linear_fwd, _linear_bwd)


def meteora_linear(x, w, a, b, scaling, experts, weights, *, block_sizes: BlockSizes | None = None,
                   interpret: bool | None = None):
    """`x @ w + delta` `[N, O]` in x's dtype (w `[D, O]`, the base weight as stored); differentiable in x, w, a, b,
    scaling and weights. The other arguments as `meteora_fused`."""
    check_args(x, a, b, scaling, experts, weights)
    if w.shape != (x.shape[1], b.shape[-1]):
        raise ValueError(f"meteora_linear: w {w.shape} must be [in={x.shape[1]}, out={b.shape[-1]}]")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    return _linear_apply(x, w.astype(x.dtype), a, b, scaling, experts, weights,
                         block_sizes or BlockSizes.get_default(), bool(interpret))


# ------------------------------------------------------------------- routed decode: gate + adapter term
# For a few tokens (decode), the MeteoRA linear's gate, routing and adapter term in two launches, added to the
# base output y in place (inference; the backward recomputes through `routed_reference`):
#   shrink  a grid of (D range Ds, column block): each program adds atomically into one zeroed f32 buffer
#           L += x[:, Ds] @ G[Ds, block]  or  P += x[:, Ds] @ a_wide[Ds, block]
#           (with a single D range, `routed_splits=1`, it stores instead and nothing is zeroed)
#   expand  programs over output tiles: each token's top-k experts and weights from L (as `meteora.route`),
#           coef [N, E*r]; y[:, tile] += (coef * P) @ b_wide[picked rows, tile].
# The same pair serves m linears that read the same x (`Members`; `meteora_routed_packed`, packed q/k/v and
# gate/up): member j owns gate columns [jE, (j+1)E), shrink columns [jEr, (j+1)Er) and its span of y's columns;
# each expand program looks up its member in a static table of tile ranges.
# The atomic adds make L and P (so, rarely, a near-tie between experts) vary in the last bits from run to run.
# (A first version wrote per-program partial sums that every expand program added up in a loop: on the H100 that
# loop of dependent loads made both kernels 7 to 20 us each.)
# Rows of b_wide of experts no token picked are never loaded. A member's first expand program also writes its
# experts and weights (the routing the model returns); the logits are L itself.
# (Expand programs that also computed their tile of the base product x @ W, a Pallas GEMV, made the H100's
# Llama-3-8B decode step slower, 8.8 to 14.6 ms against 7.5: removed. `meteora_routed_expand` instead takes the
# base output, the logits and P from one XLA product x @ [W | G | A], packed mode "extended".)
# `routed_one_launch` runs both halves as one grid, the expand programs spinning on a counter until every shrink
# program has added its part; on the H100 it was no faster than two launches (experiments/results/
# decode_tune_one.md), so it is off by default.

@dataclasses.dataclass(frozen=True)
class RouteSpec:
    """How the routed expand picks experts: from the gate logits (`top_k`, `temperature`, `routing` as in
    `meteora_jax.meteora.route`), or every token on `forced_expert` with weight 1 (then top_k is 1)."""

    top_k: int
    temperature: float = 1.0
    routing: str = "topk_softmax"
    forced_expert: int | None = None


@dataclasses.dataclass(frozen=True)
class Members:
    """The linears one routed call serves, all reading the same x. Member j owns gate columns [jE, (j+1)E) of
    G [D, m*E], shrink columns [jER, (j+1)ER) of A (a [E, D, R] for one member, or a packed [D, m*E*R]), and the
    output columns `spans[j] = (offset, size)` of y [N, ld] and of B viewed as [E*R, ld]."""

    e: int
    r: int
    spans: tuple[tuple[int, int], ...]
    ld: int

    @property
    def m(self) -> int:
        return len(self.spans)

    def tile_starts(self, bn: int) -> tuple[int, ...]:
        """First expand program of each member, then the number of programs."""
        out = [0]
        for _, size in self.spans:
            out.append(out[-1] + pl.cdiv(size, bn))
        return tuple(out)


def _routed_shrink_kernel(x_ref, g_ref, a_ref, *refs, **kw):
    """Program (s, cb) adds x[:, Ds] @ A[Ds, cols of block cb] into o[n*gc:] (P, [N, c]) or, for cb >= ablocks,
    x[:, Ds] @ G[Ds, cols of gate block cb - ablocks] into o[:n*gc] (logits, [N, gc]). With one D range
    (`atomic` False) it stores instead of adding, and o needs no zeroing."""
    # (with atomics, refs[0] is the zeroed buffer, aliased to refs[-1])
    _shrink_body(x_ref, g_ref, a_ref, refs[-1], pl.program_id(0), pl.program_id(1), **kw)


def _shrink_body(x_ref, g_ref, a_ref, o_ref, s, cb, *, n, d, gc, c, bm, bd, bc, bg, chunks, ablocks, a_layout, gate,
                 atomic, dtype, interpret, signal=None):
    """The shrink program (s, cb); `signal(old)`, if given, runs after its atomic adds with the values they
    returned (so after they are done)."""
    rows = _iota(bm)
    rmask = rows < n

    def x_tile(t):
        dd = (s * chunks + t) * bd + _iota(bd)
        dmask = dd < d
        xv = _load(x_ref, rows[:, None] * d + dd[None, :], rmask[:, None] & dmask[None, :], interpret)
        return dd, dmask, xv

    def shrink():
        cols = cb * bc + _iota(bc)
        cmask = cols < c

        def body(t, p):
            dd, dmask, xv = x_tile(t)
            av = _load(a_ref, a_layout.off(dd[:, None], cols[None, :]), dmask[:, None] & cmask[None, :], interpret)
            return p + _dot(xv.astype(dtype), av.astype(dtype))

        p = lax.fori_loop(0, chunks, body, jnp.zeros((bm, bc), jnp.float32))
        old = _store(o_ref, n * gc + rows[:, None] * c + cols[None, :], p, rmask[:, None] & cmask[None, :],
                     interpret, atomic=atomic)
        if signal is not None:
            signal(old)

    def gate_product():
        cols = (cb - ablocks) * bg + _iota(bg)
        cmask = cols < gc

        def body(t, lg):
            dd, dmask, xv = x_tile(t)
            gv = _load(g_ref, dd[:, None] * gc + cols[None, :], dmask[:, None] & cmask[None, :], interpret)
            return lg + _dot(xv.astype(jnp.float32), gv.astype(jnp.float32))

        lg = lax.fori_loop(0, chunks, body, jnp.zeros((bm, bg), jnp.float32))
        old = _store(o_ref, rows[:, None] * gc + cols[None, :], lg, rmask[:, None] & cmask[None, :], interpret,
                     atomic=atomic)
        if signal is not None:
            signal(old)

    if gate:
        pl.when(cb < ablocks)(shrink)
        pl.when(cb >= ablocks)(gate_product)
    else:
        shrink()


def _pick(logits, valid, ecols, spec: RouteSpec):
    """Per token (rows of `logits [bm, ep]`), the top-k experts and their weights, as `meteora.route` (ties to
    the lower index, as `lax.top_k`)."""
    neg = jnp.float32(-jnp.inf)
    v = jnp.where(valid, logits, neg)
    if spec.routing == "softmax_topk":
        z = jnp.exp((v - jnp.max(v, axis=1, keepdims=True)) / spec.temperature)
        v = jnp.where(valid, z / jnp.sum(z, axis=1, keepdims=True), neg)
    vals, idx = [], []
    for _ in range(spec.top_k):
        m = jnp.max(v, axis=1)
        i = jnp.min(jnp.where(v == m[:, None], ecols[None, :], ecols.shape[0]), axis=1)
        vals.append(m)
        idx.append(i)
        v = jnp.where(ecols[None, :] == i[:, None], neg, v)
    if spec.routing == "softmax_topk":
        tot = functools.reduce(jnp.add, vals)
        return idx, [u / tot for u in vals]
    if spec.top_k == 1:
        return idx, [jnp.ones_like(vals[0])]
    ex = [jnp.exp((u - vals[0]) / spec.temperature) for u in vals]
    tot = functools.reduce(jnp.add, ex)
    return idx, [u / tot for u in ex]


def _routed_expand_kernel(*refs, spec, has_y, **kw):
    """Program i serves output columns of one member j: routing of its tokens from its logits (or given), coef,
    y[:, tile] += (coef * P_j) @ B[picked rows, tile]. A member's first program writes its experts and weights."""
    refs = list(refs)
    buf_ref = refs.pop(0)  # [N * gc] logits, then [N, m*E*R] P
    given = spec is None
    e_ref, w_ref = (refs.pop(0), refs.pop(0)) if given else (None, None)
    b_ref, s_ref = refs.pop(0), refs.pop(0)
    y_ref = refs.pop(0) if has_y else None
    out_ref = refs.pop(0)
    ex_ref, wt_ref = (None, None) if given else refs
    _expand_body(buf_ref, e_ref, w_ref, b_ref, s_ref, y_ref, out_ref, ex_ref, wt_ref, pl.program_id(0), spec=spec,
                 **kw)


def _member_term(buf_ref, e_ref, w_ref, b_ref, s_ref, j, cols, omask, rows, rmask, after, *, n, mem: Members, k,
                 bm, ep, cp, gc, spec, dtype, interpret, zl, dense_b=False):
    """Member j's part of an expand program (`j` static or traced): its tokens' routing (from the logits in buf,
    given in e_ref / w_ref, or the forced expert) and the operands of its adapter term on output columns `cols`:
    (h [bm, cp] = coef * P in `dtype`, B's tile [cp, bn], experts, weights). B's tile holds only the picked
    experts' rows (the others masked to zero), or with `dense_b` all of them, loaded first, before the routing
    is known (their h is zero)."""
    given = spec is None
    e, r, m, ld = mem.e, mem.r, mem.m, mem.ld
    c, er = m * e * r, e * r
    ecols, ccols = _iota(ep), _iota(cp)
    emask, cmask = ecols < e, ccols < er
    if zl is None:  # buf: [N * gc] logits, then [N, c] P
        lg_off = lambda part: rows[:, None] * gc + j * e + ecols[None, :] + after  # noqa: E731
        p_off = n * gc + rows[:, None] * c + j * er + ccols[None, :] + after
    else:  # buf: z [N, ldz]
        ldz, parts = zl
        lg_off = lambda part: rows[:, None] * ldz + ld + part * gc + j * e + ecols[None, :] + after  # noqa: E731
        p_off = rows[:, None] * ldz + ld + parts * gc + j * er + ccols[None, :] + after
    bload = lambda rmask_b: _load(b_ref, ccols[:, None] * ld + cols[None, :],  # noqa: E731
                                  (rmask_b & cmask)[:, None] & omask[None, :], interpret)
    bw = bload(cmask) if dense_b else None
    p = _load(buf_ref, p_off, rmask[:, None] & cmask[None, :], interpret).astype(jnp.float32)  # z may be bf16
    if given:  # routing passed in: experts / weights [N, m, k]
        idx = [_load(e_ref, rows * (m * k) + j * k + jj, rmask, interpret) for jj in range(k)]
        wts = [_load(w_ref, rows * (m * k) + j * k + jj, rmask, interpret) for jj in range(k)]
    elif spec.forced_expert is None:
        lmask = rmask[:, None] & emask[None, :]
        lg = functools.reduce(jnp.add, [_load(buf_ref, lg_off(t), lmask, interpret).astype(jnp.float32)
                                        for t in range(1 if zl is None else zl[1])])
        idx, wts = _pick(lg, emask[None, :], ecols, spec)
    else:
        idx, wts = [jnp.full((bm,), spec.forced_expert, jnp.int32)], [jnp.ones((bm,), jnp.float32)]
    ce = lax.div(ccols, r)
    sc = _load(s_ref, j * e + ce, cmask, interpret)
    coef = functools.reduce(jnp.add, [jnp.where(ce[None, :] == i[:, None], w[:, None], 0.0)
                                      for i, w in zip(idx, wts, strict=True)])
    coef = jnp.where(rmask[:, None], coef * sc[None, :], 0.0)
    h = (coef * p).astype(dtype)
    if bw is None:
        bw = bload(jnp.max((coef != 0).astype(jnp.int32), axis=0) > 0)  # only the picked experts' rows
    return h, bw, idx, wts


def _store_routing(ex_ref, wt_ref, j, idx, wts, rows, rmask, first, *, m, k, interpret):
    """Member j's experts and weights of the block's tokens into [N, m, k] (where `first`: one program each)."""
    for jj in range(k):
        _store(ex_ref, rows * (m * k) + j * k + jj, idx[jj], rmask & first, interpret)
        _store(wt_ref, rows * (m * k) + j * k + jj, wts[jj], rmask & first, interpret)


def _expand_body(buf_ref, e_ref, w_ref, b_ref, s_ref, y_ref, out_ref, ex_ref, wt_ref, pid, *, n, mem: Members, k, bm,
                 bn, ep, cp, gc, spec, dtype, interpret, zl=None, pre=None, dense_b=False):
    """`zl` (ldz, parts): buf is z = x @ [W | G (parts column blocks, summed) | A], [N, ldz] (`meteora_routed_expand`):
    the logits and P come from its columns, and without y_ref the base output too. `pre(cols, omask)`, if given,
    runs first and returns (the f32 base tile [bm, bn] of these columns, an int32 0 that orders every later load
    of buf after it): the base output then comes from it (`meteora_gemv_expand`)."""
    given, has_y = spec is None, y_ref is not None
    m, ld = mem.m, mem.ld
    starts = mem.tile_starts(bn)
    j, first_tile, off, end = 0, starts[0], mem.spans[0][0], sum(mem.spans[0])
    for jj in range(1, m):  # which member this program serves (static table; arithmetic, no scalar selects)
        here = (pid >= starts[jj]).astype(jnp.int32)
        j = j + here
        first_tile = first_tile + here * (starts[jj] - starts[jj - 1])
        off = off + here * (mem.spans[jj][0] - mem.spans[jj - 1][0])
        end = end + here * (sum(mem.spans[jj]) - sum(mem.spans[jj - 1]))
    rows = _iota(bm)
    cols = off + (pid - first_tile) * bn + _iota(bn)
    rmask, omask = rows < n, cols < end
    base, after = pre(cols, omask) if pre is not None else (None, 0)
    h, bw, idx, wts = _member_term(buf_ref, e_ref, w_ref, b_ref, s_ref, j, cols, omask, rows, rmask, after, n=n,
                                   mem=mem, k=k, bm=bm, ep=ep, cp=cp, gc=gc, spec=spec, dtype=dtype,
                                   interpret=interpret, zl=zl, dense_b=dense_b)
    omask2 = rmask[:, None] & omask[None, :]
    yoff = rows[:, None] * ld + cols[None, :]
    yv = _load(y_ref, yoff, omask2, interpret) if has_y else None
    if base is not None:
        yv = base
    elif zl is not None and not has_y:  # the base output from z, in f32
        yv = _load(buf_ref, rows[:, None] * zl[0] + cols[None, :], omask2, interpret).astype(jnp.float32)
    delta = _dot(h, bw.astype(dtype))
    if base is not None or (zl is not None and not has_y):  # f32 base + f32 delta, rounded once
        delta = (yv + delta).astype(out_ref.dtype)
    else:
        delta = delta.astype(out_ref.dtype)
        if yv is not None:
            delta = (yv.astype(jnp.float32) + delta.astype(jnp.float32)).astype(out_ref.dtype)
    _store(out_ref, yoff, delta, omask2, interpret)
    if not given:  # the routing of member j, once (its first program)
        _store_routing(ex_ref, wt_ref, j, idx, wts, rows, rmask, pid == first_tile, m=m, k=k, interpret=interpret)


def _routed_glu_kernel(buf_ref, b_ref, s_ref, out_ref, ex_ref, wt_ref, *, n, mem: Members, k, bm, bn, ep, cp, gc,
                       spec, dtype, interpret, zl, dense_b=False):
    """`meteora_routed_expand(glu=True)`: program i serves columns [i*bn, (i+1)*bn) of both members (gate: member 0,
    up: member 1, each `half` columns): y_j = base_j + delta_j (f32, from z) for both, then silu(y_0) * y_1 rounded
    once. Program 0 writes both members' routing."""
    pid = pl.program_id(0)
    half = mem.spans[1][0]
    rows, cols = _iota(bm), pid * bn + _iota(bn)
    rmask, omask = rows < n, cols < half
    kw = dict(n=n, mem=mem, k=k, bm=bm, ep=ep, cp=cp, gc=gc, spec=spec, dtype=dtype, interpret=interpret, zl=zl,
              dense_b=dense_b)
    terms = [_member_term(buf_ref, None, None, b_ref, s_ref, j, cols + j * half, omask, rows, rmask, 0, **kw)
             for j in range(2)]
    omask2 = rmask[:, None] & omask[None, :]
    gate, up = (_load(buf_ref, rows[:, None] * zl[0] + j * half + cols[None, :], omask2, interpret).astype(jnp.float32)
                + _dot(h, bw.astype(dtype)) for j, (h, bw, _, _) in enumerate(terms))
    act = gate / (1.0 + jnp.exp(-gate)) * up  # silu(gate) * up, f32
    _store(out_ref, rows[:, None] * half + cols[None, :], act.astype(out_ref.dtype), omask2, interpret)
    for j, (_, _, idx, wts) in enumerate(terms):
        _store_routing(ex_ref, wt_ref, j, idx, wts, rows, rmask, pid == 0, m=2, k=k, interpret=interpret)


def routed_tiles(bs: BlockSizes, n: int, d: int) -> tuple[int, int, int, int]:
    """(bm, bd, chunks, programs): token rows (a power of two >= 16), D rows per shrink step, steps per shrink
    program, and shrink programs along D (at most `routed_splits`)."""
    bm, bd = _p2(n, 16), bs.routed_block_in
    steps = pl.cdiv(d, bd)
    chunks = pl.cdiv(steps, max(1, bs.routed_splits))
    return bm, bd, chunks, pl.cdiv(steps, chunks)


def _routed_forward(x, y, gate, a, b, scaling, experts, weights, spec: RouteSpec | None, bs: BlockSizes,
                    interpret: bool, mem: Members | None = None):
    """The two launches. One member (`mem` None): a [E, D, R], b [E, R, O], scaling [E], experts/weights [N, k].
    Packed members (`mem` given): a [D, m*E*R], b [E*R, ld], scaling [m, E]. `spec` None: the routing is given;
    else the gate [D, m*E] picks (or forces) it. Returns y + delta (or delta when y is None; one member only),
    and with a gate (logits [N, m*E], experts [N, m*k], weights [N, m*k])."""
    n, d = x.shape
    if mem is None:
        e, _, r = a.shape
        mem = Members(e, r, ((0, b.shape[-1]),), b.shape[-1])
        a_layout = Wide(d, r)
    else:
        a_layout = Rows(mem.m * mem.e * mem.r)
    e, r, m = mem.e, mem.r, mem.m
    c = m * e * r
    f32 = jnp.float32
    bm, bd, chunks, programs = routed_tiles(bs, n, d)
    gated = spec is not None
    gc = m * e if gated else 0
    bc = min(bs.routed_block_cols, _p2(c, 16))
    ablocks = pl.cdiv(c, bc)
    bg = min(bs.routed_block_gate, _p2(gc, 16))
    gblocks = pl.cdiv(gc, bg) if gated else 0
    atomic = programs > 1
    k = spec.top_k if gated else experts.shape[-1]
    bn = bs.routed_out_block(mem.ld)
    shrink_kw = dict(n=n, d=d, gc=gc, c=c, bm=bm, bd=bd, bc=bc, bg=bg, chunks=chunks, ablocks=ablocks,
                     a_layout=a_layout, gate=gated, atomic=atomic, dtype=x.dtype, interpret=interpret)
    expand_kw = dict(n=n, mem=mem, k=k, bm=bm, bn=bn, ep=_p2(e, 16), cp=_p2(e * r, 16), gc=gc, spec=spec,
                     dtype=x.dtype, interpret=interpret)
    params = plgpu.CompilerParams(num_warps=bs.routed_warps_for(bm), num_stages=2)
    size = n * (gc + c)
    head = [x.reshape(-1), (gate if gated else jnp.zeros((1,), f32)).reshape(-1), a.reshape(-1)]
    given = [] if gated else [experts.reshape(-1).astype(jnp.int32), weights.reshape(-1).astype(f32)]
    tail = [b.reshape(-1), scaling.reshape(-1).astype(f32)] + ([] if y is None else [y.reshape(-1)])
    out_dtype = x.dtype if y is None else y.dtype
    routing_shapes = [jax.ShapeDtypeStruct((n * m * k,), jnp.int32), jax.ShapeDtypeStruct((n * m * k,), f32)]
    tiles = mem.tile_starts(bn)[-1]
    if bs.routed_one_launch and atomic:  # one launch: expand programs wait for the shrink programs
        n_shrink = programs * (ablocks + gblocks)
        args = head + given + tail + [jnp.zeros((size + 1,), f32)]
        aliases = {len(args) - 1: 1}
        if y is not None:
            aliases[len(args) - 2] = 0
        one = functools.partial(_routed_one_kernel, n_shrink=n_shrink, nblocks=ablocks + gblocks, cnt=size,
                                has_y=y is not None, shrink_kw=shrink_kw, expand_kw=expand_kw, interpret=interpret)
        outs = _launch(
            one, args, grid=(n_shrink + tiles,), input_output_aliases=aliases, compiler_params=params,
            out_shape=(jax.ShapeDtypeStruct((n * mem.ld,), out_dtype), jax.ShapeDtypeStruct((size + 1,), f32),
                       *(routing_shapes if gated else [])),
            interpret=interpret, name="meteora_routed_one")
        out, buf, routing = outs[0].reshape(n, mem.ld), outs[1], outs[2:]
    else:
        buf = _launch(
            functools.partial(_routed_shrink_kernel, **shrink_kw), head + ([jnp.zeros((size,), f32)] if atomic else []),
            grid=(programs, ablocks + gblocks),
            out_shape=jax.ShapeDtypeStruct((size,), f32), input_output_aliases={3: 0} if atomic else {},
            compiler_params=params, interpret=interpret, name="meteora_routed_shrink")
        args = [buf] + given + tail
        outs = _launch(
            functools.partial(_routed_expand_kernel, has_y=y is not None, **expand_kw), args,
            grid=(tiles,),
            out_shape=(jax.ShapeDtypeStruct((n * mem.ld,), out_dtype), *(routing_shapes if gated else [])),
            input_output_aliases={len(given) + 3: 0} if y is not None else {}, compiler_params=params,
            interpret=interpret, name="meteora_routed_expand")
        out, routing = outs[0].reshape(n, mem.ld), outs[1:]
    if not gated:
        return out
    return out, buf[:n * gc].reshape(n, gc), routing[0].reshape(n, m * k), routing[1].reshape(n, m * k)


def _routed_one_kernel(x_ref, g_ref, a_ref, *refs, n_shrink, nblocks, cnt, has_y, shrink_kw, expand_kw, interpret):
    """Both halves in one grid: programs [0, n_shrink) are the shrink's (s, cb); after its atomic adds have
    returned, each adds 1 to a counter (buf[cnt], acquire-release at GPU scope, as every Pallas atomic). The
    expand programs that follow spin on the counter until all shrink programs are counted, then run as
    `_routed_expand_kernel`. The shrink programs come first in the grid, so they are scheduled before any
    spinning program can take their place; all of them fit on the GPU at once at decode sizes."""
    refs = list(refs)
    given = expand_kw["spec"] is None
    e_ref, w_ref = (refs.pop(0), refs.pop(0)) if given else (None, None)
    b_ref, s_ref = refs.pop(0), refs.pop(0)
    y_ref = refs.pop(0) if has_y else None
    refs.pop(0)  # the zeroed buffer, aliased to buf_ref
    out_ref, buf_ref = refs.pop(0), refs.pop(0)
    ex_ref, wt_ref = (None, None) if given else refs
    pid = pl.program_id(0)
    at = jnp.full((1,), cnt, jnp.int32)
    signal = lambda old: _count(buf_ref, at, old, interpret)  # noqa: E731

    @pl.when(pid < n_shrink)
    def _():
        _shrink_body(x_ref, g_ref, a_ref, buf_ref, lax.div(pid, nblocks), lax.rem(pid, nblocks), signal=signal,
                     **shrink_kw)

    @pl.when(pid >= n_shrink)
    def _():
        tile = pid - n_shrink + _wait(buf_ref, at, n_shrink, interpret)  # (+ 0: orders the expand after the wait)
        _expand_body(buf_ref, e_ref, w_ref, b_ref, s_ref, y_ref, out_ref, ex_ref, wt_ref, tile, **expand_kw)


def meteora_fused_add(x, y, a, b, scaling, experts, weights, *, block_sizes: BlockSizes | None = None,
                      interpret: bool | None = None):
    """`y + delta` for given routing through the routed pair (forward only; meant for a few tokens): the adapter
    term is added into the base output's buffer, with no separate add."""
    check_args(x, a, b, scaling, experts, weights)
    if y.shape != (x.shape[0], b.shape[-1]):
        raise ValueError(f"meteora_fused_add: y {y.shape} must be [N={x.shape[0]}, out={b.shape[-1]}]")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    return _routed_forward(x, y, None, a, b, scaling, experts, weights, None, block_sizes or BlockSizes.get_default(),
                           bool(interpret))


# ------------------------------------------------------------- base product + adapter term in one launch
# `meteora_gemv`: y = x @ W + delta for a few tokens with the routing given, ONE launch, the base weight stored
# transposed (wt = W^T [out, in], PyTorch's nn.Linear layout), so that each program's rows of wt are contiguous
# runs of D and the matrix-vector product streams them at the bandwidth cuBLAS reaches. (Reading W [in, out]
# instead, a program's [D tile, out tile] block is made of short rows: the same kernel ran 1.25x to 1.6x the XLA
# base product on the H100, split over D or not, see experiments/results/gemv/README.md.) Grid:
#   programs [0, S)       shrink, one per (group of pairs, D range Ds): h[p] += x[tok p, Ds] @ a[e_p][Ds] for
#                         its (token, slot) pairs p (the picked experts' A only), atomically into a zeroed f32
#                         buffer; then +1 on a counter at the buffer's end
#   programs [S, S + O/bn) their bn output rows of x @ W (f32), then spin on the counter until all S shrink
#                         programs are counted, then add sum_p c_p h[p] @ b[e_p][:, rows] and store y once.
# The shrink programs come first in the grid, so they are scheduled before the programs that wait on them.
# From `BlockSizes.gemv_dense_from` tokens on (`_gemv_dense_kernel`), the shrink is the routed kernels' (x against
# every expert's A in tensor-core tiles) and the output programs run the routed expand with the routing given.
# Measured (gemv/README.md): 1.01x to 1.10x the XLA base product at one token; 1.35x to 1.71x at 16, 2x+ at 64.

def _gemv_kernel(x_ref, wt_ref, a_ref, b_ref, s_ref, e_ref, w_ref, z_ref, o_ref, buf_ref, *, n, d, o, k, r, bm, bn,
                 bk, pp, rp, ppb, n_ds, n_shrink, chunk, sbk, interpret):
    del z_ref  # the zeroed buffer, aliased to buf_ref
    pid = pl.program_id(0)
    p = _iota(pp)
    pmask = p < n * k
    tok = lax.div(p, k)
    rr = _iota(rp)
    rrmask = rr < r
    e = _load(e_ref, p, pmask, interpret)
    hmask = pmask[:, None] & rrmask[None, :]
    at = jnp.full((1,), pp * rp, jnp.int32)

    @pl.when(pid < n_shrink)
    def _():  # program (pair group, D range)
        q = lax.div(pid, n_ds) * ppb + _iota(ppb)
        qmask = q < n * k
        h = _pair_shrink(x_ref, a_ref, lax.div(q, k), _load(e_ref, q, qmask, interpret), qmask, rr, rrmask,
                         lax.rem(pid, n_ds) * chunk, chunk // sbk, sbk, d=d, r=r, interpret=interpret)
        old = _store(buf_ref, q[:, None] * rp + rr[None, :], h, qmask[:, None] & rrmask[None, :], interpret,
                     atomic=True)
        _count(buf_ref, at, old, interpret)

    @pl.when(pid >= n_shrink)
    def _():
        cols = (pid - n_shrink) * bn + _iota(bn)
        cmask = cols < o
        rows = _iota(bm)
        acc = _gemv_acc(x_ref, wt_ref, cols, cmask, n=n, d=d, bm=bm, bk=bk, interpret=interpret)
        after = _wait(buf_ref, at, n_shrink, interpret)
        h = _load(buf_ref, p[:, None] * rp + rr[None, :] + after, hmask, interpret)
        c = _load(w_ref, p, pmask, interpret) * _load(s_ref, e, pmask, interpret)
        contrib = _pair_expand(h, c, e, b_ref, pmask, rr, rrmask, cols, cmask, r=r, o=o, dtype=x_ref.dtype,
                               interpret=interpret)  # [pp, bn]
        for i in range(n):
            base = acc if n == 1 else jnp.sum(jnp.where((rows == i)[:, None], acc, 0.0), axis=0)
            row = base + jnp.sum(jnp.where((tok == i)[:, None], contrib, 0.0), axis=0)
            _store(o_ref, i * o + cols, row.astype(o_ref.dtype), cmask, interpret)


def gemv_tiles(bs: BlockSizes, n: int, d: int, pairs: int, r: int) -> dict:
    """The launch geometry of `meteora_gemv` for n tokens: row tile, output rows per program, D step, pairs and
    rank rounded up to powers of two, pairs per shrink program, D ranges, shrink programs, D range and step."""
    pp, rp = _p2(pairs, 1), _p2(r, 1)
    ppb = min(pp, _p2(bs.gemv_shrink_pairs, 1))
    sbk = min(bs.gemv_shrink_block_in, max(16, 4096 // (ppb * rp)))
    chunk = pl.cdiv(pl.cdiv(d, max(1, bs.gemv_shrink_splits)), sbk) * sbk
    n_ds = pl.cdiv(d, chunk)
    one = n == 1
    return dict(bm=_p2(n, 16), bn=bs.gemv_block_out if one else max(16, bs.gemv_block_out_tokens),
                bk=bs.gemv_block_in if one else bs.gemv_block_in_tokens, pp=pp, rp=rp, ppb=ppb, n_ds=n_ds,
                n_shrink=n_ds * (pp // ppb), chunk=chunk, sbk=sbk)


def _gemv_dense_kernel(x_ref, wt_ref, a_ref, e_ref, w_ref, b_ref, s_ref, z_ref, out_ref, buf_ref, *, n_shrink,
                       nblocks, cnt, bk, shrink_kw, expand_kw, interpret):
    """Several tokens: the shrink programs of the routed kernels (x @ a_wide for every expert, tensor-core tiles,
    atomics; then +1 on a counter) and output programs that take their rows of x @ W^T, wait for the counter, and
    add (coef * P) @ b_wide (the routed expand with the routing given), rounded once."""
    del z_ref  # the zeroed buffer, aliased to buf_ref
    pid = pl.program_id(0)
    n, bm, d = shrink_kw["n"], shrink_kw["bm"], shrink_kw["d"]
    at = jnp.full((1,), cnt, jnp.int32)
    signal = lambda old: _count(buf_ref, at, old, interpret)  # noqa: E731

    @pl.when(pid < n_shrink)
    def _():
        _shrink_body(x_ref, None, a_ref, buf_ref, lax.div(pid, nblocks), lax.rem(pid, nblocks), signal=signal,
                     **shrink_kw)

    def pre(cols, omask):
        base = _gemv_rows(x_ref, wt_ref, cols, omask, n=n, d=d, bm=bm, bk=bk, interpret=interpret)
        return base, _wait(buf_ref, at, n_shrink, interpret)

    @pl.when(pid >= n_shrink)
    def _():
        _expand_body(buf_ref, e_ref, w_ref, b_ref, s_ref, None, out_ref, None, None, pid - n_shrink, pre=pre,
                     **expand_kw)


def _gemv_dense_forward(x, wt, a, b, scaling, experts, weights, bs: BlockSizes, interpret: bool):
    n, d = x.shape
    e, _, r = a.shape
    o = wt.shape[0]
    k = experts.shape[1]
    c = e * r
    bm, bd, chunks, programs = routed_tiles(bs, n, d)
    bc = min(bs.routed_block_cols, _p2(c, 16))
    ablocks = pl.cdiv(c, bc)
    bn = max(16, bs.gemv_block_out_tokens)
    mem = Members(e, r, ((0, o),), o)
    shrink_kw = dict(n=n, d=d, gc=0, c=c, bm=bm, bd=bd, bc=bc, bg=16, chunks=chunks, ablocks=ablocks,
                     a_layout=Wide(d, r), gate=False, atomic=True, dtype=x.dtype, interpret=interpret)
    expand_kw = dict(n=n, mem=mem, k=k, bm=bm, bn=bn, ep=_p2(e, 16), cp=_p2(c, 16), gc=0, spec=None,
                     dtype=x.dtype, interpret=interpret)
    n_shrink = programs * ablocks
    size = n * c + 1
    kern = functools.partial(_gemv_dense_kernel, n_shrink=n_shrink, nblocks=ablocks, cnt=n * c,
                             bk=bs.gemv_block_in_tokens, shrink_kw=shrink_kw, expand_kw=expand_kw, interpret=interpret)
    out, _ = _launch(
        kern, [x.reshape(-1), wt.reshape(-1), a.reshape(-1), experts.reshape(-1).astype(jnp.int32),
               weights.reshape(-1).astype(jnp.float32), b.reshape(-1), scaling.astype(jnp.float32),
               jnp.zeros((size,), jnp.float32)],
        grid=(n_shrink + mem.tile_starts(bn)[-1],), input_output_aliases={7: 1},
        out_shape=(jax.ShapeDtypeStruct((n * o,), x.dtype), jax.ShapeDtypeStruct((size,), jnp.float32)),
        compiler_params=plgpu.CompilerParams(num_warps=bs.gemv_warps, num_stages=bs.gemv_stages_tokens),
        interpret=interpret, name="meteora_gemv_dense")
    return out.reshape(n, o)


def _gemv_forward(x, wt, a, b, scaling, experts, weights, bs: BlockSizes, interpret: bool):
    n, d = x.shape
    if n >= bs.gemv_dense_from:
        return _gemv_dense_forward(x, wt, a, b, scaling, experts, weights, bs, interpret)
    o = wt.shape[0]
    k, r = experts.shape[1], a.shape[2]
    g = gemv_tiles(bs, n, d, n * k, r)
    size = g["pp"] * g["rp"] + 1
    kern = functools.partial(_gemv_kernel, n=n, d=d, o=o, k=k, r=r, interpret=interpret, **g)
    out, _ = _launch(
        kern, [x.reshape(-1), wt.reshape(-1), a.reshape(-1), b.reshape(-1), scaling.astype(jnp.float32),
               experts.reshape(-1).astype(jnp.int32), weights.reshape(-1).astype(jnp.float32),
               jnp.zeros((size,), jnp.float32)],
        grid=(g["n_shrink"] + pl.cdiv(o, g["bn"]),), input_output_aliases={7: 1},
        out_shape=(jax.ShapeDtypeStruct((n * o,), x.dtype), jax.ShapeDtypeStruct((size,), jnp.float32)),
        compiler_params=plgpu.CompilerParams(num_warps=bs.gemv_warps,
                                             num_stages=bs.gemv_stages if n == 1 else bs.gemv_stages_tokens),
        interpret=interpret, name="meteora_gemv")
    return out.reshape(n, o)


def gemv_reference(x, wt, a, b, scaling, experts, weights):
    """Pure JAX (float32): x @ wt^T + the adapter term, rounded once to x's dtype."""
    f32 = jnp.float32
    base = jnp.dot(x.astype(f32), wt.astype(f32).T, precision=lax.Precision.HIGHEST)
    delta = meteora_reference(x.astype(f32), a, b, scaling, experts, weights)
    return (base + delta).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _gemv_apply(x, wt, a, b, scaling, experts, weights, bs, interpret):
    return _gemv_forward(x, wt, a, b, scaling, experts, weights, bs, interpret)


def _gemv_fwd(x, wt, a, b, scaling, experts, weights, bs, interpret):
    return _gemv_forward(x, wt, a, b, scaling, experts, weights, bs, interpret), (x, wt, a, b, scaling, experts,
                                                                                 weights)


def _gemv_bwd(bs, interpret, res, g):
    """Through the reference (a decode-size path: the backward is not where its time goes)."""
    x, wt, a, b, scaling, experts, weights = res
    _, vjp = jax.vjp(lambda x, wt, a, b, s, w: gemv_reference(x, wt, a, b, s, experts, w).astype(g.dtype),
                     x, wt, a, b, scaling, weights)
    gx, gwt, ga, gb, gs, gw = vjp(g)
    return gx, gwt, ga, gb, gs, None, gw


_gemv_apply.defvjp(_gemv_fwd, _gemv_bwd)


def meteora_gemv(x, wt, a, b, scaling, experts, weights, *, block_sizes: BlockSizes | None = None,
                 interpret: bool | None = None):
    """`x @ wt.T + delta` for a few tokens and given routing, in one launch (see the section comment above).

    x [N, in] with N <= `BlockSizes.gemv_max_tokens`; wt [out, in]: the base weight TRANSPOSED (nn.Linear's
    layout); a [E, in, r], b [E, r, out] in x's dtype; scaling [E]; experts, weights [N, k]. Returns [N, out] in
    x's dtype (f32 accumulation, rounded once). Differentiable (the backward runs `gemv_reference`); the atomic
    adds of h make the last bits vary from run to run.
    """
    check_args(x, a, b, scaling, experts, weights)
    bs = block_sizes or BlockSizes.get_default()
    n, d = x.shape
    if wt.ndim != 2 or wt.shape != (b.shape[-1], d):
        raise ValueError(f"meteora_gemv: wt {wt.shape} must be the base weight transposed, [out={b.shape[-1]}, "
                         f"in={d}]")
    if not 1 <= n <= bs.gemv_max_tokens:
        raise ValueError(f"meteora_gemv: takes 1..{bs.gemv_max_tokens} tokens (BlockSizes.gemv_max_tokens), got "
                         f"x {x.shape}")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    return _gemv_apply(x, wt, a, b, scaling, experts, weights, bs, bool(interpret))


def routed_weights(logits, experts, spec: RouteSpec):
    """The routing weights of given experts from gate logits, as `meteora.route` computes them (differentiable)."""
    logits = logits.astype(jnp.float32)
    if spec.forced_expert is not None or (spec.top_k == 1 and spec.routing == "topk_softmax"):
        return jnp.ones(experts.shape, jnp.float32)
    if spec.routing == "topk_softmax":
        return jax.nn.softmax(jnp.take_along_axis(logits, experts, axis=-1) / spec.temperature, axis=-1)
    w = jnp.take_along_axis(jax.nn.softmax(logits / spec.temperature, axis=-1), experts, axis=-1)
    return w / jnp.sum(w, axis=-1, keepdims=True)


def routed_reference(x, y, gate, a, b, scaling, experts, spec: RouteSpec):
    """Pure JAX (float32) of the routed path for given experts: (y + delta, logits, weights)."""
    logits = jnp.dot(x.astype(jnp.float32), gate.astype(jnp.float32), precision=lax.Precision.HIGHEST)
    weights = routed_weights(logits, experts, spec)
    delta = meteora_reference(x, a, b, scaling, experts, weights)
    out = (y.astype(jnp.float32) + delta.astype(y.dtype).astype(jnp.float32)).astype(y.dtype)
    return out, logits, weights


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def routed_apply(x, y, gate, a, b, scaling, spec: RouteSpec, bs: BlockSizes, interpret: bool):
    """(y + delta, logits, experts, weights) through the routed kernels (no argument checks)."""
    return _routed_forward(x, y, gate, a, b, scaling, None, None, spec, bs, interpret)


def _routed_fwd(x, y, gate, a, b, scaling, spec, bs, interpret):
    outs = _routed_forward(x, y, gate, a, b, scaling, None, None, spec, bs, interpret)
    return outs, (x, y, gate, a, b, scaling, outs[2])


def _routed_bwd(spec, bs, interpret, res, g):
    """Through the reference, with the experts the forward picked (the routing is piecewise constant)."""
    x, y, gate, a, b, scaling, experts = res
    g_out, g_logits, _, g_weights = g
    _, vjp = jax.vjp(lambda *p: routed_reference(*p, experts, spec), x, y, gate, a, b, scaling)
    return vjp((g_out, g_logits, g_weights))


routed_apply.defvjp(_routed_fwd, _routed_bwd)


def _route_spec(who: str, e_num: int, top_k: int, temperature: float, routing: str,
                forced_expert: int | None) -> RouteSpec:
    """The checked RouteSpec of a routed call (`who` names the function in the errors)."""
    if routing not in ("topk_softmax", "softmax_topk"):
        raise ValueError(f"{who}: routing must be topk_softmax or softmax_topk, got {routing!r}")
    k = 1 if forced_expert is not None else top_k
    if not 1 <= k <= e_num:
        raise ValueError(f"{who}: top_k must be in 1..{e_num}, got {top_k}")
    return RouteSpec(k, float(temperature), routing, forced_expert)


def meteora_routed(x, y, gate, a, b, scaling, *, top_k: int, temperature: float = 1.0, routing: str = "topk_softmax",
                   forced_expert: int | None = None, block_sizes: BlockSizes | None = None,
                   interpret: bool | None = None):
    """A MeteoRA linear's adapter part for a few tokens: gate logits `x @ gate` (f32), each token's top-k experts
    and weights (as `meteora_jax.meteora.route`, or `forced_expert` with weight 1), and `y + delta`.

    x [N, in], y [N, out] (the base output; its buffer is reused), gate [in, E] (f32), a [E, in, r], b [E, r, out]
    (cast to x's dtype beforehand), scaling [E]. Returns (y + delta, logits [N, E] f32, experts [N, k] int32,
    weights [N, k] f32). Differentiable in x, y, gate, a, b and scaling (the backward runs the reference).
    """
    n = x.shape[0]
    check_shapes(x, a, b, scaling)
    e_num, d, _ = a.shape
    if gate.shape != (d, e_num) or y.shape != (n, b.shape[-1]):
        raise ValueError(f"meteora_routed: gate {gate.shape} must be [in={d}, E={e_num}] and y {y.shape} "
                         f"[N={n}, out={b.shape[-1]}]")
    spec = _route_spec("meteora_routed", e_num, top_k, temperature, routing, forced_expert)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    return routed_apply(x, y, gate, a, b, scaling, spec, block_sizes or BlockSizes.get_default(), bool(interpret))


def meteora_routed_packed(x, y, gate, a, b, scaling, spans, *, top_k: int, temperature: float = 1.0,
                          routing: str = "topk_softmax", forced_expert: int | None = None,
                          block_sizes: BlockSizes | None = None, interpret: bool | None = None):
    """`meteora_routed` for m MeteoRA linears that read the same x, packed (`meteora_jax.packed`, mode "routed"):
    one shrink launch for all m gates and shrinks, one expand launch for all m outputs. Forward only (inference).

    x [N, in]; y [N, ld]: the members' base outputs side by side (its buffer is reused); gate [in, m*E] f32;
    a [in, m*E*r]: column (j*E + e)*r + t is member j's expert e, rank t; b [E*r, ld]: member j's B (its
    [E, r, size_j] as [E*r, size_j]) in the columns `spans[j] = (offset, size_j)`, as in y (columns outside every
    span are left as they are); scaling [m, E]. Returns (y + delta, logits [N, m, E] f32, experts [N, m, k]
    int32, weights [N, m, k] f32).
    """
    if x.ndim != 2 or y.ndim != 2 or gate.ndim != 2 or a.ndim != 2 or b.ndim != 2 or scaling.ndim != 2:
        raise ValueError("meteora_routed_packed: expected x [N, in], y [N, ld], gate [in, m*E], a [in, m*E*r], "
                         f"b [E*r, ld], scaling [m, E]; got x {x.shape}, y {y.shape}, gate {gate.shape}, "
                         f"a {a.shape}, b {b.shape}, scaling {scaling.shape}")
    n, d = x.shape
    m, e_num = scaling.shape
    spans = tuple((int(o), int(s)) for o, s in spans)
    ld = y.shape[1]
    er = b.shape[0] // e_num if e_num else 0
    if (len(spans) != m or y.shape[0] != n or gate.shape != (d, m * e_num) or er < 1 or b.shape != (e_num * er, ld)
            or a.shape != (d, m * e_num * er)):
        raise ValueError(f"meteora_routed_packed: inconsistent shapes x {x.shape}, y {y.shape}, gate {gate.shape}, "
                         f"a {a.shape}, b {b.shape}, scaling {scaling.shape} (want gate [{d}, m*E], a [{d}, m*E*r], "
                         f"b [E*r, {ld}], scaling [m, E]) for {len(spans)} spans")
    _check_spans("meteora_routed_packed", spans, ld, None)
    spec = _route_spec("meteora_routed_packed", e_num, top_k, temperature, routing, forced_expert)
    k = spec.top_k
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    mem = Members(e_num, er, spans, ld)
    out, logits, experts, weights = _routed_forward(x, y, gate, a, b, scaling, None, None, spec,
                                                    block_sizes or BlockSizes.get_default(), bool(interpret), mem)
    return out, logits.reshape(n, m, e_num), experts.reshape(n, m, k), weights.reshape(n, m, k)


def _check_spans(who: str, spans, ld: int, cover: str | None) -> None:
    """Spans must be non-empty, ordered, disjoint column ranges of ld; with `cover` (the reason), all of them."""
    ends = [0] + [o + s for o, s in spans]
    if any(s < 1 or o < prev for (o, s), prev in zip(spans, ends, strict=False)) or ends[-1] > ld:
        raise ValueError(f"{who}: spans {spans} must be non-empty, ordered, disjoint column ranges of y's {ld} columns")
    gaps = any(o != p for (o, _), p in zip(spans, ends, strict=False))
    if cover is not None and (gaps or ends[-1] != ld):
        raise ValueError(f"{who}: {cover}, spans {spans} must cover all {ld} columns, in order")


def meteora_routed_expand(z, b, scaling, spans, *, gate_parts: int = 1, top_k: int, temperature: float = 1.0,
                          routing: str = "topk_softmax", forced_expert: int | None = None, y=None, out_dtype=None,
                          glu: bool = False, block_sizes: BlockSizes | None = None, interpret: bool | None = None):
    """The routed expand alone, for packed members whose base product, gate logits and shrink came from one
    product (`meteora_jax.packed`, mode "extended"): z = x @ [W | G_1 .. G_parts | A | padding] in f32, [N, ldz]
    with ldz = ld + parts*m*E + m*E*r plus padding columns (ignored; aligned rows make the product faster),
    where W [in, ld] are the members' base weights side by side, each G_t [in, m*E] holds the gates (their logits
    are the sum over t: an f32 gate as bf16 hi + lo parts) and A [in, m*E*r] the shrinks, laid out as in
    `meteora_routed_packed`. One launch routes every member's tokens from its logits
    and writes y = base + delta (f32, rounded once to `out_dtype`, default b's dtype). b [E*r, ld] and scaling
    [m, E] as in `meteora_routed_packed`. The spans must cover all ld columns, unless `y` [N, ld] (the base output;
    its buffer is reused) is given: then its columns outside every span stay as they are, and z's W part is not
    read. Forward only. Returns (y, logits [N, m, E] f32, experts [N, m, k] int32, weights [N, m, k] f32).

    `glu=True` (a Llama MLP's packed gate/up: two members of `half` columns each, spans ((0, half), (half, half)),
    no y): y is silu(gate) * up [N, half] instead, computed from the f32 gate and up outputs and rounded once, so
    the MLP's activation needs no launch of its own.

    `block_sizes.routed_dense_b`: each program loads all E*r rows of its B tile with its first loads, instead of
    only the picked experts' rows once the top-k is known (same result; more bytes, one dependent load less).

    z may also come rounded, in bfloat16 or float16 (`BlockSizes.routed_z_low`): its values are read as f32, so
    the routing is that of the rounded logits, and the base output is rounded twice."""
    who = "meteora_routed_expand"
    if z.ndim != 2 or b.ndim != 2 or scaling.ndim != 2:
        raise ValueError(f"{who}: expected z [N, ldz], b [E*r, ld], scaling [m, E]; got z {z.shape}, b {b.shape}, "
                         f"scaling {scaling.shape}")
    if z.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise ValueError(f"{who}: z must be float32 (the product's f32 result) or bfloat16 / float16 (a rounded one, "
                         f"`BlockSizes.routed_z_low`), got {z.dtype}")
    n, ldz = z.shape
    m, e_num = scaling.shape
    er, ld = b.shape
    spans = tuple((int(o), int(s)) for o, s in spans)
    need = ld + gate_parts * m * e_num + m * er
    if gate_parts < 1 or e_num < 1 or er % e_num or len(spans) != m or not need <= ldz < need + 1024:
        raise ValueError(f"{who}: z {z.shape} must be [N, ld + gate_parts*m*E + m*E*r (+ under 1024 columns of "
                         f"padding)] = [N, {ld} + {gate_parts}*{m}*{e_num} + {m}*{er}] for b {b.shape}, scaling "
                         f"{scaling.shape}, {len(spans)} spans and gate_parts={gate_parts}")
    if y is not None and y.shape != (n, ld):
        raise ValueError(f"{who}: y {y.shape} must be [N={n}, ld={ld}]")
    _check_spans(who, spans, ld, None if y is not None else "without y")
    if glu and (y is not None or len(spans) != 2 or spans[1] != (ld // 2, ld // 2) or ld % 2):
        raise ValueError(f"{who}: glu=True takes two members of equal size, spans ((0, half), (half, half)), and no "
                         f"y; got spans {spans} over {ld} columns" + (" and y" if y is not None else ""))
    spec = _route_spec(who, e_num, top_k, temperature, routing, forced_expert)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    bs = block_sizes or BlockSizes.get_default()
    mem, k, gc = Members(e_num, er // e_num, spans, ld), spec.top_k, m * e_num
    bm, bn = _p2(n, 16), bs.routed_out_block(ld)
    out_dtype = y.dtype if y is not None else (out_dtype or b.dtype)
    kw = dict(n=n, mem=mem, k=k, bm=bm, bn=bn, ep=_p2(e_num, 16), cp=_p2(er, 16), gc=gc, spec=spec, dtype=b.dtype,
              interpret=bool(interpret), zl=(ldz, gate_parts), dense_b=bs.routed_dense_b)
    args = [z.reshape(-1), b.reshape(-1), scaling.reshape(-1).astype(jnp.float32)]
    if glu:  # both members' tiles in one program, silu(gate) * up out
        kern, grid, lo, aliases = functools.partial(_routed_glu_kernel, **kw), pl.cdiv(ld // 2, bn), ld // 2, {}
    else:
        kern = functools.partial(_routed_expand_kernel, has_y=y is not None, **kw)
        grid, lo, aliases = mem.tile_starts(bn)[-1], ld, {3: 0} if y is not None else {}
        args += [] if y is None else [y.reshape(-1)]
    out, experts, weights = _launch(
        kern, args, grid=(grid,),
        out_shape=(jax.ShapeDtypeStruct((n * lo,), out_dtype), jax.ShapeDtypeStruct((n * m * k,), jnp.int32),
                   jax.ShapeDtypeStruct((n * m * k,), jnp.float32)),
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=bs.routed_warps_for(bm), num_stages=2),
        interpret=bool(interpret), name="meteora_routed_glu_z" if glu else "meteora_routed_expand_z")
    logits = functools.reduce(jnp.add, [z[:, ld + t * gc:ld + (t + 1) * gc].astype(jnp.float32)
                                        for t in range(gate_parts)])
    return out.reshape(n, lo), logits.reshape(n, m, e_num), experts.reshape(n, m, k), weights.reshape(n, m, k)


# `meteora_gemv_expand`: a packed group's whole decode step in ONE launch, from zt = [W | G parts | A | pad]^T
# [ldz, in] (the transposed product matrix of packing mode "extended"; packing mode "gemv"). Programs
# [0, X) compute z's extra columns (gate logits and every shrink; rows ld.. of zt) as matrix-vector products and
# add them atomically into a zeroed f32 buffer [N, ldz], then +1 on a counter; the member programs compute their
# base columns (rows of zt), spin until all X are counted, then route, expand and store y as
# `meteora_routed_expand` does with z, the base taken from their own product (f32, rounded once).

def _gemv_acc(x_ref, zt_ref, cols, cmask, *, n, d, bm, bk, interpret):
    """Rows `cols` of zt [., d] times x [n, d] in f32 (products over D tiles of bk): [bn] for one token (matrix-
    vector products reduced over each D tile), else [bm, bn] (tensor-core tiles)."""
    rows = _iota(bm)
    rmask = rows < n

    def body(t, acc):
        dd = t * bk + _iota(bk)
        dmask = dd < d
        wv = _load(zt_ref, cols[:, None] * d + dd[None, :], cmask[:, None] & dmask[None, :], interpret)
        if n == 1:
            xv = _load(x_ref, dd, dmask, interpret)
            return acc + jnp.sum(xv.astype(jnp.float32)[None, :] * wv.astype(jnp.float32), axis=1)
        xv = _load(x_ref, rows[:, None] * d + dd[None, :], rmask[:, None] & dmask[None, :], interpret)
        prec = lax.Precision.HIGHEST if xv.dtype == jnp.float32 else None
        return acc + lax.dot_general(xv, wv, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                                     precision=prec)

    bn = cols.shape[0]
    return lax.fori_loop(0, pl.cdiv(d, bk), body, jnp.zeros((bn,) if n == 1 else (bm, bn), jnp.float32))


def _gemv_rows(x_ref, zt_ref, cols, cmask, *, n, d, bm, bk, interpret):
    """`_gemv_acc` as a [bm, bn] tile (one token: in row 0)."""
    acc = _gemv_acc(x_ref, zt_ref, cols, cmask, n=n, d=d, bm=bm, bk=bk, interpret=interpret)
    return jnp.where(_iota(bm)[:, None] == 0, acc[None, :], 0.0) if n == 1 else acc


def _gemv_expand_kernel(x_ref, zt_ref, b_ref, s_ref, z_ref, out_ref, buf_ref, ex_ref, wt_ref, *, n, d, ld, ldz,
                        n_extra, bne, bk, expand_kw, interpret):
    del z_ref  # the zeroed buffer, aliased to buf_ref
    pid = pl.program_id(0)
    bm = expand_kw["bm"]
    rows = _iota(bm)
    rmask = rows < n
    at = jnp.full((1,), n * ldz, jnp.int32)
    gemv = functools.partial(_gemv_rows, x_ref, zt_ref, n=n, d=d, bm=bm, bk=bk, interpret=interpret)

    @pl.when(pid < n_extra)
    def _():
        cols = ld + pid * bne + _iota(bne)
        cmask = cols < ldz
        old = _store(buf_ref, rows[:, None] * ldz + cols[None, :], gemv(cols, cmask), rmask[:, None] & cmask[None, :],
                     interpret, atomic=True)
        _count(buf_ref, at, old, interpret)

    def pre(cols, omask):
        base = gemv(cols, omask)
        return base, _wait(buf_ref, at, n_extra, interpret)

    @pl.when(pid >= n_extra)
    def _():
        _expand_body(buf_ref, None, None, b_ref, s_ref, None, out_ref, ex_ref, wt_ref, pid - n_extra, pre=pre,
                     **expand_kw)


def meteora_gemv_expand(x, zt, b, scaling, spans, *, gate_parts: int = 1, top_k: int, temperature: float = 1.0,
                        routing: str = "topk_softmax", forced_expert: int | None = None, out_dtype=None,
                        block_sizes: BlockSizes | None = None, interpret: bool | None = None):
    """A packed group's decode step in one launch (see the section comment above): x [N, in] (N <=
    `BlockSizes.gemv_max_tokens`); zt [ldz, in]: the transpose of `meteora_routed_expand`'s product matrix
    [W | G_1 .. G_parts | A | padding] (ldz = ld + parts*m*E + m*E*r plus under 1024 padding rows, never read);
    b [E*r, ld], scaling [m, E] and the spans (covering all ld columns) as there. Forward only. Returns
    (y [N, ld] in `out_dtype` (default b's), logits [N, m, E] f32, experts [N, m, k] int32, weights [N, m, k])."""
    who = "meteora_gemv_expand"
    if x.ndim != 2 or zt.ndim != 2 or b.ndim != 2 or scaling.ndim != 2:
        raise ValueError(f"{who}: expected x [N, in], zt [ldz, in], b [E*r, ld], scaling [m, E]; got x {x.shape}, "
                         f"zt {zt.shape}, b {b.shape}, scaling {scaling.shape}")
    n, d = x.shape
    ldz = zt.shape[0]
    m, e_num = scaling.shape
    er, ld = b.shape
    spans = tuple((int(o), int(s)) for o, s in spans)
    need = ld + gate_parts * m * e_num + m * er
    if (zt.shape[1] != d or gate_parts < 1 or e_num < 1 or er % e_num or len(spans) != m
            or not need <= ldz < need + 1024):
        raise ValueError(f"{who}: zt {zt.shape} must be [ld + gate_parts*m*E + m*E*r (+ under 1024 rows of padding), "
                         f"in] = [{ld} + {gate_parts}*{m}*{e_num} + {m}*{er}, {d}] for x {x.shape}, b {b.shape}, "
                         f"scaling {scaling.shape}, {len(spans)} spans and gate_parts={gate_parts}")
    _check_spans(who, spans, ld, "the base output comes from zt")
    spec = _route_spec(who, e_num, top_k, temperature, routing, forced_expert)
    bs = block_sizes or BlockSizes.get_default()
    if not 1 <= n <= bs.gemv_max_tokens:
        raise ValueError(f"{who}: takes 1..{bs.gemv_max_tokens} tokens (BlockSizes.gemv_max_tokens), got x {x.shape}")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    mem, k, gc = Members(e_num, er // e_num, spans, ld), spec.top_k, m * e_num
    bm = _p2(n, 16)
    bn = max(16, bs.gemv_block_out if n == 1 else bs.gemv_block_out_tokens)
    bk = bs.gemv_block_in if n == 1 else bs.gemv_block_in_tokens
    n_extra = pl.cdiv(need - ld, bn)
    out_dtype = out_dtype or b.dtype
    expand_kw = dict(n=n, mem=mem, k=k, bm=bm, bn=bn, ep=_p2(e_num, 16), cp=_p2(er, 16), gc=gc, spec=spec,
                     dtype=b.dtype, interpret=bool(interpret), zl=(ldz, gate_parts))
    kern = functools.partial(_gemv_expand_kernel, n=n, d=d, ld=ld, ldz=ldz, n_extra=n_extra, bne=bn, bk=bk,
                             expand_kw=expand_kw, interpret=bool(interpret))
    size = n * ldz + 1
    out, buf, experts, weights = _launch(
        kern, [x.reshape(-1), zt.reshape(-1), b.reshape(-1), scaling.reshape(-1).astype(jnp.float32),
               jnp.zeros((size,), jnp.float32)],
        grid=(n_extra + mem.tile_starts(bn)[-1],), input_output_aliases={4: 1},
        out_shape=(jax.ShapeDtypeStruct((n * ld,), out_dtype), jax.ShapeDtypeStruct((size,), jnp.float32),
                   jax.ShapeDtypeStruct((n * m * k,), jnp.int32), jax.ShapeDtypeStruct((n * m * k,), jnp.float32)),
        compiler_params=plgpu.CompilerParams(num_warps=bs.gemv_warps,
                                             num_stages=bs.gemv_stages if n == 1 else bs.gemv_stages_tokens),
        interpret=bool(interpret), name="meteora_gemv_expand")
    z = buf[:n * ldz].reshape(n, ldz)
    logits = functools.reduce(jnp.add, [z[:, ld + t * gc:ld + (t + 1) * gc] for t in range(gate_parts)])
    return out.reshape(n, ld), logits.reshape(n, m, e_num), experts.reshape(n, m, k), weights.reshape(n, m, k)


def check_args(x, a, b, scaling, experts, weights):
    check_shapes(x, a, b, scaling)
    if experts.shape != weights.shape or experts.ndim != 2 or experts.shape[0] != x.shape[0]:
        raise ValueError(f"meteora_fused: experts {experts.shape} and weights {weights.shape} must both be "
                         f"[N={x.shape[0]}, k]")
    if not jnp.issubdtype(experts.dtype, jnp.integer):
        raise ValueError(f"meteora_fused: experts must be integers, got {experts.dtype}")


def check_shapes(x, a, b, scaling):
    if x.ndim != 2 or a.ndim != 3 or b.ndim != 3:
        raise ValueError(f"meteora_fused: expected x [N, in], a [E, in, r], b [E, r, out]; got x {x.shape}, "
                         f"a {a.shape}, b {b.shape}")
    e_num, d, r = a.shape
    if x.shape[1] != d or b.shape[:2] != (e_num, r) or scaling.shape != (e_num,):
        raise ValueError(f"meteora_fused: inconsistent shapes x {x.shape}, a {a.shape}, b {b.shape}, "
                         f"scaling {scaling.shape} (want a [E, {x.shape[1]}, r], b [E, r, out], scaling [E])")


# ------------------------------------------------------------------------------------------ reference
def meteora_reference(x, a, b, scaling, experts, weights):
    """Pure JAX, float32 throughout: sum_j w_j s_e (x a_e) b_e, gathering each token's experts."""
    f32 = jnp.float32
    hp = lax.Precision.HIGHEST
    a_sel, b_sel = a.astype(f32)[experts], b.astype(f32)[experts]  # [N, k, D, R], [N, k, R, O]
    h = jnp.einsum("nd,nkdr->nkr", x.astype(f32), a_sel, precision=hp)
    h = h * (weights.astype(f32) * scaling.astype(f32)[experts])[..., None]
    return jnp.einsum("nkr,nkro->no", h, b_sel, precision=hp).astype(x.dtype)


def linear_reference(x, w, a, b, scaling, experts, weights):
    """Pure JAX, float32 throughout: x @ w + `meteora_reference`."""
    base = jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32), precision=lax.Precision.HIGHEST)
    return (base + meteora_reference(x.astype(jnp.float32), a, b, scaling, experts, weights)).astype(x.dtype)
