"""Layer benchmark of the MeteoRA adapter-term strategies against the base linear, with PyTorch references.

    python experiments/bench_layer.py --out experiments/results          (on the GPU machine)

A layer is `y = x @ W + delta(x)` with in = out = 4096, E = 28 experts of rank 8, top-2, bf16, and a fixed
per-layer routing (random gate logits -> top-k -> softmax; the same for every strategy). Eight distinct layers
(their weights, 8 x 36 MB, exceed the 50 MB L2) are applied in sequence three times inside one jitted program;
time per layer = median over repeats / 24. Strategies:

    JAX    base (x @ W), base-t (the same with W stored [out, in]), lora (one adapter), loop, gather, dense,
           fused (Pallas), fused-linear (`meteora_linear`: base product and expand as one reduction), fused-add
           (the routed pair, into x @ W's buffer), fused-gemv (`meteora_gemv`: base
           product + adapter term in one launch, W stored [out, in]; T <= 16), triton (jax-triton)
    torch  base, lora, loop-original (every expert on every token, weighted), bmm-torch (gather A[idx], B[idx]
           then batched products), eager (torch.compile off), timed with CUDA events in the same process

Memory ("extra"): beyond the layer's inputs (weights, x) and its output y. JAX: XLA's temp allocation of one
layer's compiled program; torch: the allocator's peak during one layer call above its level before, less y.
Training: the adapter term alone (8 layers summed, fwd) and its gradient in x, a, b and the routing weights
(fwd + bwd); bwd = (fwd + bwd) - fwd.
Writes layer_bench.json, layer_bench.md and layer_bench.png under --out.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from kernels import meteora_pallas as mp  # noqa: E402
from kernels import meteora_triton as mt  # noqa: E402
from meteora_jax import strategies  # noqa: E402

D = DOUT = 4096
E, R, K = 28, 8, 2
LAYERS, PASSES = 8, 3
TOKENS = (1, 16, 64, 256, 1024, 4096, 16384)
DT = jnp.bfloat16


def make_layers(t: int, seed: int = 0, *, d=D, dout=DOUT, e=E, r=R, k=K, layers=LAYERS):
    """Per layer: W [d, dout], A [e, d, r], B [e, r, dout], s [e], experts [t, k], weights [t, k]; x [t, d]
    (the benchmark's sizes unless given)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(layers):
        logits = rng.standard_normal((t, e))
        idx = np.argsort(-logits, axis=1)[:, :k]
        top = np.take_along_axis(logits, idx, 1)
        w = np.exp(top - top.max(1, keepdims=True))
        out.append(dict(
            W=rng.standard_normal((d, dout), np.float32) / d ** 0.5,
            A=rng.standard_normal((e, d, r), np.float32) / d ** 0.5,
            B=rng.standard_normal((e, r, dout), np.float32) / r ** 0.5,
            s=rng.uniform(0.5, 2.0, e).astype(np.float32),
            e=idx.astype(np.int32), w=(w / w.sum(1, keepdims=True)).astype(np.float32)))
    x = rng.standard_normal((t, d), np.float32)
    return out, x


def jax_strategy(name: str, block_sizes=None):
    if name == "fused":
        return lambda *a: mp.meteora_fused(*a, block_sizes=block_sizes)
    if name == "triton":
        return lambda *a: mt.meteora_triton(*a, block_sizes=block_sizes)
    return strategies.STRATEGIES[name]


def jax_layer(name: str, block_sizes=None):
    if name == "base":
        return lambda x, p: x @ p["W"]
    if name == "lora":
        return lambda x, p: x @ p["W"] + ((x @ p["A"][0]) * p["s"][0].astype(x.dtype)) @ p["B"][0]
    if name == "base-t":  # the base weight stored transposed ([out, in], nn.Linear's layout)
        return lambda x, p: jax.lax.dot_general(x, p["WT"], (((1,), (1,)), ((), ())))
    if name == "fused-gemv":  # base product + adapter term in one launch, reading W^T
        return lambda x, p: mp.meteora_gemv(x, p["WT"], p["A"], p["B"], p["s"], p["e"], p["w"],
                                            block_sizes=block_sizes)
    if name == "fused-linear":  # base product and expand as one reduction (what the model runs for 512..8192 tokens)
        return lambda x, p: mp.meteora_linear(x, p["W"], p["A"], p["B"], p["s"], p["e"], p["w"],
                                              block_sizes=block_sizes)
    if name == "fused-add":  # the routed pair adds the adapter term into the base output's buffer
        return lambda x, p: mp.meteora_fused_add(x, x @ p["W"], p["A"], p["B"], p["s"], p["e"], p["w"],
                                                 block_sizes=block_sizes)
    fn = jax_strategy(name, block_sizes)
    return lambda x, p: x @ p["W"] + fn(x, p["A"], p["B"], p["s"], p["e"], p["w"])


def to_jax(layers, x, dtype=DT):
    """`make_layers`' arrays as JAX arrays: W, A, B and x in `dtype`, plus W^T."""
    cast = lambda k, v: jnp.asarray(v, dtype if k in "WAB" else v.dtype)
    params = [{k: cast(k, v) for k, v in p.items()} for p in layers]
    for p in params:  # W^T, stored (not transposed inside the timed program), for base-t and fused-gemv
        p["WT"] = jnp.asarray(np.ascontiguousarray(np.asarray(p["W"]).T))
    return params, jnp.asarray(x, dtype)


def time_call(f, *args, inner=5, repeats=7):
    """Median seconds of one call of a jitted f (calls queued back to back, then one sync)."""
    jax.block_until_ready(f(*args))
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = [f(*args) for _ in range(inner)]
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / inner)
    return float(np.median(times))


