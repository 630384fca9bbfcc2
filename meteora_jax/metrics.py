"""Scores of generated answers: accuracy (five matching modes), BLEU, ROUGE-L, numbered composite answers, and
token routing accuracy. Pure Python / NumPy; `meteora_jax.evaluate` runs the model and calls these.

Accuracy modes (`ACCURACY_MODES`); a prediction is right when it matches *any* of its references:

    exact       normalize(pred) == normalize(ref)                (whitespace collapsed, case kept)
    exact_ci    the same after casefold, ignoring a final . ! or ?
    contains    casefold(normalize(ref)) is a substring of casefold(normalize(pred))  (the reference's "fuzzy")
    first_word  the first word (regex \\w+) of pred equals that of ref, casefolded (yes/no answers with reasons)
    choice      multiple choice: pred names exactly one of the example's choices (it equals one, or contains one
                that no other contained choice contains, so "incorrect" is not read as "correct"), and that
                choice is a reference

BLEU is sacrebleu's corpus BLEU (0-100); ROUGE-L is rouge-score's `rougeL` F1 (stemmed), the best over an
example's references, averaged over examples (0-1). Both need the `eval` extra (sacrebleu, rouge-score).

Routing accuracy: for each token with a task label, the fraction of (layer, module) pairs whose top-1 expert
(slot 0 of the chosen experts) is the token's task; averaged over the tokens of each task.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

ACCURACY_MODES = ("exact", "exact_ci", "contains", "first_word", "choice")
TEXT_METRICS = ("bleu", "rougeL")
_WORD = re.compile(r"\w+")
_MARKER = re.compile(r"(?m)^[ \t]*(\d+)[.)][ \t]?")


def normalize(text: str) -> str:
    """Whitespace runs collapsed to one space, ends stripped."""
    return " ".join(text.split())


def _fold(text: str) -> str:
    return normalize(text).casefold()


def _fold_end(text: str) -> str:
    return _fold(text).rstrip(".!?").rstrip()


def matched_choice(pred: str, choices: Sequence[str]) -> str | None:
    """The one choice `pred` names (see `choice` mode), or None when it names none or several."""
    p = _fold_end(pred)
    for c in choices:
        if p == _fold_end(c):
            return c
    found = [c for c in choices if _fold_end(c) and _fold_end(c) in _fold(pred)]
    # drop a choice that is only found as part of a longer found choice ("correct" inside "incorrect")
    found = [c for c in found if not any(o != c and _fold_end(c) in _fold_end(o) for o in found)]
    return found[0] if len(set(found)) == 1 else None


def is_correct(pred: str, references: Sequence[str], mode: str, choices: Sequence[str] | None = None) -> bool:
    """Whether `pred` matches any reference under `mode` (see the module docstring)."""
    if mode not in ACCURACY_MODES:
        raise ValueError(f"accuracy mode must be one of {ACCURACY_MODES}, got {mode!r}")
    if not references:
        raise ValueError("an example needs at least one reference answer")
    if mode == "choice":
        if not choices:
            raise ValueError("accuracy mode 'choice' needs the example's choices")
        got = matched_choice(pred, choices)
        return got is not None and _fold_end(got) in {_fold_end(r) for r in references}
    for ref in references:
        if mode == "exact" and normalize(pred) == normalize(ref):
            return True
        if mode == "exact_ci" and _fold_end(pred) == _fold_end(ref):
            return True
        if mode == "contains" and _fold(ref) and _fold(ref) in _fold(pred):
            return True
        if mode == "first_word":
            a, b = _WORD.search(pred.casefold()), _WORD.search(ref.casefold())
            if a and b and a.group() == b.group():
                return True
    return False


def accuracy(preds: Sequence[str], references: Sequence[Sequence[str]], mode: str,
             choices: Sequence[Sequence[str] | None] | None = None) -> float:
    """Fraction of predictions that match (0 for no predictions)."""
    _same_length(preds, references)
    if not preds:
        return 0.0
    choices = choices if choices is not None else [None] * len(preds)
    hits = [is_correct(p, r, mode, c) for p, r, c in zip(preds, references, choices, strict=True)]
    return float(np.mean(hits))


def bleu(preds: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """sacrebleu corpus BLEU (0-100). Examples with fewer references repeat their first (which changes nothing:
    BLEU clips n-gram counts by the maximum over references and takes the closest reference length)."""
    _same_length(preds, references)
    try:
        import sacrebleu
    except ImportError:
        raise ImportError("BLEU needs sacrebleu: pip install 'meteora-jax[eval]'") from None
    if not preds:
        return 0.0
    width = max(len(r) for r in references)
    streams = [[r[min(j, len(r) - 1)] for r in references] for j in range(width)]
    return float(sacrebleu.corpus_bleu(list(preds), streams).score)


def rouge_l(preds: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean over examples of rouge-score's rougeL F1 (stemmed), best over each example's references (0-1)."""
    _same_length(preds, references)
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise ImportError("ROUGE needs rouge-score: pip install 'meteora-jax[eval]'") from None
    if not preds:
        return 0.0
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(np.mean([scorer.score_multi(list(r), p)["rougeL"].fmeasure for p, r in zip(preds, references,
                                                                                          strict=True)]))


