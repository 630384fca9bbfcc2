"""Training throughput of our gate-training step against a PyTorch implementation of the reference's path.

Both train the gates only (LM loss + gate loss), with E experts of rank r on all seven modules, top-k
routing, bf16 compute, random weights of the named model shapes, in the same process on the same device:

- ours: `meteora_jax.train.build_step` (one jitted step), for each strategy asked;
- torch: transformers' LlamaForCausalLM whose target nn.Linear layers are wrapped by the reference's
  accelerated MoE-LoRA forward (top-k of the gate logits, softmax(w / T), per-token gathered A and B
  applied with bmm: the paper's "bmm-torch"), AdamW on the gates.

    python experiments/bench_train.py --shapes smollm2 --batch 8 --seq 512 --out experiments/results/train_bench
    python experiments/bench_train.py --shapes tiny --steps 2   # a CPU smoke run

Writes OUT.json and OUT.md (tokens/s, ratio to torch, peak memory, the command and the device).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU in this process

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import SHAPES, write_outputs  # noqa: E402  (the model shapes every benchmark shares)


def bench_ours(shape, args, strategy):
    from flax import nnx

    from meteora_jax.config import LlamaConfig
    from meteora_jax.meteora import GateParam, MeteoraConfig, MeteoraLlama
    from meteora_jax.train import TrainConfig, build_step, make_optimizer

    cfg = LlamaConfig(**shape, dtype="bfloat16", param_dtype="bfloat16")
    mcfg = MeteoraConfig(expert_names=tuple(f"e{i}" for i in range(args.experts)), rank=args.rank,
                         top_k=args.top_k, temperature=args.temperature, strategy=strategy)
    model = MeteoraLlama(cfg, mcfg, rngs=nnx.Rngs(0))
    tcfg = TrainConfig(steps=args.steps + 2)
    opt, _ = make_optimizer(model, tcfg, GateParam)
    graphdef, state = nnx.split((model, opt))
    step = build_step(graphdef, GateParam, tcfg)
    rng = np.random.default_rng(0)
    b, t = args.batch, args.seq
    batch = {"tokens": jnp.asarray(rng.integers(0, cfg.vocab_size, (b, t)), jnp.int32),
             "attention_mask": jnp.ones((b, t), bool),
             "task_ids": jnp.asarray(rng.integers(0, args.experts, (b, t)), jnp.int32),
             "response": jnp.ones((b, t), bool)}
    try:  # this program's own footprint (the process peak below also holds earlier strategies' buffers)
        mem = step.lower(state, batch).compile().memory_analysis()
        program = int(mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
                      - mem.alias_size_in_bytes)
    except Exception:  # memory_analysis is not available on every backend
        program = None
    for _ in range(2):
        state, m = step(state, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    stats = jax.devices()[0].memory_stats() or {}
    sec = float(np.median(times))
    return {"impl": f"jax-{strategy}", "step_s": sec, "tokens_per_s": b * t / sec,
            "peak_bytes": stats.get("peak_bytes_in_use"), "program_bytes": program, "loss": float(m["loss"])}


def moe_lora_bmm(x, base, gate, a, b, scaling, top_k, temperature):
    """The reference's accelerated MoE-LoRA forward in torch (the paper's bmm-torch): per token, the top-k of the
    gate logits, softmax(logits / T) over them (weight 1 for k = 1) times the expert's scaling, and the picked
    experts' A [E, in, r] and B [E, r, out] gathered and applied with bmm. Returns (y, gate logits [N, E])."""
    import torch
    import torch.nn.functional as F

    y = base(x)
    xf = x.reshape(-1, x.shape[-1])
    logits = gate(xf)
    w, idx = torch.topk(logits, top_k, dim=-1)
    w = F.softmax(w.float() / temperature, dim=-1).to(x.dtype) if top_k > 1 else torch.ones_like(w)
    w = w * scaling[idx].to(x.dtype)
    r = a.shape[-1]
    h = torch.bmm(xf.unsqueeze(1).expand(-1, top_k, -1).reshape(-1, 1, xf.shape[-1]),
                  a[idx].reshape(-1, xf.shape[-1], r))  # [N*k, 1, r]
    d = torch.bmm(h, b[idx].reshape(-1, r, b.shape[-1]))  # [N*k, 1, out]
    d = (d.reshape(xf.shape[0], top_k, -1) * w.unsqueeze(-1)).sum(1)
    return y + d.reshape(*x.shape[:-1], -1), logits


