"""The benchmarks compare like with like: every layer `experiments/bench_layer.py` (and `sweep_layer.py`, which
shares its PyTorch layers) times, ours and the PyTorch references, computes the same MeteoRA layer as a float64
formula on the same weights and routing; `experiments/bench_train.py`'s PyTorch MoE-LoRA forward (the paper's
bmm-torch, with its own gate and top-k) equals our `MeteoraLinear`; and its whole run writes its records. CPU,
small sizes, fp32 (the Pallas strategies in interpret mode)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]

SIZES = dict(d=48, dout=40, e=6, r=4, k=2, layers=2)
JAX_LAYERS = ("base", "base-t", "lora", "loop", "gather", "dense", "fused", "fused-linear", "fused-add", "fused-gemv",
              "triton")
TORCH_LAYERS = ("base", "lora", "loop-original", "bmm-torch")


@pytest.fixture(scope="module")
def bench_layer():
    sys.path.insert(0, str(ROOT))
    from experiments import bench_layer as mod

    return mod


def want(name: str, p: dict, x: np.ndarray) -> np.ndarray:
    """float64: x @ W plus, per token, sum over its k slots of weight x scaling[e] x (x @ A[e]) @ B[e] (MeteoRA);
    `lora`: expert 0 alone with its scaling on every token; `base*`: x @ W."""
    x = x.astype(np.float64)
    f64 = {k: np.asarray(v, np.float64) for k, v in p.items() if k in ("W", "A", "B", "s", "w")}
    y = x @ f64["W"]
    if name.startswith("base"):
        return y
    if name == "lora":
        return y + f64["s"][0] * (x @ f64["A"][0]) @ f64["B"][0]
    for slot in range(p["e"].shape[1]):
        e = p["e"][:, slot]
        h = np.einsum("td,tdr->tr", x, f64["A"][e])
        y = y + (f64["w"][:, slot] * f64["s"][e])[:, None] * np.einsum("tr,tro->to", h, f64["B"][e])
    return y


@pytest.mark.parametrize("t", (5, 21))
def test_bench_layer_jax_layers(bench_layer, t):
    layers, x = bench_layer.make_layers(t, seed=t, **SIZES)
    params, xj = bench_layer.to_jax(layers, x, dtype=jnp.float32)
    for name in JAX_LAYERS:
        if name == "triton" and importlib.util.find_spec("jax_triton") is None:
            continue
        if name == "fused-gemv" and t > bench_layer.mp.BlockSizes().gemv_max_tokens:
            continue
        fn = jax.jit(bench_layer.jax_layer(name))
        for p, q in zip(params, layers, strict=True):
            np.testing.assert_allclose(np.asarray(fn(xj, p)), want(name, q, x), rtol=1e-4, atol=1e-4,
                                       err_msg=f"bench_layer jax {name}, T = {t}")


@pytest.mark.parametrize("t", (5, 21))
def test_bench_layer_torch_layers(bench_layer, t):
    layers, x = bench_layer.make_layers(t, seed=100 + t, **SIZES)
    tparams, tx = bench_layer.torch_layers(layers, x, device="cpu", dtype="float32")
    for name in TORCH_LAYERS:
        fn = bench_layer.torch_layer(name)
        for p, q in zip(tparams, layers, strict=True):
            with torch.no_grad():
                got = fn(tx, p).numpy()
            np.testing.assert_allclose(got, want(name, q, x), rtol=1e-4, atol=1e-4,
                                       err_msg=f"bench_layer torch {name}, T = {t}")


def test_bench_layer_routing_is_a_top_k_softmax(bench_layer):
    """Each token's k experts are distinct and its weights are positive and sum to 1 (as a top-k softmax's)."""
    layers, _ = bench_layer.make_layers(9, seed=3, **SIZES)
    for p in layers:
        assert p["e"].shape == (9, SIZES["k"]) and p["e"].min() >= 0 and p["e"].max() < SIZES["e"]
        assert all(len(set(row)) == SIZES["k"] for row in p["e"].tolist())
        assert (p["w"] > 0).all()
        np.testing.assert_allclose(p["w"].sum(1), 1.0, rtol=1e-6)


@pytest.fixture(scope="module")
def bench_train():
    sys.path.insert(0, str(ROOT))
    from experiments import bench_train as mod

    return mod


@pytest.mark.parametrize(("top_k", "temperature"), ((2, 1.0), (3, 0.5), (1, 1.0)))
def test_bench_train_torch_forward_equals_meteora_linear(bench_train, top_k, temperature):
    from flax import nnx

    from meteora_jax.meteora import MeteoraConfig, MeteoraLinear

    d, o, e, r, n = 32, 24, 5, 4, 11
    cfg = MeteoraConfig(expert_names=tuple(f"e{i}" for i in range(e)), rank=r, top_k=top_k, temperature=temperature,
                        strategy="gather")
    lin = MeteoraLinear(d, o, use_bias=False, config=cfg, dtype="float32", param_dtype="float32",
                        rngs=nnx.Rngs(top_k))
    rng = np.random.default_rng(top_k)
    lin.scaling.value = jnp.asarray(rng.uniform(0.5, 2.0, e), jnp.float32)
    x = rng.standard_normal((3, n // 3 + 1, d)).astype(np.float32)
    y, routing = lin(jnp.asarray(x))

    tt = lambda v: torch.tensor(np.asarray(v))  # noqa: E731
    base = torch.nn.Linear(d, o, bias=False)
    gate = torch.nn.Linear(d, e, bias=False)
    with torch.no_grad():
        base.weight.copy_(tt(lin.kernel[...]).T)
        gate.weight.copy_(tt(lin.gate[...]).T)
        got, logits = bench_train.moe_lora_bmm(tt(x), base, gate, tt(lin.lora_a[...]), tt(lin.lora_b[...]),
                                               tt(lin.scaling[...]), top_k, temperature)
    np.testing.assert_allclose(logits.numpy(), np.asarray(routing.logits).reshape(-1, e), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.numpy(), np.asarray(y), rtol=1e-5, atol=1e-5)


def test_bench_train_runs_and_writes(bench_train, tmp_path, monkeypatch):
    """The whole benchmark on the tiny shape: our strategy and the torch reference both measured (no error
    records), ratios to the torch row, and the JSON (as printed) and markdown written."""
    monkeypatch.setattr("sys.argv", ["bench_train.py"])
    out = tmp_path / "train"
    result = bench_train.main(["--shapes", "tiny", "--batch", "2", "--seq", "16", "--steps", "1", "--experts", "4",
                               "--strategies", "dense", "--out", str(out)])
    rows = result["rows"]
    assert [r["impl"] for r in rows] == ["jax-dense", "torch-bmm (reference)"]
    for r in rows:
        assert "error" not in r, r
        assert r["step_s"] > 0 and np.isfinite(r["loss"])
        assert r["tokens_per_s"] == pytest.approx(2 * 16 / r["step_s"])
        assert r["vs_torch"] == pytest.approx(r["tokens_per_s"] / rows[-1]["tokens_per_s"])
    assert json.loads(out.with_suffix(".json").read_text()) == json.loads(json.dumps(result))
    md = out.with_suffix(".md").read_text()
    assert all(f"| {r['impl']} | {r['tokens_per_s']:.0f} |" in md for r in rows)
    assert not list(tmp_path.glob("*.tmp"))
