"""Generation speed: our jitted decode (KV cache, `lax.while_loop`) against transformers + PEFT `generate`.

Random weights (bf16) of the named shapes. For each shape:

- ours, decode: `meteora_jax.generate._decode` (the program `generate` runs) for `--steps` tokens after a
  `--prompt`-token context, at each `--batches` size, for the base Llama and for MeteoRA (E experts of rank
  r, top-k, all seven modules) with each strategy, and packed (`meteora_jax.packed`: `packed`, the expand
  folded into the base product, `packed-split`, the two products apart, and `packed-routed`, the routed kernels
  for all members of a group at once, `packed-extended`, one product and one launch per group, and
  `packed-extended-lowgate`, the same with that product in bf16, gate logits included (`BlockSizes.routed_z_low`,
  `generate --low-precision-gate`), against the equally packed base, `base-packed`); tokens/s = batch x
  steps / time, and the time per step;
- ours, prefill: `_prefill` of `--prompt` tokens at batch 1 and of `--prefill-len` tokens (tokens/s);
- ours, end to end: `generate()` at batch 1, `--prompt` tokens in, `--steps` out (greedy, no EOS);
- transformers + PEFT (one LoRA of rank r on all seven modules), batch 1, the same prompt: `generate` eager
  (dynamic cache) and with `cache_implementation="static"` (which transformers compiles itself), and the
  base model the same way; tokens/s = new tokens / wall time of `generate`.

Each part runs in its own subprocess (JAX and torch never share the GPU), in priority order under a
time budget; a part that fails or is cut off is recorded as such. Results: OUT.json and OUT.md.

    python experiments/bench_generate.py --out experiments/results/generate_bench            # the H100 run
    python experiments/bench_generate.py --shapes tiny --batches 1,2 --steps 8 --prompt 8 --budget 300 \\
        --out /tmp/gb   # a CPU smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16),
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128),
}


def _median(xs):
    """The median of a non-empty list (the upper one of an even count)."""
    return sorted(xs)[len(xs) // 2]


def _median_time(fn, repeats):
    """The median seconds of `repeats` calls of `fn()`."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return _median(times)


def median_run(run, repeats):
    """The median of `repeats` calls of `run()`, each returning its own seconds (a `_decode_runner` run)."""
    return _median([run() for _ in range(repeats)])


# ------------------------------------------------------------------------------------------- JAX part
def _err(e):
    return f"{type(e).__name__}: {str(e)[:300]}"


def _time_decode(model, cfg, batch, steps, args, rng):
    """Median seconds of `_decode` for `steps` tokens after `args.prompt` cached ones (random k/v)."""
    run, first_call = _decode_runner(model, cfg, batch, steps, args, rng)
    return median_run(run, args.repeats), first_call


def _decode_runner(model, cfg, batch, steps, args, rng):
    """(run, seconds to compile and run it once): `run()` decodes `steps` tokens with `_decode` after `args.prompt`
    cached ones (random k/v; greedy, as `generate()` compiles it), through an executable compiled here, ahead of
    time, so later changes of the block-size defaults (which drop JAX's caches) do not touch it, and returns the
    seconds of that call alone: its fresh KV cache (the loop donates it) and scalar inputs are made before the clock
    starts. (Before 2026-12-05 the timed span also made them: about 0.2 ms more per decode step, on every variant,
    in the H100 runs of that day.)"""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from meteora_jax import generate as gen

    p = args.prompt
    tp, buf = gen.bucket(p), gen.bucket(args.steps)
    static = gen._Static(True, 0, False, False, False, buf, tp + buf)  # what generate() compiles (greedy)
    rule = gen._stop_rule(cfg.vocab_size, [], [], [])
    kv = jnp.asarray(rng.normal(0, 1, (batch, tp + buf, cfg.num_key_value_heads, cfg.head_dim)), jnp.bfloat16)
    valid = jnp.asarray(np.arange(tp + buf)[None].repeat(batch, 0) < p)
    first = jnp.asarray(rng.integers(0, cfg.vocab_size, batch), jnp.int32)
    treedef, leaves = gen.flat_model(model)
    layers = cfg.num_hidden_layers

    def cache():
        out = gen.KVCache(tuple(kv + 0 for _ in range(layers)), tuple(kv + 0 for _ in range(layers)), valid,
                          jnp.int32(p))
        return jax.block_until_ready(out)

    def rest():  # forced: none (the gate routes)
        return (first, jnp.zeros(batch, bool), jnp.full((batch, 1), -2, jnp.int32), jax.random.key(0),
                jnp.float32(1), jnp.float32(1), rule, jnp.int32(steps), jnp.int32(0), jnp.int32(0), None)

    t0 = time.perf_counter()
    compiled = gen._decode.lower(treedef, leaves, cache(), *rest(), static=static).compile()

    def call():
        args_in = (leaves, cache(), *rest())
        t = time.perf_counter()
        did = int(compiled(*args_in)[3])  # the loop's step count: waits for the loop
        return time.perf_counter() - t, did

    _, did = call()
    first_call = time.perf_counter() - t0
    assert did == steps - 1, (did, steps)
    return (lambda: call()[0]), first_call


