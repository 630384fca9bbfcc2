"""experiments/reproduce/pipeline.py: the evaluation commands it builds (--dry-run prints them, runs nothing), and
one whole toy run of the plumbing on the CPU."""

import json
import shlex

import pytest
from _helpers_reproduce import load_script, make_source, source_presets

pipeline = load_script("pipeline")


@pytest.fixture
def work(tmp_path):
    (tmp_path / "data" / "tasks" / "t0").mkdir(parents=True)
    (tmp_path / "data" / "composite").mkdir()
    for n in (10, 3, 5):
        (tmp_path / "data" / "composite" / f"composite_{n}.jsonl").write_text("")
    return tmp_path


def commands(work, capsys, *extra):
    """{stage: argv} of a dry run."""
    assert pipeline.main(["--work", str(work), "--base", "x.gguf", "--dry-run", *extra]) == 0
    out = {}
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("[") and "] $ " in line:
            stage, cmd = line[1:].split("] $ ", 1)
            out[stage] = shlex.split(cmd)
    return out


def _after(argv, flag):
    i = argv.index(flag)
    return argv[i + 1:i + 4]


def test_oracle_stage_answers_composites_one_sub_question_at_a_time(work, capsys):
    cmd = commands(work, capsys, "--stages", "eval_oracle,eval_lora_b", "--composite-mode", "restate",
                   "--min-new-tokens", "1", "--composite-only")
    oracle = cmd["eval_oracle"]
    comps = [str(work / "data" / "composite" / f"composite_{n}.jsonl") for n in (3, 5, 10)]  # sizes in order
    assert "--oracle" in oracle and _after(oracle, "--composite") == comps
    assert oracle[oracle.index("--out") + 1] == str(work / "results" / "oracle_restate_min1.json")
    assert oracle[oracle.index("--min-new-tokens") + 1] == "1" and "--no-single" in oracle
    assert _after(cmd["eval_lora_b"], "--composite") == comps  # the same problems as the method it bounds
    # one-pass answering cannot force one expert per sub-question: the oracle then scores single tasks only
    free = commands(work, capsys, "--stages", "eval_oracle", "--composite-mode", "free")["eval_oracle"]
    assert "--composite" not in free and free[free.index("--label") + 1] == "oracle_free"
    plain = commands(work, capsys, "--stages", "eval_oracle", "--no-composite")["eval_oracle"]
    assert "--composite" not in plain and plain[plain.index("--out") + 1] == str(work / "results" / "oracle.json")


def test_gate_tag_and_composite_mix_reach_train_and_evaluate(work, capsys):
    cmd = commands(work, capsys, "--stages", "gates,eval_top1", "--gate-tag", "comp", "--gate-composite-mix", "0.3",
                   "--gate-from", str(work / "runs" / "gates" / "final"), "--eos-token-id", "1")
    gates, top1 = cmd["gates"], cmd["eval_top1"]
    assert gates[gates.index("--run-dir") + 1] == str(work / "runs" / "gates_comp")
    assert gates[gates.index("--composite-mix") + 1] == "0.3" and gates[gates.index("--composite-sizes") + 1] == "2,3"
    assert gates[gates.index("--checkpoint") + 1] == str(work / "runs" / "gates" / "final")
    assert top1[top1.index("--checkpoint") + 1] == str(work / "runs" / "gates_comp" / "final")
    assert top1[top1.index("--eos-token-id") + 1] == "1" and top1[top1.index("--top-k") + 1] == "1"
    with pytest.raises(SystemExit, match="--gate-tag must be letters"):
        pipeline.main(["--work", str(work), "--dry-run", "--stages", "gates", "--gate-tag", "a/b"])


@pytest.mark.slow
def test_toy_run_of_every_training_stage_and_the_report(tmp_path):
    """BIG-bench-style tasks written here (no bigbench package), a random 2-layer base with SmolLM2's tokenizer,
    --tiny sizes: PEFT LoRAs and LoRA-B trained in PyTorch, converted, gates trained, the PEFT cross-check, two
    evaluations and the report. Catches any stage drifting from the commands it calls."""
    bb = load_script("bigbench_tasks")
    src = make_source(tmp_path)
    bb.build(src, tmp_path / "data", ["pick", "count", "say"], n_train=10, n_test=4, n_composite=3, seed=1,
             max_prompt_chars=1000, composite_sizes=[2], presets=source_presets())
    work = tmp_path / "work"
    stages = "data,base,loras,lora_b,convert,gates,check,eval_oracle,eval_top1,report"
    assert pipeline.main(["--work", str(work), "--tiny", "--base", "random-tiny", "--data-from",
                          str(tmp_path / "data"), "--tasks", "pick", "count", "say", "--stages", stages]) == 0
    ran = [json.loads(line) for line in (work / "commands.jsonl").read_text().splitlines()]
    assert all(r["rc"] == 0 for r in ran), ran
    assert set(stages.split(",")) - {"base"} == {r["stage"] for r in ran}  # the base is built in this process
    assert (work / "base" / "config.json").exists()
    assert {p.name for p in (work / "adapters").iterdir()} == {"pick", "count", "say"}
    check = json.loads((work / "results" / "crosscheck.json").read_text())
    assert check["ok"] and all(p["logits_rel_err"] < 1e-4 for p in check["prompts"]), check
    for name in ("oracle", "meteora_top1"):
        res = json.loads((work / "results" / f"{name}.json").read_text())
        assert set(res["tasks"]) == {"pick", "count", "say"} and all(t["n"] == 2 for t in res["tasks"].values())
        assert set(res["composite"]) == {"composite_2"}
    top1 = json.loads((work / "results" / "meteora_top1.json").read_text())
    assert top1["model"]["meteora"]["expert_names"] == ["pick", "count", "say"]
    assert 0 <= top1["routing"]["dominant"]["overall"] <= 1
    report = (work / "results" / "REPRODUCTION.md").read_text()
    assert "TOY RUN" in report and all(f"| {t} |" in report for t in ("pick", "count", "say"))
