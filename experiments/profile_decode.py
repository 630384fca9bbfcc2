"""Where a decode step's time goes: GPU kernel time against idle gaps, from a `jax.profiler` trace.

    python experiments/profile_decode.py --shape llama3-8b --batch 1 --variants base,dense --out /tmp/prof.json

For each variant (as in `bench_generate.py`: base, a MeteoRA strategy, or base-packed / packed / packed-split),
the decode program `generate` compiles is warmed up, then run twice under the profiler. From the device planes
of the trace: kernels per step, the GPU's busy time per step (the union of kernel and copy intervals), the
step's span on the GPU (first start to last end, over the steps), hence the idle share, and the kernels that
take the most time. A step far longer than its busy time is bound by launches and dependencies, not by work.
Set XLA_FLAGS in the environment to compare XLA options (e.g. command buffers); the flags are recorded.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def device_events(xspace_path: str):
    """(line name, event name, start ns, end ns) of every event on a device plane's stream lines."""
    from jax.profiler import ProfileData

    out = []
    for plane in ProfileData.from_file(xspace_path).planes:
        if not plane.name.startswith("/device:"):
            continue
        for line in plane.lines:
            if not line.name.startswith("Stream"):
                continue
            for ev in line.events:
                out.append((line.name, ev.name, float(ev.start_ns), float(ev.start_ns + ev.duration_ns)))
    return out


def summarise(events, steps: int, top: int = 12) -> dict:
    """Busy time (union of intervals), span and the heaviest kernels, per decode step; and `step_sequence`, the
    kernel names of one step in launch order: a window of one step's length in the middle of the trace (the loop
    repeats one program, so the window holds every kernel of a step once, starting at some kernel of it)."""
    if not events:
        return {"error": "no device events in the trace (no GPU?)"}
    iv = sorted((s, e) for _, _, s, e in events)
    busy, cur_s, cur_e = 0.0, iv[0][0], iv[0][1]
    for s, e in iv[1:]:
        if s > cur_e:
            busy, cur_s = busy + (cur_e - cur_s), s
            cur_e = e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    span = max(e for _, e in iv) - iv[0][0]  # the last-starting event need not end last
    per = collections.defaultdict(lambda: [0, 0.0])
    for _, name, s, e in events:
        per[name][0] += 1
        per[name][1] += e - s
    heavy = sorted(per.items(), key=lambda kv: -kv[1][1])[:top]
    ordered = [name for _, name, _, _ in sorted(events, key=lambda ev: ev[2])]
    width = round(len(events) / steps)
    mid = max(0, min(len(ordered) - width, len(ordered) // 2 - width // 2))
    return {
        "steps": steps, "events_per_step": len(events) / steps, "span_ms_per_step": span / steps / 1e6,
        "busy_ms_per_step": busy / steps / 1e6, "idle_share": 1 - busy / span,
        "mean_event_us": busy / len(events) / 1e3,
        "top": [{"name": n[:120], "count_per_step": c / steps, "ms_per_step": t / steps / 1e6} for n, (c, t) in heavy],
        "step_sequence": [n[:120] for n in ordered[mid:mid + width]],
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--variants", default="base,dense")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--experts", type=int, default=28)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--top", type=int, default=12, help="how many of the heaviest kernels to list (default 12)")
    ap.add_argument("--block-sizes", help="JSON object of kernels.meteora_pallas.BlockSizes fields for every "
                    "variant, e.g. '{\"routed_glu\": true}' (recorded)")
    ap.add_argument("--out", help="JSON to write (also printed)")
    args = ap.parse_args(argv)
    block_sizes = {}
    if args.block_sizes:
        from bench_generate import block_sizes_arg

        from kernels.meteora_pallas import set_default_block_sizes

        try:
            set_default_block_sizes(block_sizes_arg(args.block_sizes))
        except ValueError as e:
            ap.error(str(e))
        block_sizes = json.loads(args.block_sizes)

    import jax
    import numpy as np
    from bench_generate import SHAPES, _time_decode
    from flax import nnx

    from meteora_jax.config import LlamaConfig
    from meteora_jax.meteora import MeteoraConfig, MeteoraLlama, base_model, set_routing
    from meteora_jax.packed import pack_projections

    cfg = LlamaConfig(**SHAPES[args.shape], dtype="bfloat16", param_dtype="bfloat16")
    mcfg = MeteoraConfig(tuple(f"e{i}" for i in range(args.experts)), args.rank, top_k=args.top_k)
    meteora = MeteoraLlama(cfg, mcfg, rngs=nnx.Rngs(0))
    variants = args.variants.split(",")
    result = {"shape": args.shape, "batch": args.batch, "xla_flags": os.environ.get("XLA_FLAGS", ""),
              "jax": jax.__version__, "device": jax.devices()[0].device_kind, "block_sizes": block_sizes,
              "variants": {}}
    targs = argparse.Namespace(prompt=args.prompt, steps=args.steps, repeats=1)
    for v in variants:
        if v == "base":
            model = base_model(meteora)
        elif v == "base-packed":
            model = pack_projections(nnx.merge(*nnx.split(base_model(meteora))))
        elif v in ("packed", "packed-split", "packed-routed", "packed-extended"):
            mode = {"packed": "fold", "packed-split": "split", "packed-routed": "routed",
                    "packed-extended": "extended"}[v]
            model = pack_projections(nnx.merge(*nnx.split(meteora)), mode=mode)
        else:
            model = set_routing(meteora, strategy=v)
        rng = np.random.default_rng(0)
        sec, _ = _time_decode(model, cfg, args.batch, args.steps, targs, rng)  # compile + one timed run
        tmp = tempfile.mkdtemp(prefix="prof_")
        t = time.perf_counter()
        with jax.profiler.trace(tmp):
            _time_decode(model, cfg, args.batch, args.steps, argparse.Namespace(**{**vars(targs), "repeats": 1}),
                         rng)
        wall = time.perf_counter() - t
        paths = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
        summ = (summarise(device_events(paths[0]), 2 * (args.steps - 1), top=args.top) if paths
                else {"error": "no trace"})
        summ.update(untraced_step_ms=1e3 * sec / (args.steps - 1), traced_wall_s=wall)
        result["variants"][v] = summ
        print(json.dumps({v: {k: x for k, x in summ.items() if k not in ("top", "step_sequence")}}), flush=True)
        for row in summ.get("top", []):
            print(f"   {row['ms_per_step']:8.3f} ms  {row['count_per_step']:6.1f}x  {row['name']}")
    if args.out:
        tmp_out = args.out + ".tmp"
        with open(tmp_out, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp_out, args.out)


if __name__ == "__main__":
    main()
