"""Gate training: `python -m meteora_jax.train` (see `--help`).

Trains the MeteoRA gates (and, with `--train gates,experts`, the experts) of a MeteoRA checkpoint on task
folders (`meteora_jax.data`), with LM loss + coef x gate loss (`meteora_jax.losses`), optax AdamW with warmup
and cosine decay, gradient clipping and accumulation. One jitted step per length bucket.

Run folder:

    RUN/config.json               the run's options (checked on --resume)
    RUN/metrics.jsonl             one line per logged step and per evaluation
    RUN/checkpoints/step_N/       trained params + optimizer state + data position, with a sha256 manifest
    RUN/final/                    the trained model as a meteora-jax checkpoint (for generate / evaluate)

Without `--checkpoint` and `--data` it runs the built-in demo (`meteora_jax.demo`): a small but real run that
finishes on a 2-core CPU in a few minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from meteora_jax import checkpoint as ckpt_lib
from meteora_jax import data as data_lib
from meteora_jax import sharding
from meteora_jax.losses import gate_terms, meteora_loss
from meteora_jax.meteora import ExpertParam, GateParam, MeteoraLlama, meteora_linears, set_routing
from meteora_jax.train_state import TrainCheckpoints


@dataclasses.dataclass
class TrainConfig:
    checkpoint: str | None = None  # MeteoRA checkpoint (python -m convert adapters); none: built-in demo
    tokenizer: str | None = None  # HF folder or .gguf of the base's tokenizer (required with --checkpoint)
    data: str | None = None  # task folders DATA/<expert>/{train,test}.jsonl; none: the demo's
    prompt_format: str | None = None  # none: "[INST] {prompt} [/INST]" (the reference's); the demo's own
    eos_token_id: int | None = None  # none: the tokenizer's
    run_dir: str = "runs/meteora"
    steps: int = 120
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 5e-3
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    gate_coef: float = 1.0
    lm_loss: str = "all"  # "all" (prompt and response, as the reference) or "response"
    train: str = "gates"  # "gates" or "gates,experts"
    composite_mix: float = 0.0  # composite-style training samples added, as a fraction of the single ones
    composite_sizes: str = "2,3"
    composite_layout: str = "restate"
    max_len: int = 256
    buckets: str = "64,128,256"
    overlong: str = "truncate"
    top_k: int | None = None
    temperature: float | None = None
    routing: str | None = None
    strategy: str | None = None
    dtype: str = "float32"
    remat: bool = False
    mesh: str | None = None  # e.g. "data=2,fsdp=1,tensor=1"; none: one device
    gate_sharding: str = "split"
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    eval_every: int = 40
    eval_batches: int = 8
    save_every: int = 40
    keep: int = 2
    log_every: int = 1
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    progress: bool = True


HELP = {
    "checkpoint": "MeteoRA checkpoint to train (from `python -m convert adapters`); omit for the built-in demo",
    "tokenizer": "Hugging Face model folder or .gguf file whose tokenizer the base uses",
    "data": "folder of task folders <expert name>/train.jsonl and test.jsonl ({\"prompt\", \"response\"} lines)",
    "prompt_format": "how a prompt is wrapped, with {prompt} (default: the reference's '[INST] {prompt} [/INST]')",
    "eos_token_id": "end-of-text token appended to every sample in place of the tokenizer's own (use the one the "
                    "adapters were trained with)",
    "run_dir": "where config, metrics, checkpoints and the final model go",
    "steps": "optimizer steps",
    "batch_size": "sequences per micro-batch",
    "grad_accum": "micro-batches accumulated per optimizer step",
    "lr": "peak learning rate (AdamW)",
    "warmup_steps": "linear warmup steps, then cosine decay to lr * min_lr_ratio",
    "min_lr_ratio": "final learning rate as a fraction of --lr",
    "weight_decay": "AdamW weight decay",
    "clip_norm": "clip gradients to this global norm (0: off)",
    "gate_coef": "weight of the gate loss (cross-entropy of all gate logits vs token task ids)",
    "lm_loss": "'all': LM loss over prompt and response tokens (the reference); 'response': response only",
    "train": "what trains: 'gates' (MeteoRA) or 'gates,experts' (also fine-tune the LoRA experts)",
    "composite_mix": "add composite-n training samples built from the train split (n different tasks' samples in "
                     "one sequence, each token labelled with its own task), this many per single sample (0: none)",
    "composite_sizes": "comma-separated n of the --composite-mix samples, drawn in equal numbers",
    "composite_layout": "'restate' (each sub-question asked again right before its answer, as `evaluate "
                        "--composite-mode restate`) or 'answers' (numbered answers after the prompt, as stepwise)",
    "max_len": "longest sample in tokens; longer ones are handled by --overlong",
    "buckets": "comma-separated padded lengths; each batch is padded to the smallest bucket that fits",
    "overlong": "'truncate' or 'skip' samples longer than --max-len (counted and reported)",
    "top_k": "override the checkpoint's top-k",
    "temperature": "override the routing temperature T",
    "routing": "override routing: topk_softmax or softmax_topk",
    "strategy": "override the forward strategy (loop, gather, dense, fused, ...)",
    "dtype": "compute dtype: float32 or bfloat16 (trained params stay float32)",
    "remat": "recompute each decoder layer's activations in the backward pass (less memory, more compute)",
    "mesh": "device mesh as axis=size pairs over data, fsdp, tensor, e.g. data=2,fsdp=1,tensor=1 (default: one "
            "device); sizes multiply to the device count, across hosts with --coordinator",
    "gate_sharding": "gates on a mesh: 'split' (on their input, like the base weight) or 'replicated'",
    "coordinator": "host:port of process 0 for a multi-host run (jax.distributed); every host runs the same command",
    "num_processes": "number of hosts' processes in a multi-host run",
    "process_id": "this process's index (0 .. num_processes-1) in a multi-host run",
    "eval_every": "evaluate on the test split every N steps (0: only at the end)",
    "eval_batches": "test batches per evaluation (0: all)",
    "save_every": "write a training checkpoint every N steps",
    "keep": "training checkpoints to keep (the last K)",
    "log_every": "write metrics every N steps",
    "seed": "seed for data order and the demo",
    "resume": "continue the run in --run-dir from its last good checkpoint (same data order, same losses)",
    "overwrite": "replace an existing --run-dir when not resuming",
    "progress": "show a progress bar (--no-progress to hide)",
}


def parse_args(argv=None) -> TrainConfig:
    p = argparse.ArgumentParser(prog="python -m meteora_jax.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=HELP[f.name])
        else:
            typ = {"int": int, "float": float, "int | None": int, "float | None": float}.get(f.type, str)
            p.add_argument(flag, type=typ, default=f.default, help=HELP[f.name] + f" (default: {f.default})")
    return TrainConfig(**vars(p.parse_args(argv)))


def trainable_filter(what: str):
    parts = {s.strip() for s in what.split(",") if s.strip()}
    if not parts or parts - {"gates", "experts"}:
        raise ValueError(f"--train {what!r}: expected 'gates' or 'gates,experts'")
    return nnx.Any(*[{"gates": GateParam, "experts": ExpertParam}[p] for p in sorted(parts)])


def make_optimizer(model, cfg: TrainConfig, wrt) -> nnx.Optimizer:
    decay = max(cfg.steps - cfg.warmup_steps, 1)
    sched = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1), cfg.warmup_steps + decay,
                                               end_value=cfg.lr * cfg.min_lr_ratio)
    tx = optax.adamw(sched, weight_decay=cfg.weight_decay)
    if cfg.clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
    if cfg.grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum)
    return nnx.Optimizer(model, tx, wrt=wrt), sched


def build_step(graphdef, wrt, cfg: TrainConfig):
    """A jitted `(state, batch) -> (state, metrics)` over the split (model, optimizer)."""

    @partial(jax.jit, donate_argnums=0)
    def step(state, batch):
        model, opt = nnx.merge(graphdef, state)
        loss_fn = partial(meteora_loss, batch=batch, gate_coef=cfg.gate_coef,
                          response_only=cfg.lm_loss == "response")
        grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt), has_aux=True)
        (_, metrics), grads = grad_fn(model)
        metrics["grad_norm"] = optax.global_norm(grads)
        opt.update(model, grads)
        return nnx.state((model, opt)), metrics

    return step


def build_eval(graphdef, cfg: TrainConfig, num_experts: int):
    @jax.jit
    def evaluate(state, batch):
        model, _ = nnx.merge(graphdef, state)
        loss, m = meteora_loss(model, batch, gate_coef=cfg.gate_coef, response_only=cfg.lm_loss == "response")
        out = model(batch["tokens"], batch["attention_mask"])
        _, _, acc_tok = gate_terms(out.aux, batch["task_ids"])
        t = batch["task_ids"]
        seg = jnp.where(t >= 0, t, num_experts)
        correct = jax.ops.segment_sum(acc_tok.reshape(-1), seg.reshape(-1), num_experts + 1)[:num_experts]
        total = jax.ops.segment_sum((t >= 0).astype(jnp.float32).reshape(-1), seg.reshape(-1),
                                    num_experts + 1)[:num_experts]
        return m, correct, total

    return evaluate


def run_eval(evaluate, state, plan, cfg, names, put=lambda b: b) -> dict:
    sums, n, correct, total = {}, 0, 0.0, 0.0
    for i, batch in enumerate(plan.one_pass()):
        if cfg.eval_batches and i >= cfg.eval_batches:
            break
        m, c, t = evaluate(state, put(batch.as_dict()))
        for k in ("lm_loss", "gate_loss", "gate_acc"):
            sums[k] = sums.get(k, 0.0) + float(m[k])
        n += 1
        correct, total = correct + np.asarray(c), total + np.asarray(t)
    out = {k: v / max(n, 1) for k, v in sums.items()}
    out["gate_acc_per_task"] = {name: (float(c / t) if t else None)
                                for name, c, t in zip(names, np.atleast_1d(correct), np.atleast_1d(total),
                                                      strict=True)}
    return out


def composite_samples(samples: list, cfg: TrainConfig) -> list:
    """The `--composite-mix` samples drawn from `samples` (seeded by `--seed`; none when the mix is 0)."""
    if cfg.composite_mix < 0:
        raise SystemExit(f"error: --composite-mix must be >= 0, got {cfg.composite_mix}")
    if cfg.composite_layout not in data_lib.COMPOSITE_LAYOUTS:
        raise SystemExit(f"error: --composite-layout must be one of {data_lib.COMPOSITE_LAYOUTS}, "
                         f"got {cfg.composite_layout!r}")
    try:
        sizes = sorted({int(n) for n in cfg.composite_sizes.split(",")})
    except ValueError:
        sizes = []
    if not sizes or sizes[0] < 2:
        raise SystemExit(f"error: --composite-sizes: expected comma-separated sizes >= 2, got {cfg.composite_sizes!r}")
    total = round(cfg.composite_mix * len(samples))
    if total == 0:
        return []
    out = []
    for i, n in enumerate(sizes):
        count = total // len(sizes) + (i < total % len(sizes))
        try:
            out += data_lib.composite(samples, n, count, seed=cfg.seed + 1000 * n, layout=cfg.composite_layout)
        except data_lib.DataError as e:
            raise SystemExit(f"error: --composite-sizes {cfg.composite_sizes}: {e}") from None
    print(f"train: {len(out)} composite samples (n in {sizes}, layout {cfg.composite_layout}) added to "
          f"{len(samples)} single ones")
    return out


def load_model_and_data(cfg: TrainConfig, run_dir: Path):
    """(model, tokenizer, data folder, prompt format) for the run: the checkpoint's, or the built-in demo's."""
    if cfg.checkpoint is None and cfg.data is None:
        from meteora_jax import demo

        return demo.setup(run_dir / "demo", seed=cfg.seed, dtype=cfg.dtype)
    if cfg.checkpoint is None or cfg.data is None or cfg.tokenizer is None:
        raise SystemExit("error: --checkpoint, --tokenizer and --data go together (or give none for the demo)")
    from convert.hf_llama import load_tokenizer

    model = ckpt_lib.load(cfg.checkpoint, dtype=cfg.dtype)
    if not isinstance(model, MeteoraLlama):
        raise SystemExit(f"error: {cfg.checkpoint} holds no MeteoRA experts (python -m convert adapters makes one)")
    return model, load_tokenizer(cfg.tokenizer), Path(cfg.data), data_lib.PROMPT_FORMAT


def prepare_run_dir(cfg: TrainConfig, check_only: bool = False) -> Path:
    """The run folder, checked against --resume / --overwrite; `check_only`: check, change nothing."""
    run_dir = Path(cfg.run_dir).absolute()
    saved = run_dir / "config.json"
    mine = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("resume", "overwrite", "progress")}
    if cfg.resume:
        if not saved.exists():
            raise SystemExit(f"error: --resume: {saved} not found (nothing to resume)")
        old = json.loads(saved.read_text())
        # a key the saved run lacks (written by an older version) counts as that option's default
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
        diff = {k: (old.get(k, defaults[k]), v) for k, v in mine.items()
                if old.get(k, defaults[k]) != v and k != "steps"}
        if diff:
            raise SystemExit(f"error: --resume with options that differ from {saved}: {diff}")
    elif run_dir.exists() and any(run_dir.iterdir()):
        if not cfg.overwrite:
            raise SystemExit(f"error: {run_dir} already exists (use --resume to continue it or --overwrite)")
        if check_only:
            return run_dir
        import shutil

        shutil.rmtree(run_dir)
    if check_only:
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = saved.with_suffix(".tmp")
    tmp.write_text(json.dumps(mine, indent=2))
    tmp.replace(saved)
    return run_dir


def train(cfg: TrainConfig) -> dict:
    """Run training; returns a summary (final metrics, paths)."""
    sharding.initialize_distributed(cfg.coordinator, cfg.num_processes, cfg.process_id)
    mesh = sharding.make_mesh(cfg.mesh) if cfg.mesh else None
    demo = cfg.checkpoint is None and cfg.data is None
    # the demo builds its model inside the run folder; otherwise the folder is only checked here and made (or
    # replaced, with --overwrite) once every input has been read, so a bad input loses no earlier run
    run_dir = prepare_run_dir(cfg, check_only=not demo)
    model, tokenizer, data_dir, prompt_format = load_model_and_data(cfg, run_dir)
    prompt_format = cfg.prompt_format or prompt_format
    if cfg.eos_token_id is not None:
        try:
            data_lib.set_eos(tokenizer, cfg.eos_token_id)
        except data_lib.DataError as e:
            raise SystemExit(f"error: {e}") from None
    routing = {k: getattr(cfg, k) for k in ("top_k", "temperature", "routing", "strategy")
               if getattr(cfg, k) is not None}
    set_routing(model, forced_expert=None, adapters_enabled=True, **routing)
    names = model.meteora_config.expert_names
    model.remat = cfg.remat
    wrt = trainable_filter(cfg.train)
    if "experts" in cfg.train:  # float32 master copies of whatever trains (gates already are)
        for _, _, lin in meteora_linears(model):
            for var in (lin.lora_a, lin.lora_b):
                var.set_value(var.get_value().astype(jnp.float32))

    buckets = sorted(int(b) for b in cfg.buckets.split(","))
    if max(buckets) < cfg.max_len:
        buckets.append(cfg.max_len)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    splits = {}
    for split in ("train", "test"):
        samples = data_lib.load_tasks(data_dir, names, split, prompt_format)
        if split == "train":
            samples = samples + composite_samples(samples, cfg)
        examples, stats = data_lib.tokenize(samples, tokenizer, cfg.max_len, overlong=cfg.overlong)
        if stats["truncated"] or stats["skipped"]:
            print(f"{split}: {stats['truncated']} samples truncated and {stats['skipped']} skipped "
                  f"(longer than --max-len {cfg.max_len})")
        splits[split] = examples
    train_plan = data_lib.BatchPlan(splits["train"], cfg.batch_size, buckets, cfg.seed, pad)
    # shuffled once (the same batches at every evaluation), so --eval-batches N samples every task, not the first
    test_plan = data_lib.BatchPlan(splits["test"], cfg.batch_size, buckets, cfg.seed, pad,
                                   drop_remainder=False, shuffle=True)
    if not demo:
        run_dir = prepare_run_dir(cfg)

    optimizer, sched = make_optimizer(model, cfg, wrt)
    ckpts = TrainCheckpoints(run_dir / "checkpoints", keep=cfg.keep)
    start = 0
    if cfg.resume:
        start = ckpts.restore_latest(model, optimizer, wrt)
        print(f"resumed from step {start}")
    metrics_path = run_dir / "metrics.jsonl"
    _truncate_log(metrics_path, start)

    graphdef, state = nnx.split((model, optimizer))
    put = lambda b: b  # noqa: E731
    if mesh is not None:
        state = sharding.shard_state(state, mesh, cfg.gate_sharding)
        put = partial(sharding.shard_batch, mesh=mesh)
    step_fn = build_step(graphdef, wrt, cfg)
    eval_fn = build_eval(graphdef, cfg, len(names))
    batches = train_plan.batches(start * cfg.grad_accum)
    log = open(metrics_path, "a")
    bar = tqdm(total=cfg.steps, initial=start, disable=not cfg.progress, dynamic_ncols=True, file=sys.stdout)
    last = {}
    t0, tokens = time.perf_counter(), 0.0
    try:
        for step in range(start + 1, cfg.steps + 1):
            acc = {}
            for _ in range(cfg.grad_accum):
                state, m = step_fn(state, put(next(batches).as_dict()))
                for k, v in m.items():
                    acc[k] = acc.get(k, 0.0) + v
            m = {k: float(v) / cfg.grad_accum for k, v in acc.items()}
            tokens += m.pop("tokens") * cfg.grad_accum
            tps = tokens / max(time.perf_counter() - t0, 1e-9)
            last = {"step": step, **m, "lr": float(sched(step - 1)), "tokens_per_s": tps}
            if step % cfg.log_every == 0 or step == cfg.steps:
                log.write(json.dumps(last) + "\n")
                log.flush()
            bar.set_postfix(loss=f"{m['loss']:.3f}", gate_acc=f"{m['gate_acc']:.3f}", tok_s=f"{tps:.0f}")
            bar.update(1)
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
                ev = run_eval(eval_fn, state, test_plan, cfg, names, put)
                log.write(json.dumps({"step": step, "eval": ev}) + "\n")
                log.flush()
                bar.write(f"step {step} eval: lm_loss {ev['lm_loss']:.3f} gate_loss {ev['gate_loss']:.3f} "
                          f"gate_acc {ev['gate_acc']:.3f}")
                last["eval"] = ev
            if step % cfg.save_every == 0 or step == cfg.steps:
                model, optimizer = nnx.merge(graphdef, state)
                ckpts.save(step, model, optimizer, wrt)
    finally:
        bar.close()
        log.close()
    model, optimizer = nnx.merge(graphdef, state)
    final = ckpt_lib.save(run_dir / "final", model, overwrite=True)
    print(f"wrote {final}")
    return {"final_checkpoint": str(final), "last": last, "run_dir": str(run_dir)}


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past `step` (a resumed run rewrites them)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    tmp.replace(path)


def main(argv=None) -> int:
    cfg = parse_args(argv)
    try:
        summary = train(cfg)
    except (data_lib.DataError, ckpt_lib.CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    last = summary["last"]
    print(f"done: step {last.get('step')} loss {last.get('loss', float('nan')):.4f} "
          f"gate_acc {last.get('gate_acc', float('nan')):.3f}; model: {summary['final_checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