def _time_generate(model, cfg, args, rng):
    from meteora_jax import generate as gen

    prompt = rng.integers(0, cfg.vocab_size, args.prompt).tolist()
    call = lambda: gen.generate(model, [prompt], max_new_tokens=args.steps, eos_token_ids=[])
    t0 = time.perf_counter()
    call()
    first_call = time.perf_counter() - t0
    totals, res = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        res.append(call())
        totals.append(time.perf_counter() - t)
    assert len(res[-1].tokens[0]) == args.steps
    parts = {"prefill_s": min(r.timings["prefill_s"] for r in res),  # as before: the fastest prefill
             "decode_s": _median([r.timings["decode_s"] for r in res]),  # the while loop, its dispatch and readback
             "other_s": _median([t - r.timings["prefill_s"] - r.timings["decode_s"]  # host work around them
                                 for t, r in zip(totals, res, strict=True)])}
    return _median(totals), first_call, parts


def _time_prefill(model, cfg, length, args, rng):
    import jax
    import jax.numpy as jnp

    from meteora_jax import generate as gen

    st = gen._Static(True, 0, False, False, False, 16, length + 16)
    toks = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, length)), jnp.int32)
    mask = jnp.ones((1, length), bool)
    td, leaves = gen.flat_model(model)
    rule = gen._stop_rule(cfg.vocab_size, [], [], [])
    call = lambda: jax.block_until_ready(gen._prefill(td, leaves, toks, mask, jax.random.key(0), jnp.float32(1),
                                                      jnp.float32(1), rule, jnp.int32(8), jnp.int32(0), None,
                                                      static=st))
    call()
    return _median_time(call, args.repeats)


VARIANT_BLOCKS = {"packed-extended-lowgate": {"routed_z_low": True}}  # a variant's own BlockSizes fields


def variant_blocks(variant: str):
    """While timing `variant`: the kernels' defaults with its VARIANT_BLOCKS fields (over --block-sizes), then the
    defaults as they were."""
    from kernels.meteora_pallas import block_sizes_with

    extra = VARIANT_BLOCKS.get(variant)
    return block_sizes_with(**extra) if extra else contextlib.nullcontext()


