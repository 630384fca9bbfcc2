"""experiments/probe_expand.py on the CPU: its groups and z layout are the packed model's (mode `extended`), its own
Pallas kernels compute what they claim (interpret mode), the chain keeps every call and its results, and a run
writes a record for every group and variant."""

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
    from experiments import probe_expand

    return probe_expand


@pytest.mark.parametrize("shape", ("tiny", "smollm2"))
def test_groups_and_z_layout_are_the_packed_models(probe, shape):
    e, r = 5, 3
    packed = one_layer_extended(probe.SHAPES[shape], e, r)
    want = probe.groups(probe.SHAPES[shape])
    assert list(want) == list(packed)
    for name, proj in packed.items():
        assert proj.spans == want[name], name
        assert proj.gate_parts == 2  # bf16: the f32 gate as hi + lo
        ld = sum(s for _, s in want[name])
        assert proj.kernel.shape[1] == probe.ldz_of(ld, len(want[name]), e, r), name


def test_probe_kernels_and_chain(probe):
    rng = np.random.default_rng()
    n, ld = 3, 200
    zs = [jnp.asarray(rng.standard_normal((n, 328)), jnp.float32) for _ in range(4)]
    copy = probe.pallas_copy(zs[0], ld, 64, 4, interpret=True)
    np.testing.assert_array_equal(np.asarray(copy), np.asarray(zs[0][:, :ld].astype(jnp.bfloat16)))
    assert float(probe.pallas_empty(zs[1], interpret=True)[0]) == float(zs[1][0, 0])
    fn = lambda z: z[:, :ld].astype(jnp.bfloat16) * 2  # noqa: E731
    chain = jax.jit(probe.chain_fn(fn))
    outs = chain(zs)
    assert len(outs) == len(zs)
    for got, z in zip(outs, zs, strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(fn(z)))
    assert chain.lower(zs).as_text().count("optimization_barrier") == len(zs) - 1


def test_run_writes_every_group_and_variant(probe, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["probe_expand.py"])
    out = tmp_path / "probe"
    result = probe.main(["--shape", "tiny", "--launches", "2", "--repeats", "1", "--experts", "4", "--rank", "2",
                         "--out", str(out)])
    recs = result["records"]
    assert [(r["group"], r["variant"]) for r in recs] == [(g, v) for g in ("qkv", "o", "gate_up", "down")
                                                        for v in probe.VARIANTS
                                                        if g == "gate_up" or v not in probe.GATE_UP_ONLY]
    for r in recs:
        assert "error" not in r, r
        assert r["us_per_launch"] > 0 and r["launches"] == 2
    assert json.loads(out.with_suffix(".json").read_text()) == json.loads(json.dumps(result))
    md = out.with_suffix(".md").read_text()
    for g in ("qkv", "o", "gate_up", "down"):
        assert f"| {g} |" in md
    with pytest.raises(SystemExit):
        probe.main(["--variants", "xla-copy,nope"])


def test_gate_up_variants_compute_the_mlp_activation(probe):
    """expand-act and expand-glu give silu(gate) * up of the same routed output (bf16 roundings apart)."""
    spans = probe.groups(probe.SHAPES["tiny"])["gate_up"]
    zs, b, scaling = probe.group_inputs(spans, 3, 1, e=4, r=2, seed=int(np.random.default_rng().integers(1 << 30)))
    act, glu = (np.asarray(probe.variant_fn(v, spans, b, scaling, k=2, interpret=True)(zs[0]), np.float32)
                for v in ("expand-act", "expand-glu"))
    y = np.asarray(probe.variant_fn("expand-topk", spans, b, scaling, k=2, interpret=True)(zs[0]), np.float32)
    half = y.shape[1] // 2
    want = y[:, :half] / (1 + np.exp(-y[:, :half])) * y[:, half:]
    assert act.shape == glu.shape == want.shape
    scale = np.abs(want).max()
    assert np.abs(act - want).max() <= 2e-2 * scale and np.abs(glu - want).max() <= 2e-2 * scale


def test_dense_b_variant_equals_topk(probe):
    """expand-dense-b reads B's unpicked rows too, but their coefficients are zero: the same output as
    expand-topk, to the f32 accumulation order."""
    spans = probe.groups(probe.SHAPES["tiny"])["qkv"]
    zs, b, scaling = probe.group_inputs(spans, 3, 1, e=4, r=2, seed=int(np.random.default_rng().integers(1 << 30)))
    topk, dense = (np.asarray(probe.variant_fn(v, spans, b, scaling, k=2, interpret=True)(zs[0]), np.float32)
                   for v in ("expand-topk", "expand-dense-b"))
    base = np.asarray(zs[0][:, :topk.shape[1]].astype(jnp.bfloat16), np.float32)
    assert np.abs(topk - base).max() > 0  # the adapter term is there
    np.testing.assert_allclose(dense, topk, rtol=1e-2, atol=1e-2 * np.abs(topk).max())


def test_probe_kernels_lower_to_triton(probe):
    """The probe's own kernels go through the Triton lowering (what a GPU run compiles), checked here on the CPU."""
    spans = probe.groups(probe.SHAPES["smollm2"])["gate_up"]
    zs, b, scaling = probe.group_inputs(spans, 1, 1, e=28, r=8, seed=0)
    z = jax.ShapeDtypeStruct(zs[0].shape, zs[0].dtype)
    kernels = {"pallas-empty": "probe_empty", "pallas-copy": "probe_copy", "expand-forced": "meteora_routed_expand_z",
               "expand-topk": "meteora_routed_expand_z", "expand-dense-b": "meteora_routed_expand_z",
               "expand-act": "meteora_routed_expand_z",
               "expand-glu": "meteora_routed_glu_z"}
    assert set(kernels) == set(probe.VARIANTS) - {"xla-copy"}
    for name, kernel in kernels.items():
        fn = probe.variant_fn(name, spans, b, scaling, k=2, interpret=False)
        text = jax.jit(fn).trace(z).lower(lowering_platforms=("cuda",)).as_text()
        assert f'name = "{kernel}"' in text, name
