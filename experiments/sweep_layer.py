"""Layer benchmark over the shapes of the issue: Llama-3-8B's linears, E, r and k, one axis at a time.

    python experiments/sweep_layer.py --out experiments/results          (on the GPU machine)

`bench_layer.py` measures every strategy at in = out = 4096, E = 28, r = 8, k = 2. This sweep moves one of those
away from that centre at a time: the linears 4096->1024 (k/v), 4096->14336 (gate/up) and 14336->4096 (down);
E in {8, 64}; r in {16, 64}; k = 1. For each it times the JAX base linear and the strategies (`gather`, `dense`,
`fused`, and `fused-linear`: `meteora_linear`, base product and expand as one reduction), and in the same
process PyTorch's base linear and the paper's bmm-torch, at a few token counts.

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


def make_layers(s: Shape, t: int, seed: int = 0):
    """numpy per layer: x [t, d], W [d, dout], A [e, d, r], B [e, r, dout], s [e], experts/weights [t, k]."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(LAYERS):
        logits = rng.standard_normal((t, s.e))
        idx = np.argsort(-logits, axis=1)[:, :s.k]
        w = np.exp(np.take_along_axis(logits, idx, 1))
        out.append(dict(x=rng.standard_normal((t, s.d), np.float32),
                        W=rng.standard_normal((s.d, s.dout), np.float32) / s.d ** 0.5,
                        A=rng.standard_normal((s.e, s.d, s.r), np.float32) / s.d ** 0.5,
                        B=rng.standard_normal((s.e, s.r, s.dout), np.float32) / s.r ** 0.5,
                        s=rng.uniform(0.5, 2.0, s.e).astype(np.float32), e=idx.astype(np.int32),
                        w=(w / w.sum(1, keepdims=True)).astype(np.float32)))
    return out


def bench_jax(name, layers):
    params = [{k: jnp.asarray(v, DT if k in ("x", "W", "A", "B") else v.dtype) for k, v in p.items()} for p in layers]
    if name == "base":
        layer = lambda p: p["x"] @ p["W"]
    elif name == "fused-linear":
        layer = lambda p: mp.meteora_linear(p["x"], p["W"], p["A"], p["B"], p["s"], p["e"], p["w"])
    else:
        fn = jax_strategy(name)
        layer = lambda p: p["x"] @ p["W"] + fn(p["x"], p["A"], p["B"], p["s"], p["e"], p["w"])
    return time_call(jax.jit(lambda ps: [layer(p) for p in ps]), params) / LAYERS


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


def write(records, meta, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "layer_sweep")
    with open(path + ".json.tmp", "w") as f:
        json.dump({"meta": meta, "records": records}, f, indent=1)
    os.replace(path + ".json.tmp", path + ".json")
    tokens = sorted({r["T"] for r in records})
    lines = ["# Layer sweep: Llama-3-8B's linears, E, r and k one at a time (bf16)", "",
             f"Device: {meta['device']}. jax {meta['jax']}, torch {meta.get('torch')}.", "",
             f"Command: `{meta['command']}`", "",
             "Time per layer (ms) and ratio to the same framework's base linear; 8 distinct layers, each with its own "
             "input, in one program. Centre: 4096->4096, E = 28, r = 8, k = 2; each row moves one of them.", ""]
    for t in tokens:
        rows = [r for r in records if r["T"] == t]
        names = list(dict.fromkeys(r["name"] for r in rows))
        get = {(r["shape"], r["name"]): r for r in rows}
        lines += [f"## T = {t}", "", "| shape | " + " | ".join(names) + " | best JAX MeteoRA |",
                  "|---|" + "---|" * (len(names) + 1)]
        for sh in dict.fromkeys(r["shape"] for r in rows):
            cells = [(f"{get[(sh, n)]['ms']:.4f} ({get[(sh, n)]['ratio']:.2f}x)" if (sh, n) in get else "-")
                     for n in names]
            ours = [get[(sh, n)] for n in names if (sh, n) in get and not n.startswith(("jax base", "torch"))]
            best = min(ours, key=lambda r: r["ms"]) if ours else None
            cells.append(f"{best['name'][4:]} {best['ratio']:.2f}x" if best else "-")
            lines.append(f"| {sh} | " + " | ".join(cells) + " |")
        lines.append("")
    with open(path + ".md", "w") as f:
        f.write("\n".join(lines))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="experiments/results")
    ap.add_argument("--tokens", default="1,64,1024,4096")
    ap.add_argument("--jax", default="base,gather,dense,fused,fused-linear")
    ap.add_argument("--torch", default="base,bmm-torch")
    ap.add_argument("--shapes", type=int, default=len(SHAPES), help="the first N shapes (a smoke run)")
    ap.add_argument("--dim-scale", type=int, default=1, help="divide in and out by this (a CPU smoke run)")
    args = ap.parse_args(argv)
    try:
        import torch
        have_torch = torch.cuda.is_available()
    except ImportError:
        have_torch = False
    meta = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                torch=torch.__version__ if have_torch else None, command="python " + " ".join(sys.argv))
    records = []
    for shape in SHAPES[:args.shapes]:
        s = dataclasses.replace(shape, d=shape.d // args.dim_scale, dout=shape.dout // args.dim_scale)
        for t in [int(v) for v in args.tokens.split(",")]:
            layers = make_layers(s, t)
            runs = [("jax", n, bench_jax) for n in args.jax.split(",") if n]
            runs += [("torch", n, bench_torch) for n in args.torch.split(",") if n and have_torch]
            base = {}
            for fw, name, bench in runs:
                try:
                    sec = bench(name, layers)
                except Exception as err:  # one failing (or out of memory) must not lose the others
                    print(f"{s.label()} T={t} {fw} {name}: FAILED {type(err).__name__}: {str(err)[:300]}", flush=True)
                    continue
                if name == "base":
                    base[fw] = sec
                ratio = sec / base[fw] if fw in base else float("nan")
                records.append(dict(shape=s.label(), T=t, name=f"{fw} {name}", ms=sec * 1e3, ratio=ratio))
                print(f"{s.label():32s} T={t:5d} {fw:5s} {name:10s} {sec * 1e3:8.4f} ms {ratio:6.2f}x", flush=True)
            write(records, meta, args.out)
    return records


if __name__ == "__main__":
    main()
