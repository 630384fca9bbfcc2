"""Write REPRODUCTION.md from the evaluation JSON files of `pipeline.py` (no numbers of its own).

    python experiments/reproduce/make_report.py --results WORK/results --commands WORK/commands.jsonl \
        --out experiments/results/REPRODUCTION.md [--toy]

Reads base.json, oracle.json, lora_b.json, meteora_top1.json, meteora_top2.json (`python -m
meteora_jax.evaluate`), crosscheck.json (`peft_crosscheck.py`) where present, and prints: Table 1 (each task's
primary score per model, averages, MeteoRA top-2 / oracle), Table 2 (composite-n sub-task scores, MeteoRA
against LoRA-B), token routing accuracy, the routing picture, the cross-check and the exact commands, with the
issue's acceptance targets checked against the numbers. `--toy` marks the whole file as a toy run.

    python experiments/reproduce/make_report.py --versus A.json B.json [C.json ...]

prints, for every composite set in the files, how each of A, C, ... fares against B over the sub-task metrics
(accuracy, BLEU, ROUGE-L, as Table 2 counts them): wins / ties / trails and the mean primary score.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

MODELS = [("base", "base"), ("lora_b", "LoRA-B"), ("oracle", "oracle LoRA"), ("oracle_cpu", "oracle LoRA (rerun)"),
          ("meteora_top1", "MeteoRA top-1"), ("meteora_top2", "MeteoRA top-2"),
          ("meteora_top2_cpu", "MeteoRA top-2 (rerun)")]
TARGET_RATIO, TARGET_BEATS, TARGET_ROUTING = 0.95, 0.80, 0.90


def fmt(x, digits=3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def where(r: dict) -> str:
    """Short 'device, limit' of one result file (columns may come from different machines and protocols)."""
    dev = str(r.get("device") or "?")
    dev = "H100" if "H100" in dev else "CPU" if dev.lower() == "cpu" else dev
    limit = (r.get("protocol") or {}).get("limit")
    return dev + (f", first {limit}" if limit else "")


def load_results(folder: Path) -> dict[str, dict]:
    out = {}
    for key, _ in MODELS:
        path = folder / f"{key}.json"
        if path.exists():
            out[key] = json.loads(path.read_text())
    return out


def table1(res: dict) -> list[str]:
    cols = [(k, n) for k, n in MODELS if k in res and res[k].get("tasks")]
    tasks = sorted({t for k, _ in cols for t in res[k]["tasks"]})
    if not tasks:
        return ["(no single-task results)"]
    lines = ["| task | metric | " + " | ".join(n for _, n in cols) + " |", "|---|---|" + "---|" * len(cols),
             "| *ran on* | | " + " | ".join(where(res[k]) for k, _ in cols) + " |"]
    for t in tasks:
        metric = next(res[k]["tasks"][t]["primary"] for k, _ in cols if t in res[k]["tasks"])
        vals = [res[k]["tasks"].get(t, {}).get("score") for k, _ in cols]
        lines.append(f"| {t} | {metric} | " + " | ".join(fmt(v) for v in vals) + " |")
    avgs = {k: sum(res[k]["tasks"][t]["score"] for t in tasks) / len(tasks) for k, _ in cols
            if all(t in res[k]["tasks"] for t in tasks)}
    lines.append("| **average** | | " + " | ".join(fmt(avgs.get(k)) for k, _ in cols) + " |")
    lines.append("")
    names = dict(MODELS)
    oracles = [o for o in ("oracle", "oracle_cpu") if avgs.get(o)]
    for k in ("meteora_top2", "meteora_top2_cpu"):
        if k in avgs and oracles:  # against the oracle run on the same device and protocol, where there is one
            o = next((o for o in oracles if where(res[o]) == where(res[k])), oracles[0])
            ratio = avgs[k] / avgs[o]
            verdict = "met" if ratio >= TARGET_RATIO else f"missed by {TARGET_RATIO - ratio:.3f}"
            same = "same device" if where(res[k]) == where(res[o]) else \
                f"{where(res[k])} against the oracle's {where(res[o])}"
            lines.append(f"{names[k]} average / {names[o]} average = **{ratio:.3f}** ({same}; target ≥ "
                         f"{TARGET_RATIO}: {verdict}).  ")
    extra = [(t, m) for t in tasks for m in ("bleu", "rougeL")
             if any(m in res[k]["tasks"].get(t, {}) for k, _ in cols)]
    if extra:
        lines += ["", "Text metrics of the generative tasks (BLEU 0-100, ROUGE-L F1 0-1):", "",
                  "| task | metric | " + " | ".join(n for _, n in cols) + " |", "|---|---|" + "---|" * len(cols)]
        for t, m in extra:
            lines.append(f"| {t} | {m} | " + " | ".join(fmt(res[k]["tasks"].get(t, {}).get(m), 2) for k, _ in cols)
                         + " |")
    return lines


def table2(res: dict) -> list[str]:
    cols = [(k, n) for k, n in MODELS if k in res and res[k].get("composite")]
    sets = sorted({c for k, _ in cols for c in res[k]["composite"]}, key=lambda c: int(c.split("_")[-1]))
    lines, beats, ties, total = [], 0, 0, 0
    for c in sets:
        have = [(k, n) for k, n in cols if c in res[k]["composite"]]
        temps = {k: res[k]["composite"][c].get("temperature") for k, _ in have}
        lines += [f"**{c}** ({res[have[0][0]]['composite'][c]['samples']} samples, "
                  f"{res[have[0][0]]['composite'][c]['mode']} answers; top-2 temperature "
                  f"{temps.get('meteora_top2', '–')}); answers attempted of n: "
                  + ", ".join(f"{n} {res[k]['composite'][c]['attempted']:.2f}" for k, n in have), "",
                  "| sub-task | metric | " + " | ".join(n for _, n in have) + " | top-2 > LoRA-B |",
                  "|---|---|" + "---|" * (len(have) + 1)]
        tasks = sorted({t for k, _ in have for t in res[k]["composite"][c]["per_task"]})
        for t in tasks:
            per = {k: res[k]["composite"][c]["per_task"].get(t, {}) for k, _ in have}
            for m in ("accuracy", "bleu", "rougeL"):
                if not any(m in v for v in per.values()):
                    continue
                b, top2 = per.get("lora_b", {}).get(m), per.get("meteora_top2", {}).get(m)
                win = ""
                if b is not None and top2 is not None:
                    total += 1
                    beats += top2 > b
                    ties += top2 == b
                    win = "yes" if top2 > b else "tie" if top2 == b else "no"
                lines.append(f"| {t} | {m} | " + " | ".join(fmt(per[k].get(m), 2 if m == "bleu" else 3)
                                                             for k, _ in have) + f" | {win} |")
        lines.append("")
    if total:
        frac = beats / total
        verdict = "met" if frac >= TARGET_BEATS else f"missed by {TARGET_BEATS - frac:.2f}"
        lines.append(f"MeteoRA top-2 beats LoRA-B on **{beats} of {total}** sub-task metrics ({frac:.0%}; target ≥ "
                     f"{TARGET_BEATS:.0%}: {verdict}); ties {ties}, LoRA-B ahead {total - beats - ties}.")
    return lines or ["(no composite results)"]


def mean_primary(result: dict, c: str) -> float | None:
    """Mean primary score over the sub-tasks of composite set `c` (None where the result lacks it)."""
    per = result.get("composite", {}).get(c, {}).get("per_task")
    return sum(v["score"] for v in per.values()) / len(per) if per else None


def composite_versus(a: dict, b: dict) -> dict[str, dict]:
    """Per composite set in both results: `a` against `b` over every sub-task metric (accuracy, bleu, rougeL)
    that both have: wins, ties, trails."""
    out = {}
    for c in sorted(set(a.get("composite", {})) & set(b.get("composite", {})), key=lambda c: int(c.split("_")[-1])):
        pa, pb = a["composite"][c]["per_task"], b["composite"][c]["per_task"]
        pairs = [(pa[t][m], pb[t][m]) for t in sorted(set(pa) & set(pb)) for m in ("accuracy", "bleu", "rougeL")
                 if m in pa[t] and m in pb[t]]
        out[c] = {"wins": sum(x > y for x, y in pairs), "ties": sum(x == y for x, y in pairs),
                  "trails": sum(x < y for x, y in pairs)}
    return out


def versus_table(files: list[Path]) -> list[str]:
    """Markdown: each of files[0], files[2:] against files[1] (`composite_versus`), one row per file, and the
    reference's mean primary scores last."""
    res = {f: json.loads(f.read_text()) for f in files}
    ref = files[1]
    sets = sorted({c for r in res.values() for c in r.get("composite", {})}, key=lambda c: int(c.split("_")[-1]))
    name = lambda f: res[f].get("label") or f.stem  # noqa: E731
    lines = [f"Against {name(ref)} (wins / ties / trails over the sub-task metrics; mean primary score):", "",
             "| | " + " | ".join(sets) + " | all |", "|---|" + "---|" * (len(sets) + 1)]
    for f in [files[0], *files[2:]]:
        v = composite_versus(res[f], res[ref])
        cells = [f"{v[c]['wins']} / {v[c]['ties']} / {v[c]['trails']}; {fmt(mean_primary(res[f], c))}" if c in v
                 else "–" for c in sets]
        tot = [sum(w[key] for w in v.values()) for key in ("wins", "ties", "trails")]
        cells.append(f"{tot[0]} / {tot[1]} / {tot[2]} ({tot[0] / sum(tot):.0%} won)" if sum(tot) else "")
        lines.append(f"| {name(f)} | " + " | ".join(cells) + " |")
    lines.append(f"| {name(ref)} | " + " | ".join(fmt(mean_primary(res[ref], c)) for c in sets) + " |  |")
    return lines


