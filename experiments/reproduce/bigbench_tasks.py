"""Task data for the reproduction from the BIG-bench `task.json` files of the PyPI sdist `bigbench==1.0.0`.

    pip install --no-deps bigbench==1.0.0          # ~80 s; ships 214 tasks as JSON
    python experiments/reproduce/bigbench_tasks.py --out data/repro [--tasks ...] [--n-train 300 --n-test 50]

Writes (the layout `meteora_jax.data` and `python -m meteora_jax.train --data` read):

    OUT/tasks/<task>/train.jsonl, test.jsonl   {"prompt", "response", "references", "choices", "subtask"} lines
    OUT/tasks/tasks.json                        per task: kind, metrics, accuracy mode, sources, sizes
    OUT/composite/composite_<n>.jsonl           n sub-questions of n different tasks (see `write_composites`)

Prompts are formatted the way BIG-bench formats a zero-shot example (`task_prefix + example_input_prefix + input
+ example_output_prefix`, with BIG-bench's defaults "\\nQ: " and "\\nA: "), and a multiple-choice question gets its
choices appended as "\\nchoice: ..." lines (in a seeded order) before the output prefix, as the reference does
for its BIG-bench tasks; `meteora_jax.data.load_tasks` wraps it in "[INST] ... [/INST]". The response of a
multiple-choice example is the text of its best-scored choice (`references`: all best-scored choices); of a
generative example its first target (`references`: all targets). Responses are single lines (whitespace
collapsed) so a composite answer is one line per sub-question.

A task with subtasks (subfolders with their own task.json) takes its examples from every subtask (or those its
preset names), each formatted with its own prefixes, interleaved so that every split draws evenly from them.
Exact duplicate prompts are dropped, as are prompts longer than `--max-prompt-chars`; then a shuffle seeded by
(--seed, task name) gives the test set (the first `--n-test`) and the train set (the next `--n-train`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import zlib
from pathlib import Path

import numpy as np

from meteora_jax import data as data_lib
from meteora_jax.metrics import ACCURACY_MODES


@dataclasses.dataclass(frozen=True)
class Preset:
    """How one task is extracted and scored. Multiple-choice tasks are scored with accuracy mode `choice`."""

    subtasks: tuple[str, ...] | None = None  # None: all subfolders with a task.json
    accuracy: str = "exact_ci"  # generative tasks' accuracy mode
    text_metrics: bool = False  # also BLEU and ROUGE-L
    primary: str = "accuracy"  # the score averaged in tables


# The paper's tasks that BIG-bench has (the others come from Hugging Face datasets).
PRESETS = {
    "logical_deduction": Preset(),
    "object_counting": Preset(accuracy="exact_ci"),
    "strategyqa": Preset(accuracy="first_word", text_metrics=True),
    "winowhy": Preset(),
    "language_identification": Preset(),
    "unit_conversion": Preset(subtasks=("chained_conversion", "different_systems", "novel_systems",
                                        "si_conversion", "unit_identification")),  # the multiple-choice ones
    "cs_algorithms": Preset(),
    "disfl_qa": Preset(accuracy="contains"),
    "question_selection": Preset(),
    "goal_step_wikihow": Preset(),
    "epistemic_reasoning": Preset(),
    "linguistics_puzzles": Preset(accuracy="exact_ci", text_metrics=True, primary="rougeL"),
    "formal_fallacies_syllogisms_negation": Preset(),
    "play_dialog_same_or_different": Preset(),
    "vitaminc_fact_verification": Preset(),
    "abstract_narrative_understanding": Preset(subtasks=("4_distractors",)),
    "elementary_math_qa": Preset(subtasks=("question_only",)),
    "contextual_parametric_knowledge_conflicts": Preset(accuracy="contains"),
    "tracking_shuffled_objects": Preset(),
    "reasoning_about_colored_objects": Preset(),
}
DEFAULT_TASKS = ("logical_deduction", "object_counting", "strategyqa", "winowhy", "language_identification",
                 "unit_conversion", "cs_algorithms", "disfl_qa", "goal_step_wikihow", "linguistics_puzzles")
COMPOSITE_SIZES = (3, 5, 10)


class TaskDataError(ValueError):
    """Bad or missing task files; the message names the file."""


def find_benchmark_tasks() -> Path:
    """`.../bigbench/benchmark_tasks` of the installed `bigbench` package (located without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("bigbench")
    if spec is None or not spec.submodule_search_locations:
        raise TaskDataError("the package bigbench is not installed: pip install --no-deps bigbench==1.0.0 "
                            "(or pass --source, a folder of BIG-bench task folders)")
    path = Path(spec.submodule_search_locations[0]) / "benchmark_tasks"
    if not path.is_dir():
        raise TaskDataError(f"{path}: no benchmark_tasks folder in the bigbench package")
    return path


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise TaskDataError(f"{path}: missing") from None
    except json.JSONDecodeError as e:
        raise TaskDataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(obj, dict):
        raise TaskDataError(f"{path}: expected a JSON object")
    return obj


def task_files(folder: Path, subtasks: tuple[str, ...] | None = None) -> list[tuple[str, Path, dict]]:
    """`[(subtask name or "", task.json path, its JSON)]`: the task's own examples, else its subtasks'."""
    top = folder / "task.json"
    if not folder.is_dir():
        raise TaskDataError(f"{folder}: no such task folder")
    main = _read_json(top)
    if main.get("examples") and not subtasks:
        return [("", top, main)]
    subs = sorted(p.parent.name for p in folder.glob("*/task.json"))
    if subtasks:
        missing = sorted(set(subtasks) - set(subs))
        if missing:
            raise TaskDataError(f"{folder}: subtask(s) {missing} not found (subtasks there: {subs})")
        subs = [s for s in subs if s in subtasks]
    if not subs:
        raise TaskDataError(f"{top}: no examples and no subtask folders with a task.json")
    return [(s, folder / s / "task.json", _read_json(folder / s / "task.json")) for s in subs]


def format_example(ex: dict, fmt: dict, rng: np.random.Generator, where: str) -> dict:
    """One BIG-bench example -> `{"prompt", "response", "references", "choices"}` (see the module docstring).

    `fmt` is the task.json holding it (for its prefixes); `where` names it in errors."""
    if not isinstance(ex, dict) or not isinstance(ex.get("input"), str):
        raise TaskDataError(f"{where}: an example without a string 'input'")
    prompt = str(fmt.get("task_prefix", "")) + fmt.get("example_input_prefix", "\nQ: ") + ex["input"]
    choices = None
    if "target" in ex:  # generative (also where target_scores exist beside a free-text target, e.g. strategyqa)
        refs = ex["target"] if isinstance(ex["target"], list) else [ex["target"]]
        refs = [_one_line(str(r)) for r in refs]
    elif isinstance(ex.get("target_scores"), dict) and ex["target_scores"]:
        scores = ex["target_scores"]
        best = max(scores.values())
        refs = [_one_line(c) for c, s in scores.items() if s == best]
        if len(refs) == len(scores) and len(scores) > 1:
            raise TaskDataError(f"{where}: no choice scores higher than the others in {scores}")
        choices = [_one_line(c) for c in scores]
        order = rng.permutation(len(choices))
        prompt += "".join(f"\nchoice: {choices[i]}" for i in order)
    else:
        raise TaskDataError(f"{where}: an example with neither 'target' nor 'target_scores'")
    refs = [r for r in refs if r]
    if not refs:
        return {}
    prompt += fmt.get("example_output_prefix", "\nA: ")
    return {"prompt": prompt.strip(), "response": refs[0], "references": refs, "choices": choices}


def _one_line(text: str) -> str:
    return " ".join(text.split())


def extract_task(source: Path, name: str, preset: Preset, n_train: int, n_test: int, seed: int,
                 max_prompt_chars: int) -> tuple[list[dict], list[dict], dict]:
    """(train rows, test rows, manifest entry) of one task."""
    files = task_files(source / name, preset.subtasks)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    pools, seen, kinds = [], set(), set()
    for sub, path, obj in files:
        examples = obj.get("examples")
        if not isinstance(examples, list) or not examples:
            raise TaskDataError(f"{path}: no 'examples' list")
        rows = []
        for i, ex in enumerate(examples):
            row = format_example(ex, obj, rng, f"{path}: example {i}")
            if not row or row["prompt"] in seen or len(row["prompt"]) > max_prompt_chars:
                continue
            seen.add(row["prompt"])
            row["subtask"] = sub
            kinds.add("multiple_choice" if row["choices"] else "generative")
            rows.append(row)
        pools.append([rows[i] for i in rng.permutation(len(rows))])
    if len(kinds) > 1:
        raise TaskDataError(f"{source / name}: mixes multiple-choice and generative examples; name the subtasks "
                            "of one kind in its preset")
    mixed = [p[i] for i in range(max(map(len, pools), default=0)) for p in pools if i < len(p)]  # round-robin
    if len(mixed) < n_test + 1:
        raise TaskDataError(f"{source / name}: only {len(mixed)} usable examples (need more than --n-test "
                            f"{n_test}; prompts over --max-prompt-chars {max_prompt_chars} are dropped)")
    test, train = mixed[:n_test], mixed[n_test:n_test + n_train]
    kind = kinds.pop()
    metrics = ["accuracy"] + (["bleu", "rougeL"] if preset.text_metrics else [])
    entry = {"kind": kind, "metrics": metrics, "accuracy": "choice" if kind == "multiple_choice" else preset.accuracy,
             "primary": preset.primary, "subtasks": [s for s, _, _ in files if s],
             "sources": [str(p.relative_to(source)) for _, p, _ in files], "usable": len(mixed),
             "n_train": len(train), "n_test": len(test)}
    if entry["accuracy"] not in ACCURACY_MODES or entry["primary"] not in metrics:
        raise TaskDataError(f"preset of {name}: accuracy {entry['accuracy']!r} / primary {entry['primary']!r}")
    return train, test, entry


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_composites(out: Path, names: list[str], test_rows: dict[str, list[dict]], sizes: list[int], count: int,
                     seed: int) -> dict:
    """composite_<n>.jsonl for each n, built by `meteora_jax.data.composite` from the test sets.

    Each line: `{"n", "tasks": [task of sub-question i], "prompt", "responses", "references", "choices",
    "segments": [[text, task, is_response], ...]}`; `segments` are the exact text pieces (prompt formatting
    and numbering included) with their task, which `meteora_jax.evaluate` tokenizes like training data."""
    samples = data_lib.load_tasks(out / "tasks", names, "test")
    by_prompt = {}
    for t, name in enumerate(names):
        for row in test_rows[name]:
            by_prompt[(t, data_lib.PROMPT_FORMAT.format(prompt=row["prompt"]))] = row
    info = {}
    for n in sizes:
        lines = []
        for s in data_lib.composite(samples, n, count, seed=seed + n):
            rows = []
            for i, (text, t, is_resp) in enumerate(s.segments[:n]):
                assert not is_resp
                rows.append(by_prompt[(t, text.removeprefix("\n").removeprefix(f"{i + 1}. "))])
            lines.append({"n": n, "tasks": [names[t] for t in s.tasks],
                          "prompt": "".join(text for text, _, r in s.segments if not r),
                          "responses": [r["response"] for r in rows], "references": [r["references"] for r in rows],
                          "choices": [r["choices"] for r in rows],
                          "segments": [[text, names[t], r] for text, t, r in s.segments]})
        write_jsonl(out / "composite" / f"composite_{n}.jsonl", lines)
        info[f"composite_{n}"] = {"n": n, "count": count, "seed": seed + n, "file": f"composite/composite_{n}.jsonl"}
    return info


def build(source: Path, out: Path, names: list[str], n_train: int, n_test: int, n_composite: int, seed: int,
          max_prompt_chars: int, composite_sizes: list[int], overwrite: bool = False,
          presets: dict[str, Preset] | None = None) -> dict:
    """Extract every task and the composites into `out` (written to a temporary folder, then renamed)."""
    presets = PRESETS if presets is None else presets
    unknown = [n for n in names if n not in presets]
    if unknown:
        raise TaskDataError(f"no preset for task(s) {unknown}; known: {sorted(presets)}")
    if len(set(names)) != len(names):
        raise TaskDataError(f"task names repeat: {names}")
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists (pass --overwrite to replace it)")
    sizes = [n for n in composite_sizes if n <= len(names)]
    for n in sorted(set(composite_sizes) - set(sizes)):
        print(f"note: composite-{n} skipped: it needs at least {n} tasks, got {len(names)}", file=sys.stderr)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        manifest = {"source": "bigbench==1.0.0 task.json files", "seed": seed, "n_train": n_train,
                    "n_test": n_test, "max_prompt_chars": max_prompt_chars,
                    "prompt_format": data_lib.PROMPT_FORMAT, "tasks": {}}
        test_rows = {}
        for name in names:
            train, test, entry = extract_task(source, name, presets[name], n_train, n_test, seed, max_prompt_chars)
            write_jsonl(tmp / "tasks" / name / "train.jsonl", train)
            write_jsonl(tmp / "tasks" / name / "test.jsonl", test)
            manifest["tasks"][name] = entry
            test_rows[name] = test
            print(f"{name}: {entry['kind']}, {entry['n_train']} train / {entry['n_test']} test of "
                  f"{entry['usable']} usable; accuracy {entry['accuracy']}, metrics {entry['metrics']}")
        manifest["composite"] = write_composites(tmp, names, test_rows, sizes, n_composite, seed)
        (tmp / "tasks" / "tasks.json").write_text(json.dumps(manifest, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (tasks/ and composite/ inside)")
    p.add_argument("--source", help="folder of BIG-bench task folders (default: the installed bigbench package's)")
    p.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), help=f"task names (default: {DEFAULT_TASKS})")
    p.add_argument("--n-train", type=int, default=300, help="train examples per task (300)")
    p.add_argument("--n-test", type=int, default=50, help="test examples per task (50)")
    p.add_argument("--n-composite", type=int, default=50, help="samples per composite-n test set (50)")
    p.add_argument("--composite-sizes", type=int, nargs="+", default=list(COMPOSITE_SIZES))
    p.add_argument("--max-prompt-chars", type=int, default=1200, help="drop longer prompts (1200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="toy sizes: 12 train, 3 test, 3 composite samples per set")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    if a.tiny:
        a.n_train, a.n_test, a.n_composite = 12, 3, 3
    try:
        source = Path(a.source) if a.source else find_benchmark_tasks()
        build(source, Path(a.out), a.tasks, a.n_train, a.n_test, a.n_composite, a.seed, a.max_prompt_chars,
              a.composite_sizes, a.overwrite)
    except (TaskDataError, data_lib.DataError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {Path(a.out).absolute()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