def jax_part(args, emit, deadline):
    import jax
    import numpy as np
    from flax import nnx

    from meteora_jax.config import LlamaConfig
    from meteora_jax.meteora import MeteoraConfig, MeteoraLlama, base_model, set_routing
    from meteora_jax.packed import pack_projections
    from meteora_jax.strategies import STRATEGIES

    if args.block_sizes:  # the kernels' defaults for every variant (checked by main)
        from kernels.meteora_pallas import set_default_block_sizes

        set_default_block_sizes(block_sizes_arg(args.block_sizes))
    packs = {"packed": "fold", "packed-split": "split", "packed-routed": "routed",  # variant -> packing mode
             "packed-extended": "extended", "packed-extended-lowgate": "extended"}
    strategies = list(STRATEGIES) + list(packs) if args.strategies == "all" else args.strategies.split(",")
    dev = jax.devices()[0]
    peak = lambda: (dev.memory_stats() or {}).get("peak_bytes_in_use")
    emit({"kind": "device", "jax": jax.__version__, "device": str(dev.device_kind), "platform": dev.platform})
    rng = np.random.default_rng(0)
    for shape_name in args.shapes.split(","):
        cfg = LlamaConfig(**SHAPES[shape_name], dtype="bfloat16", param_dtype="bfloat16")
        mcfg = MeteoraConfig(tuple(f"e{i}" for i in range(args.experts)), args.rank, top_k=args.top_k)
        t = time.perf_counter()
        meteora = MeteoraLlama(cfg, mcfg, rngs=nnx.Rngs(0))
        models = {"base": base_model(meteora)}  # the same base weights, plain linears
        packed = [v for v in packs if v in strategies]
        if packed:  # packed copies (new concatenated weights; the originals stay for the others)
            models["base-packed"] = pack_projections(nnx.merge(*nnx.split(models["base"])))
            by_mode = {}  # variants of one packing mode share its packed model (they differ in BlockSizes only)
            for v in packed:
                if packs[v] not in by_mode:
                    by_mode[packs[v]] = pack_projections(nnx.merge(*nnx.split(meteora)), mode=packs[v])
                models[v] = by_mode[packs[v]]
        jax.block_until_ready((nnx.state(meteora), [nnx.state(m) for m in models.values()]))
        emit({"kind": "built", "shape": shape_name, "seconds": time.perf_counter() - t})
        variants = (["base"] + (["base-packed"] + packed if packed else [])
                    + [s for s in strategies if s != "loop" and s not in packs]
                    + (["loop"] if "loop" in strategies else []))
        model_of = lambda v, m=meteora, ms=models: ms[v] if v in ms else set_routing(m, strategy=v)
        for batch in [int(b) for b in args.batches.split(",")]:
            for v in variants:
                if v == "loop" and batch > args.loop_max_batch:
                    continue
                rec = {"kind": "decode", "shape": shape_name, "variant": v, "batch": batch, "context": args.prompt}
                if time.time() > deadline:
                    emit({**rec, "kind": "skipped", "why": "time budget"})
                    continue
                steps = args.steps if v != "loop" else min(args.steps, 32)
                try:
                    with variant_blocks(v):
                        sec, first = _time_decode(model_of(v), cfg, batch, steps, args, rng)
                    rec.update(steps=steps, seconds=sec, first_call_s=first, step_ms=1e3 * sec / (steps - 1),
                               tokens_per_s=batch * (steps - 1) / sec, peak_bytes=peak())
                except Exception as e:  # a strategy that cannot run here: recorded, not fatal
                    rec["error"] = _err(e)
                emit(rec)
        for v in variants:  # end-to-end generate() and a longer prefill, batch 1
            if v == "loop":
                continue
            for kind in ("generate", "prefill"):
                rec = {"kind": kind, "shape": shape_name, "variant": v, "batch": 1}
                if time.time() > deadline:
                    emit({**rec, "kind": "skipped", "why": f"time budget ({kind})"})
                    continue
                try:
                    if kind == "generate":
                        with variant_blocks(v):
                            sec, first, parts = _time_generate(model_of(v), cfg, args, rng)
                        rec.update(prompt=args.prompt, new=args.steps, seconds=sec, first_call_s=first,
                                   tokens_per_s=args.steps / sec, **parts,
                                   prefill_tokens_per_s=args.prompt / parts["prefill_s"])
                    elif args.prefill_len:
                        with variant_blocks(v):
                            sec = _time_prefill(model_of(v), cfg, args.prefill_len, args, rng)
                        rec.update(tokens=args.prefill_len, seconds=sec, tokens_per_s=args.prefill_len / sec)
                    else:
                        continue
                except Exception as e:
                    rec["error"] = _err(e)
                emit(rec)
        del meteora, models


