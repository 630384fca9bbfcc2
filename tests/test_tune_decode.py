"""experiments/tune_decode.py: each configuration is in effect (and only it) while its decode step is timed, the
defaults come back afterwards, bad configurations are refused, and the report ranks what was measured."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from kernels import meteora_pallas as mp

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "tune_decode.py"


def load():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("tune_decode", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_config_is_timed_under_its_block_sizes(tmp_path, monkeypatch):
    tune = load()
    rng = np.random.default_rng()
    seen, fake = [], {}

    def fake_time(model, cfg, batch, steps, args, r):  # what the decode loop would trace with
        bs = mp.BlockSizes.get_default()
        qkv = model.layers[0].self_attn.packed_qkv
        seen.append((batch, bs, "base" if qkv.gate is None else qkv.mode))
        sec = float(rng.uniform(0.01, 0.02))
        fake[(batch, bs)] = sec
        return sec, 1.0

    monkeypatch.setattr(tune, "_time_decode", fake_time)
    configs = [{}, {"routed_block_out": 64}, {"routed_splits": 1, "routed_block_cols": 16}]
    out = tmp_path / "tune"
    assert tune.main(["--shape", "tiny", "--batches", "1,3", "--steps", "5", "--out", str(out),
                      "--configs", json.dumps(configs)]) == 0
    assert mp.BlockSizes.get_default() == mp.BlockSizes()  # restored
    want = [mp.BlockSizes(**c) for c in configs]
    for batch in (1, 3):
        timed = [bs for b, bs, _ in seen if b == batch]
        assert timed[0] == mp.BlockSizes() and timed[1:] == want  # base-packed first (defaults), then each config
    assert [m for b, _, m in seen if b == 1] == ["base"] + ["routed"] * 3  # packed base, then packed-routed
    data = json.loads(out.with_suffix(".json").read_text())
    recs = [r for r in data["records"] if r["variant"] == "packed-routed"]
    assert [r["config"] for r in recs] == configs * 2
    for r in recs:
        assert r["step_ms"] == pytest.approx(1e3 * fake[(r["batch"], mp.BlockSizes(**r["config"]))] / 4)
    md = out.with_suffix(".md").read_text()
    for batch in (1, 3):
        rows = [line for line in md.split(f"## Batch {batch}")[1].split("##")[0].splitlines()
                if line.startswith("| `")]
        ms = [float(line.split("|")[2]) for line in rows]
        assert len(ms) == 3 and ms == sorted(ms)  # best first


def test_bad_configs_are_refused(tmp_path, capsys):
    tune = load()
    for bad, why in (('{"a": 1}', "expected a JSON list of objects"), ('[{"nope": 1}]', "unexpected keyword")):
        with pytest.raises(SystemExit):
            tune.main(["--shape", "tiny", "--out", str(tmp_path / "t"), "--configs", bad])
        assert why in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written


def test_set_default_block_sizes_refuses_other_types():
    with pytest.raises(TypeError, match="expected a BlockSizes or None, got dict"):
        mp.set_default_block_sizes({"routed_block_out": 64})


def test_changing_the_defaults_retraces_compiled_functions():
    """Block sizes are read at trace time; a function compiled before a change must not keep the old ones."""
    import jax

    f = jax.jit(lambda x: x * mp.BlockSizes.get_default().routed_block_out)
    try:
        assert float(f(1.0)) == mp.BlockSizes().routed_block_out
        mp.set_default_block_sizes(mp.BlockSizes(routed_block_out=32))
        assert float(f(1.0)) == 32
    finally:
        mp.set_default_block_sizes(None)
    assert float(f(1.0)) == mp.BlockSizes().routed_block_out
