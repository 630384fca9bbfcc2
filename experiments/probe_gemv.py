"""Probe: can a Pallas (Triton backend) matrix-vector product with the MeteoRA adapter folded in match XLA's
base linear at decode sizes? Prints one JSON line per config.

    python experiments/probe_gemv.py --tokens 1 --grid        (on the GPU machine)
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import triton as plgpu  # noqa: E402

from experiments.bench_layer import LAYERS, PASSES, make_layers, time_call, to_jax  # noqa: E402
from kernels import meteora_pallas as mp  # noqa: E402
from kernels.meteora_pallas import _count, _dot, _iota, _load, _pair_expand, _pair_shrink, _store, _wait  # noqa: E402


def _kernel(x_ref, w_ref, a_ref, b_ref, s_ref, e_ref, wt_ref, o_ref, *, n, d, o, k, r, bn, bk, pp, rp, adapter,
            mode, interpret, trans=False):
    cols = pl.program_id(0) * bn + _iota(bn)
    cmask = cols < o
    bm = 16
    rows = _iota(bm)
    rmask = rows < n
    p = _iota(pp)
    pmask = p < n * k
    tok = lax.div(p, k)
    rr = _iota(rp)
    rrmask = rr < r
    e = _load(e_ref, p, pmask, interpret)

    def body(t, carry):
        acc, h = carry
        dd = t * bk + _iota(bk)
        dmask = dd < d
        if trans:  # w is W^T [o, d]: rows of d contiguous
            wv = _load(w_ref, cols[:, None] * d + dd[None, :], cmask[:, None] & dmask[None, :], interpret)
            xv = _load(x_ref, dd, dmask, interpret)
            acc = acc + jnp.sum(xv.astype(jnp.float32)[None, :] * wv.astype(jnp.float32), axis=1)[None, :]
        else:
            wv = _load(w_ref, dd[:, None] * o + cols[None, :], dmask[:, None] & cmask[None, :], interpret)
        if trans:
            pass
        elif mode == "dot":
            xv = _load(x_ref, rows[:, None] * d + dd[None, :], rmask[:, None] & dmask[None, :], interpret)
            acc = acc + _dot(xv, wv)
        else:  # one token: elementwise products, reduced over the D tile
            xv = _load(x_ref, dd, dmask, interpret)
            acc = acc + jnp.sum(xv.astype(jnp.float32)[:, None] * wv.astype(jnp.float32), axis=0)[None, :]
        if adapter:
            xp = _load(x_ref, tok[:, None] * d + dd[None, :], pmask[:, None] & dmask[None, :], interpret)
            av = _load(a_ref, e[:, None, None] * (d * r) + dd[None, :, None] * r + rr[None, None, :],
                       pmask[:, None, None] & dmask[None, :, None] & rrmask[None, None, :], interpret)
            h = h + jnp.sum(xp.astype(jnp.float32)[:, :, None] * av.astype(jnp.float32), axis=1)
        return acc, h

    acc0 = jnp.zeros((bm if mode == "dot" and not trans else 1, bn), jnp.float32)
    acc, h = lax.fori_loop(0, pl.cdiv(d, bk), body, (acc0, jnp.zeros((pp, rp), jnp.float32)))
    if adapter:
        c = _load(wt_ref, p, pmask, interpret) * _load(s_ref, e, pmask, interpret)
        h = (h * c[:, None]).astype(x_ref.dtype).astype(jnp.float32)
        bv = _load(b_ref, e[:, None, None] * (r * o) + rr[None, :, None] * o + cols[None, None, :],
                   pmask[:, None, None] & rrmask[None, :, None] & cmask[None, None, :], interpret)
        contrib = jnp.sum(h[:, :, None] * bv.astype(jnp.float32), axis=1)  # [pp, bn]
    for i in range(n):
        row = jnp.sum(jnp.where((rows == i)[:, None], acc, 0.0), axis=0) if mode == "dot" else acc[0]
        if adapter:
            row = row + jnp.sum(jnp.where((tok == i)[:, None], contrib, 0.0), axis=0)
        _store(o_ref, i * o + cols, row.astype(o_ref.dtype), cmask, interpret)


def gemv(x, w, a, b, s, e, wt, *, bn, bk, warps, stages, adapter, mode, interpret=False, trans=False):
    n, d = x.shape
    o = w.shape[0] if trans else w.shape[1]
    k = e.shape[1]
    r = a.shape[2]
    pp = max(1, 1 << (n * k - 1).bit_length())
    rp = max(1, 1 << (r - 1).bit_length())
    kern = functools.partial(_kernel, n=n, d=d, o=o, k=k, r=r, bn=bn, bk=bk, pp=pp, rp=rp, adapter=adapter,
                             mode=mode, interpret=interpret, trans=trans)
    out = pl.pallas_call(kern, grid=(pl.cdiv(o, bn),), out_shape=jax.ShapeDtypeStruct((n * o,), x.dtype),
                         compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages),
                         interpret=interpret, name="probe_gemv")(
        x.reshape(-1), w.reshape(-1), a.reshape(-1), b.reshape(-1), s, e.reshape(-1), wt.reshape(-1))
    return out.reshape(n, o)


def bench(layer, params, x):
    def run(x, params):
        for _ in range(PASSES):
            for p in params:
                x = layer(x, p)
        return x
    return time_call(jax.jit(run).lower(x, params).compile(), x, params) / (LAYERS * PASSES)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--grid", action="store_true")
    ap.add_argument("--configs", default="")
    ap.add_argument("--trans", action="store_true")
    ap.add_argument("--no-adapter", action="store_true")
    args = ap.parse_args()
    layers, x = make_layers(args.tokens)
    params, xj = to_jax(layers, x)
    base = bench(lambda x, p: x @ p["W"], params, xj)
    print(json.dumps(dict(what="xla-base", us=base * 1e6)), flush=True)
    if args.trans:  # to_jax stores W^T as p["WT"]
        bt = bench(lambda x, p: lax.dot_general(x, p["WT"], (((1,), (1,)), ((), ()))), params, xj)
        print(json.dumps(dict(what="xla-base-WT", us=bt * 1e6)), flush=True)
    p0 = params[0]
    ref_base = np.asarray(xj, np.float32) @ np.asarray(p0["W"], np.float32)
    from kernels.meteora_pallas import meteora_reference
    ref_full = ref_base + np.asarray(meteora_reference(xj.astype(jnp.float32), p0["A"].astype(jnp.float32),
                                                       p0["B"].astype(jnp.float32), p0["s"], p0["e"], p0["w"]))
    if args.configs:
        configs = json.loads(args.configs)
    else:
        configs = [dict(bn=bn, bk=bk, warps=wp, stages=st, mode=md)
                   for bn, bk, wp, st, md in itertools.product((16, 32, 64), (128, 256, 512), (4, 8), (3, 4),
                                                               ("dot", "ew") if args.tokens == 1 else ("dot",))]
        if args.trans:
            configs = [dict(bn=bn, bk=bk, warps=wp, stages=st, mode="ew")
                       for bn, bk, wp, st in itertools.product((4, 8, 16, 32), (256, 512, 1024), (2, 4, 8), (2, 3, 4))]
    for cfg in configs:
        for adapter in (False,) if args.no_adapter else (False, True):
            f = functools.partial(gemv, adapter=adapter, trans=args.trans, **cfg)
            wk = "WT" if args.trans else "W"
            layer = lambda x, p, f=f, wk=wk: f(x, p[wk], p["A"], p["B"], p["s"], p["e"], p["w"])
            try:
                got = np.asarray(jax.jit(layer)(xj, p0), np.float32)
                ref = ref_full if adapter else ref_base
                err = float(np.abs(got - ref).max() / np.abs(ref).max())
                us = bench(layer, params, xj) * 1e6
                print(json.dumps(dict(cfg, adapter=adapter, us=us, ratio=us / (base * 1e6), err=err)), flush=True)
            except Exception as ex:  # noqa: BLE001
                print(json.dumps(dict(cfg, adapter=adapter, error=str(ex)[:200])), flush=True)




def _split_kernel(x_ref, w_ref, a_ref, b_ref, s_ref, e_ref, wt_ref, z_ref, o_ref, buf_ref, *, n, d, o, k, r, bn, bk,
                  pp, rp, n_shrink, chunk, sbk, splits, dsplit, n_gemv, bnf, interpret):
    """W [D, O] as stored. Programs: shrink (h, atomics) | gemv (col block x D split, atomics into f32 y) |
    finish (wait for all, y + adapter term, cast)."""
    pid = pl.program_id(0)
    p = _iota(pp)
    pmask = p < n * k
    tok = lax.div(p, k)
    rr = _iota(rp)
    rrmask = rr < r
    e = _load(e_ref, p, pmask, interpret)
    hsz = pp * rp
    at = jnp.full((1,), hsz + o, jnp.int32)

    @pl.when(pid < n_shrink)
    def _():
        h = _pair_shrink(x_ref, a_ref, tok, e, pmask, rr, rrmask, pid * chunk, chunk // sbk, sbk, d=d, r=r,
                         interpret=interpret)
        old = _store(buf_ref, p[:, None] * rp + rr[None, :], h, pmask[:, None] & rrmask[None, :], interpret,
                     atomic=True)
        _count(buf_ref, at, old, interpret)

    @pl.when((pid >= n_shrink) & (pid < n_shrink + n_gemv))
    def _():
        g = pid - n_shrink
        cb, sp = lax.div(g, splits), lax.rem(g, splits)
        cols = cb * bn + _iota(bn)
        cmask = cols < o

        def body(t, acc):
            dd = sp * dsplit + t * bk + _iota(bk)
            dmask = dd < d
            wv = _load(w_ref, dd[:, None] * o + cols[None, :], dmask[:, None] & cmask[None, :], interpret)
            xv = _load(x_ref, dd, dmask, interpret)
            return acc + jnp.sum(xv.astype(jnp.float32)[:, None] * wv.astype(jnp.float32), axis=0)

        acc = lax.fori_loop(0, dsplit // bk, body, jnp.zeros((bn,), jnp.float32))
        old = _store(buf_ref, hsz + cols, acc, cmask, interpret, atomic=True)
        _count(buf_ref, at, old, interpret)

    @pl.when(pid >= n_shrink + n_gemv)
    def _():
        cols = (pid - n_shrink - n_gemv) * bnf + _iota(bnf)
        cmask = cols < o
        after = _wait(buf_ref, at, n_shrink + n_gemv, interpret)
        h = _load(buf_ref, p[:, None] * rp + rr[None, :] + after, pmask[:, None] & rrmask[None, :], interpret)
        y = _load(buf_ref, hsz + cols + after, cmask, interpret)
        c = _load(wt_ref, p, pmask, interpret) * _load(s_ref, e, pmask, interpret)
        contrib = _pair_expand(h, c, e, b_ref, pmask, rr, rrmask, cols, cmask, r=r, o=o, dtype=x_ref.dtype,
                               interpret=interpret)
        _store(o_ref, cols, (y + jnp.sum(contrib, axis=0)).astype(o_ref.dtype), cmask, interpret)


def gemv_split(x, w, a, b, s, e, wt, *, bn, bk, splits, warps, stages, n_shrink=16, sbk=64, bnf=256,
               interpret=False):
    n, d = x.shape
    assert n == 1
    o = w.shape[1]
    k, r = e.shape[1], a.shape[2]
    pp = max(1, 1 << (n * k - 1).bit_length())
    rp = max(1, 1 << (r - 1).bit_length())
    chunk = pl.cdiv(pl.cdiv(d, n_shrink), sbk) * sbk
    n_shrink = pl.cdiv(d, chunk)
    dsplit = pl.cdiv(pl.cdiv(d, splits), bk) * bk
    splits = pl.cdiv(d, dsplit)
    n_gemv = pl.cdiv(o, bn) * splits
    kern = functools.partial(_split_kernel, n=n, d=d, o=o, k=k, r=r, bn=bn, bk=bk, pp=pp, rp=rp, n_shrink=n_shrink,
                             chunk=chunk, sbk=sbk, splits=splits, dsplit=dsplit, n_gemv=n_gemv, bnf=bnf,
                             interpret=interpret)
    size = pp * rp + o + 1
    out, _ = pl.pallas_call(
        kern, grid=(n_shrink + n_gemv + pl.cdiv(o, bnf),), input_output_aliases={7: 1},
        out_shape=(jax.ShapeDtypeStruct((n * o,), x.dtype), jax.ShapeDtypeStruct((size,), jnp.float32)),
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages), interpret=interpret,
        name="probe_gemv_split")(x.reshape(-1), w.reshape(-1), a.reshape(-1), b.reshape(-1), s, e.reshape(-1),
                                 wt.reshape(-1), jnp.zeros((size,), jnp.float32))
    return out.reshape(n, o)


def main_one():
    """XLA base (W and W^T), the one-launch kernel over W^T (`meteora_gemv`, its prototype's tilings) and the
    split kernel over W, T = 1, alternating, 3 rounds."""
    layers, x = make_layers(1)
    params, xj = to_jax(layers, x)  # with W^T as p["WT"]
    p0 = params[0]
    from kernels.meteora_pallas import meteora_reference
    ref = np.asarray(xj, np.float32) @ np.asarray(p0["W"], np.float32) + np.asarray(meteora_reference(
        xj.astype(jnp.float32), p0["A"].astype(jnp.float32), p0["B"].astype(jnp.float32), p0["s"], p0["e"], p0["w"]))
    cands = {"xla-base": lambda x, p: x @ p["W"],
             "xla-base-WT": lambda x, p: lax.dot_general(x, p["WT"], (((1,), (1,)), ((), ())))}
    for bn, bk, wp, st, ns in ((4, 512, 4, 4, 16), (4, 512, 4, 4, 32), (16, 1024, 8, 3, 32), (4, 512, 4, 4, 64),
                               (16, 1024, 8, 3, 64)):
        bs = mp.BlockSizes(gemv_block_out=bn, gemv_block_in=bk, gemv_warps=wp, gemv_stages=st, gemv_shrink_splits=ns,
                           gemv_shrink_block_in=64, gemv_shrink_pairs=2)
        cands[f"one-bn{bn}-ns{ns}"] = lambda x, p, bs=bs: mp.meteora_gemv(
            x, p["WT"], p["A"], p["B"], p["s"], p["e"], p["w"], block_sizes=bs)
    for bn, bk, sp, wp, st in ((64, 256, 4, 4, 3), (128, 128, 4, 4, 3), (128, 256, 8, 4, 3), (64, 128, 8, 4, 4),
                               (256, 64, 8, 8, 3), (128, 128, 16, 4, 3), (64, 256, 2, 4, 3)):
        f = functools.partial(gemv_split, bn=bn, bk=bk, splits=sp, warps=wp, stages=st, n_shrink=32, sbk=64)
        cands[f"split-bn{bn}-bk{bk}-sp{sp}-w{wp}-s{st}"] = \
            lambda x, p, f=f: f(x, p["W"], p["A"], p["B"], p["s"], p["e"], p["w"])
    res = {}
    for name, layer in cands.items():
        if not name.startswith("xla"):
            got = np.asarray(jax.jit(layer)(xj, p0), np.float32)
            err = float(np.abs(got - ref).max() / np.abs(ref).max())
            print(json.dumps(dict(name=name, err=err)), flush=True)
    for _ in range(3):
        for name, layer in cands.items():
            res.setdefault(name, []).append(bench(layer, params, xj) * 1e6)
    base = float(np.median(res["xla-base"]))
    for name, v in res.items():
        print(json.dumps(dict(name=name, us=[round(t, 2) for t in v], med=round(float(np.median(v)), 2),
                              ratio=round(float(np.median(v)) / base, 3))), flush=True)


def tune_gemv(tokens=(16, 64)):
    """`kernels.meteora_pallas.meteora_gemv` block sizes against the XLA base product, per T."""
    grid = {1: [dict(), dict(gemv_block_out=16), dict(gemv_shrink_splits=32), dict(gemv_block_out=4)],
            "many": [dict(), dict(gemv_dense_from=99), dict(routed_splits=32), dict(routed_block_in=128),
                     dict(gemv_block_out_tokens=64), dict(gemv_block_in_tokens=512), dict(gemv_warps=8),
                     dict(gemv_block_out_tokens=16), dict(routed_block_cols=128)]}
    for t in tokens:
        layers, x = make_layers(t)
        params, xj = to_jax(layers, x)
        base = bench(lambda x, p: x @ p["W"], params, xj)
        for c in grid[1 if t == 1 else "many"]:
            if t > 16 and c.get("gemv_dense_from", 0) > t:  # the per-pair path is for a few tokens
                continue
            bs = mp.BlockSizes(**c)
            layer = lambda x, p, bs=bs: mp.meteora_gemv(x, p["WT"], p["A"], p["B"], p["s"], p["e"], p["w"],
                                                        block_sizes=bs)
            try:
                us = bench(layer, params, xj) * 1e6
                print(json.dumps(dict(T=t, change=c, us=round(us, 2), base_us=round(base * 1e6, 2),
                                      ratio=round(us / (base * 1e6), 3))), flush=True)
            except Exception as ex:  # noqa: BLE001
                print(json.dumps(dict(T=t, change=c, error=str(ex)[:300])), flush=True)


if __name__ == "__main__":
    if "--tune-gemv" in sys.argv:
        tune_gemv()
    elif "--one" in sys.argv:
        main_one()
    else:
        main()