def bench_jax_layer(name, params, x, block_sizes=None, passes=PASSES, memory=True):
    """(seconds per layer, extra bytes): the extra bytes are XLA's temp allocation of ONE layer's program
    (what the layer needs beyond its inputs and its output y)."""
    layer = jax_layer(name, block_sizes)

    def run(x, params):
        for _ in range(passes):
            for p in params:
                x = layer(x, p)
        return x

    sec = time_call(jax.jit(run).lower(x, params).compile(), x, params)
    extra = None
    if memory:
        mem = jax.jit(layer).lower(x, params[0]).compile().memory_analysis()
        extra = None if mem is None else int(mem.temp_size_in_bytes)
    return sec / (LAYERS * passes), extra


def bench_jax_train(name, params, x, block_sizes=None):
    """(fwd s, fwd+bwd s) of the adapter term alone over the 8 layers (summed, not chained); for `fused-linear` and
    `dense-layer`, of the whole layer (base product included; W gets no gradient)."""
    cot = jnp.ones((x.shape[0], DOUT), DT)
    if name == "dense-layer":
        fn = lambda x, a, b, s, e, w, W: x @ W + strategies.dense(x, a, b, s, e, w)  # noqa: E731
    elif name == "fused-linear":
        fn = lambda x, a, b, s, e, w, W: mp.meteora_linear(x, W, a, b, s, e, w, block_sizes=block_sizes)  # noqa: E731
    else:
        adapter = jax_strategy(name, block_sizes)
        fn = lambda x, a, b, s, e, w, W: adapter(x, a, b, s, e, w)  # noqa: E731

    def fwd(x, a, b, w):
        return sum(fn(x, a[i], b[i], params[i]["s"], params[i]["e"], w[i], params[i]["W"]) for i in range(LAYERS))

    def loss(x, a, b, w):
        return jnp.sum(fwd(x, a, b, w).astype(jnp.float32) * cot)

    a = [p["A"] for p in params]
    b = [p["B"] for p in params]
    w = [p["w"] for p in params]
    t_f = time_call(jax.jit(fwd), x, a, b, w)
    t_fb = time_call(jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))), x, a, b, w)
    return t_f / LAYERS, t_fb / LAYERS


# ----------------------------------------------------------------------------------------------- torch
def torch_layers(layers, x, device="cuda", dtype="bfloat16"):
    """`make_layers`' arrays as torch tensors on `device`: W, A, B and x in `dtype`, plus each token's routing
    coefficient per expert (`coef` [T, E], weight x scaling, 0 where unpicked) for loop-original."""
    import torch
    dt = getattr(torch, dtype)
    tl = []
    for p in layers:
        q = {k: torch.tensor(v, device=device) for k, v in p.items()}
        for k in "WAB":
            q[k] = q[k].to(dt)
        q["e"] = q["e"].long()
        n_exp = q["A"].shape[0]
        q["coef"] = torch.zeros(x.shape[0], n_exp, device=device).scatter_add_(1, q["e"], q["w"]) * q["s"]
        tl.append(q)
    return tl, torch.tensor(x, device=device).to(dt)


