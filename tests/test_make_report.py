"""experiments/reproduce/make_report.py: the report's averages, ratio, win/tie counts and routing verdicts equal
a direct recomputation from the result files it reads (random scores, fresh each run)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from _helpers_reproduce import load_script

report = load_script("make_report")
TASKS = ["alpha", "beta", "gamma", "delta"]


def _result(rng, label, device, limit=None, composite=True, routing=False, low=0):
    tasks = {t: {"score": float(rng.integers(low, 11)) / 10, "primary": "accuracy", "accuracy": 0.0} for t in TASKS}
    for v in tasks.values():
        v["accuracy"] = v["score"]
    r = {"label": label, "device": device, "jax": "0.x", "data": "DATA", "protocol": {"limit": limit},
         "tasks": tasks}
    if composite:
        # scores on a coarse grid so that ties happen
        r["composite"] = {f"composite_{n}": {"samples": 5, "mode": "stepwise", "attempted": float(n),
                                             "per_task": {t: {"accuracy": float(rng.integers(0, 3)) / 2,
                                                              "score": 0.0} for t in TASKS}}
                          for n in (3, 5)}
    if routing:
        per = {t: float(rng.uniform(0.5, 1.0)) for t in TASKS}
        block = {"overall": float(np.mean(list(per.values()))), "per_task": per}
        r["routing"] = {"all": block, "response": block, "dominant": block, "dominant_response": block}
    return r


@pytest.mark.parametrize("two_oracles", [False, True])
def test_report_numbers_match_recomputation(tmp_path, two_oracles):
    """Averages, ratios, wins and routing figures against a recomputation from random result files. With one
    oracle (on the CPU) both top-2 runs divide by it; with an H100 oracle and a CPU rerun of the first 10 prompts,
    each top-2 run divides by the oracle of its own device and protocol."""
    rng = np.random.default_rng()
    res = {"oracle": _result(rng, "oracle", "NVIDIA H100 80GB HBM3" if two_oracles else "cpu", composite=False,
                             low=1),  # a nonzero average to divide by
           "lora_b": _result(rng, "lora_b", "NVIDIA H100 80GB HBM3"),
           "meteora_top2": _result(rng, "meteora_top2", "NVIDIA H100 80GB HBM3", routing=True),
           "meteora_top2_cpu": _result(rng, "meteora_top2", "cpu", limit=10, composite=False)}
    if two_oracles:
        res["oracle_cpu"] = _result(rng, "oracle", "cpu", limit=10, composite=False, low=1)
    folder = tmp_path / "results"
    folder.mkdir()
    for k, v in res.items():
        (folder / f"{k}.json").write_text(json.dumps(v))
    out = tmp_path / "R.md"
    assert report.main(["--results", str(folder), "--out", str(out)]) == 0
    text = out.read_text()

    avg = {k: np.mean([v["tasks"][t]["score"] for t in TASKS]) for k, v in res.items()}
    row = re.search(r"^\| \*\*average\*\* \| \|(.*)\|$", text, re.M).group(1).split("|")
    cols = ("lora_b", "oracle") + (("oracle_cpu",) if two_oracles else ()) + ("meteora_top2", "meteora_top2_cpu")
    assert [float(x) for x in row] == [round(avg[k], 3) for k in cols]
    ran = "H100 | H100 | CPU, first 10" if two_oracles else "H100 | CPU"
    assert f"| *ran on* | | {ran} | H100 | CPU, first 10 |" in text
    names = dict(report.MODELS)
    if two_oracles:
        pairs = (("meteora_top2", "oracle", "same device"), ("meteora_top2_cpu", "oracle_cpu", "same device"))
    else:
        pairs = (("meteora_top2", "oracle", "H100 against the oracle's CPU"),
                 ("meteora_top2_cpu", "oracle", "CPU, first 10 against"))
    for k, o, same in pairs:
        ratio = avg[k] / avg[o]
        line = next(x for x in text.splitlines() if x.startswith(f"{names[k]} average / {names[o]} average"))
        shown = float(re.search(r"\*\*([0-9.]+)\*\*", line).group(1))  # 3 decimals; a ratio on a rounding
        assert abs(shown - ratio) <= 0.0005 + 1e-12 and same in line  # boundary may print either way
        assert ("met" if ratio >= 0.95 else "missed") in line.split(":")[-1]

    wins = ties = total = 0
    for c in ("composite_3", "composite_5"):
        for t in TASKS:
            a = res["meteora_top2"]["composite"][c]["per_task"][t]["accuracy"]
            b = res["lora_b"]["composite"][c]["per_task"][t]["accuracy"]
            total, wins, ties = total + 1, wins + (a > b), ties + (a == b)
    assert f"beats LoRA-B on **{wins} of {total}**" in text
    assert f"ties {ties}, LoRA-B ahead {total - wins - ties}" in text
    assert text.count("| yes |") == wins and text.count("| tie |") == ties

    overall = res["meteora_top2"]["routing"]["all"]["overall"]
    assert f"MeteoRA top-2 {overall:.3f} ({'met' if overall >= 0.9 else 'missed'})" in text


def test_versus_counts_match_recomputation(tmp_path, capsys):
    """`--versus A B C`: A's and C's wins / ties / trails against B per composite set and in total, and the mean
    primary scores, against a direct recomputation (coarse random scores, so ties happen; a BLEU metric on one
    sub-task of A and B only)."""
    rng = np.random.default_rng()
    files = []
    for label in ("a", "b", "c"):
        r = _result(rng, label, "cpu")
        for c in r["composite"].values():
            for v in c["per_task"].values():
                v["score"] = v["accuracy"]
            if label != "c":
                c["per_task"]["beta"]["bleu"] = float(rng.integers(0, 3))
        path = tmp_path / f"{label}.json"
        path.write_text(json.dumps(r))
        files.append((path, r))
    assert report.main(["--versus", *[str(p) for p, _ in files]]) == 0
    out = capsys.readouterr().out
    ref = files[1][1]["composite"]
    for _, r in (files[0], files[2]):
        row = next(ln for ln in out.splitlines() if ln.startswith(f"| {r['label']} |"))
        total = np.zeros(3, int)
        for n in (3, 5):
            pa, pb = r["composite"][f"composite_{n}"]["per_task"], ref[f"composite_{n}"]["per_task"]
            pairs = [(pa[t][m], pb[t][m]) for t in TASKS for m in ("accuracy", "bleu") if m in pa[t] and m in pb[t]]
            w = np.array([sum(x > y for x, y in pairs), sum(x == y for x, y in pairs), sum(x < y for x, y in pairs)])
            total += w
            mean = np.mean([pa[t]["score"] for t in TASKS])
            assert f"{w[0]} / {w[1]} / {w[2]}; {mean:.3f}" in row, (row, w, mean)
        assert f"{total[0]} / {total[1]} / {total[2]} ({total[0] / total.sum():.0%} won)" in row
    with pytest.raises(SystemExit, match="at least two"):
        report.main(["--versus", str(files[0][0])])
    with pytest.raises(SystemExit, match="no such file"):
        report.main(["--versus", str(files[0][0]), str(tmp_path / "nope.json")])
