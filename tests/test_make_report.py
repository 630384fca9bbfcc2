"""experiments/reproduce/make_report.py: the report's averages, ratio, win/tie counts and routing verdicts equal
a direct recomputation from the result files it reads (random scores, fresh each run)."""

from __future__ import annotations

import json
import re

import numpy as np
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


def test_report_numbers_match_recomputation(tmp_path):
    rng = np.random.default_rng()
    res = {"oracle": _result(rng, "oracle", "cpu", composite=False, low=1),  # a nonzero average to divide by
           "lora_b": _result(rng, "lora_b", "NVIDIA H100 80GB HBM3"),
           "meteora_top2": _result(rng, "meteora_top2", "NVIDIA H100 80GB HBM3", routing=True),
           "meteora_top2_cpu": _result(rng, "meteora_top2", "cpu", limit=10, composite=False)}
    folder = tmp_path / "results"
    folder.mkdir()
    for k, v in res.items():
        (folder / f"{k}.json").write_text(json.dumps(v))
    out = tmp_path / "R.md"
    assert report.main(["--results", str(folder), "--out", str(out)]) == 0
    text = out.read_text()

    avg = {k: np.mean([v["tasks"][t]["score"] for t in TASKS]) for k, v in res.items()}
    row = re.search(r"^\| \*\*average\*\* \| \|(.*)\|$", text, re.M).group(1).split("|")
    assert [float(x) for x in row] == [round(avg[k], 3) for k in ("lora_b", "oracle", "meteora_top2",
                                                                    "meteora_top2_cpu")]
    assert "| *ran on* | | H100 | CPU | H100 | CPU, first 10 |" in text
    for k, same in (("meteora_top2", "H100 against the oracle's CPU"), ("meteora_top2_cpu", "CPU, first 10 against")):
        ratio = avg[k] / avg["oracle"]
        line = next(x for x in text.splitlines() if x.startswith(dict(report.MODELS)[k] + " average / oracle"))
        assert f"**{ratio:.3f}**" in line and same in line
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
