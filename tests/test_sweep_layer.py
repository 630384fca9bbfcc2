"""experiments/sweep_layer.py on the CPU (tiny dimensions): every strategy of every shape is timed on the same
layers, ratios are to that shape's and T's own base, and the report names the fastest MeteoRA strategy."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_sweep_records_and_report(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from experiments import sweep_layer

    seen = []
    real = sweep_layer.bench_jax

    def spy(name, layers):
        seen.append((name, layers[0]["x"].shape, layers[0]["A"].shape))
        return real(name, layers)

    monkeypatch.setattr(sweep_layer, "bench_jax", spy)
    monkeypatch.setattr(sys, "argv", ["sweep_layer.py"])
    records = sweep_layer.main(["--out", str(tmp_path), "--dim-scale", "64", "--shapes", "3", "--tokens", "5",
                                "--jax", "base,dense,fused-linear", "--torch", ""])
    shapes = [sweep_layer.SHAPES[i] for i in range(3)]
    # every shape: base first, then each strategy, on x [5, in] and A [E, in, r] of that shape
    want = [(n, (5, s.d // 64), (s.e, s.d // 64, s.r)) for s in shapes for n in ("base", "dense", "fused-linear")]
    assert seen == want
    assert len(records) == 9
    for r in records:
        base = next(b for b in records if b["shape"] == r["shape"] and b["T"] == r["T"] and b["name"] == "jax base")
        assert abs(r["ratio"] - r["ms"] / base["ms"]) < 1e-9
    saved = json.loads((tmp_path / "layer_sweep.json").read_text())
    assert saved["records"] == records
    md = (tmp_path / "layer_sweep.md").read_text()
    for s in shapes:
        label = sweep_layer.dataclasses.replace(s, d=s.d // 64, dout=s.dout // 64).label()
        row = next(line for line in md.splitlines() if line.startswith(f"| {label} |"))
        best = min((r for r in records if r["shape"] == label and r["name"] != "jax base"), key=lambda r: r["ms"])
        assert row.rstrip(" |").endswith(f"{best['name'][4:]} {best['ratio']:.2f}x")
