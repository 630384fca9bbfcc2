"""What one decode expand launch costs, against the floor of a launch: is 1.25x the base step reachable?

    python experiments/probe_expand.py --shape smollm2 --batch 1 --out experiments/results/h200/probe_expand

In packing mode `extended` a MeteoRA decode step adds one Pallas launch per packed group (q/k/v, o, gate/up,
down) to the packed base's step: `meteora_routed_expand`, which routes every member's tokens from the product's
gate columns and writes y = base + delta. At SmolLM2-135M shapes those 120 launches per step are the whole
overhead (4.2 us each on the H200, `results/h200/decode_profile_smollm2.json`). This probe times, for each group
of a shape, `--launches` back-to-back calls (each on its own z, so none is shared or cached) of:

    xla-copy       y = z[:, :ld] in bf16: an XLA fusion reading what the expand reads first (a typical small kernel)
    pallas-empty   a one-program Pallas kernel that stores one number (the floor of a Pallas launch)
    pallas-copy    a Pallas kernel on the expand's grid that loads its base tile of z and stores it in bf16
    expand-forced  `meteora_routed_expand` with a forced expert (no logits, no top-k: one dependent load less)
    expand-topk    `meteora_routed_expand` as the model runs it (top-2 of the f32 gate logits)
    expand-dense-b expand-topk with `BlockSizes.routed_dense_b`: B's whole tile is loaded with the first loads,
                   not after the top-k (more bytes, one dependent load less)
    expand-act     gate/up only: expand-topk, then the MLP's silu(gate) * up in XLA (what a layer runs today)
    expand-glu     gate/up only: `meteora_routed_expand(glu=True)`, which writes silu(gate) * up itself
                   (`BlockSizes.routed_glu`); per launch it stands for expand-act's two

and reports microseconds per launch (wall time of the whole jitted chain / launches: gaps between kernels
included, as in a decode step). Random bf16 B, f32 z; E, r and k as the issue's benchmark (28, 8, 2).
Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from bench_generate import SHAPES, write_outputs  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import triton as plgpu  # noqa: E402

from kernels import meteora_pallas as mp  # noqa: E402
from meteora_jax.packed import EXTENDED_ALIGN  # noqa: E402

VARIANTS = ("xla-copy", "pallas-empty", "pallas-copy", "expand-forced", "expand-topk", "expand-dense-b", "expand-act",
            "expand-glu")
GATE_UP_ONLY = ("expand-act", "expand-glu")  # variants of the gate/up group alone


def groups(shape: dict) -> dict[str, tuple[tuple[int, int], ...]]:
    """Each packed group's member spans (offset, size) in its output, as `meteora_jax.packed` lays them out."""
    d, inter = shape["hidden_size"], shape["intermediate_size"]
    hd = shape.get("head_dim", d // shape["num_attention_heads"])
    q, kv = shape["num_attention_heads"] * hd, shape["num_key_value_heads"] * hd
    return {"qkv": ((0, q), (q, kv), (q + kv, kv)), "o": ((0, d),), "gate_up": ((0, inter), (inter, inter)),
            "down": ((0, d),)}


def ldz_of(ld: int, m: int, e: int, r: int, parts: int = 2) -> int:
    need = ld + parts * m * e + m * e * r
    return -(-need // EXTENDED_ALIGN) * EXTENDED_ALIGN


def _copy_kernel(z_ref, o_ref, *, n, ldz, ld, bm, bn, interpret):
    rows, cols = mp._iota(bm), pl.program_id(0) * bn + mp._iota(bn)
    mask = (rows < n)[:, None] & (cols < ld)[None, :]
    v = mp._load(z_ref, rows[:, None] * ldz + cols[None, :], mask, interpret)
    mp._store(o_ref, rows[:, None] * ld + cols[None, :], v.astype(o_ref.dtype), mask, interpret)


def pallas_copy(z, ld: int, bn: int, programs: int, interpret: bool):
    """z[:, :ld] in bf16 by `programs` programs of bn columns (the expand's grid)."""
    n, ldz = z.shape
    kern = functools.partial(_copy_kernel, n=n, ldz=ldz, ld=ld, bm=mp._p2(n, 16), bn=bn, interpret=interpret)
    out = pl.pallas_call(kern, grid=(programs,), out_shape=jax.ShapeDtypeStruct((n * ld,), jnp.bfloat16),
                         compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2), interpret=interpret,
                         name="probe_copy")(z.reshape(-1))
    return out.reshape(n, ld)


def _empty_kernel(z_ref, o_ref, *, interpret):
    i = mp._iota(16)
    mp._store(o_ref, i, mp._load(z_ref, i, i < 1, interpret), i < 1, interpret)


def pallas_empty(z, interpret: bool):
    """z's first number, by one program: a launch with one load and one store."""
    return pl.pallas_call(functools.partial(_empty_kernel, interpret=interpret), grid=(1,),
                          out_shape=jax.ShapeDtypeStruct((1,), jnp.float32),
                          compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1), interpret=interpret,
                          name="probe_empty")(z.reshape(-1))