# ----------------------------------------------------------------------------------------- torch part
def _hf_generate(model, ids, new, cache, adapter_on):
    import torch

    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, attention_mask=torch.ones_like(ids))
    if cache == "static":
        kw["cache_implementation"] = "static"
    with torch.no_grad():
        if adapter_on:
            out = model.generate(input_ids=ids, **kw)
        else:
            with model.disable_adapter():
                out = model.generate(input_ids=ids, **kw)
    if ids.is_cuda:
        torch.cuda.synchronize()
    assert out.shape[1] == ids.shape[1] + new, out.shape
    return out


def torch_part(args, emit, deadline):
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    emit({"kind": "device", "torch": torch.__version__, "transformers": transformers.__version__,
          "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu"})
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for shape_name in args.shapes.split(","):
        torch.manual_seed(0)
        torch.set_default_dtype(torch.bfloat16)
        with torch.device(dev):
            hf = LlamaForCausalLM(LlamaConfig(**SHAPES[shape_name])).eval()
        torch.set_default_dtype(torch.float32)
        hf.generation_config.eos_token_id = None
        hf.generation_config.pad_token_id = 0
        model = get_peft_model(hf, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=modules,
                                              init_lora_weights=False)).to(torch.bfloat16).eval()
        ids = torch.randint(0, SHAPES[shape_name]["vocab_size"], (1, args.prompt), device=dev)
        for variant, cache in (("peft", "dynamic"), ("peft", "static"), ("hf-base", "dynamic"), ("hf-base", "static")):
            new = args.steps if cache == "static" else args.eager_steps
            rec = {"kind": "hf_generate", "shape": shape_name, "variant": f"{variant}-{cache}", "batch": 1,
                   "prompt": args.prompt, "new": new}
            if time.time() > deadline:
                emit({**rec, "kind": "skipped", "why": "time budget"})
                continue
            call = lambda m=model, x=ids, n=new, c=cache, on=variant == "peft": _hf_generate(m, x, n, c, on)
            try:
                t0 = time.perf_counter()
                call()
                rec["first_call_s"] = time.perf_counter() - t0
                sec = _median_time(call, args.repeats)
                rec.update(seconds=sec, tokens_per_s=new / sec)
                if dev == "cuda":
                    rec["peak_bytes"] = torch.cuda.max_memory_allocated()
            except Exception as e:
                rec["error"] = _err(e)
            emit(rec)
        del hf, model
        if dev == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- driver