def routing_table(res: dict) -> list[str]:
    cols = [(k, n) for k, n in MODELS if k in res and res[k].get("routing")]
    if not cols:
        return ["(no routing results)"]
    has_dom = all("dominant" in res[k]["routing"] for k, _ in cols)
    tasks = sorted({t for k, _ in cols for t in res[k]["routing"]["all"]["per_task"]})
    lines = ["Teacher-forced on test prompts + reference answers, each token labelled with its task. *Gates*: per "
             "token, the fraction of the (layer, module) gates whose top-1 expert is the token's task. "
             + ("*Dominant*: per token, whether the expert with the most routing weight summed over all gates (the "
                "routing picture's colour) is the token's task. " if has_dom else "")
             + "Means over the task's tokens, all tokens / answer tokens.", "",
             "| task | " + " | ".join(f"{n} gates" + (f" | {n} dominant" if has_dom else "") for _, n in cols) + " |",
             "|---|" + "---|" * (len(cols) * (2 if has_dom else 1))]

    def cell(r: dict, kind: str, t: str) -> str:
        resp = "response" if kind == "all" else f"{kind}_response"
        return f"{fmt(r[kind]['per_task'].get(t))} / {fmt(r[resp]['per_task'].get(t))}"

    kinds = ("all", "dominant") if has_dom else ("all",)
    for t in tasks:
        lines.append(f"| {t} | " + " | ".join(cell(res[k]["routing"], kind, t) for k, _ in cols for kind in kinds)
                     + " |")
    lines.append("| **all tokens** | " + " | ".join(fmt(res[k]["routing"][kind]["overall"]) for k, _ in cols
                                                     for kind in kinds) + " |")
    lines.append("")
    for kind in kinds:
        overall = {k: res[k]["routing"][kind]["overall"] for k, _ in cols}
        lines.append(f"Routing accuracy over all single-task tokens ({'gates' if kind == 'all' else 'dominant'}): "
                     + ", ".join(f"{n} {fmt(overall[k])} ({'met' if overall[k] >= TARGET_ROUTING else 'missed'})"
                                 for k, n in cols) + f" (target ≥ {TARGET_ROUTING}).  ")
        worst = {k: min(v for v in res[k]["routing"][kind]["per_task"].values() if v is not None) for k, _ in cols}
        lines.append(f"Lowest per-task routing accuracy ({'gates' if kind == 'all' else 'dominant'}): " + ", ".join(
            f"{n} {fmt(worst[k])} ({'met' if worst[k] >= TARGET_ROUTING else 'missed'})" for k, n in cols)
            + f" (target ≥ {TARGET_ROUTING} on every task).  ")
    comp = [(k, n, c, v["routing"]) for k, n in cols for c, v in res[k].get("composite", {}).items()
            if v.get("routing")]
    if comp:
        lines += ["", "In composite prompts (teacher-forced, all tokens, gates" + (" / dominant" if has_dom else "")
                  + "): " + "; ".join(f"{n} {c} {fmt(r['all']['overall'])}"
                                      + (f" / {fmt(r['dominant']['overall'])}" if "dominant" in r else "")
                                      for _, n, c, r in comp) + "."]
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", help="folder of the evaluation JSON files")
    p.add_argument("--commands", help="commands.jsonl of pipeline.py")
    p.add_argument("--out", help="the report to write")
    p.add_argument("--versus", nargs="+", metavar="JSON", type=Path,
                   help="print composite wins / ties / trails of the first file (and the third, ...) against the "
                        "second, instead of writing a report")
    p.add_argument("--toy", action="store_true", help="mark the report as a toy run (numbers mean nothing)")
    p.add_argument("--note", help="a paragraph (markdown) put under the title: how this run differs from the plan")
    a = p.parse_args(argv)
    if a.versus:
        if len(a.versus) < 2:
            raise SystemExit("error: --versus needs at least two result files")
        missing = [str(f) for f in a.versus if not f.exists()]
        if missing:
            raise SystemExit(f"error: --versus: no such file {missing}")
        print("\n".join(versus_table(list(a.versus))))
        return 0
    if not a.results or not a.out:
        raise SystemExit("error: give --results and --out (or --versus)")
    folder = Path(a.results)
    res = load_results(folder)
    if not res:
        raise SystemExit(f"error: no results (base.json, oracle.json, ...) in {folder}")
    any_res = next(iter(res.values()))
    lines = ["# Reproduction: MeteoRA on SmolLM2-135M-Instruct with BIG-bench LoRA experts", ""]
    if a.toy:
        lines += ["> **TOY RUN.** Every stage ran at toy size (a few examples and optimizer steps) to prove the "
                  "plumbing; the numbers below mean nothing about MeteoRA.", ""]
    if a.note:
        lines += [a.note, ""]
    runs = sorted({f"{r.get('device')} (jax {r.get('jax')})" for r in res.values()})
    lines += [f"Devices: {', '.join(runs)}; each column's is in Table 1's *ran on* row. Data: {any_res.get('data')}. "
              "Greedy decoding; accuracy in [0, 1] (mode per task in tasks.json), BLEU 0-100, ROUGE-L F1 in [0, 1].",
              "", "## Table 1: single tasks (primary score)", "", *table1(res), "",
              "## Table 2: composite-n problems, per sub-task", "", *table2(res), "",
              "## Token routing accuracy", "", *routing_table(res), ""]
    png = folder / "routing_composite.png"
    if png.exists():
        link = os.path.relpath(png.absolute(), Path(a.out).absolute().parent)
        lines += ["## Routing of one composite-3 sample (MeteoRA top-2)", "", f"![routing]({link})", ""]
    cc = folder / "crosscheck.json"
    if cc.exists():
        c = json.loads(cc.read_text())
        lines += ["## Oracle expert vs PEFT", "", f"Task {c['task']}: " + "; ".join(
            f"{q['tokens']}-token prompt: logits rel. err {q['logits_rel_err']:.1e}, greedy tokens agree "
            f"{q['greedy_agree_tokens']}/{q['greedy_tokens']}" for q in c["prompts"])
            + f" → {'ok' if c['ok'] else 'MISMATCH'}.", ""]
    if a.commands and Path(a.commands).exists():
        lines += ["## Commands", "", "```"]
        for ln in Path(a.commands).read_text().splitlines():
            c = json.loads(ln)
            lines.append(f"# {c['stage']}: {c['seconds']} s, exit {c['rc']}\n{c['command']}")
        lines += ["```", ""]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
