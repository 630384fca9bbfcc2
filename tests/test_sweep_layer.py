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
                                "--jax", "base,dense,fused-linear", "--torch", "", "--train", "base,dense",
                                "--train-tokens", "5,3"])
    shapes = [sweep_layer.SHAPES[i] for i in range(3)]
    # every shape: base first, then each strategy, on x [5, in] and A [E, in, r] of that shape
    want = [(n, (5, s.d // 64), (s.e, s.d // 64, s.r)) for s in shapes for n in ("base", "dense", "fused-linear")]
    assert seen == want
    fwd = [r for r in records if r["kind"] == "fwd"]
    train = [r for r in records if r["kind"] == "train"]
    assert len(fwd) == 9 and {r["T"] for r in fwd} == {5}
    # training steps at both of their T, for every shape: base and dense
    assert sorted((r["shape"], r["T"], r["name"]) for r in train) == sorted(
        (sweep_layer.dataclasses.replace(s, d=s.d // 64, dout=s.dout // 64).label(), t, n)
        for s in shapes for t in (3, 5) for n in ("jax base", "jax dense"))
    for r in records:
        base = next(b for b in records if b["shape"] == r["shape"] and b["T"] == r["T"] and b["name"] == "jax base"
                    and b["kind"] == r["kind"])
        assert abs(r["ratio"] - r["ms"] / base["ms"]) < 1e-9
    for r in train:  # bwd/fwd against the same strategy's forward where that was timed (T = 5), else none
        f = [q for q in fwd if (q["shape"], q["T"], q["name"]) == (r["shape"], r["T"], r["name"])]
        if f:
            assert abs(r["bwd_over_fwd"] - r["ms"] / f[0]["ms"]) < 1e-9
        else:
            assert r["T"] == 3 and r["bwd_over_fwd"] is None
    saved = json.loads((tmp_path / "layer_sweep.json").read_text())
    assert saved["records"] == records
    md = (tmp_path / "layer_sweep.md").read_text()
    assert "## Backward" in md and md.index("## Forward, T = 5") < md.index("## Backward")
    md = md[:md.index("## Backward")]
    for s in shapes:
        label = sweep_layer.dataclasses.replace(s, d=s.d // 64, dout=s.dout // 64).label()
        row = next(line for line in md.splitlines() if line.startswith(f"| {label} |"))
        best = min((r for r in fwd if r["shape"] == label and r["name"] != "jax base"), key=lambda r: r["ms"])
        assert row.rstrip(" |").endswith(f"{best['name'][4:]} {best['ratio']:.2f}x")

    # --append: a later run of some strategies replaces those records and keeps the rest
    first = str(tmp_path / "layer_sweep.json")
    again = sweep_layer.main(["--out", str(tmp_path / "b"), "--dim-scale", "64", "--shapes", "1", "--tokens", "5",
                              "--jax", "base,gather", "--torch", "", "--train", "", "--append", first])
    merged = json.loads((tmp_path / "b" / "layer_sweep.json").read_text())
    key = lambda r: (r["kind"], r["shape"], r["T"], r["name"])  # noqa: E731
    assert {key(r) for r in again} == {("fwd", shapes[0].label().replace("4096", "64"), 5, n)
                                       for n in ("jax base", "jax gather")}
    assert sorted(map(key, merged["records"])) == sorted({key(r) for r in records} | {key(r) for r in again})
    new_base = next(r for r in again if r["name"] == "jax base")
    for r in merged["records"]:
        src = next(q for q in (again if key(r) in {key(q) for q in again} else records) if key(q) == key(r))
        assert r["ms"] == src["ms"]
        if r["kind"] == "fwd" and r["shape"] == new_base["shape"]:  # ratios are to the base the report shows
            assert abs(r["ratio"] - r["ms"] / new_base["ms"]) < 1e-9
        else:
            assert abs(r["ratio"] - src["ratio"]) < 1e-9
    assert merged["meta"]["earlier_commands"] == [saved["meta"]["command"]]
