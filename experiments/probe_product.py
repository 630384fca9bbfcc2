"""What the extended product costs beyond its bytes: packing mode `extended`'s XLA product against the base's.

    python experiments/probe_product.py --shape llama3-8b --batches 1,16 --out experiments/results/probe_product

In packing mode `extended` each packed group runs one XLA product `z = x @ [W | G hi | G lo | A | padding]` with
an f32 result, where the packed base runs `x @ W` with a bf16 result. The profile of a Llama-3-8B decode step
(`results/decode_profile.json`, H100) shows the four extended products taking about 0.75 ms per step more than the
base's, where their extra bytes (m * (2E + E*r) more columns) would take about 0.2 ms at the H100's bandwidth.
This probe separates the suspects. For each packed group of a shape it times, over `--layers` distinct weights
(so that every product reads its weight from memory, as in a decode step), one product per layer of:

    base-bf16      x @ W, bf16 result                       (the packed base's product)
    base-f32       x @ W, f32 result                        (does the f32 result alone cost?)
    ext-f32        x @ [W | G hi | G lo | A | pad], f32     (mode `extended` today)
    ext-bf16       the same matrix, bf16 result
    ext-f32-nopad  the same without the zero padding to a multiple of 128 columns
    split          x @ W (bf16) and x @ [G hi | G lo | A | pad] (f32): two products

and reports microseconds per product (wall time of the chain / layers: gaps included), the weight's bytes read
per microsecond (GB/s) and the time over base-bf16's. Random bf16 weights; E, r as the issue's benchmark (28, 8).
Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from bench_generate import SHAPES  # noqa: E402
from probe_expand import groups, ldz_of, probe_result, time_chain  # noqa: E402

VARIANTS = ("base-bf16", "base-f32", "ext-f32", "ext-bf16", "ext-f32-nopad", "split")


def group_dims(shape: dict, group: str, spans, e: int, r: int, parts: int = 2) -> dict:
    """in, ld (the base's columns), need (base + gate parts + shrinks) and ldz (need padded) of one group."""
    m, ld = len(spans), sum(s for _, s in spans)
    d_in = shape["intermediate_size"] if group == "down" else shape["hidden_size"]
    return {"d_in": d_in, "ld": ld, "need": ld + parts * m * e + m * e * r, "ldz": ldz_of(ld, m, e, r, parts)}


def variant_weights(name: str, z: jax.Array, dims: dict) -> tuple[jax.Array, ...]:
    """The matrices variant `name` multiplies by, cut from one layer's full extended matrix z [in, ldz] (each a
    contiguous copy of its own)."""
    ld, need = dims["ld"], dims["need"]
    if name.startswith("base"):
        return (jnp.array(z[:, :ld]),)
    if name == "ext-f32-nopad":
        return (jnp.array(z[:, :need]),)
    if name == "split":
        return jnp.array(z[:, :ld]), jnp.array(z[:, ld:])
    return (z,)


def product_fn(name: str):
    """(x, weights) -> the variant's outputs (a tuple)."""
    if name == "split":
        return lambda x, w: (jnp.dot(x, w[0]), jnp.dot(x, w[1], preferred_element_type=jnp.float32))
    out = jnp.bfloat16 if name.endswith("bf16") else jnp.float32
    return lambda x, w: (jnp.dot(x, w[0], preferred_element_type=out),)


def run(args) -> list[dict]:
    shape = SHAPES[args.shape]
    layers = args.layers or shape["num_hidden_layers"]
    names = args.variants.split(",")
    records = []
    for gi, (group, spans) in enumerate(groups(shape).items()):
        dims = group_dims(shape, group, spans, args.experts, args.rank)
        keys = jax.random.split(jax.random.key(gi), layers)
        zs = [(jax.random.normal(k, (dims["d_in"], dims["ldz"]), jnp.float32) / dims["d_in"] ** 0.5)
              .astype(jnp.bfloat16) for k in keys]
        for name in names:
            ws = [variant_weights(name, z, dims) for z in zs]
            nbytes = sum(int(w.size) * w.dtype.itemsize for w in ws[0])
            for batch in args.batches:
                x = jax.random.normal(jax.random.key(1000 + batch), (batch, dims["d_in"]), jnp.bfloat16)
                rec = {"shape": args.shape, "group": group, **dims, "variant": name, "batch": batch,
                       "layers": layers, "weight_bytes": nbytes}
                try:
                    fn = product_fn(name)
                    sec = time_chain(lambda w, fn=fn, x=x: fn(x, w), ws, args.repeats) / layers
                    rec["us_per_product"] = sec * 1e6
                    rec["gb_per_s"] = nbytes / sec / 1e9
                except Exception as err:  # one variant failing must not lose the others
                    rec["error"] = f"{type(err).__name__}: {err}"[:300]
                print(json.dumps(rec), flush=True)
                records.append(rec)
            del ws
        del zs
    for rec in records:  # time over the base product of the same group and batch
        base = next((b for b in records if b["group"] == rec["group"] and b["batch"] == rec["batch"]
                     and b["variant"] == "base-bf16" and "us_per_product" in b), None)
        if base and "us_per_product" in rec:
            rec["over_base"] = rec["us_per_product"] / base["us_per_product"]
    return records


def render(result: dict) -> str:
    recs = result["records"]
    names = list(dict.fromkeys(r["variant"] for r in recs))
    lines = [f"# The extended product against the base's ({result['args']['shape']} shapes)", "",
             f"Device: {result['device']} (jax {result['jax']}). Command: `{result['command']}`", "",
             "Microseconds per product (wall time of one product per layer over "
             f"{recs[0]['layers'] if recs else 0} layers' distinct weights, gaps included), GB/s of weight read, "
             "and the time over `base-bf16`.", "",
             "| group | batch | in x ld (ldz) | " + " | ".join(names) + " |", "|---|---:|---|" + "---:|" * len(names)]
    for group in dict.fromkeys(r["group"] for r in recs):
        for batch in dict.fromkeys(r["batch"] for r in recs):
            row = {r["variant"]: r for r in recs if r["group"] == group and r["batch"] == batch}
            if not row:
                continue
            cells = []
            for n in names:
                r = row.get(n, {})
                cells.append(f"{r['us_per_product']:.1f} us, {r['gb_per_s']:.0f} GB/s"
                             + (f", {r['over_base']:.2f}x" if "over_base" in r else "") if "us_per_product" in r
                             else ("error" if n in row else ""))
            first = next(iter(row.values()))
            lines.append(f"| {group} | {batch} | {first['d_in']} x {first['ld']} ({first['ldz']}) | "
                         + " | ".join(cells) + " |")
    errors = [r for r in recs if "error" in r]
    lines += [""] + [f"- {r['group']} {r['variant']} batch {r['batch']}: {r['error']}" for r in errors]
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES), help="model shape whose groups to probe")
    p.add_argument("--batches", default="1,16", help="comma list of tokens per product (decode batch)")
    p.add_argument("--layers", type=int, default=0, help="distinct weights per group (default: the shape's layers)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {VARIANTS}")
    p.add_argument("--experts", type=int, default=28)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = p.parse_args(argv)
    bad = [v for v in args.variants.split(",") if v not in VARIANTS]
    if bad:
        p.error(f"--variants: unknown {bad}; expected some of {VARIANTS}")
    try:
        args.batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        p.error(f"--batches: expected a comma list of integers, got {args.batches!r}")
    if min(args.batches) < 1 or args.layers < 0:
        p.error("--batches must be at least 1 and --layers at least 0")
    return probe_result("probe_product.py", argv, args, run(args), render)


if __name__ == "__main__":
    main()
