"""BIG-bench task extraction (experiments/reproduce/bigbench_tasks.py) on small task.json files written here:
prompt format, references, seeded splits, subtasks, composites, and errors. Needs no bigbench package."""

import json
from pathlib import Path

import pytest
from _helpers_reproduce import load_script, make_source, source_presets, write_json

from meteora_jax import data as data_lib
from meteora_jax import evaluate

bb = load_script("bigbench_tasks")

PRESETS = source_presets()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("bb")
    src = make_source(root)
    manifest = bb.build(src, root / "out", ["pick", "count", "say"], n_train=10, n_test=4, n_composite=5, seed=3,
                        max_prompt_chars=1000, composite_sizes=[2, 3, 5], presets=PRESETS)
    return root, src, manifest


def rows(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines()]


def test_prompt_formats_and_references(built):
    root, src, manifest = built
    out = root / "out" / "tasks"
    by_input = {e["input"]: e for e in json.loads((src / "pick" / "task.json").read_text())["examples"]}
    for r in rows(out / "pick" / "test.jsonl") + rows(out / "pick" / "train.jsonl"):
        head, rest = r["prompt"].split("\nBall: ")
        assert head == "Colours.\n"  # task_prefix, then the input prefix "\nBall: "
        text, *choice_lines = rest.split("\n")
        assert choice_lines[-1].startswith("Colour:") and choice_lines[-1] == "Colour:"  # output prefix, stripped
        shown = [c.removeprefix("choice: ") for c in choice_lines[:-1]]
        assert all(c.startswith("choice: ") for c in choice_lines[:-1])
        assert sorted(shown) == sorted(r["choices"]) == sorted(["red", "green", "blue", "black"])
        best = [c for c, s in by_input[text]["target_scores"].items() if s == 1]
        assert r["response"] == best[0] and r["references"] == best
    for r in rows(out / "count" / "test.jsonl"):
        sub = r["subtask"]
        assert r["prompt"].startswith(f"{sub}: ") and r["prompt"].endswith(" =") and r["choices"] is None
        k, j = (int(w) for w in r["prompt"].split()[1:5:3])
        assert r["references"] == [str(k + j), f"{k + j} {sub[:-1]}s"] and r["response"] == str(k + j)
    for r in rows(out / "say" / "test.jsonl"):  # BIG-bench defaults "\nQ: " / "\nA: "; free-text target wins
        i = int(r["prompt"].split()[2])
        assert r["prompt"] == f"Q: Is {i} even?\nA:" and r["choices"] is None
        assert r["response"] == f"{'Yes' if i % 2 == 0 else 'No'}. Because {i} mod 2 is {i % 2}."  # one line
    t = manifest["tasks"]
    assert (t["pick"]["kind"], t["pick"]["accuracy"], t["pick"]["metrics"]) == ("multiple_choice", "choice",
                                                                                ["accuracy"])
    assert (t["count"]["kind"], t["count"]["accuracy"], t["count"]["subtasks"]) == ("generative", "exact_ci",
                                                                                    ["apples", "pears"])
    assert t["say"]["metrics"] == ["accuracy", "bleu", "rougeL"] and t["say"]["primary"] == "rougeL"
    assert evaluate.load_specs(out)["say"]["accuracy"] == "first_word"  # the evaluator reads the manifest


def test_splits_are_seeded_disjoint_and_balanced(built, tmp_path):
    root, src, _ = built
    out = root / "out" / "tasks"
    for task in ("pick", "count", "say"):
        train, test = rows(out / task / "train.jsonl"), rows(out / task / "test.jsonl")
        assert (len(train), len(test)) == (10, 4)
        prompts = [r["prompt"] for r in train + test]
        assert len(set(prompts)) == len(prompts)  # disjoint, no duplicates
    subs = [r["subtask"] for r in rows(out / "count" / "test.jsonl")]
    assert sorted(subs) == ["apples", "apples", "pears", "pears"]  # round-robin over subtasks
    again = bb.build(src, tmp_path / "again", ["pick", "count", "say"], 10, 4, 5, 3, 1000, [2, 3], presets=PRESETS)
    other = bb.build(src, tmp_path / "other", ["pick", "count", "say"], 10, 4, 5, 4, 1000, [2, 3], presets=PRESETS)
    assert again["tasks"] == built[2]["tasks"] and other["tasks"]["pick"]["usable"] == 24
    for task in ("pick", "count", "say"):
        assert (tmp_path / "again" / "tasks" / task / "test.jsonl").read_text() == \
            (out / task / "test.jsonl").read_text()
    assert any((tmp_path / "other" / "tasks" / t / "test.jsonl").read_text() != (out / t / "test.jsonl").read_text()
               for t in ("pick", "count", "say"))
    # the training data loader reads the folder as it is (tasks.json beside the task folders is ignored)
    samples = data_lib.load_tasks(out, ["count", "pick", "say"], "train")
    assert len(samples) == 30 and samples[0].segments[0][0].startswith("[INST] ")