def bench_torch(shape, args):
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**shape)).to(dev, torch.bfloat16)
    hf.requires_grad_(False)
    gate_logits = []

    class MoELoRALinear(torch.nn.Module):
        """The reference's accelerated training forward (bmm-torch), gates trainable."""

        def __init__(self, base):
            super().__init__()
            self.base = base
            e, r, i, o = args.experts, args.rank, base.in_features, base.out_features
            self.gate = torch.nn.Linear(i, e, bias=False, device=dev, dtype=torch.bfloat16)
            self.a = torch.randn(e, i, r, device=dev, dtype=torch.bfloat16) / i ** 0.5
            self.b = torch.randn(e, r, o, device=dev, dtype=torch.bfloat16) / r ** 0.5
            self.s = torch.full((e,), 2.0, device=dev)

        def forward(self, x):
            y, logits = moe_lora_bmm(x, self.base, self.gate, self.a, self.b, self.s, args.top_k, args.temperature)
            gate_logits.append(logits)
            return y

    for layer in hf.model.layers:
        for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                              (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for n in names:
                setattr(parent, n, MoELoRALinear(getattr(parent, n)))
    gates = [p for n, p in hf.named_parameters() if n.endswith("gate.weight")]
    for p in gates:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(gates, lr=1e-3)
    b, t = args.batch, args.seq
    tokens = torch.randint(0, shape["vocab_size"], (b, t), device=dev)
    tasks = torch.randint(0, args.experts, (b * t,), device=dev)

    def step():
        gate_logits.clear()
        out = hf(input_ids=tokens, labels=tokens)
        gl = torch.stack([F.cross_entropy(lg.float(), tasks) for lg in gate_logits]).mean()
        loss = out.loss + gl
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(2):
        step()
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = step()
        if dev == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    sec = float(np.median(times))
    peak = torch.cuda.max_memory_allocated() if dev == "cuda" else None
    return {"impl": "torch-bmm (reference)", "step_s": sec, "tokens_per_s": b * t / sec, "peak_bytes": peak,
            "loss": float(loss.detach())}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", choices=sorted(SHAPES), default="smollm2")
    p.add_argument("--experts", type=int, default=28)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--strategies", default="gather,dense")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = p.parse_args(argv)
    shape = SHAPES[args.shapes]
    rows = []
    for s in args.strategies.split(","):
        try:
            rows.append(bench_ours(shape, args, s))
        except Exception as e:  # e.g. a kernel strategy that does not build here: report it, go on
            rows.append({"impl": f"jax-{s}", "error": f"{type(e).__name__}: {e}"[:300]})
    if not args.no_torch:
        try:
            rows.append(bench_torch(shape, args))
        except Exception as e:  # e.g. out of memory: report it
            rows.append({"impl": "torch-bmm (reference)", "error": f"{type(e).__name__}: {e}"[:300]})
    ref = next((r for r in rows if r["impl"].startswith("torch") and "tokens_per_s" in r), None)
    for r in rows:
        if ref and "tokens_per_s" in r:
            r["vs_torch"] = r["tokens_per_s"] / ref["tokens_per_s"]
    result = {"command": "python " + " ".join(sys.argv), "device": str(jax.devices()[0].device_kind),
              "host": platform.node(), "args": vars(args), "rows": rows}
    print(json.dumps(result, indent=1))
    if args.out:
        lines = [f"# Training throughput ({args.shapes} shapes, E={args.experts}, r={args.rank}, k={args.top_k}, "
                 f"batch {args.batch} x {args.seq}, bf16)", "", f"Device: {result['device']}. "
                 f"Command: `{result['command']}`", "",
                 "| impl | tokens/s | x torch | step ms | peak GiB (process) | program GiB |",
                 "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['impl']} | {r['error']} | | | | |")
                continue
            peak = f"{r['peak_bytes'] / 2**30:.2f}" if r.get("peak_bytes") else "n/a"
            prog = f"{r['program_bytes'] / 2**30:.2f}" if r.get("program_bytes") else "n/a"
            lines.append(f"| {r['impl']} | {r['tokens_per_s']:.0f} | {r.get('vs_torch', float('nan')):.2f} | "
                         f"{r['step_s'] * 1e3:.1f} | {peak} | {prog} |")
        lines += ["", "Peak (process): the device allocator's high-water mark so far in this process (JAX rows run "
                  "first, in order, so later rows include earlier ones' leftovers; the torch row is torch's own "
                  "allocator). Program: XLA's memory analysis of our compiled step (arguments + outputs + temporaries "
                  "- donated aliases)."]
        write_outputs(Path(args.out), {".json": json.dumps(result, indent=1), ".md": "\n".join(lines) + "\n"})
    return result


if __name__ == "__main__":
    main()
