"""The MeteoRA linear: every strategy equals a float64 NumPy version of the formula, for both routings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from meteora_jax.meteora import MeteoraConfig, MeteoraLinear, route, set_routing
from meteora_jax.strategies import STRATEGIES

REFERENCE_STRATEGIES = ("loop", "gather", "dense")


def np_route(logits, k, t, routing):
    """float64 routing: (weights [N, k], experts [N, k])."""
    logits = logits.astype(np.float64)
    if routing == "topk_softmax":
        idx = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
        vals = np.take_along_axis(logits, idx, -1) / t
        w = np.exp(vals - vals.max(-1, keepdims=True))
        w = w / w.sum(-1, keepdims=True) if k > 1 else np.ones_like(w)
    else:
        p = np.exp(logits / t - (logits / t).max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        idx = np.argsort(-p, axis=-1, kind="stable")[:, :k]
        w = np.take_along_axis(p, idx, -1)
        w /= w.sum(-1, keepdims=True)
    return w, idx


def np_meteora(x, w_base, gate, a, b, s, k, t, routing):
    x, w_base, gate, a, b, s = (np.asarray(v, np.float64) for v in (x, w_base, gate, a, b, s))
    wts, idx = np_route(x @ gate, k, t, routing)
    y = x @ w_base
    for n in range(x.shape[0]):
        for j in range(k):
            e = idx[n, j]
            y[n] += wts[n, j] * s[e] * (x[n] @ a[e]) @ b[e]
    return y


CASES = [  # (E, r, k, N, in, out)
    (4, 4, 1, 7, 16, 24),
    (4, 8, 2, 13, 32, 16),
    (8, 2, 2, 5, 24, 40),
    (3, 16, 3, 9, 8, 8),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("routing", ["topk_softmax", "softmax_topk"])
def test_strategies_match_float64_formula(case, routing):
    e, r, k, n, d_in, d_out = case
    rng = np.random.default_rng([CASES.index(case), routing == "softmax_topk"])
    t = float(rng.uniform(0.5, 3.0))
    cfg = MeteoraConfig(expert_names=tuple(f"x{i}" for i in range(e)), rank=r, top_k=k, temperature=t,
                        routing=routing)
    lin = MeteoraLinear(d_in, d_out, use_bias=False, config=cfg, dtype="float32", param_dtype="float32",
                        rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    lin.scaling.set_value(jnp.asarray(rng.uniform(0.5, 2.0, e), jnp.float32))
    x = jnp.asarray(rng.normal(size=(2, n, d_in)), jnp.float32)
    ref = np_meteora(np.asarray(x).reshape(-1, d_in), lin.kernel[...], lin.gate[...], lin.lora_a[...],
                     lin.lora_b[...], lin.scaling[...], k, t, routing).reshape(2, n, d_out)
    outs = {}
    for name in REFERENCE_STRATEGIES:
        lin.set_routing(cfg.replace(strategy=name))
        y, routing_info = jax.jit(lambda m, v: m(v))(lin, x)
        outs[name] = np.asarray(y)
        np.testing.assert_allclose(outs[name], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max(), err_msg=name)
        assert routing_info.logits.shape == (2, n, e)
        assert routing_info.experts.shape == routing_info.weights.shape == (2, n, k)
        np.testing.assert_allclose(np.asarray(routing_info.weights).sum(-1), 1.0, rtol=1e-6)
    for name in REFERENCE_STRATEGIES[1:]:  # the strategies agree to float32 rounding
        np.testing.assert_allclose(outs[name], outs["loop"], rtol=2e-6, atol=2e-6 * np.abs(ref).max())


def test_route_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 6)).astype(np.float32)
    for routing in ("topk_softmax", "softmax_topk"):
        for k in (1, 2, 4):
            w, idx = route(jnp.asarray(logits), k, 2.0, routing)
            rw, ridx = np_route(logits, k, 2.0, routing)
            np.testing.assert_array_equal(np.asarray(idx), ridx)
            np.testing.assert_allclose(np.asarray(w), rw, rtol=1e-6)


def test_forced_expert_and_adapters_off():
    rng = np.random.default_rng(1)
    cfg = MeteoraConfig(expert_names=("a", "b", "c"), rank=4)
    lin = MeteoraLinear(16, 8, use_bias=True, config=cfg, dtype="float32", param_dtype="float32", rngs=nnx.Rngs(3))
    lin.bias.set_value(jnp.asarray(rng.normal(size=8), jnp.float32))
    lin.scaling.set_value(jnp.asarray([0.5, 1.5, 3.0], jnp.float32))
    x = jnp.asarray(rng.normal(size=(5, 16)), jnp.float32)
    base = np.asarray(x, np.float64) @ np.asarray(lin.kernel[...], np.float64) + np.asarray(lin.bias[...])
    for e in range(3):
        lin.set_routing(cfg.replace(forced_expert=e))
        y, info = lin(x)
        a, b = np.asarray(lin.lora_a[...][e], np.float64), np.asarray(lin.lora_b[...][e], np.float64)
        ref = base + lin.scaling[...][e] * (np.asarray(x, np.float64) @ a) @ b
        np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
        assert (np.asarray(info.experts) == e).all()
    lin.set_routing(cfg.replace(adapters_enabled=False))
    y, info = lin(x)
    assert info is None
    np.testing.assert_array_equal(np.asarray(y), np.asarray(lin.base(x)))


def test_bad_routing_options_are_refused():
    with pytest.raises(ValueError, match="top_k must be in 1..3"):
        MeteoraConfig(expert_names=("a", "b", "c"), rank=4, top_k=4)
    with pytest.raises(ValueError, match="routing must be one of"):
        MeteoraConfig(expert_names=("a",), rank=4, top_k=1, routing="argmax")
    with pytest.raises(ValueError, match="expert_names must be non-empty and unique"):
        MeteoraConfig(expert_names=("a", "a"), rank=4)
    with pytest.raises(ValueError, match="forced_expert must be in 0..1"):
        MeteoraConfig(expert_names=("a", "b"), rank=4, forced_expert=2)
    from meteora_jax.config import LlamaConfig
    from meteora_jax.meteora import MeteoraLlama

    c = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=2, head_dim=4)
    m = MeteoraLlama(c, MeteoraConfig(expert_names=("a", "b"), rank=2), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="strategy must be one of"):
        set_routing(m, strategy="magic")
    with pytest.raises(ValueError, match="fix parameter shapes"):
        set_routing(m, rank=4)
    assert set(REFERENCE_STRATEGIES) <= set(STRATEGIES)