def test_long_prompts_dropped(tmp_path):
    src = make_source(tmp_path)
    m = bb.build(src, tmp_path / "o", ["count"], 50, 2, 1, 0, 32, [], presets=PRESETS)
    kept = rows(tmp_path / "o" / "tasks" / "count" / "train.jsonl") + rows(tmp_path / "o" / "tasks" / "count" /
                                                                            "test.jsonl")
    assert 2 < m["tasks"]["count"]["usable"] == len(kept) < 48 and all(len(r["prompt"]) <= 32 for r in kept)


def test_composites_keep_sub_question_references(built):
    root, _, manifest = built
    out = root / "out"
    assert sorted(manifest["composite"]) == ["composite_2", "composite_3"]  # 5 > 3 tasks: skipped
    tests = {t: {data_lib.PROMPT_FORMAT.format(prompt=r["prompt"]): r for r in rows(out / "tasks" / t / "test.jsonl")}
             for t in ("pick", "count", "say")}
    for n in (2, 3):
        lines = evaluate.read_composite(out / "composite" / f"composite_{n}.jsonl")
        assert len(lines) == 5
        for c in lines:
            assert len(c["tasks"]) == n == len(set(c["tasks"])) and c["sub_tasks"] == c["tasks"]
            prompts = [s for s in c["segments"] if not s[2]]
            answers = [s for s in c["segments"] if s[2]]
            for k, ((text, task, _), (ans, atask, _)) in enumerate(zip(prompts, answers, strict=True)):
                row = tests[task][text.removeprefix("\n").removeprefix(f"{k + 1}. ")]
                assert atask == task == c["tasks"][k]
                assert ans.removeprefix("\n") == f"{k + 1}. {row['response']}"
                assert c["references"][k] == row["references"] and c["choices"][k] == row["choices"]
                assert c["responses"][k] == row["response"]
            assert c["prompt"] == "".join(p[0] for p in prompts)


def test_errors_name_the_file(tmp_path):
    src = make_source(tmp_path)
    with pytest.raises(bb.TaskDataError, match="nope: no such task folder"):
        bb.build(src, tmp_path / "a", ["nope"], 5, 2, 1, 0, 1000, [], presets={"nope": bb.Preset()})
    with pytest.raises(bb.TaskDataError, match="no preset"):
        bb.build(src, tmp_path / "a", ["unknown"], 5, 2, 1, 0, 1000, [])
    bad = json.loads((src / "say" / "task.json").read_text())
    bad["examples"][3] = {"input": "no target"}
    write_json(src / "say" / "task.json", bad)
    with pytest.raises(bb.TaskDataError, match=r"say/task.json: example 3: .*neither 'target' nor 'target_scores'"):
        bb.build(src, tmp_path / "a", ["say"], 5, 2, 1, 0, 1000, [], presets=PRESETS)
    (src / "pick" / "task.json").write_text("{broken")
    with pytest.raises(bb.TaskDataError, match=r"pick/task.json: not valid JSON"):
        bb.build(src, tmp_path / "a", ["pick"], 5, 2, 1, 0, 1000, [], presets=PRESETS)
    write_json(src / "count" / "pears" / "task.json", {"examples": [{"input": "x", "target_scores": {"a": 1, "b": 0}}]})
    with pytest.raises(bb.TaskDataError, match="mixes multiple-choice and generative"):
        bb.build(src, tmp_path / "a", ["count"], 5, 2, 1, 0, 1000, [], presets=PRESETS)
    with pytest.raises(bb.TaskDataError, match=r"subtask\(s\) \['plums'\] not found"):
        bb.build(src, tmp_path / "a", ["count"], 5, 2, 1, 0, 1000, [],
                 presets={"count": bb.Preset(subtasks=("plums",))})
    assert not (tmp_path / "a").exists()  # nothing half-written
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        bb.build(src, tmp_path / "exists", ["pick"], 5, 2, 1, 0, 1000, [], presets=PRESETS)


def test_default_tasks_have_presets():
    assert len(bb.DEFAULT_TASKS) >= 10 and set(bb.DEFAULT_TASKS) <= set(bb.PRESETS)
