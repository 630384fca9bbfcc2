"""Cross-check: our MeteoRA checkpoint with one expert forced against PEFT (torch) with that adapter.

    python experiments/reproduce/peft_crosscheck.py --base BASE --adapter adapters/TASK --checkpoint ckpt/meteora \
        --data DATA/tasks --task TASK --out results/crosscheck.json [--n 4 --new-tokens 24]

On `--n` test prompts of TASK (tokenized as in training), compares the logits of every prompt token
(relative error: max |ours - peft| / max |peft|) and the greedy continuations of `--new-tokens` tokens
(our jitted `generate` against transformers `generate`, token by token). Writes the numbers to `--out`
and exits 1 if the logits differ by more than `--tol` or the greedy tokens disagree before the first
position where PEFT's top-2 logits are within `--tie` of each other (a near-tie float rounding may flip).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="Hugging Face Llama folder or .gguf file (as the adapters were "
                                                 "trained on)")
    p.add_argument("--adapter", required=True, help="PEFT adapter folder of TASK")
    p.add_argument("--checkpoint", required=True, help="MeteoRA checkpoint holding that adapter as expert TASK")
    p.add_argument("--data", required=True, help="task folders")
    p.add_argument("--task", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--tie", type=float, default=1e-3)
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx
    from peft import PeftModel

    from meteora_jax import checkpoint, evaluate
    from meteora_jax import generate as gen
    from meteora_jax.meteora import set_routing

    jax.config.update("jax_default_matmul_precision", "highest")  # no TF32 on GPUs: compare float32 with float32
    import_path = Path(__file__).parent
    sys.path.insert(0, str(import_path))
    from train_lora import load_torch_base

    base, tok = load_torch_base(args.base, "cpu" if not torch.cuda.is_available() else "cuda")
    peft = PeftModel.from_pretrained(base, args.adapter).eval()
    ours = checkpoint.load(args.checkpoint, dtype="float32", param_dtype="float32")
    names = ours.meteora_config.expert_names
    if args.task not in names:
        raise SystemExit(f"error: {args.checkpoint} has no expert {args.task!r} (experts: {list(names)})")
    set_routing(ours, forced_expert=names.index(args.task))
    rows = evaluate.read_task_rows(args.data, "test", [args.task], args.n)[args.task]
    ids = evaluate.prompt_ids(evaluate.encode([evaluate.single_sample(r, 0) for r in rows], tok))
    dev = next(peft.parameters()).device
    report = {"task": args.task, "adapter": args.adapter, "checkpoint": args.checkpoint, "prompts": []}
    ok = True
    # ours: one jitted forward over the right-padded prompts and one batched generate (a compile each, not one per
    # prompt length; batched generation equals one prompt at a time, tests/test_generate.py)
    width = max(map(len, ids))
    padded = jnp.asarray([q + [0] * (width - len(q)) for q in ids])
    mask = jnp.asarray([[True] * len(q) + [False] * (width - len(q)) for q in ids])
    all_logits = np.asarray(nnx.jit(lambda m, x, a: m(x, a).logits)(ours, padded, mask))
    all_toks = gen.generate(ours, ids, max_new_tokens=args.new_tokens, eos_token_ids=[]).tokens
    for prompt, logits, our_toks in zip(ids, all_logits, all_toks, strict=True):
        x = torch.tensor([prompt], device=dev)
        with torch.no_grad():
            ref = peft(input_ids=x).logits[0].float().cpu().numpy()
            ref_gen = peft.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=args.new_tokens,
                                    do_sample=False, eos_token_id=None, pad_token_id=tok.eos_token_id,
                                    output_scores=True, return_dict_in_generate=True)
        got = logits[:len(prompt)]
        rel = float(np.abs(got - ref).max() / np.abs(ref).max())
        ref_toks = ref_gen.sequences[0, len(prompt):].cpu().tolist()
        gaps = [float(np.diff(np.sort(s[0].float().cpu().numpy())[-2:])[0]) for s in ref_gen.scores]
        agree = next((i for i, (a, b) in enumerate(zip(our_toks, ref_toks, strict=False)) if a != b),
                     min(len(our_toks), len(ref_toks)))
        first_tie = next((i for i, g in enumerate(gaps) if g < args.tie), len(gaps))
        good = rel <= args.tol and agree >= min(first_tie, len(ref_toks))
        ok &= good
        report["prompts"].append({"tokens": len(prompt), "logits_rel_err": rel, "greedy_agree_tokens": agree,
                                  "greedy_tokens": len(ref_toks), "first_near_tie": first_tie, "ok": good,
                                  "peft_text": tok.decode(ref_toks), "ours_text": tok.decode(our_toks)})
        print(f"prompt of {len(prompt)} tokens: logits rel err {rel:.2e}, greedy tokens agree {agree}/"
              f"{len(ref_toks)} (first near-tie at {first_tie}) -> {'ok' if good else 'MISMATCH'}")
    report["ok"] = ok
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}: {'ok' if ok else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