def score(preds: Sequence[str], references: Sequence[Sequence[str]], spec: dict,
          choices: Sequence[Sequence[str] | None] | None = None) -> dict:
    """Every metric of a task spec `{"metrics": ["accuracy", "bleu", "rougeL"], "accuracy": mode}`.

    Returns `{"n", "empty", "accuracy"?, "bleu"?, "rougeL"?}` (`empty`: predictions with no text)."""
    metrics = spec.get("metrics", ["accuracy"])
    bad = sorted(set(metrics) - {"accuracy", *TEXT_METRICS})
    if bad:
        raise ValueError(f"unknown metric(s) {bad}; expected some of {['accuracy', *TEXT_METRICS]}")
    out = {"n": len(preds), "empty": sum(1 for p in preds if not p.strip())}
    if "accuracy" in metrics:
        out["accuracy"] = accuracy(preds, references, spec.get("accuracy", "exact_ci"), choices)
    if "bleu" in metrics:
        out["bleu"] = bleu(preds, references)
    if "rougeL" in metrics:
        out["rougeL"] = rouge_l(preds, references)
    return out


def _same_length(preds, references) -> None:
    if len(preds) != len(references):
        raise ValueError(f"{len(preds)} predictions but {len(references)} reference lists")


# --------------------------------------------------------------------------------------------- composite
def parse_numbered(text: str, n: int, *, first_line: bool = True) -> list[str]:
    """Answers 1..n of a composite response `"1. a\\n2. b\\n..."`; a missing answer is "".

    Markers are `k.` or `k)` at a line start, accepted in order (1, then 2, ...), so numbers inside an answer
    do not split it. Answer k is the text after its marker up to the next accepted marker, cut at its first
    line break when `first_line` (the reference's rule; answers here are single lines)."""
    found: dict[int, tuple[int, int]] = {}
    want = 1
    for m in _MARKER.finditer(text):
        if want <= n and int(m.group(1)) == want:
            found[want] = (m.start(), m.end())
            want += 1
    out = []
    for k in range(1, n + 1):
        if k not in found:
            out.append("")
            continue
        end = found[k + 1][0] if k + 1 in found else len(text)
        ans = text[found[k][1]:end]
        if first_line:
            ans = ans.split("\n", 1)[0]
        out.append(ans.strip())
    return out


# ----------------------------------------------------------------------------------------------- routing
def token_routing_hits(experts: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-token fraction of (layer, module) pairs whose top-1 expert is the token's label.

    `experts [..., L, M, k]` int (slot 0 is the top-1 choice), `labels [...]` int -> `[...]` float64
    (NaN where the label is negative: no task)."""
    experts, labels = np.asarray(experts), np.asarray(labels)
    if experts.shape[:labels.ndim] != labels.shape or experts.ndim != labels.ndim + 3:
        raise ValueError(f"experts {experts.shape} must be labels {labels.shape} + [L, M, k]")
    top1 = experts[..., 0]
    hits = (top1 == labels[..., None, None]).mean(axis=(-2, -1))
    return np.where(labels >= 0, hits, np.nan)


def token_dominant_hits(experts: np.ndarray, weights: np.ndarray, labels: np.ndarray, num_experts: int) -> np.ndarray:
    """Per-token 1.0 where the token's dominant expert is its label, else 0.0 (NaN where the label is negative).

    The dominant expert of a token is the one with the largest routing weight summed over all (layer, module)
    pairs and top-k slots (`meteora_jax.trace.expert_mass`, the routing picture's colour). `experts` and
    `weights [..., L, M, k]`, `labels [...]`; ties go to the lower expert index."""
    experts, weights, labels = np.asarray(experts), np.asarray(weights, np.float64), np.asarray(labels)
    if experts.shape != weights.shape or experts.shape[:labels.ndim] != labels.shape or experts.ndim != labels.ndim + 3:
        raise ValueError(f"experts {experts.shape} and weights {weights.shape} must both be labels {labels.shape}"
                         " + [L, M, k]")
    from meteora_jax.trace import expert_mass

    flat = (labels.size, *experts.shape[labels.ndim:])  # [tokens, L, M, k]
    mass = expert_mass(experts.reshape(flat), weights.reshape(flat), num_experts).reshape(*labels.shape, -1)
    hits = (mass.argmax(-1) == labels).astype(np.float64)
    return np.where(labels >= 0, hits, np.nan)


class RoutingTally:
    """Sums of per-token routing hits by task label, over batches; `result(names)` gives per-task accuracy."""

    def __init__(self, num_tasks: int):
        self.sums = np.zeros(num_tasks)
        self.counts = np.zeros(num_tasks, np.int64)

    def add(self, hits: np.ndarray, labels: np.ndarray) -> None:
        """`hits [...]` per-token hit fractions (`token_routing_hits`), `labels [...]` (-1 ignored)."""
        labels = np.asarray(labels).ravel()
        hits = np.asarray(hits, np.float64).ravel()
        keep = labels >= 0
        np.add.at(self.sums, labels[keep], hits[keep])
        np.add.at(self.counts, labels[keep], 1)

    def result(self, names: Sequence[str]) -> dict:
        """`{"per_task": {name: accuracy or None}, "tokens": {name: count}, "overall": token-weighted mean}`."""
        per = {n: (float(s / c) if c else None) for n, s, c in zip(names, self.sums, self.counts, strict=True)}
        total = int(self.counts.sum())
        return {"per_task": per, "tokens": {n: int(c) for n, c in zip(names, self.counts, strict=True)},
                "overall": float(self.sums.sum() / total) if total else None}
