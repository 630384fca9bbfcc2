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


def fake_decode(monkeypatch, tune, drift=None):
    """Stand-ins for the compiled decode loops: each `_decode_runner` call notes the block sizes in effect (what
    the loop would be compiled with) and returns a `run` whose 'seconds' are fixed per loop, times `drift(round)`
    when given (a machine that gets slower or faster between rounds); `median_run` returns what run returns."""
    rng = np.random.default_rng()
    compiled, fake, calls = [], {}, []

    def runner(model, cfg, batch, steps, args, r):
        bs = mp.BlockSizes.get_default()
        qkv = model.layers[0].self_attn.packed_qkv
        key = (batch, bs, "base" if qkv.gate is None else qkv.mode)
        compiled.append(key)
        sec = fake.setdefault(key, float(rng.uniform(0.01, 0.02)))

        def run():
            calls.append(key)
            return sec * (drift(len([c for c in calls if c == key]) - 1) if drift else 1.0)

        return run, 1.0

    monkeypatch.setattr(tune, "_decode_runner", runner)
    monkeypatch.setattr(tune, "median_run", lambda fn, repeats: fn())
    return compiled, fake, calls


def test_each_config_is_compiled_under_its_block_sizes(tmp_path, monkeypatch):
    tune = load()
    compiled, fake, calls = fake_decode(monkeypatch, tune)
    configs = [{}, {"routed_block_out": 64}, {"routed_splits": 1, "routed_block_cols": 16}]
    out = tmp_path / "tune"
    assert tune.main(["--shape", "tiny", "--batches", "1,3", "--steps", "5", "--out", str(out),
                      "--configs", json.dumps(configs)]) == 0
    assert mp.BlockSizes.get_default() == mp.BlockSizes()  # restored
    want = [mp.BlockSizes(**c) for c in configs]
    for batch in (1, 3):
        made = [bs for b, bs, _ in compiled if b == batch]
        assert made[0] == mp.BlockSizes() and made[1:] == want  # base-packed first (defaults), then each config
    assert [m for b, _, m in compiled if b == 1] == ["base"] + ["routed"] * 3  # packed base, then packed-routed
    for batch in (1, 3):  # an untimed pass, then one round: each compiled loop once, in order
        made = [c for c in compiled if c[0] == batch]
        assert [c for c in calls if c[0] == batch] == made * 2
    data = json.loads(out.with_suffix(".json").read_text())
    recs = [r for r in data["records"] if r["variant"] == "packed-routed"]
    assert [r["config"] for r in recs] == configs * 2
    for r in recs:
        sec = fake[(r["batch"], mp.BlockSizes(**r["config"]), "routed")]
        assert r["step_ms"] == pytest.approx(1e3 * sec / 4)
        assert r["ratio"] == pytest.approx(sec / fake[(r["batch"], mp.BlockSizes(), "base")])
    md = out.with_suffix(".md").read_text()
    for batch in (1, 3):
        rows = [line for line in md.split(f"## Batch {batch}")[1].split("##")[0].splitlines()
                if line.startswith("| `")]
        ms = [float(line.split("|")[2]) for line in rows]
        assert len(ms) == 3 and ms == sorted(ms)  # best first


def test_rounds_interleave_and_ratios_pair_within_a_round(tmp_path, monkeypatch):
    """With --rounds, every loop runs once per round (base first), and a configuration's ratio is the median of
    its per-round ratios: a machine that drifts between rounds leaves it unchanged."""
    tune = load()
    compiled, fake, calls = fake_decode(monkeypatch, tune, drift=lambda i: (9.0, 1.0, 1.3, 0.8, 1.1)[i])
    configs = [{}, {"routed_block_out": 64}]
    out = tmp_path / "tune"
    assert tune.main(["--shape", "tiny", "--batches", "2", "--steps", "5", "--rounds", "4", "--out", str(out),
                      "--configs", json.dumps(configs)]) == 0
    assert len(compiled) == 3 and calls == compiled * 5  # compiled once; an untimed pass (9.0), 4 timed rounds
    data = json.loads(out.with_suffix(".json").read_text())
    base = fake[(2, mp.BlockSizes(), "base")]
    for r in data["records"][1:]:
        sec = fake[(2, mp.BlockSizes(**r["config"]), "routed")]
        assert r["round_ms"] == pytest.approx([1e3 * sec * d / 4 for d in (1.0, 1.3, 0.8, 1.1)])
        assert r["step_ms"] == pytest.approx(1e3 * sec * 1.05 / 4)  # the median of four rounds
        for key in ("ratio", "ratio_min", "ratio_max"):  # the drift cancels within each round
            assert r[key] == pytest.approx(sec / base)
    assert "4 interleaved rounds" in out.with_suffix(".md").read_text()
    with pytest.raises(SystemExit):
        tune.main(["--shape", "tiny", "--out", str(tmp_path / "t"), "--rounds", "0"])


