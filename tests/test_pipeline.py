"""experiments/reproduce/pipeline.py: the evaluation commands it builds (--dry-run prints them, runs nothing)."""

import shlex

import pytest
from _helpers_reproduce import load_script

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
