"""Layer benchmark over the shapes of the issue: Llama-3-8B's linears, E, r and k, one axis at a time.

    python experiments/sweep_layer.py --out experiments/results          (on the GPU machine)

`bench_layer.py` measures every strategy at in = out = 4096, E = 28, r = 8, k = 2. This sweep moves one of those
away from that centre at a time: the linears 4096->1024 (k/v), 4096->14336 (gate/up) and 14336->4096 (down);
E in {8, 64}; r in {16, 64}; k = 1. For each it times, forward, the JAX base linear and the strategies (`loop`,
`gather`, `dense`, `fused`, `triton`, and `fused-linear`: `meteora_linear`, base product and expand as one
reduction), in the same process PyTorch's base linear and the paper's bmm-torch, and, at fewer token counts, the
backward of the gate-training step through the layer (the gradients of x and of the routing weights), with its
time over the same strategy's forward.

Each layer has its own input (in != out rules out chaining): 8 distinct layers, whose weights exceed the H100's
and H200's 50 MB L2 at these sizes, run one after another inside one jitted program (PyTorch: one stream,
CUDA events); time per layer = median over repeats / 8. Ratios are to the same framework's base linear.
Writes layer_sweep.json, layer_sweep.md under --out.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments.bench_layer import jax_strategy, time_call, torch_layer  # noqa: E402
from kernels import meteora_pallas as mp  # noqa: E402

LAYERS = 8
DT = jnp.bfloat16


@dataclasses.dataclass(frozen=True)
class Shape:
    d: int = 4096
    dout: int = 4096
    e: int = 28
    r: int = 8
    k: int = 2

    def label(self):
        return f"{self.d}->{self.dout}, E={self.e}, r={self.r}, k={self.k}"


CENTRE = Shape()
SHAPES = [CENTRE, Shape(dout=1024), Shape(dout=14336), Shape(d=14336), Shape(e=8), Shape(e=64), Shape(r=16),
          Shape(r=64), Shape(k=1)]


@functools.lru_cache(maxsize=1)
def _weights(s: Shape, seed: int):
    """The LAYERS layers' weights of a shape (drawn once per shape: the token counts reuse them)."""
    rng = np.random.default_rng(seed)
    return [dict(W=rng.standard_normal((s.d, s.dout), np.float32) / s.d ** 0.5,
                 A=rng.standard_normal((s.e, s.d, s.r), np.float32) / s.d ** 0.5,
                 B=rng.standard_normal((s.e, s.r, s.dout), np.float32) / s.r ** 0.5,
                 s=rng.uniform(0.5, 2.0, s.e).astype(np.float32)) for _ in range(LAYERS)]


def make_layers(s: Shape, t: int, seed: int = 0):
    """numpy per layer: x [t, d], W [d, dout], A [e, d, r], B [e, r, dout], s [e], experts/weights [t, k]."""
    rng = np.random.default_rng([seed, t])
    out = []
    for weights in _weights(s, seed):
        logits = rng.standard_normal((t, s.e))
        idx = np.argsort(-logits, axis=1)[:, :s.k]
        w = np.exp(np.take_along_axis(logits, idx, 1))
        out.append(dict(weights, x=rng.standard_normal((t, s.d), np.float32), e=idx.astype(np.int32),
                        w=(w / w.sum(1, keepdims=True)).astype(np.float32)))
    return out


_DEVICE = {}  # the last layers moved to the device: every strategy of one shape and T reuses them


def _jax_params(layers):
    if _DEVICE.get("key") is not layers:
        _DEVICE.clear()  # drop the previous arrays before the new ones arrive
        _DEVICE.update(key=layers, params=[{k: jnp.asarray(v, DT if k in ("x", "W", "A", "B") else v.dtype)
                                            for k, v in p.items()} for p in layers])
    return _DEVICE["params"]


def _jax_layer(name):
    """(p, x, w) -> y for one layer: the base product plus the strategy's adapter term (w: routing weights)."""
    if name == "base":
        return lambda p, x, w: x @ p["W"]
    if name == "fused-linear":
        return lambda p, x, w: mp.meteora_linear(x, p["W"], p["A"], p["B"], p["s"], p["e"], w)
    fn = jax_strategy(name)
    return lambda p, x, w: x @ p["W"] + fn(x, p["A"], p["B"], p["s"], p["e"], w)


def bench_jax(name, layers):
    params = _jax_params(layers)
    layer = _jax_layer(name)
    return time_call(jax.jit(lambda ps: [layer(p, p["x"], p["w"]) for p in ps]), params) / LAYERS


