"""Tune the routed kernels' block sizes where they run: inside the jitted decode loop of a packed MeteoRA model.

For each configuration (fields of `kernels.meteora_pallas.BlockSizes`), the decode step of the packed MeteoRA
model (`meteora_jax.packed`, `--mode` routed, extended or gemv) is compiled with those defaults, next to the
equally packed base model. `--mode unpacked` times the MeteoRA model as built, with strategy `fused` (the routed
pair of launches per linear), next to the unpacked base model. After one untimed pass over all of them, the
compiled loops are timed in `--rounds` interleaved rounds (base, then each configuration, in every round), each
time as `bench_generate.py` times decoding (median of `--repeats` runs of `--steps` tokens after a
`--prompt`-token context, random bf16 weights). A configuration's time is the median over rounds, and its ratio
is the median of its time over the base's in the same round: drifts of the machine between rounds touch both
sides of the ratio. Results in OUT.json and OUT.md, best first per batch, with the spread of the rounds.

    python experiments/tune_decode.py --shape llama3-8b --batches 1,16 --out experiments/results/decode_tune
    python experiments/tune_decode.py --shape smollm2 --mode extended --rounds 5 --out experiments/results/dense_b
        --configs '[{}, {"routed_dense_b": true}]'        # (the same command, continued)
    python experiments/tune_decode.py --shape tiny --batches 1 --steps 4 --prompt 4 --out /tmp/t   # smoke (CPU)

Configurations: `--configs '[{"routed_block_out": 64}, ...]'` or the built-in sweep (`CONFIGS`); `{}` is the
class defaults. A configuration may also hold `"routing": {...}`, options of `meteora.set_routing` that its loop is
compiled with (`{"forced_expert": 0}`, `{"top_k": 1}`, `{"adapters_enabled": false}`): they take parts of the
adapters' work away, to see what each part costs. A configuration that fails to compile or run is recorded with
its error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import SHAPES, _decode_runner, _err, median_run, write_outputs  # noqa: E402

CONFIGS = (
    {},
    {"routed_block_out": 64},
    {"routed_block_out": 256},
    {"routed_block_in": 128},
    {"routed_block_in": 256},
    {"routed_block_cols": 128},
    {"routed_block_cols": 128, "routed_block_gate": 32},
    {"routed_splits": 16, "routed_block_in": 128, "routed_block_cols": 128},
    {"routed_splits": 8, "routed_block_cols": 64, "routed_block_gate": 32},
    {"routed_splits": 1, "routed_block_in": 128, "routed_block_cols": 32, "routed_block_gate": 16},
    {"routed_splits": 1, "routed_block_in": 256, "routed_block_cols": 16, "routed_block_gate": 16},
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output path without suffix (.json and .md are written)")
    p.add_argument("--shape", default="llama3-8b", help=f"one of {sorted(SHAPES)}")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--configs", help="JSON list of BlockSizes field dicts (default: the built-in sweep)")
    p.add_argument("--mode", default="routed", choices=["routed", "extended", "gemv", "unpacked"],
                   help="packing mode (meteora_jax.packed), or unpacked (strategy fused, no packing)")
    p.add_argument("--experts", type=int, default=28)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--prompt", type=int, default=128, help="context (prompt) tokens")
    p.add_argument("--steps", type=int, default=64, help="decode steps per timed run")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per round (their median)")
    p.add_argument("--rounds", type=int, default=1,
                   help="rounds of timing every compiled loop in turn (medians over rounds; spread reported)")
    p.add_argument("--budget", type=float, default=540, help="seconds; configurations left after it are skipped")
    args = p.parse_args(argv)
    if args.shape not in SHAPES:
        p.error(f"--shape: expected one of {sorted(SHAPES)}, got {args.shape!r}")
    if args.rounds < 1 or args.repeats < 1:
        p.error(f"--rounds and --repeats must be at least 1, got {args.rounds} and {args.repeats}")
    configs = json.loads(args.configs) if args.configs else list(CONFIGS)
    if not isinstance(configs, list) or not all(isinstance(c, dict) for c in configs):
        p.error("--configs: expected a JSON list of objects")

    import jax
    import numpy as np
    from flax import nnx

    from kernels import meteora_pallas as mp
    from meteora_jax.config import LlamaConfig
    from meteora_jax.meteora import MeteoraConfig, MeteoraLlama, base_model, set_routing
    from meteora_jax.packed import pack_projections

    routings = [c.get("routing", {}) for c in configs]
    try:
        blocks = [mp.BlockSizes(**{k: v for k, v in c.items() if k != "routing"}) for c in configs]
    except TypeError as e:
        p.error(f"--configs: {e}")
    options = ("top_k", "temperature", "routing", "forced_expert", "adapters_enabled")  # what the loops may vary
    for r in routings:
        if not isinstance(r, dict) or set(r) - set(options):
            p.error(f"--configs: \"routing\" must be an object with keys among {options}, got {r!r}")
    start = time.time()
    cfg = LlamaConfig(**SHAPES[args.shape], dtype="bfloat16", param_dtype="bfloat16")
    unpacked = args.mode == "unpacked"
    mcfg = MeteoraConfig(tuple(f"e{i}" for i in range(args.experts)), args.rank, top_k=args.top_k,
                         **({"strategy": "fused"} if unpacked else {}))
    meteora = MeteoraLlama(cfg, mcfg, rngs=nnx.Rngs(0))
    base = base_model(meteora) if unpacked else pack_projections(nnx.merge(*nnx.split(base_model(meteora))))
    model = meteora if unpacked else pack_projections(meteora, mode=args.mode)
    base_name, name = ("base", "fused") if unpacked else ("base-packed", f"packed-{args.mode}")
    records = []
    meta = {"command": "python experiments/tune_decode.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "device": jax.devices()[0].device_kind, "jax": jax.__version__, "shape": args.shape,
            "experts": args.experts, "rank": args.rank, "top_k": args.top_k, "prompt": args.prompt,
            "steps": args.steps, "mode": args.mode, "base": base_name, "rounds": args.rounds, "repeats": args.repeats,
            "date": time.strftime("%Y-%m-%d")}
    rng = np.random.default_rng(0)
    for batch in [int(b) for b in args.batches.split(",")]:
        base_run, _ = _decode_runner(base, cfg, batch, args.steps, args, rng)
        runs, recs = [], []  # the compiled loops that run, and every record of this batch
        for c, bs, routing in zip(configs, blocks, routings, strict=True):
            rec = {"batch": batch, "variant": name, "config": c}
            recs.append(rec)
            if time.time() - start > args.budget:
                rec["error"] = "time budget"
                continue
            mp.set_default_block_sizes(bs)  # read while tracing: the loop is compiled with these
            try:
                set_routing(model, **routing)  # likewise (the compiled loop keeps them)
                run, rec["first_call_s"] = _decode_runner(model, cfg, batch, args.steps, args, rng)
                runs.append((rec, run))
            except Exception as e:  # a tiling that does not compile here: recorded
                rec["error"] = _err(e)
            finally:
                mp.set_default_block_sizes(None)
                set_routing(model, **{f: getattr(mcfg, f) for f in routing})
        per_step = lambda sec: 1e3 * sec / (args.steps - 1)  # noqa: E731
        base_ms = []
        for run in [base_run, *(run for _, run in runs)]:  # one untimed pass: the first calls after all compiles
            run()
        for i in range(args.rounds):  # every compiled loop once per round, the base first
            if i and time.time() - start > args.budget:
                meta.setdefault("rounds_cut", {})[str(batch)] = i  # the rounds that ran, the budget spent
                break
            base_ms.append(per_step(median_run(base_run, args.repeats)))
            for rec, run in runs:
                if "error" in rec:
                    continue
                try:  # its ms per step, one per round
                    rec.setdefault("round_ms", []).append(per_step(median_run(run, args.repeats)))
                except Exception as e:
                    rec["error"] = _err(e)
        records.append({"batch": batch, "variant": base_name, "step_ms": float(np.median(base_ms)),
                        "round_ms": base_ms})
        print(json.dumps(records[-1]), flush=True)
        for rec in recs:
            ms = rec.pop("round_ms", None)
            if "error" not in rec and ms:
                ratios = [t / b for t, b in zip(ms, base_ms, strict=True)]
                rec.update(step_ms=float(np.median(ms)), round_ms=ms, ratio=float(np.median(ratios)),
                           ratio_min=min(ratios), ratio_max=max(ratios))
            records.append(rec)
            print(json.dumps(rec), flush=True)
    write_outputs(Path(args.out), {".json": json.dumps({"meta": meta, "records": records}, indent=1),
                                   ".md": render_md(meta, records)})
    return 0


def render_md(meta, records) -> str:
    rounds, bn = meta.get("rounds", 1), meta.get("base", "base-packed")
    how = (f"{rounds} interleaved rounds of {meta.get('repeats', '?')} runs each; ms per step and ratio to the "
           f"{bn} step of the same round are medians over rounds, the ratio's range in brackets"
           if rounds > 1 else f"step / {bn} step")
    mode = meta.get("mode", "routed")
    lines = [f"# Routed-kernel block sizes in the decode loop ({meta['shape']}, {meta['device']})", "",
             f"Command: `{meta['command']}` ({meta['date']}, jax {meta['jax']}). MeteoRA E = {meta['experts']}, "
             f"r = {meta['rank']}, k = {meta['top_k']} on all seven modules, "
             + ("unpacked, strategy fused" if mode == "unpacked" else f"packed (mode {mode})") + "; "
             f"{meta['prompt']}-token context, {meta['steps']} steps; {how}.", ""]
    if meta.get("rounds_cut"):
        lines += [f"The time budget cut the rounds (batch: rounds run): {meta['rounds_cut']}.", ""]
    for batch in dict.fromkeys(r["batch"] for r in records):
        rows = [r for r in records if r["batch"] == batch]
        base = next((r["step_ms"] for r in rows if r["variant"] == bn), None)
        lines += [f"## Batch {batch} ({bn} {base:.3f} ms per step)" if base else f"## Batch {batch}", "",
                  f"| config | ms per step | / {bn} |", "|---|---|---|"]
        timed = sorted((r for r in rows if "step_ms" in r and r["variant"] != bn),
                       key=lambda r: r.get("ratio", r["step_ms"]))
        for r in timed:
            ratio = r.get("ratio", r["step_ms"] / base if base else None)
            cell = "-" if ratio is None else f"{ratio:.3f}x"
            if rounds > 1 and "ratio_min" in r:
                cell += f" [{r['ratio_min']:.3f}, {r['ratio_max']:.3f}]"
            lines.append(f"| `{json.dumps(r['config'])}` | {r['step_ms']:.3f} | {cell} |")
        lines += [f"| `{json.dumps(r['config'])}` | {r['error']} | - |" for r in rows if "error" in r]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