def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output path without suffix (.json and .md are written)")
    p.add_argument("--shapes", default="llama3-8b,smollm2", help=f"comma list of {sorted(SHAPES)}")
    p.add_argument("--batches", default="1,16,64", help="decode batch sizes")
    p.add_argument("--strategies", default="all", help="comma list, or all registered strategies")
    p.add_argument("--experts", type=int, default=28)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--prompt", type=int, default=128, help="context (prompt) tokens")
    p.add_argument("--steps", type=int, default=128, help="new tokens (decode steps)")
    p.add_argument("--eager-steps", type=int, default=32, help="new tokens for the slow eager torch generate")
    p.add_argument("--prefill-len", type=int, default=1024, help="a longer prefill to time (0: skip)")
    p.add_argument("--loop-max-batch", type=int, default=1, help="largest batch for the slow loop strategy")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget", type=float, default=540, help="seconds for all parts together")
    p.add_argument("--torch-share", type=float, default=0.3, help="share of the budget for the torch part")
    p.add_argument("--parts", default="jax,torch")
    p.add_argument("--block-sizes", help="JSON object of kernels.meteora_pallas.BlockSizes fields for the JAX "
                   "variants, e.g. '{\"routed_glu\": true}' (recorded in the command)")
    p.add_argument("--append", help="a JSON of an earlier run whose records (and command) to keep in OUT")
    p.add_argument("--render", action="store_true", help="only rewrite OUT.md from OUT.json")
    p.add_argument("--part", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    return p


def block_sizes_arg(text: str):
    """`--block-sizes`: a BlockSizes from a JSON object of its fields; ValueError naming the option otherwise."""
    from kernels.meteora_pallas import BlockSizes

    try:
        fields = json.loads(text)
        if not isinstance(fields, dict):
            raise TypeError(f"got {type(fields).__name__}")
        return BlockSizes(**fields)
    except (ValueError, TypeError) as e:
        raise ValueError(f"--block-sizes: expected a JSON object of BlockSizes fields, got {text!r}: {e}") from None


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.block_sizes:
        try:
            block_sizes_arg(args.block_sizes)
        except ValueError as e:
            parser.error(str(e))
    if args.render:  # re-render OUT.md from OUT.json
        data = json.loads(Path(args.out).with_suffix(".json").read_text())
        Path(args.out).with_suffix(".md").write_text(render_md(data["meta"], data["records"]))
        return 0
    if args.part:  # a child: stream JSON lines to stdout
        def emit(rec):
            print("@@" + json.dumps(rec), flush=True)

        {"jax": jax_part, "torch": torch_part}[args.part](args, emit, args.deadline)
        return 0
    start = time.time()
    records, log = [], []
    if args.append:
        prev = json.loads(Path(args.append).read_text())
        records = prev["records"]
        args.earlier = prev["meta"].get("earlier", []) + [prev["meta"]["command"]]
    parts = args.parts.split(",")
    for i, part in enumerate(parts):
        left = args.budget - (time.time() - start)
        share = left * (1 - args.torch_share) if part == "jax" and "torch" in parts[i + 1:] else left
        deadline_wall = time.time() + share
        argv_child = [sys.executable, __file__, *sys.argv[1:], "--part", part, "--deadline", str(deadline_wall)]
        proc = subprocess.Popen(argv_child, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        try:
            for line in proc.stdout:
                if line.startswith("@@"):
                    rec = json.loads(line[2:])
                    rec["part"] = part
                    records.append(rec)
                    print(_short(rec), flush=True)
                    _write(args, records, log, start)
                else:
                    log.append(line.rstrip())
            proc.wait(timeout=max(1, deadline_wall + 60 - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            records.append({"kind": "error", "part": part, "why": "killed after its budget"})
        if proc.returncode not in (0, None):
            records.append({"kind": "error", "part": part, "why": f"exit {proc.returncode}",
                            "log_tail": log[-15:]})
            print("\n".join(log[-15:]))
    _write(args, records, log, start)
    return 0


def _short(rec):
    keys = ("kind", "shape", "variant", "batch", "tokens_per_s", "step_ms", "first_call_s", "error", "why")
    return " ".join(f"{k}={rec[k]:.4g}" if isinstance(rec.get(k), float) else f"{k}={rec[k]}" for k in keys if k in rec)


def write_outputs(out: Path, texts: dict[str, str]) -> None:
    """OUT with each suffix of `texts` (".json", ".md"), each written through a temporary file and a rename (a
    run cut off leaves the earlier files whole). The benchmarks and probes share it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in texts.items():
        tmp = out.with_suffix(suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out.with_suffix(suffix))


def _write(args, records, log, start):
    meta = {"command": "python " + " ".join([sys.argv[0], *sys.argv[1:]]), "earlier": getattr(args, "earlier", []),
            "host": platform.node(),
            "elapsed_s": time.time() - start,
            "args": {k: v for k, v in vars(args).items() if k not in ("part", "deadline", "earlier")}}
    write_outputs(Path(args.out), {".json": json.dumps({"meta": meta, "records": records}, indent=1),
                                   ".md": render_md(meta, records)})


def _fmt(x, digits=1):
    return "-" if x is None else f"{x:,.{digits}f}"


def _run_of(records):
    """`id(record) -> the run (command) that measured it`: records of appended runs follow each other, each run's
    JAX part opening with a `device` record."""
    run, out = 0, {}
    for r in records:
        run += r["kind"] == "device" and r.get("part") == "jax"
        out[id(r)] = run
    return out


def _base_of(records):
    """`(record id) -> its base decode record`: the base (or base-packed, for packed variants) of the same shape and
    batch measured by the same command, else the latest one."""
    run_of, runs, latest = _run_of(records), {}, {}
    for r in records:
        if r["kind"] == "decode" and "error" not in r and r["variant"] in ("base", "base-packed"):
            key = (r["shape"], r["variant"], r["batch"])
            runs[(run_of[id(r)], *key)] = latest[key] = r

    def base(r):
        v = "base-packed" if r["variant"].startswith("packed") else "base"
        return runs.get((run_of.get(id(r)), r["shape"], v, r["batch"])) or latest.get((r["shape"], v, r["batch"]))
    return base


def render_md(meta, records):
    """Tables of the records, and the issue's targets checked against them."""
    dev = {r["part"]: r for r in records if r["kind"] == "device"}
    base_of = _base_of(records)
    dec = [r for r in records if r["kind"] == "decode" and "error" not in r]
    get = {(r["shape"], r["variant"], r["batch"]): r for r in dec}
    lines = ["# Generation speed: jitted decode vs transformers + PEFT generate", "",
             *[f"Earlier command (records kept): `{c}`  " for c in meta.get("earlier", [])],
             f"Command: `{meta['command']}`  ", *([f"Note: {meta['note']}  "] if meta.get("note") else []),
             f"Device: {dev.get('jax', {}).get('device')} "
             f"(jax {dev.get('jax', {}).get('jax')}; torch {dev.get('torch', {}).get('torch')}, transformers "
             f"{dev.get('torch', {}).get('transformers')})  ",
             f"Random bf16 weights; MeteoRA: E={meta['args']['experts']}, r={meta['args']['rank']}, "
             f"k={meta['args']['top_k']} on all seven modules; context (prompt) {meta['args']['prompt']} tokens; "
             "greedy, no EOS; the number of decode steps of each record is in the JSON (`steps`, `new`).", ""]
    if meta.get("earlier"):
        lines += ["Where commands measured the same shape, variant and batch, the later record is shown (all are in "
                  "the JSON); each ratio uses the base measured by the same command as the variant.", ""]
    shapes = sorted({r["shape"] for r in dec}, key=lambda s: list(SHAPES).index(s))
    batches = sorted({r["batch"] for r in dec})
    lines += ["## Decode (ours, `lax.while_loop`): tokens/s, ms per step, step time / base (`packed` / `base-packed`)",
              "",
              "| shape | variant | " + " | ".join(f"batch {b}" for b in batches) + " |",
              "|---|---|" + "---|" * len(batches)]
    for sh in shapes:
        for v in dict.fromkeys(r["variant"] for r in dec if r["shape"] == sh):
            cells = []
            for b in batches:
                r = get.get((sh, v, b))
                base = base_of(r) if r else None
                if r is None:
                    cells.append("-")
                    continue
                ratio = f", {r['step_ms'] / base['step_ms']:.2f}x" if base and not v.startswith("base") else ""
                cells.append(f"{_fmt(r['tokens_per_s'])} tok/s, {r['step_ms']:.2f} ms{ratio}")
            lines.append(f"| {sh} | {v} | " + " | ".join(cells) + " |")
    for sh in shapes:
        peak = max((r.get("peak_bytes") or 0) for r in dec if r["shape"] == sh)
        lines.append(f"\n{sh}: JAX peak device memory over its runs (high-water mark, all variants): "
                     f"{peak / 2**30:.1f} GiB.")
    e2e = [r for r in records if r["kind"] in ("generate", "hf_generate", "prefill") and "error" not in r]
    lines += ["", "## Batch 1, end to end `generate` (prompt in, new tokens out) and prefill", "",
              "| shape | who | variant | prompt + new | new tokens/s | prefill tokens/s | decode ms per step, rest ms "
              "| first call s (compile) | peak GiB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in e2e:
        who = "transformers" if r["kind"] == "hf_generate" else "ours"
        peak = _fmt((r.get("peak_bytes") or 0) / 2**30 or None)
        if r["kind"] == "prefill":
            lines.append(f"| {r['shape']} | ours | {r['variant']} (prefill only) | {r['tokens']} + 0 | - | "
                         f"{_fmt(r['tokens_per_s'], 0)} | - | - | - |")
        else:
            split = "-" if "decode_s" not in r else (  # generate()'s own split of its time (later records)
                f"{1e3 * r['decode_s'] / max(r['new'] - 1, 1):.2f}, {1e3 * r['other_s']:.1f}")
            lines.append(f"| {r['shape']} | {who} | {r['variant']} | {r['prompt']} + {r['new']} | "
                         f"{_fmt(r['tokens_per_s'])} | {_fmt(r.get('prefill_tokens_per_s'), 0)} | {split} | "
                         f"{_fmt(r.get('first_call_s'), 1)} | {peak} |")
    lines += ["", "## Targets (issue 6)", ""] + targets(records)
    done = {(r["kind"], r.get("shape"), r.get("variant"), r.get("batch")) for r in records if "seconds" in r}
    bad = [r for r in records if "error" in r or r["kind"] == "error" or (
        r["kind"] == "skipped" and (_skipped_kind(r), r.get("shape"), r.get("variant"), r.get("batch")) not in done)]
    if bad:
        lines += ["", "## Errors and skipped runs", ""]
        lines += [f"- {r.get('part')} {r.get('shape', '')} {r.get('variant', '')} batch {r.get('batch', '-')}: "
                  f"{r.get('error') or r.get('why')}" for r in bad]
    return "\n".join(lines) + "\n"


def _skipped_kind(r):
    why = r.get("why", "")
    return ("prefill" if "(prefill)" in why else "generate" if "(generate)" in why
            else "hf_generate" if r.get("part") == "torch" else "decode")


def targets(records):
    dec = {(r["shape"], r["variant"], r["batch"]): r for r in records if r["kind"] == "decode" and "error" not in r}
    gen = {(r["shape"], r["variant"]): r for r in records if r["kind"] in ("generate", "hf_generate")
           and "error" not in r}
    base_of = _base_of(records)  # like with like: packed against base-packed, measured by the same command
    out = []
    for sh in dict.fromkeys(k[0] for k in dec):
        for b in (1, 16):
            ratios = {v: r["step_ms"] / base_of(r)["step_ms"] for (s, v, bb), r in dec.items()
                      if s == sh and bb == b and not v.startswith("base") and base_of(r)}
            if ratios:
                best = min(ratios, key=ratios.get)
                ok = "met" if ratios[best] <= 1.25 else "NOT met"
                out.append(f"- {sh}, batch {b}: MeteoRA decode step / base <= 1.25: best {best} "
                           f"{ratios[best]:.2f}x: **{ok}** (" + ", ".join(f"{v} {x:.2f}x" for v, x in ratios.items())
                           + ")")
    sh = "llama3-8b"
    met = {v: r["tokens_per_s"] for (s, v, b), r in dec.items() if s == sh and b == 1 and not v.startswith("base")}
    if met:
        best = max(met, key=met.get)
        out.append(f"- {sh}, batch 1: MeteoRA >= 120 tokens/s (decode loop): best {best} {met[best]:.1f}: "
                   f"**{'met' if met[best] >= 120 else 'NOT met'}**")
    run_of = _run_of(records)  # ours against transformers measured by the same command where it measured both
    for sh2 in dict.fromkeys(k[0] for k in gen):
        mine = [o for o in records if o["kind"] == "generate" and "error" not in o and o["shape"] == sh2
                and not o["variant"].startswith("base")]
        for ref, factor in (("peft-static", 1.0), ("peft-dynamic", 10.0)):
            r = gen.get((sh2, ref))
            same = [o for o in mine if r and run_of[id(o)] == run_of[id(r)]]
            ours = {o["variant"]: o["tokens_per_s"] for o in (same or mine)}  # the later record of a variant wins
            if not ours:
                continue
            best = max(ours, key=ours.get)
            if r:
                ok = ours[best] >= factor * r["tokens_per_s"]
                out.append(f"- {sh2}, batch 1, end to end: ours (MeteoRA {best}) {ours[best]:.1f} tokens/s vs "
                           f"transformers + PEFT {ref} {r['tokens_per_s']:.1f}: {ours[best] / r['tokens_per_s']:.1f}x, "
                           f"target >= {factor:g}x: **{'met' if ok else 'NOT met'}**")
    return out or ["- (no measurements)"]


if __name__ == "__main__":
    raise SystemExit(main())