def bench_jax_train(name, layers):
    """Seconds per layer of the backward of the gate-training step through the whole layer: `jax.grad` of
    sum(y * cotangent) for the gradients of x and of the routing weights (what flows back to the gate; W and the
    experts are frozen); the base, x alone. jax.grad does not return the loss, so XLA drops whatever of the forward
    no gradient needs (all of the base product x @ W): this is the backward's time, which a training step adds to
    its forward. Each layer's output has its own fixed random cotangent."""
    params = _jax_params(layers)
    layer = _jax_layer(name)
    rng = np.random.default_rng(1)
    cots = [jnp.asarray(rng.standard_normal((p["x"].shape[0], p["W"].shape[1]), np.float32), DT) for p in params]
    frozen = [{k: v for k, v in p.items() if k not in ("x", "w")} for p in params]

    def loss(xs, ws, frozen, cots):  # everything an argument: closed-over arrays would be constants XLA folds
        outs = [layer(p, x, w) for p, x, w in zip(frozen, xs, ws, strict=True)]
        return sum(jnp.sum(y.astype(jnp.float32) * c) for y, c in zip(outs, cots, strict=True))

    xs = [p["x"] for p in params]
    ws = [p["w"] for p in params]
    grad = jax.grad(loss, argnums=0) if name == "base" else jax.grad(loss, argnums=(0, 1))
    return time_call(jax.jit(grad), xs, ws, frozen, cots) / LAYERS


def bench_torch(name, layers, repeats=7):
    import torch
    ps = []
    for p in layers:
        q = {k: torch.tensor(v, device="cuda") for k, v in p.items()}
        for k in ("x", "W", "A", "B"):
            q[k] = q[k].to(torch.bfloat16)
        q["e"] = q["e"].long()
        ps.append(q)

    fn = torch_layer(name)  # bench_layer's: base, bmm-torch (the paper's path)
    layer = lambda p: fn(p["x"], p)  # noqa: E731
    with torch.no_grad():
        for _ in range(2):
            [layer(p) for p in ps]
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0.record()
            [layer(p) for p in ps]
            t1.record()
            torch.cuda.synchronize()
            times.append(t0.elapsed_time(t1) / 1e3)
    del ps
    torch.cuda.empty_cache()
    return float(np.median(times)) / LAYERS


COLUMNS = ["jax base", "jax lora", "jax loop", "jax gather", "jax dense", "jax fused", "jax triton", "jax fused-linear",
           "torch base", "torch lora", "torch loop-original", "torch bmm-torch"]


def _column(name):
    return COLUMNS.index(name) if name in COLUMNS else len(COLUMNS)


def _key(r):
    return r["kind"], r["shape"], r["T"], r["name"]


def relate(records):
    """Set, in place, each record's ratio to its framework's base of the same kind, shape and T, and each
    backward record's bwd_over_fwd (its time over the same strategy's forward); nan / None where those are
    missing. Returns records."""
    by = {_key(r): r for r in records}
    for r in records:
        base = by.get((r["kind"], r["shape"], r["T"], r["name"].split()[0] + " base"))
        r["ratio"] = r["ms"] / base["ms"] if base else float("nan")
        if r["kind"] == "train":
            fwd = by.get(("fwd", r["shape"], r["T"], r["name"]))
            r["bwd_over_fwd"] = r["ms"] / fwd["ms"] if fwd else None
    return records


def _cell(r):
    cell = f"{r['ms']:.4f} ({r['ratio']:.2f}x"
    if r.get("bwd_over_fwd") is not None:
        cell += f", bwd/fwd {r['bwd_over_fwd']:.2f}"
    return cell + ")"