def test_a_configs_routing_options_are_in_effect_while_its_loop_compiles(tmp_path, monkeypatch):
    """`"routing"` in a configuration: its loop is compiled with those routing options (and its block sizes), the
    others with the model's own, which come back after each."""
    tune = load()
    seen = []

    def runner(model, cfg, batch, steps, args, r):
        qkv = model.layers[0].self_attn.packed_qkv
        if qkv.gate is not None or qkv.lora_b is not None:  # the MeteoRA model (the base has no experts)
            down = model.layers[-1].mlp.packed_down
            assert (down.top_k, down.forced_expert, down.adapters_enabled) == (
                qkv.top_k, qkv.forced_expert, qkv.adapters_enabled)  # every group alike
            seen.append((mp.BlockSizes.get_default(), qkv.top_k, qkv.forced_expert, qkv.adapters_enabled))
        return (lambda: 0.01), 1.0

    monkeypatch.setattr(tune, "_decode_runner", runner)
    monkeypatch.setattr(tune, "median_run", lambda fn, repeats: fn())
    configs = [{"routing": {"forced_expert": 3}}, {}, {"routing": {"top_k": 1}, "routed_block_out": 64},
               {"routing": {"adapters_enabled": False}}, {}]
    out = tmp_path / "tune"
    assert tune.main(["--shape", "tiny", "--batches", "1", "--steps", "5", "--top-k", "2", "--out", str(out),
                      "--configs", json.dumps(configs)]) == 0
    d = mp.BlockSizes()
    assert seen == [(d, 2, 3, True), (d, 2, None, True), (mp.BlockSizes(routed_block_out=64), 1, None, True),
                    (d, 2, None, False), (d, 2, None, True)]
    recs = json.loads(out.with_suffix(".json").read_text())["records"]
    assert [r["config"] for r in recs[1:]] == configs


def test_unpacked_mode_times_strategy_fused_next_to_the_unpacked_base(tmp_path, monkeypatch):
    from meteora_jax.meteora import MeteoraLinear
    from meteora_jax.packed import is_packed

    tune = load()
    seen = []

    def runner(model, cfg, batch, steps, args, r):
        attn = model.layers[0].self_attn
        seen.append((is_packed(model), type(attn.q_proj).__name__, getattr(attn.q_proj, "strategy", None)))
        return (lambda: 0.02 if isinstance(attn.q_proj, MeteoraLinear) else 0.01), 1.0

    monkeypatch.setattr(tune, "_decode_runner", runner)
    monkeypatch.setattr(tune, "median_run", lambda fn, repeats: fn())
    out = tmp_path / "tune"
    assert tune.main(["--shape", "tiny", "--batches", "1", "--steps", "5", "--mode", "unpacked", "--out", str(out),
                      "--configs", "[{}]"]) == 0
    assert seen == [(False, "Linear", None), (False, "MeteoraLinear", "fused")]
    recs = json.loads(out.with_suffix(".json").read_text())["records"]
    assert [r["variant"] for r in recs] == ["base", "fused"] and recs[1]["ratio"] == pytest.approx(2.0)
    md = out.with_suffix(".md").read_text()
    assert "unpacked, strategy fused" in md and "| config | ms per step | / base |" in md


def test_bad_configs_are_refused(tmp_path, capsys):
    tune = load()
    for bad, why in (('{"a": 1}', "expected a JSON list of objects"), ('[{"nope": 1}]', "unexpected keyword"),
                     ('[{"routing": {"strategy": "dense"}}]', "keys among"), ('[{"routing": 3}]', "keys among")):
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

    f = jax.jit(lambda x: x * mp.BlockSizes.get_default().routed_block_in)
    try:
        assert float(f(1.0)) == mp.BlockSizes().routed_block_in
        mp.set_default_block_sizes(mp.BlockSizes(routed_block_in=32))
        assert float(f(1.0)) == 32
    finally:
        mp.set_default_block_sizes(None)
    assert float(f(1.0)) == mp.BlockSizes().routed_block_in
