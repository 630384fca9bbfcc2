"""experiments/probe_product.py on the CPU: its groups' matrices are the packed model's (mode `extended`), each
variant multiplies by what it claims, and a run writes a record for every group, variant and batch."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import one_layer_extended

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def probe():
    sys.path.insert(0, str(ROOT))
    from experiments import probe_product

    return probe_product


def test_group_dims_are_the_packed_models(probe):
    shape = dict(probe.SHAPES["smollm2"], num_hidden_layers=1, vocab_size=64)
    e, r = 5, 3
    packed = one_layer_extended(shape, e, r)
    for group, spans in probe.groups(shape).items():
        dims = probe.group_dims(shape, group, spans, e, r)
        proj = packed[group]
        assert proj.kernel.shape == (dims["d_in"], dims["ldz"]), group
        assert dims["ld"] == sum(proj.sizes) and dims["need"] <= dims["ldz"] < dims["need"] + 128, group


def test_variants_multiply_by_what_they_claim(probe):
    rng = np.random.default_rng()
    dims = {"d_in": 32, "ld": 48, "need": 70, "ldz": 128}
    z = jnp.asarray(rng.standard_normal((32, 128)), jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((3, 32)), jnp.bfloat16)
    full = np.asarray(x, np.float64) @ np.asarray(z, np.float64)
    bf, f32 = jnp.bfloat16, jnp.float32
    want = {  # (columns of z, result dtype) of each output
        "base-bf16": [((0, 48), bf)], "base-f32": [((0, 48), f32)], "ext-f32": [((0, 128), f32)],
        "ext-bf16": [((0, 128), bf)], "ext-f32-nopad": [((0, 70), f32)], "split": [((0, 48), bf), ((48, 128), f32)]}
    assert sorted(want) == sorted(probe.VARIANTS)
    for name, parts in want.items():
        outs = probe.product_fn(name)(x, probe.variant_weights(name, z, dims))
        assert len(outs) == len(parts), name
        for out, ((lo, hi), dtype) in zip(outs, parts, strict=True):
            assert out.dtype == dtype and out.shape == (3, hi - lo), name
            tol = 1e-2 if dtype == bf else 1e-5  # a bf16 result is rounded (8 bits)
            np.testing.assert_allclose(np.asarray(out, np.float64), full[:, lo:hi], rtol=tol,
                                       atol=tol * np.abs(full).max(), err_msg=name)


def test_chain_keeps_every_product(probe):
    """The products chained as `run` times them (probe_expand's chain, one product per layer's weights)."""
    from experiments import probe_expand

    x = jnp.ones((2, 8), jnp.float32)
    layers = [(jnp.full((8, 4), float(i), jnp.float32),) for i in range(3)]
    fn = probe.product_fn("ext-f32")
    chain = jax.jit(probe_expand.chain_fn(lambda w: fn(x, w)))
    outs = chain(layers)
    assert [float(o[0][0, 0]) for o in outs] == [0.0, 8.0, 16.0]
    assert chain.lower(layers).as_text().count("optimization_barrier") == 2



def test_run_writes_every_group_variant_and_batch(probe, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["probe_product.py"])
    out = tmp_path / "probe"
    result = probe.main(["--shape", "tiny", "--layers", "2", "--repeats", "1", "--batches", "1,3", "--experts", "4",
                         "--rank", "2", "--out", str(out)])
    recs = result["records"]
    assert [(r["group"], r["variant"], r["batch"]) for r in recs] == [
        (g, v, b) for g in ("qkv", "o", "gate_up", "down") for v in probe.VARIANTS for b in (1, 3)]
    for r in recs:
        assert "error" not in r, r
        assert r["us_per_product"] > 0 and r["layers"] == 2 and "over_base" in r
    assert json.loads(out.with_suffix(".json").read_text()) == json.loads(json.dumps(result))
    assert "| qkv | 1 |" in out.with_suffix(".md").read_text()
    with pytest.raises(SystemExit):
        probe.main(["--variants", "nope"])
