"""Task data for gate training: JSONL task folders, token-level task labels, length buckets, composite-n samples.

Layout (the reference's): one folder per task, named like the expert that serves it,

    DATA/<task>/train.jsonl   {"prompt": ..., "response": ...} per line
    DATA/<task>/test.jsonl

Every token of a sample carries the index of the expert of its task (composite samples: of its own
sub-task), padding carries -1. Batches come from length buckets (few shapes to compile), in an order
fixed by (seed, epoch), so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

PROMPT_FORMAT = "[INST] {prompt} [/INST]"


class DataError(ValueError):
    """Bad task data; the message names the folder, file and line."""


@dataclasses.dataclass(frozen=True)
class Sample:
    """Text segments `(text, task_index, is_response)`; single-task samples have a prompt and a response."""

    segments: tuple[tuple[str, int, bool], ...]

    @property
    def tasks(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys(t for _, t, _ in self.segments))


def read_json_lines(path: str | os.PathLike, parse: Callable[[Any], Any], expected: str) -> list:
    """`parse(record)` of every non-blank line of a JSONL file. A line that is not JSON, or that `parse` rejects
    (KeyError, TypeError or ValueError), raises `DataError` naming the file, the line and what was `expected`;
    so does a file without lines."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            try:
                rows.append(parse(record))
            except (KeyError, TypeError, ValueError) as e:
                raise DataError(f"{path}:{n}: expected {expected} ({e})") from None
    if not rows:
        raise DataError(f"{path}: empty (no samples)")
    return rows


def _prompt_response(row: Any) -> dict:
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not isinstance(row.get("response"), str):
        raise TypeError(f"got {str(row)[:80]}")
    return row


def read_jsonl(path: Path) -> list[dict]:
    """`{"prompt", "response"}` records; malformed lines raise `DataError` naming file and line."""
    return read_json_lines(path, _prompt_response, 'an object with string "prompt" and "response"')


def load_tasks(data_dir: str | os.PathLike, expert_names: Sequence[str], split: str,
               prompt_format: str = PROMPT_FORMAT) -> list[Sample]:
    """Samples of every task folder under `data_dir` for `split` ("train" or "test").

    Each folder must be named like an expert; experts without a folder are allowed (they get no data).
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: no such data folder")
    index = {name: i for i, name in enumerate(expert_names)}
    folders = sorted(p for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"{data_dir}: no task folders (expected DATA/<task>/{split}.jsonl)")
    samples = []
    for folder in folders:
        if folder.name not in index:
            raise DataError(f"{folder}: task {folder.name!r} has no matching expert (experts: {list(expert_names)})")
        path = folder / f"{split}.jsonl"
        if not path.exists():
            raise DataError(f"{path}: missing")
        t = index[folder.name]
        for row in read_jsonl(path):
            samples.append(Sample(((prompt_format.format(prompt=row["prompt"]), t, False),
                                   (" " + row["response"].strip(), t, True))))
    return samples


COMPOSITE_LAYOUTS = ("answers", "restate")


def composite(samples: Sequence[Sample], n: int, count: int, seed: int, layout: str = "answers") -> list[Sample]:
    """`count` composite-n samples: n single-task samples of n different tasks joined into one prompt with
    numbered sub-questions ("k. question"), then one numbered answer each; every segment keeps its own task label.

    `layout`: "answers" puts "k. answer" lines after the prompt (the reference's composite layout, what
    `evaluate --composite-mode stepwise` builds); "restate" asks each sub-question again right before its answer
    ("\nk. question" then " answer"), the context `evaluate --composite-mode restate` builds with the answers in.
    The draws depend on `seed` only, not on the layout."""
    if layout not in COMPOSITE_LAYOUTS:
        raise ValueError(f"composite layout must be one of {COMPOSITE_LAYOUTS}, got {layout!r}")
    rng = np.random.default_rng(seed)
    by_task: dict[int, list[Sample]] = {}
    for s in samples:
        by_task.setdefault(s.tasks[0], []).append(s)
    tasks = sorted(by_task)
    if len(tasks) < n:
        raise DataError(f"composite-{n} needs samples of at least {n} tasks, got {len(tasks)}")
    out = []
    for _ in range(count):
        chosen = rng.choice(tasks, size=n, replace=False)
        parts = [by_task[t][rng.integers(len(by_task[t]))] for t in chosen]
        segs = []
        for i, p in enumerate(parts):
            text, t, _ = p.segments[0]
            segs.append((("" if i == 0 else "\n") + f"{i + 1}. {text}", t, False))
        for i, p in enumerate(parts):
            (question, t, _), (answer, _, _) = p.segments[:2]
            if layout == "restate":
                segs += [("\n" + f"{i + 1}. {question}".strip(), t, False), (answer, t, True)]
            else:
                segs.append((("" if i == 0 else "\n") + f"{i + 1}.{answer}", t, True))
        out.append(Sample(tuple(segs)))
    return out


@dataclasses.dataclass
class Example:
    tokens: np.ndarray  # [L] int32
    task_ids: np.ndarray  # [L] int32 (-1: no task, e.g. BOS)
    response: np.ndarray  # [L] bool: token belongs to a response (or is the final EOS)


def set_eos(tokenizer, token_id: int) -> None:
    """Make `token_id` the tokenizer's end-of-text token (what `tokenize` appends and generation stops at)."""
    if not 0 <= token_id < len(tokenizer):
        raise DataError(f"--eos-token-id {token_id} is outside the tokenizer's vocabulary (0..{len(tokenizer) - 1})")
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(token_id)


