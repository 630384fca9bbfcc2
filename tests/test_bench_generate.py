"""experiments/bench_generate.py end to end on the CPU with the tiny shape: every JAX part it times (the decode loop
`generate` compiles, end-to-end `generate`, prefill) runs without error for the base, a strategy and a packed
variant, and the report has their rows. The benchmark records a failing part instead of stopping, so this is what
catches it drifting from `meteora_jax.generate`'s programs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "bench_generate.py"


def test_jax_part_runs_every_variant(tmp_path):
    out = tmp_path / "gen"
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), "--shapes", "tiny", "--batches", "1,2", "--strategies",
           "dense,packed", "--experts", "3", "--rank", "2", "--prompt", "8", "--steps", "4", "--prefill-len", "16",
           "--repeats", "1", "--parts", "jax", "--budget", "600"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=SCRIPT.parents[1])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = json.loads(out.with_suffix(".json").read_text())["records"]
    errors = [r for r in records if r.get("error") or r.get("kind") in ("error", "skipped")]
    assert not errors, errors
    decode = {(r["variant"], r["batch"]): r for r in records if r["kind"] == "decode"}
    want = {(v, b) for v in ("base", "base-packed", "dense", "packed") for b in (1, 2)}
    assert set(decode) == want
    for r in decode.values():
        assert r["steps"] == 4 and r["step_ms"] > 0 and r["tokens_per_s"] > 0
    for kind in ("generate", "prefill"):
        assert {r["variant"] for r in records if r["kind"] == kind} == {"base", "base-packed", "dense", "packed"}
    md = out.with_suffix(".md").read_text()
    assert "| tiny | packed |" in md and "| tiny | dense |" in md
