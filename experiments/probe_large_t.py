"""Probe: can the large-T MeteoRA linear fold its expand into the base GEMM and stay near the base's cost?

    python experiments/probe_large_t.py --out OUT.json [--tokens 1024,4096,16384]      (on the GPU machine)

The layer `y = x @ W + (coef * (x @ a_wide)) @ b_wide` (in = out = 4096, E = 28, r = 8, k = 2, bf16) costs one
GEMM plus 2 x E*r / in = 11% more FLOPs. Written as one product over a concatenated reduction,

    y = [x | H] @ [W ; b_wide],      H = coef * (x @ a_wide)   [T, E*r]

it needs no separate expand and no pass over y. This probe times, over 8 distinct layers (distinct inputs,
no chaining; median of repeats), in one process:

    xla-base        x @ W
    xla-dense       x @ W + dense(...)            (what `MeteoraConfig(strategy="dense")` runs)
    xla-shrink      H alone
    xla-kcat        H, then concat([x, H]) @ [W ; b_wide]   (the concat costs a copy of x)
    pallas-base     x @ W with the kernels' `_matmul` (Triton backend), for several tilings
    pallas-kcat     `_matmul` over a K = in + E*r reduction (what one kernel reading x, W, H and b_wide costs)
    blockspec-base  x @ W as a plain BlockSpec Pallas kernel, the same tilings

and prints the compiled HLO's kernel list of xla-dense (to see whether XLA adds the expand into the base GEMM).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import triton as plgpu  # noqa: E402

from experiments import sweep_layer  # noqa: E402
from experiments.bench_layer import time_call  # noqa: E402
from kernels import meteora_pallas as mp  # noqa: E402
from meteora_jax import strategies  # noqa: E402

D = DOUT = 4096
E, R, K = 28, 8, 2
LAYERS = 8
DT = jnp.bfloat16
TILINGS = [  # (bm, bn, bk, warps, stages)
    (128, 128, 64, 4, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (128, 256, 64, 8, 4),
    (256, 128, 64, 8, 3), (64, 256, 64, 4, 4), (128, 128, 32, 4, 5),
]


def make(t, seed=0):
    """sweep_layer's layers (each with its own x) in bf16, plus [W ; b_wide] and a stand-in for [x | H]."""
    layers = []
    for q in sweep_layer.make_layers(sweep_layer.Shape(d=D, dout=DOUT, e=E, r=R, k=K), t, seed):
        p = {k: jnp.asarray(v, DT if k in ("x", "W", "A", "B") else v.dtype) for k, v in q.items()}
        p["WB"] = jnp.concatenate([p["W"], p["B"].reshape(E * R, DOUT)], axis=0)
        p["xc"] = jnp.concatenate([p["x"], jnp.ones((t, E * R), DT)], axis=1)
        layers.append(p)
    return layers


def shrink(p):
    coef = mp._coef(p["e"], p["w"], p["s"], R)[0]
    a_wide = p["A"].transpose(1, 0, 2).reshape(D, E * R)
    return ((p["x"] @ a_wide).astype(jnp.float32) * coef).astype(DT)


def pallas_mm(lhs, rhs, tiling):
    bm, bn, bk, warps, stages = tiling
    m, kdim = lhs.shape
    n = rhs.shape[1]
    return mp._matmul(lhs, rhs, m=m, n=n, kdim=kdim, lhs=mp.Rows(kdim), rhs=mp.Rows(n), out=mp.Rows(n),
                      out_dtype=DT, dtype=DT, bm=bm, bn=bn, bk=bk, num_warps=warps, num_stages=stages,
                      interpret=jax.default_backend() != "gpu").reshape(m, n)


def _bs_kernel(x_ref, w_ref, o_ref, *, bk, steps):
    def body(i, acc):
        return acc + jnp.dot(x_ref[:, pl.ds(i * bk, bk)], w_ref[pl.ds(i * bk, bk), :],
                             preferred_element_type=jnp.float32)
    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def blockspec_mm(lhs, rhs, tiling):
    """The same product as a BlockSpec Pallas kernel (whole-K row / column blocks; shapes divisible by the tiles)."""
    bm, bn, bk, warps, stages = tiling
    (m, kdim), n = lhs.shape, rhs.shape[1]
    return pl.pallas_call(
        functools.partial(_bs_kernel, bk=bk, steps=kdim // bk), grid=(m // bm, n // bn),
        in_specs=[pl.BlockSpec((bm, kdim), lambda i, j: (i, 0)), pl.BlockSpec((kdim, bn), lambda i, j: (0, j))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)), out_shape=jax.ShapeDtypeStruct((m, n), DT),
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages),
        interpret=jax.default_backend() != "gpu")(lhs, rhs)


VARIANTS = {
    "xla-base": lambda p: p["x"] @ p["W"],
    "xla-dense": lambda p: p["x"] @ p["W"] + strategies.dense(p["x"], p["A"], p["B"], p["s"], p["e"], p["w"]),
    "xla-shrink": shrink,
    "xla-kcat": lambda p: jnp.concatenate([p["x"], shrink(p)], axis=1) @ p["WB"],
    "xla-kcat-mm": lambda p: p["xc"] @ p["WB"],
}


def timed(fn, layers):
    run = jax.jit(lambda ls: [fn(p) for p in ls])
    return time_call(run, layers) / LAYERS


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", default="1024,4096,16384")
    ap.add_argument("--dim", type=int, default=4096, help="in = out (smaller for a CPU smoke run)")
    ap.add_argument("--tilings", type=int, default=len(TILINGS), help="try the first N tilings")
    args = ap.parse_args()
    global D, DOUT
    D = DOUT = args.dim
    rows = []
    for t in [int(v) for v in args.tokens.split(",")]:
        layers = make(t)
        for name, fn in VARIANTS.items():
            rows.append(dict(t=t, variant=name, ms=timed(fn, layers) * 1e3))
            print(rows[-1], flush=True)
        hlo = jax.jit(VARIANTS["xla-dense"]).lower(layers[0]).compile().as_text()
        n_fusions = len(re.findall(r" fusion\(", hlo))
        kernels = sorted(set(re.findall(r'custom_call_target="([^"]+)"', hlo))) + [f"fusions={n_fusions}"]
        rows.append(dict(t=t, variant="xla-dense-hlo", kernels=kernels))
        print(rows[-1], flush=True)
        for tiling in TILINGS[:args.tilings]:
            for name, mm, lhs, rhs in (("pallas-base", pallas_mm, "x", "W"), ("pallas-kcat", pallas_mm, "xc", "WB"),
                                       ("blockspec-base", blockspec_mm, "x", "W")):
                try:
                    fn = functools.partial(lambda p, mm, lhs, rhs, tiling: mm(p[lhs], p[rhs], tiling), mm=mm,
                                           lhs=lhs, rhs=rhs, tiling=tiling)
                    ms = timed(fn, layers) * 1e3
                except Exception as err:  # a tiling Triton cannot compile (shared memory): note it, go on
                    ms = None
                    print(f"{name} {tiling}: {type(err).__name__}: {str(err)[:200]}", flush=True)
                rows.append(dict(t=t, variant=name, tiling=tiling, ms=ms))
                print(rows[-1], flush=True)
        del layers
    base = {r["t"]: r["ms"] for r in rows if r["variant"] == "xla-base"}
    for r in rows:
        if r.get("ms"):
            r["ratio"] = r["ms"] / base[r["t"]]
    meta = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                command="python experiments/probe_large_t.py " + " ".join(sys.argv[1:]))
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