def variant_fn(name: str, spans, b, scaling, *, k: int, interpret: bool):
    """z -> that variant's output for one group."""
    ld = b.shape[1]
    bn = mp.BlockSizes.get_default().routed_out_block(ld)
    programs = mp.Members(scaling.shape[1], b.shape[0] // scaling.shape[1], spans, ld).tile_starts(bn)[-1]
    if name == "xla-copy":
        return lambda z: z[:, :ld].astype(jnp.bfloat16)
    if name == "pallas-empty":
        return lambda z: pallas_empty(z, interpret)
    if name == "pallas-copy":
        return lambda z: pallas_copy(z, ld, bn, programs, interpret)
    if name in ("expand-forced", "expand-topk", "expand-dense-b"):
        forced = 0 if name == "expand-forced" else None
        bs = mp.BlockSizes.get_default()
        bs = dataclasses.replace(bs, routed_dense_b=True) if name == "expand-dense-b" else bs
        return lambda z: mp.meteora_routed_expand(z, b, scaling, spans, gate_parts=2, top_k=1 if forced == 0 else k,
                                                  forced_expert=forced, out_dtype=jnp.bfloat16, block_sizes=bs,
                                                  interpret=interpret)[0]
    if name in GATE_UP_ONLY:
        expand = functools.partial(mp.meteora_routed_expand, b=b, scaling=scaling, spans=spans, gate_parts=2,
                                   top_k=k, out_dtype=jnp.bfloat16, interpret=interpret)
        if name == "expand-glu":
            return lambda z: expand(z, glu=True)[0]

        def act(z):
            y = expand(z)[0]
            return jax.nn.silu(y[:, :ld // 2]) * y[:, ld // 2:]

        return act
    raise ValueError(f"--variants: unknown variant {name!r}; expected some of {VARIANTS}")


def group_inputs(spans, n: int, launches: int, *, e: int, r: int, seed: int):
    """`launches` distinct z [n, ldz] (f32), and the group's b [E*r, ld] (bf16) and scaling [m, E]."""
    ld, m = sum(s for _, s in spans), len(spans)
    rng = np.random.default_rng(seed)
    zs = [jnp.asarray(rng.standard_normal((n, ldz_of(ld, m, e, r)), np.float32)) for _ in range(launches)]
    b = jnp.asarray(rng.standard_normal((e * r, ld), np.float32) / r ** 0.5, jnp.bfloat16)
    scaling = jnp.asarray(rng.uniform(0.5, 2.0, (m, e)), jnp.float32)
    return zs, b, scaling


def chain_fn(fn):
    """zs -> [fn(z) for z in zs], each call ordered after the previous one by an optimization barrier (no work
    at run time), so that XLA neither fuses the small copies side by side into one kernel nor reorders them."""

    def chain(zs):
        outs = [fn(zs[0])]
        for z in zs[1:]:
            prev, z = jax.lax.optimization_barrier((outs[-1], z))
            outs[-1] = prev
            outs.append(fn(z))
        return outs

    return chain


def time_chain(fn, zs, repeats: int) -> float:
    """Median seconds of one call of the jitted chain of fn over zs (calls queued back to back)."""
    chain = jax.jit(chain_fn(fn))
    jax.block_until_ready(chain(zs))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        outs = [chain(zs) for _ in range(3)]
        jax.block_until_ready(outs)
        times.append((time.perf_counter() - t0) / 3)
    return float(np.median(times))


def run(args) -> list[dict]:
    interpret = jax.default_backend() != "gpu"
    shape = SHAPES[args.shape]
    records = []
    for gi, (group, spans) in enumerate(groups(shape).items()):
        zs, b, scaling = group_inputs(spans, args.batch, args.launches, e=args.experts, r=args.rank, seed=gi)
        for name in args.variants.split(","):
            if name in GATE_UP_ONLY and group != "gate_up":
                continue
            rec = {"shape": args.shape, "group": group, "ld": b.shape[1], "ldz": zs[0].shape[1], "batch": args.batch,
                   "variant": name, "launches": args.launches}
            try:
                sec = time_chain(variant_fn(name, spans, b, scaling, k=args.top_k, interpret=interpret), zs,
                                 args.repeats)
                rec["us_per_launch"] = sec / args.launches * 1e6
            except Exception as err:  # one variant failing must not lose the others
                rec["error"] = f"{type(err).__name__}: {err}"[:300]
            print(json.dumps(rec), flush=True)
            records.append(rec)
    return records


def render(result: dict) -> str:
    recs = result["records"]
    names = list(dict.fromkeys(r["variant"] for r in recs))
    lines = [f"# Decode expand launch against the floor of a launch ({result['args']['shape']} shapes, batch "
             f"{result['args']['batch']})", "", f"Device: {result['device']} (jax {result['jax']}). Command: "
             f"`{result['command']}`", "", "Microseconds per launch (wall time of "
             f"{result['args']['launches']} back-to-back launches, gaps included).", "",
             "| group | ld | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    for group in dict.fromkeys(r["group"] for r in recs):
        row = {r["variant"]: r for r in recs if r["group"] == group}
        cells = [f"{row[n]['us_per_launch']:.2f}" if "us_per_launch" in row.get(n, {}) else
                 ("error" if n in row else "") for n in names]
        ld = next(iter(row.values()))["ld"]
        lines.append(f"| {group} | {ld} | " + " | ".join(cells) + " |")
    errors = [r for r in recs if "error" in r]
    lines += [""] + [f"- {r['group']} {r['variant']}: {r['error']}" for r in errors]
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="smollm2", choices=sorted(SHAPES), help="model shape whose groups to probe")
    p.add_argument("--batch", type=int, default=1, help="tokens per launch (decode batch)")
    p.add_argument("--launches", type=int, default=240, help="back-to-back launches timed together, per group")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {VARIANTS}")
    p.add_argument("--experts", type=int, default=28)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = p.parse_args(argv)
    bad = [v for v in args.variants.split(",") if v not in VARIANTS]
    if bad:
        p.error(f"--variants: unknown {bad}; expected some of {VARIANTS}")
    if args.launches < 1 or args.batch < 1:
        p.error("--launches and --batch must be at least 1")
    return probe_result("probe_expand.py", argv, args, run(args), render)


def probe_result(script: str, argv, args, records: list[dict], render) -> dict:
    """A probe's result (command, device, arguments, records), also written to OUT.json and OUT.md (`render`)
    when `args.out` is set. The probes share it."""
    result = {"command": " ".join([f"python experiments/{script}", *(sys.argv[1:] if argv is None else argv)]),
              "device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "host": platform.node(),
              "args": vars(args), "records": records}
    if args.out:
        write_outputs(Path(args.out), {".json": json.dumps(result, indent=1), ".md": render(result)})
    return result


if __name__ == "__main__":
    main()