def tokenize(samples: Sequence[Sample], tokenizer, max_len: int, *, overlong: str = "truncate"
             ) -> tuple[list[Example], dict[str, int]]:
    """Token ids with per-token task labels. `overlong` is "truncate" or "skip"; returns stats with counts."""
    if overlong not in ("truncate", "skip"):
        raise ValueError(f"overlong must be 'truncate' or 'skip', got {overlong!r}")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    out, stats = [], {"samples": len(samples), "truncated": 0, "skipped": 0}
    for s in samples:
        # BOS is the same for every task: it carries no task label (-1, ignored by the gate loss)
        toks, tasks, resp = ([bos], [-1], [False]) if bos is not None else ([], [], [])
        for text, t, is_resp in s.segments:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            toks += ids
            tasks += [t] * len(ids)
            resp += [is_resp] * len(ids)
        if eos is not None:
            toks.append(eos)
            tasks.append(s.segments[-1][1])
            resp.append(True)
        if len(toks) > max_len:
            if overlong == "skip":
                stats["skipped"] += 1
                continue
            stats["truncated"] += 1
            toks, tasks, resp = toks[:max_len], tasks[:max_len], resp[:max_len]
        out.append(Example(np.asarray(toks, np.int32), np.asarray(tasks, np.int32), np.asarray(resp, bool)))
    return out, stats


@dataclasses.dataclass
class Batch:
    tokens: np.ndarray  # [B, T] int32 (right-padded with pad_id)
    attention_mask: np.ndarray  # [B, T] bool
    task_ids: np.ndarray  # [B, T] int32, -1 on padding
    response: np.ndarray  # [B, T] bool

    def as_dict(self) -> dict[str, np.ndarray]:
        return dataclasses.asdict(self)


def bucket_of(length: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if length <= b:
            return b
    raise DataError(f"a sample of {length} tokens exceeds the largest bucket {max(buckets)}")


def collate(examples: Sequence[Example], length: int, batch_size: int, pad_id: int) -> Batch:
    """Right-pad to `[batch_size, length]`; rows beyond `len(examples)` are all padding."""
    tok = np.full((batch_size, length), pad_id, np.int32)
    mask = np.zeros((batch_size, length), bool)
    task = np.full((batch_size, length), -1, np.int32)
    resp = np.zeros((batch_size, length), bool)
    for i, ex in enumerate(examples):
        n = len(ex.tokens)
        tok[i, :n], mask[i, :n], task[i, :n], resp[i, :n] = ex.tokens, True, ex.task_ids, ex.response
    return Batch(tok, mask, task, resp)


class BatchPlan:
    """Deterministic batches over length buckets: epoch e's order depends only on (seed, e).

    Train batches drop each bucket's remainder (fixed shapes); `drop_remainder=False` pads the last batch
    of a bucket with empty rows (for evaluation)."""

    def __init__(self, examples: Sequence[Example], batch_size: int, buckets: Sequence[int], seed: int,
                 pad_id: int, drop_remainder: bool = True, shuffle: bool = True):
        self.examples, self.batch_size, self.pad_id = list(examples), batch_size, pad_id
        self.buckets, self.seed, self.drop, self.shuffle = sorted(buckets), seed, drop_remainder, shuffle
        self.by_bucket: dict[int, list[int]] = {}
        for i, ex in enumerate(self.examples):
            self.by_bucket.setdefault(bucket_of(len(ex.tokens), self.buckets), []).append(i)
        if not self.examples:
            raise DataError("no examples to batch")
        if drop_remainder and len(self.epoch(0)) == 0:
            raise DataError(f"batch_size {batch_size} exceeds the examples of every length bucket "
                            f"({ {b: len(v) for b, v in self.by_bucket.items()} })")

    def epoch(self, e: int) -> list[tuple[int, list[int]]]:
        """`[(bucket length, example indices)]` for epoch `e`."""
        rng = np.random.default_rng([self.seed, e])
        batches = []
        for b in sorted(self.by_bucket):
            idx = list(self.by_bucket[b])
            if self.shuffle:
                rng.shuffle(idx)
            stop = len(idx) - len(idx) % self.batch_size if self.drop else len(idx)
            batches += [(b, idx[i:i + self.batch_size]) for i in range(0, stop, self.batch_size)]
        if self.shuffle:
            order = rng.permutation(len(batches))
            batches = [batches[i] for i in order]
        return batches

    def batches(self, start: int = 0) -> Iterator[Batch]:
        """Endless stream of batches from global batch number `start` (epochs follow each other)."""
        per_epoch = len(self.epoch(0))
        e, i = divmod(start, per_epoch)
        while True:
            plan = self.epoch(e)
            for b, idx in plan[i:]:
                yield collate([self.examples[j] for j in idx], b, self.batch_size, self.pad_id)
            e, i = e + 1, 0

    def one_pass(self) -> Iterator[Batch]:
        for b, idx in self.epoch(0):
            yield collate([self.examples[j] for j in idx], b, self.batch_size, self.pad_id)