def write(records, meta, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "layer_sweep")
    with open(path + ".json.tmp", "w") as f:
        json.dump({"meta": meta, "records": records}, f, indent=1)
    os.replace(path + ".json.tmp", path + ".json")
    lines = ["# Layer sweep: Llama-3-8B's linears, E, r and k one at a time (bf16)", "",
             f"Device: {meta['device']}. jax {meta['jax']}, torch {meta.get('torch')}.", "",
             *[f"Earlier command (records kept): `{c}`  " for c in meta.get("earlier_commands", [])],
             f"Command: `{meta['command']}`", "",
             "Time per layer (ms) and ratio to the same framework's base linear in the same row (in the backward "
             "tables, to the base's backward, the gradient of x alone); 8 distinct layers, each with its own input, in "
             "one program. Centre: 4096->4096, E = 28, r = 8, k = 2; each row moves one of them.", ""]
    for kind, title in (("fwd", "Forward"), ("train", "Backward of the gate-training step (the gradients of x and of "
                                                      "the routing weights; bwd/fwd = its time / the same strategy's "
                                                      "forward)")):
        for t in sorted({r["T"] for r in records if r["kind"] == kind}):
            rows = [r for r in records if r["T"] == t and r["kind"] == kind]
            names = sorted(dict.fromkeys(r["name"] for r in rows), key=_column)
            get = {(r["shape"], r["name"]): r for r in rows}
            lines += [f"## {title}, T = {t}", "", "| shape | " + " | ".join(names) + " | best JAX MeteoRA |",
                      "|---|" + "---|" * (len(names) + 1)]
            for sh in dict.fromkeys(r["shape"] for r in rows):
                cells = [_cell(get[(sh, n)]) if (sh, n) in get else "-" for n in names]
                ours = [get[(sh, n)] for n in names if (sh, n) in get and not n.startswith(("jax base", "torch"))]
                best = min(ours, key=lambda r: r["ms"]) if ours else None
                cells.append(f"{best['name'][4:]} {best['ratio']:.2f}x" if best else "-")
                lines.append(f"| {sh} | " + " | ".join(cells) + " |")
            lines.append("")
    with open(path + ".md.tmp", "w") as f:
        f.write("\n".join(lines))
    os.replace(path + ".md.tmp", path + ".md")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="experiments/results")
    ap.add_argument("--tokens", default="1,16,64,256,1024,4096,16384", help="token counts of the forward runs")
    ap.add_argument("--jax", default="base,loop,gather,dense,fused,triton,fused-linear",
                    help="JAX strategies timed forward (ratios are to `base`)")
    ap.add_argument("--torch", default="base,bmm-torch", help="PyTorch layers timed forward (bench_layer's)")
    ap.add_argument("--train", default="base,dense,fused,fused-linear",
                    help="JAX strategies whose backward of the gate-training step is timed (the gradients of x and "
                         "of the routing weights); empty for none")
    ap.add_argument("--train-tokens", default="64,4096", help="token counts of the backward runs")
    ap.add_argument("--shapes", type=int, default=len(SHAPES), help="the first N shapes (a smoke run)")
    ap.add_argument("--dim-scale", type=int, default=1, help="divide in and out by this (a CPU smoke run)")
    ap.add_argument("--append", default=None,
                    help="an earlier layer_sweep.json whose records are kept in the report, except those of a kind, "
                         "shape, T and strategy measured again now (ratios are then to the base shown in the report, "
                         "whichever run measured it)")
    args = ap.parse_args(argv)
    try:
        import torch
        have_torch = torch.cuda.is_available()
    except ImportError:
        have_torch = False
    meta = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                torch=torch.__version__ if have_torch else None, command="python " + " ".join(sys.argv))
    tokens = [int(v) for v in args.tokens.split(",") if v]
    train_tokens = [int(v) for v in args.train_tokens.split(",") if v]
    kept = []
    if args.append:
        with open(args.append) as f:
            earlier = json.load(f)
        kept = [dict(r, kind=r.get("kind", "fwd")) for r in earlier["records"]]
        commands = earlier["meta"].get("earlier_commands", []) + [earlier["meta"]["command"]]
        meta["earlier_commands"] = commands
    records = []
    for shape in SHAPES[:args.shapes]:
        s = dataclasses.replace(shape, d=shape.d // args.dim_scale, dout=shape.dout // args.dim_scale)
        for t in sorted(set(tokens) | set(train_tokens)):
            layers = make_layers(s, t)
            runs = []
            if t in tokens:
                runs += [("fwd", "jax", n, bench_jax) for n in args.jax.split(",") if n]
                runs += [("fwd", "torch", n, bench_torch) for n in args.torch.split(",") if n and have_torch]
            if t in train_tokens:
                runs += [("train", "jax", n, bench_jax_train) for n in args.train.split(",") if n]
            for kind, fw, name, bench in runs:
                try:
                    sec = bench(name, layers)
                except Exception as err:  # one failing (or out of memory) must not lose the others
                    print(f"{s.label()} T={t} {kind} {fw} {name}: FAILED {type(err).__name__}: {str(err)[:300]}",
                          flush=True)
                    continue
                records.append(dict(kind=kind, shape=s.label(), T=t, name=f"{fw} {name}", ms=sec * 1e3))
                relate(records)
                print(f"{s.label():32s} T={t:5d} {kind:5s} {fw:5s} {name:12s} {sec * 1e3:8.4f} ms "
                      f"{records[-1]['ratio']:6.2f}x", flush=True)
            now = {_key(r) for r in records}
            write(relate([r for r in kept if _key(r) not in now] + records), meta, args.out)
    return records


if __name__ == "__main__":
    main()
