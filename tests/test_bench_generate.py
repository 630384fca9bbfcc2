"""experiments/bench_generate.py end to end on the CPU with the tiny shape: every JAX part it times (the decode loop
`generate` compiles, end-to-end `generate`, prefill) runs without error for the base, a strategy and a packed
variant, and the report has their rows. The benchmark records a failing part instead of stopping, so this is what
catches it drifting from `meteora_jax.generate`'s programs. The transformers + PEFT part runs on the tiny shape
too."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "bench_generate.py"


def test_jax_part_runs_every_variant(tmp_path):
    out = tmp_path / "gen"
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), "--shapes", "tiny", "--batches", "1,2", "--strategies",
           "dense,packed,packed-extended,packed-extended-lowgate", "--experts", "3", "--rank", "2", "--prompt", "8",
           "--steps", "4", "--prefill-len", "16", "--repeats", "1", "--parts", "jax", "--budget", "600",
           "--block-sizes", '{"routed_glu": true}']  # packed-extended decodes through the GLU expand
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=SCRIPT.parents[1])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.with_suffix(".json").read_text())
    records = res["records"]
    assert res["meta"]["args"]["block_sizes"] == '{"routed_glu": true}'
    errors = [r for r in records if r.get("error") or r.get("kind") in ("error", "skipped")]
    assert not errors, errors
    variants = {"base", "base-packed", "dense", "packed", "packed-extended", "packed-extended-lowgate"}
    decode = {(r["variant"], r["batch"]): r for r in records if r["kind"] == "decode"}
    assert set(decode) == {(v, b) for v in variants for b in (1, 2)}
    for r in decode.values():
        assert r["steps"] == 4 and r["step_ms"] > 0 and r["tokens_per_s"] > 0
    for kind in ("generate", "prefill"):
        assert {r["variant"] for r in records if r["kind"] == kind} == variants
    for r in records:
        if r["kind"] == "generate":  # generate()'s time split into prefill, the decode loop and the rest
            assert r["prefill_s"] > 0 and r["decode_s"] > 0 and 0 <= r["other_s"] < r["seconds"], r
            assert r["prefill_s"] + r["decode_s"] < r["seconds"] * 1.5, r
    md = out.with_suffix(".md").read_text()
    assert "decode ms per step, rest ms" in md
    assert "| tiny | packed |" in md and "| tiny | dense |" in md and "| tiny | packed-extended |" in md


def test_variant_blocks_apply_while_timing_that_variant_only():
    """`packed-extended-lowgate` is timed with `routed_z_low` on top of the defaults in effect (--block-sizes);
    the others, and everything after, with those defaults unchanged."""
    import importlib.util

    from kernels.meteora_pallas import BlockSizes, set_default_block_sizes

    spec = importlib.util.spec_from_file_location("bench_generate", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    set_default_block_sizes(BlockSizes(routed_glu=True))
    try:
        with bench.variant_blocks("packed-extended-lowgate"):
            assert BlockSizes.get_default() == BlockSizes(routed_glu=True, routed_z_low=True)
        assert BlockSizes.get_default() == BlockSizes(routed_glu=True)
        with bench.variant_blocks("packed-extended"):
            assert BlockSizes.get_default() == BlockSizes(routed_glu=True)
    finally:
        set_default_block_sizes(None)


def test_bad_block_sizes_are_refused_before_any_run(tmp_path):
    out = tmp_path / "gen"
    for bad in ('{"routed_nope": 1}', "[1]", "{"):
        proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--block-sizes", bad],
                              capture_output=True, text=True, timeout=300, cwd=SCRIPT.parents[1])
        assert proc.returncode == 2 and "--block-sizes: expected a JSON object of BlockSizes fields" in proc.stderr
    assert not list(tmp_path.iterdir())  # nothing written


def test_torch_part_runs_every_variant(tmp_path):
    """The transformers + PEFT part: `generate` with and without the LoRA, dynamic and static cache, each timed
    without error and producing the tokens asked for (the part asserts the output length)."""
    out = tmp_path / "gen"
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), "--shapes", "tiny", "--rank", "2", "--prompt", "8",
           "--steps", "3", "--eager-steps", "2", "--repeats", "1", "--parts", "torch", "--budget", "600"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=SCRIPT.parents[1])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = json.loads(out.with_suffix(".json").read_text())["records"]
    gen = {r["variant"]: r for r in records if r["kind"] == "hf_generate"}
    assert set(gen) == {"peft-dynamic", "peft-static", "hf-base-dynamic", "hf-base-static"}, records
    for variant, r in gen.items():
        assert "error" not in r, r
        assert r["new"] == (3 if variant.endswith("static") else 2)
        assert r["tokens_per_s"] == r["new"] / r["seconds"]


def test_end_to_end_targets_compare_within_one_run():
    """The issue wants ours and transformers `generate` measured in the same run: with two appended runs, the
    target lines pair the torch records with ours from their run, not with a later run's."""
    import importlib.util

    import numpy as np

    spec = importlib.util.spec_from_file_location("bench_generate", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rng = np.random.default_rng()
    first, later, static, eager = (float(x) for x in rng.uniform(10, 500, 4))
    records = [{"kind": "device", "part": "jax"},
               {"kind": "generate", "part": "jax", "shape": "tiny", "variant": "dense", "tokens_per_s": first},
               {"kind": "device", "part": "torch"},
               {"kind": "hf_generate", "part": "torch", "shape": "tiny", "variant": "peft-static",
                "tokens_per_s": static},
               {"kind": "hf_generate", "part": "torch", "shape": "tiny", "variant": "peft-dynamic",
                "tokens_per_s": eager},
               {"kind": "device", "part": "jax"},  # a second, appended run without a torch part
               {"kind": "generate", "part": "jax", "shape": "tiny", "variant": "dense", "tokens_per_s": later}]
    lines = bench.targets(records)
    assert len(lines) == 2
    assert f"{first:.1f} tokens/s vs transformers + PEFT peft-static {static:.1f}: {first / static:.1f}x" in lines[0]
    assert f"{first:.1f} tokens/s vs transformers + PEFT peft-dynamic {eager:.1f}: {first / eager:.1f}x" in lines[1]
    assert ("**met**" in lines[1]) == (first >= 10 * eager)