def torch_layer(name):
    import torch

    def base(x, p):
        return x @ p["W"]

    def lora(x, p):
        return x @ p["W"] + ((x @ p["A"][0]) * p["s"][0]) @ p["B"][0]

    def loop_original(x, p):  # every expert on every token, weighted by its routing coefficient (0 if unpicked)
        y = x @ p["W"]
        coef = p["coef"].to(x.dtype)
        for i in range(p["A"].shape[0]):
            y = y + coef[:, i:i + 1] * ((x @ p["A"][i]) @ p["B"][i])
        return y

    def bmm_torch(x, p):  # gather each token's k experts, then batched products
        a_sel, b_sel = p["A"][p["e"]], p["B"][p["e"]]  # [T, k, D, R], [T, k, R, DOUT]
        h = torch.einsum("td,tkdr->tkr", x, a_sel) * (p["w"] * p["s"][p["e"]]).to(x.dtype)[..., None]
        return x @ p["W"] + torch.einsum("tkr,tkro->to", h, b_sel)

    return {"base": base, "lora": lora, "loop-original": loop_original, "bmm-torch": bmm_torch}[name]


def bench_torch_layer(name, params, x, repeats=7):
    import torch
    layer = torch_layer(name)

    def run():
        y = x
        for _ in range(PASSES):
            for p in params:
                y = layer(y, p)
        return y

    with torch.no_grad():
        run()
        run()
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0.record()
            run()
            t1.record()
            torch.cuda.synchronize()
            times.append(t0.elapsed_time(t1) / 1e3)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        y = layer(x, params[0])
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - before - y.numel() * y.element_size()
        del y
    return float(np.median(times)) / (LAYERS * PASSES), int(extra)


# --------------------------------------------------------------------------------------------- outputs
MEMORY_METRIC = "extra memory of one layer (MB, beyond its inputs and its output y)"


