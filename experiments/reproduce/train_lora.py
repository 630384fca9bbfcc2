"""Train PEFT LoRA adapters in PyTorch: one per task (the experts / oracles) or one on the union (LoRA-B).

    python experiments/reproduce/train_lora.py --base BASE --data DATA/tasks --out adapters [--tasks a b ...]
    python experiments/reproduce/train_lora.py --base BASE --data DATA/tasks --out adapters_b --union lora_b

BASE is a Hugging Face Llama folder or a .gguf file (dequantized to float32 by transformers). Each adapter is
r=8, alpha=16, dropout 0.05 on all seven linears (q, k, v, o, gate, up, down), trained with AdamW (linear
warmup, cosine decay) on the response tokens of its task's train split, tokenized exactly as the MeteoRA gate
training does (`meteora_jax.data.tokenize`: BOS, "[INST] prompt [/INST]", " response", EOS). `--union NAME`
trains one adapter NAME on every task's train split mixed (the paper's LoRA-B) for `--steps` x number of
tasks steps unless `--union-steps` says otherwise. Writes OUT/<name>/ (adapter_config.json +
adapter_model.safetensors, PEFT's format) and OUT/<name>/train_log.json (losses, options, timings).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import zlib
from pathlib import Path

import numpy as np

from meteora_jax import data as data_lib

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_torch_base(base: str, device: str):
    """(transformers LlamaForCausalLM float32 on `device`, tokenizer) from a folder or .gguf file."""
    import torch
    from transformers import AutoModelForCausalLM

    from convert.hf_llama import load_tokenizer

    path = Path(base)
    kw = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    folder = path.parent if path.suffix == ".gguf" else path
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kw).to(device)
    return model, load_tokenizer(path)


def task_examples(data_dir: Path, names: list[str], tokenizer, max_len: int) -> dict[str, list]:
    """`{task: [Example]}` of the train split (task ids are indices into the sorted folder names)."""
    folders = sorted(p.name for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    samples = data_lib.load_tasks(data_dir, folders, "train")
    examples, stats = data_lib.tokenize(samples, tokenizer, max_len, overlong="truncate")
    if stats["truncated"]:
        print(f"note: {stats['truncated']} train samples truncated to {max_len} tokens")
    out = {n: [] for n in names}
    for ex, s in zip(examples, samples, strict=True):
        name = folders[s.tasks[0]]
        if name in out:
            out[name].append(ex)
    empty = [n for n, v in out.items() if not v]
    if empty:
        raise SystemExit(f"error: no train data for {empty} under {data_dir} (folders: {folders})")
    return out


def collate(batch, pad_id: int, device: str):
    """input_ids, attention_mask, labels (-100 except response targets) `[B, T]` torch tensors."""
    import torch

    t = max(len(e.tokens) for e in batch)
    ids = np.full((len(batch), t), pad_id, np.int64)
    mask = np.zeros((len(batch), t), np.int64)
    labels = np.full((len(batch), t), -100, np.int64)
    for i, e in enumerate(batch):
        n = len(e.tokens)
        ids[i, :n], mask[i, :n] = e.tokens, 1
        labels[i, :n] = np.where(e.response, e.tokens, -100)
    return (torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device),
            torch.from_numpy(labels).to(device))


def train_adapter(base_model, examples: list, name: str, out: Path, args, pad_id: int, device: str,
                  steps: int) -> dict:
    """Fit one LoRA on `examples`; save it under out/name. Returns its log."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(args.seed)
    cfg = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=TARGETS,
                     task_type="CAUSAL_LM")
    model = get_peft_model(copy.deepcopy(base_model), cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warm = max(1, min(args.warmup, steps // 5))

    def factor(s: int) -> float:  # linear warmup, then cosine from 1 to 0.1
        if s < warm:
            return (s + 1) / warm
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    rng = np.random.default_rng([args.seed, zlib.crc32(name.encode())])
    amp = device.startswith("cuda")
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        idx = rng.choice(len(examples), size=min(args.batch_size, len(examples)), replace=False)
        ids, mask, labels = collate([examples[i] for i in idx], pad_id, device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            print(f"  {name} step {step + 1}/{steps} loss {losses[-1]:.4f}", flush=True)
    model.save_pretrained(str(out / name))
    log = {"name": name, "steps": steps, "examples": len(examples), "first_loss": losses[0],
           "last_loss": float(np.mean(losses[-max(1, steps // 10):])), "losses": losses,
           "seconds": round(time.perf_counter() - t0, 1), "options": {k: v for k, v in vars(args).items()}}
    (out / name / "train_log.json").write_text(json.dumps(log, indent=1))
    return log


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="Hugging Face Llama folder or .gguf file")
    p.add_argument("--data", required=True, help="task folders DATA/<task>/train.jsonl")
    p.add_argument("--out", required=True, help="folder for the adapter folders")
    p.add_argument("--tasks", nargs="+", help="tasks to train one adapter each (default: every folder)")
    p.add_argument("--union", metavar="NAME", help="train one adapter NAME on all --tasks mixed (LoRA-B)")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per task adapter (150)")
    p.add_argument("--union-steps", type=int, help="steps of the --union adapter (default: --steps x tasks)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--skip-existing", action="store_true", help="keep adapters already in --out")
    args = p.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    data_dir, out = Path(args.data), Path(args.out)
    names = args.tasks or sorted(q.name for q in data_dir.iterdir() if q.is_dir() and not q.name.startswith("."))
    base, tok = load_torch_base(args.base, device)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    by_task = task_examples(data_dir, names, tok, args.max_len)
    out.mkdir(parents=True, exist_ok=True)
    jobs = ([(args.union, [e for n in names for e in by_task[n]], args.union_steps or args.steps * len(names))]
            if args.union else [(n, by_task[n], args.steps) for n in names])
    summary = {}
    for name, examples, steps in jobs:
        if args.skip_existing and (out / name / "adapter_model.safetensors").exists():
            print(f"{name}: exists, skipped")
            continue
        print(f"{name}: {len(examples)} examples, {steps} steps on {device}")
        log = train_adapter(base, examples, name, out, args, pad, device, steps)
        summary[name] = {k: log[k] for k in ("steps", "examples", "first_loss", "last_loss", "seconds")}
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