def write(records, meta, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "layer_bench.json.tmp"), "w") as f:
        json.dump({"meta": meta, "records": records}, f, indent=1)
    os.replace(os.path.join(out_dir, "layer_bench.json.tmp"), os.path.join(out_dir, "layer_bench.json"))
    lines = [f"# Layer benchmark: in = out = {D}, E = {E}, r = {R}, k = {K}, bf16", "",
             f"Device: {meta['device']}. jax {meta['jax']}, torch {meta.get('torch')}.", "",
             f"Command: `{meta['command']}`", "",
             "Time per layer (ms), 8 distinct layers x 3 passes in one program; ratio to the same framework's "
             "base linear; " + meta.get("memory_metric", MEMORY_METRIC) + ".", ""]
    tokens = sorted({r["T"] for r in records if r["kind"] == "layer"})
    names = list(dict.fromkeys((r["framework"], r["name"]) for r in records if r["kind"] == "layer"))
    get = {(r["framework"], r["name"], r["T"]): r for r in records if r["kind"] == "layer"}
    lines.append("| strategy | " + " | ".join(f"T={t}" for t in tokens) + " |")
    lines.append("|---|" + "---|" * len(tokens))
    for fw, nm in names:
        cells = []
        for t in tokens:
            r = get.get((fw, nm, t))
            cells.append("-" if r is None else f"{r['ms']:.4f} ({r['ratio']:.2f}x, {r['extra_mb']:.1f} MB)")
        lines.append(f"| {fw} {nm} | " + " | ".join(cells) + " |")
    lines.append("| x + y size | " + " | ".join(f"{2 * t * D * 2 / 2 ** 20:.1f} MB" for t in tokens) + " |")
    if meta.get("block_sizes"):
        lines += ["", "fused / triton block sizes per T (changes from `BlockSizes()` defaults, picked by "
                  "`--tune`): " + "; ".join(f"T={t}: `{json.dumps(c)}`" for t, c in meta["block_sizes"].items())]
    train = [r for r in records if r["kind"] == "train"]
    if train:
        lines += ["", "Adapter term alone, per layer: forward, forward + backward (grads of x, a, b, routing "
                  "weights), and backward / forward.", "", "| strategy | T | fwd ms | fwd+bwd ms | bwd/fwd |",
                  "|---|---|---|---|---|"]
        for r in train:
            lines.append(f"| {r['name']} | {r['T']} | {r['fwd_ms']:.4f} | {r['fwdbwd_ms']:.4f} | "
                         f"{r['bwd_over_fwd']:.2f} |")
    if meta.get("notes"):
        lines += ["", "## Notes", "", meta["notes"]]
    with open(os.path.join(out_dir, "layer_bench.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(8, 5))
        for i, (fw, nm) in enumerate(names):
            pts = [(t, get[(fw, nm, t)]["ratio"]) for t in tokens if (fw, nm, t) in get]
            ax.plot(*zip(*pts, strict=True), marker="o" if fw == "jax" else "s", ls="-" if fw == "jax" else "--",
                    color=plt.cm.tab20(i % 20), label=f"{fw} {nm}")
        ax.set(xscale="log", yscale="log", xlabel="tokens T", ylabel="time / base linear",
               title=f"MeteoRA layer, {meta['device']}")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(True, which="both", alpha=0.3)
        fig.savefig(os.path.join(out_dir, "layer_bench.png"), dpi=120, bbox_inches="tight")
    except ImportError:
        pass


TUNE = {  # changes from the BlockSizes defaults tried per token count (a small coordinate search)
    "decode": [dict(decode_block_in=1024, decode_max_elems=16384, decode_warps=8),
               dict(decode_block_in=2048, decode_max_elems=32768, decode_warps=8),
               dict(decode_block_in=1024, decode_max_elems=16384, decode_warps=8, decode_block_out=64),
               dict(decode_block_in=1024, decode_max_elems=16384, decode_warps=8, decode_block_out=32),
               dict(decode_max_tokens=0), dict(decode_kernel="split"), dict(decode_kernel="split", routed_splits=64),
               dict(decode_kernel="split", routed_splits=16), dict(decode_kernel="split", routed_block_out=64),
               dict(decode_kernel="split", routed_block_in=128)],
    "small": [dict(decode_max_tokens=64, decode_kernel="split"),
              dict(decode_max_tokens=64, decode_kernel="split", routed_block_out=64),
              dict(decode_max_tokens=64, decode_kernel="split", routed_splits=64),
              dict(shrink_split=1), dict(shrink_split=8), dict(shrink_split=32), dict(shrink_block_cols=64),
              dict(shrink_block_in=128), dict(expand_block_out=32), dict(expand_block_out=128)],
    "mid": [dict(shrink_block_cols=256), dict(shrink_split=1), dict(shrink_split=4), dict(expand_block_out=128),
            dict(shrink_block_tokens=32)],
    "large": [dict(shrink_block_tokens=128), dict(shrink_split=1), dict(shrink_block_tokens=128, shrink_split=1),
              dict(expand_block_out=256), dict(expand_block_tokens=256), dict(expand_block_cols=64),
              dict(num_stages=4)],
}


def tune(tokens, out_dir):
    """Coordinate search over `BlockSizes` for `fused` (8 layers, one pass); writes tune.json after each T
    (keeping an existing tune.json's rows of the other token counts)."""
    path = os.path.join(out_dir, "tune.json")
    rows = [r for r in json.load(open(path)) if r["T"] not in tokens] if os.path.exists(path) else []
    for t in tokens:
        layers, x = make_layers(t)
        params, xj = to_jax(layers, x)
        base, _ = bench_jax_layer("base", params, xj, passes=1, memory=False)
        group = "decode" if t <= 2 else "small" if t <= 64 else "mid" if t <= 256 else "large"
        for c in [{}] + TUNE[group]:
            try:
                sec, _ = bench_jax_layer("fused", params, xj, mp.BlockSizes(**c), passes=1, memory=False)
            except Exception as err:  # a variant that does not compile is reported, not fatal
                print(f"tune T={t} {c}: FAILED {type(err).__name__}: {str(err)[:300]}", flush=True)
                continue
            rows.append(dict(impl="fused", T=t, change=c, ms=sec * 1e3, ratio=sec / base))
            print(f"tune T={t:6d} {json.dumps(c):90s} {sec * 1e3:8.4f} ms {sec / base:6.3f}x", flush=True)
        os.makedirs(out_dir, exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(rows, f, indent=1)
        os.replace(path + ".tmp", path)


def best_block_sizes(path):
    """{T: change} with the fastest `fused` variant per token count in a tune.json."""
    best = {}
    for r in json.load(open(path)):
        if r["T"] not in best or r["ms"] < best[r["T"]]["ms"]:
            best[r["T"]] = r
    return {t: r["change"] for t, r in best.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="experiments/results")
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--jax",
                    default="base,base-t,lora,loop,gather,dense,fused,fused-linear,fused-add,fused-gemv,triton")
    ap.add_argument("--linear-min-tokens", type=int, default=256, help="smallest T for fused-linear")
    ap.add_argument("--add-max-tokens", type=int, default=64, help="largest T for fused-add (a few-token path)")
    ap.add_argument("--torch", default="base,lora,loop-original,bmm-torch")
    ap.add_argument("--train", default="gather,dense,fused,triton,dense-layer,fused-linear")
    ap.add_argument("--train-tokens", default="1,64,1024,4096,16384")
    ap.add_argument("--notes", default="", help="markdown appended to the table (e.g. targets missed and why)")
    ap.add_argument("--tune", action="store_true", help="search block sizes of fused instead (writes tune.json)")
    ap.add_argument("--block-sizes", default=None, help="a tune.json: use its fastest variant per T for fused/triton")
    args = ap.parse_args(argv)
    tokens = [int(t) for t in args.tokens.split(",")]
    jax_names = [n for n in args.jax.split(",") if n and (n != "triton" or mt.available())]
    if args.tune:
        return tune(tokens, args.out)
    chosen = best_block_sizes(args.block_sizes) if args.block_sizes else {}
    torch_names = [n for n in args.torch.split(",") if n]
    try:
        import torch
        have_torch = torch.cuda.is_available()
    except ImportError:
        have_torch = False
    meta = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "torch": torch.__version__ if have_torch else None, "command": "python " + " ".join(sys.argv),
            "layers": LAYERS, "passes": PASSES, "shape": dict(D=D, DOUT=DOUT, E=E, R=R, K=K, dtype="bfloat16"),
            "notes": args.notes, "block_sizes": {str(t): c for t, c in chosen.items()}}
    records = []
    for t in tokens:
        layers, x = make_layers(t)
        params, xj = to_jax(layers, x)
        base = None
        bs = mp.BlockSizes(**chosen.get(t, {}))
        for nm in jax_names:
            if ((nm == "fused-add" and t > args.add_max_tokens) or (nm == "fused-gemv" and t > bs.gemv_max_tokens)
                    or (nm == "fused-linear" and t < args.linear_min_tokens)):
                continue
            try:
                sec, extra = bench_jax_layer(nm, params, xj, bs if nm.startswith(("fused", "triton")) else None)
            except Exception as err:  # one strategy failing (or out of memory) must not lose the others
                print(f"jax   {nm:14s} T={t:6d} FAILED {type(err).__name__}: {str(err)[:400]}", flush=True)
                continue
            base = sec if nm == "base" else base
            records.append(dict(kind="layer", framework="jax", name=nm, T=t, ms=sec * 1e3,
                                ratio=sec / base if base else float("nan"), extra_mb=(extra or 0) / 2 ** 20))
            print(f"jax   {nm:14s} T={t:6d} {sec * 1e3:9.4f} ms  {records[-1]['ratio']:6.2f}x  "
                  f"{records[-1]['extra_mb']:8.1f} MB", flush=True)
        if have_torch:
            tparams, tx = torch_layers(layers, x)
            tbase = None
            for nm in torch_names:
                try:
                    sec, extra = bench_torch_layer(nm, tparams, tx)
                except Exception as err:
                    print(f"torch {nm:14s} T={t:6d} FAILED {type(err).__name__}: {str(err)[:400]}", flush=True)
                    torch.cuda.empty_cache()
                    continue
                tbase = sec if nm == "base" else tbase
                records.append(dict(kind="layer", framework="torch", name=nm, T=t, ms=sec * 1e3,
                                    ratio=sec / tbase if tbase else float("nan"), extra_mb=extra / 2 ** 20))
                print(f"torch {nm:14s} T={t:6d} {sec * 1e3:9.4f} ms  {records[-1]['ratio']:6.2f}x  "
                      f"{records[-1]['extra_mb']:8.1f} MB", flush=True)
            del tparams, tx
            torch.cuda.empty_cache()
        if str(t) in args.train_tokens.split(","):
            for nm in [n for n in args.train.split(",") if n in jax_names or n == "dense-layer"]:
                try:
                    f, fb = bench_jax_train(nm, params, xj, bs if nm in ("fused", "triton", "fused-linear") else None)
                except Exception as err:
                    print(f"train {nm:14s} T={t:6d} FAILED {type(err).__name__}: {str(err)[:400]}", flush=True)
                    continue
                records.append(dict(kind="train", name=nm, T=t, fwd_ms=f * 1e3, fwdbwd_ms=fb * 1e3,
                                    bwd_over_fwd=(fb - f) / f))
                print(f"train {nm:14s} T={t:6d} fwd {f * 1e3:8.4f} fwd+bwd {fb * 1e3:8.4f} ms "
                      f"bwd/fwd {(fb - f) / f:5.2f}", flush=True)
        write(records, meta, args.out)
    return records


if __name__ == "__main__":
    main()
