"""Packed projections (meteora_jax.packed) against the unpacked model with the `loop` strategy, transformers,
and transformers + PEFT `generate`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import hf_logits, left_padded_batch
from flax import nnx
from test_generate import PROMPTS, hf_generate, peft_tiny, random_meteora

from convert.hf_llama import load_hf_llama
from meteora_jax import checkpoint
from meteora_jax import generate as gen
from meteora_jax.api import load_model
from meteora_jax.config import LlamaConfig
from meteora_jax.llama import TARGET_MODULES, Linear, Llama
from meteora_jax.meteora import MeteoraConfig, MeteoraLlama, set_routing
from meteora_jax.packed import PackedProjection, is_packed, pack_projections, packed_projections


def copy(model):
    """An independent module graph over the same arrays (packing one leaves the other as it was)."""
    return nnx.merge(*nnx.split(model))


def assert_same_routing(aux_ref, aux, modules):
    assert sorted(aux) == sorted(modules)
    for m in modules:
        np.testing.assert_array_equal(np.asarray(aux[m].experts), np.asarray(aux_ref[m].experts), err_msg=m)
        np.testing.assert_allclose(aux[m].weights, aux_ref[m].weights, rtol=1e-5, atol=1e-6, err_msg=m)
        np.testing.assert_allclose(aux[m].logits, aux_ref[m].logits, rtol=1e-5, atol=1e-5, err_msg=m)


CASES = [
    dict(top_k=2, temperature=2.0, options=True),
    dict(top_k=1),
    dict(top_k=3, routing="softmax_topk", temperature=0.7),
    dict(top_k=2, target_modules=("q_proj", "v_proj", "down_proj"), bias=True),
    dict(top_k=2, target_modules=("k_proj", "gate_proj", "o_proj"), rank=5, experts=6),
    dict(top_k=2, temperature=2.0, mode="split", options=True),  # the base product and the expand apart
    dict(top_k=3, target_modules=("q_proj", "k_proj", "up_proj", "down_proj"), bias=True, rank=5, mode="split"),
    # routed: 27 tokens take the dense math; 8 tokens (<= routed_max_tokens) the routed kernels, interpret mode
    dict(top_k=2, temperature=2.0, mode="routed", options=True),
    dict(top_k=2, temperature=2.0, mode="routed", lengths=(4, 2)),
    dict(top_k=3, routing="softmax_topk", temperature=0.7, mode="routed", lengths=(4, 3)),
    dict(top_k=3, target_modules=("q_proj", "v_proj", "up_proj", "down_proj"), bias=True, rank=5, experts=6,
         mode="routed", lengths=(4, 1)),
    # extended: one product x @ [W | G | A]; 27 tokens take the dense math on its columns, 8 tokens the expand kernel
    dict(top_k=2, temperature=2.0, mode="extended", options=True),
    dict(top_k=2, temperature=2.0, mode="extended", lengths=(4, 2)),
    dict(top_k=3, routing="softmax_topk", temperature=0.7, mode="extended", lengths=(4, 3)),
    dict(top_k=3, target_modules=("q_proj", "v_proj", "up_proj", "down_proj"), bias=True, rank=5, experts=6,
         mode="extended", lengths=(4, 1)),
    dict(top_k=2, target_modules=("k_proj", "gate_proj", "o_proj"), rank=5, experts=6, mode="extended"),
    dict(top_k=3, target_modules=("q_proj", "v_proj", "gate_proj", "up_proj", "o_proj"), bias=True, rank=5,
         experts=6, mode="extended", lengths=(3, 2)),
    # extended with BlockSizes.routed_glu: gate/up's decode launch writes silu(gate) * up (where both members have
    # experts and there is no bias; else the activation runs after it)
    dict(top_k=2, temperature=2.0, mode="extended", lengths=(4, 2), blocks=dict(routed_glu=True), options=True),
    dict(top_k=2, target_modules=("q_proj", "gate_proj", "down_proj"), mode="extended", lengths=(4, 2),
         blocks=dict(routed_glu=True)),
    dict(top_k=2, bias=True, mode="extended", lengths=(4, 2), blocks=dict(routed_glu=True)),
    # ... and with BlockSizes.routed_dense_b: every expand launch loads B's whole tile before the routing
    dict(top_k=3, routing="softmax_topk", temperature=0.7, mode="extended", lengths=(4, 3),
         blocks=dict(routed_dense_b=True, routed_glu=True)),
    # gemv: extended's matrix transposed; 8 tokens (every member with experts) one launch, the rest XLA products
    dict(top_k=2, temperature=2.0, mode="gemv", lengths=(4, 2), options=True),
    dict(top_k=3, routing="softmax_topk", temperature=0.7, mode="gemv", lengths=(4, 3)),
    dict(top_k=3, target_modules=("q_proj", "v_proj", "up_proj", "down_proj"), bias=True, rank=5, experts=6,
         mode="gemv", lengths=(4, 1)),
    dict(top_k=2, temperature=2.0, mode="gemv"),
]


@pytest.fixture
def block_sizes():
    """Set the kernels' default BlockSizes for one test: `block_sizes(**fields)`; restored afterwards. (A change
    drops every compiled program, which later tests of the worker would compile again: set only when needed.)"""
    from kernels.meteora_pallas import BlockSizes, set_default_block_sizes

    yield lambda **kw: set_default_block_sizes(BlockSizes(**kw))
    set_default_block_sizes(None)  # no-op unless the test changed them


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_packed_forward_equals_unpacked_loop(case, block_sizes):
    case = dict(case)
    if "blocks" in case:  # kernel block sizes for this case (defaults otherwise)
        block_sizes(**case.pop("blocks"))
    bias, e, r = case.pop("bias", False), case.pop("experts", 4), case.pop("rank", 3)
    mode, lengths = case.pop("mode", "fold"), case.pop("lengths", (9, 5, 2))
    options = case.pop("options", False)
    cfg = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=12, attention_bias=bias, mlp_bias=bias, dtype="float32",
                      param_dtype="float32")
    mcfg = MeteoraConfig(tuple(f"t{i}" for i in range(e)), r, strategy="loop", **case)
    seed = int(np.random.default_rng().integers(1 << 30))
    ref = MeteoraLlama(cfg, mcfg, rngs=nnx.Rngs(seed))
    packed = pack_projections(copy(ref), mode=mode)
    assert is_packed(packed) and not is_packed(ref)
    assert {p.mode for p in packed_projections(packed) if p.expert_members} == {mode}
    assert all(getattr(layer.self_attn, m) is None for layer in packed.layers for m in TARGET_MODULES[:4])
    tokens, mask = left_padded_batch(np.random.default_rng(seed), cfg.vocab_size, lengths=lengths, total=max(lengths))
    want, got = ref(jnp.asarray(tokens), jnp.asarray(mask)), packed(jnp.asarray(tokens), jnp.asarray(mask))
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(got.logits)[real], np.asarray(want.logits)[real], rtol=1e-5, atol=1e-5)
    assert_same_routing(want.aux, got.aux, mcfg.target_modules)
    if not options:
        return
    # routing options still apply after packing, as they do unpacked (checked on one case of each mode)
    for change in (dict(forced_expert=e - 1), dict(forced_expert=None, top_k=1), dict(adapters_enabled=False)):
        set_routing(ref, **change)
        set_routing(packed, **change)
        w, g = ref(jnp.asarray(tokens), jnp.asarray(mask)), packed(jnp.asarray(tokens), jnp.asarray(mask))
        np.testing.assert_allclose(np.asarray(g.logits)[real], np.asarray(w.logits)[real], rtol=1e-5, atol=1e-5)
        assert sorted(g.aux) == sorted(w.aux)


def test_packed_base_equals_transformers(tiny_llama3):
    _, hf, folder = tiny_llama3
    ours = pack_projections(load_hf_llama(folder))
    tokens, mask = left_padded_batch(np.random.default_rng(), 128)
    got = np.asarray(ours(jnp.asarray(tokens), jnp.asarray(mask)).logits)
    want = hf_logits(hf, tokens, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], want[real], rtol=1e-4, atol=1e-4)


def test_packed_forced_expert_equals_peft_generate(tiny_llama3):
    peft, ours = peft_tiny(tiny_llama3)
    pack_projections(ours)
    n = 8
    for expert, name in ((0, "a"), (1, "b")):
        peft.set_adapter(name)
        set_routing(ours, forced_expert=expert)
        res = gen.generate(ours, PROMPTS, max_new_tokens=n, trace=True)
        assert res.tokens == [hf_generate(peft, p, n) for p in PROMPTS], name
        assert all((e == expert).all() for e in res.trace.experts)
    with peft.disable_adapter():
        set_routing(ours, forced_expert=None, adapters_enabled=False)
        assert gen.generate(ours, PROMPTS, max_new_tokens=n).tokens == [hf_generate(peft, p, n) for p in PROMPTS]


@pytest.mark.parametrize("mode", ["fold", "routed", "extended", "extended-glu", "gemv"])
def test_packed_generate_and_trace_equal_unpacked(tiny_llama3, mode, block_sizes):
    """Same tokens; same experts and weights (`routed`, `extended`: decode steps through the kernels, interpret
    mode), but for fp32 near-ties: over 1000 seeds, `fold` gave 4 runs with 1 or 2 of about 1000 expert slots
    swapped between near-tied experts (seeds 192, 341, 777, 871; same tokens), so at most 0.5% of the slots may
    differ. The weights of equal slots are compared to 2e-3: the packed products round in another order, and with
    these large random adapters (std 0.3) the fp32 difference grows over the decode steps; a run saw 6.5e-4 on one
    of 308 weights. A packing mistake changes tokens and most experts."""
    seed = int(np.random.default_rng().integers(1000))
    ref = random_meteora(tiny_llama3[0], seed=seed, top_k=2, temperature=3.0)
    if mode == "extended-glu":
        block_sizes(routed_glu=True)  # gate/up's decode launch applies the activation
    packed = pack_projections(copy(ref), mode=mode.removesuffix("-glu"))
    want = gen.generate(ref, PROMPTS, max_new_tokens=9, trace=True)
    got = gen.generate(packed, PROMPTS, max_new_tokens=9, trace=True)
    assert got.tokens == want.tokens, f"seed {seed}"
    slots = differ = 0
    for i in range(len(PROMPTS)):
        g, w = np.asarray(got.trace.experts[i]), np.asarray(want.trace.experts[i])
        assert g.shape == w.shape, f"seed {seed}"
        same = g == w
        slots, differ = slots + same.size, differ + int((~same).sum())
        np.testing.assert_allclose(np.asarray(got.trace.weights[i])[same], np.asarray(want.trace.weights[i])[same],
                                   atol=2e-3, err_msg=f"seed {seed}")
    assert differ <= 0.005 * slots, f"seed {seed}: {differ} of {slots} expert slots differ"


def fp32_and_bf16_models(kw, mcfg, seed):
    """(fp32, bf16) MeteoRA models of LlamaConfig fields `kw` holding the same (bf16) weight values."""
    f32 = MeteoraLlama(LlamaConfig(**kw, dtype="float32", param_dtype="float32"), mcfg, rngs=nnx.Rngs(seed))
    bf = MeteoraLlama(LlamaConfig(**kw, dtype="bfloat16", param_dtype="bfloat16"), mcfg, rngs=nnx.Rngs(seed))
    weights = jax.tree.map(lambda mine, v: v.astype(mine.dtype), nnx.state(bf), nnx.state(f32))
    nnx.update(bf, weights)
    nnx.update(f32, jax.tree.map(lambda v: v.astype(jnp.float32), weights))  # the same (bf16) values in fp32
    return f32, bf


@pytest.mark.parametrize("mode", ["auto", "extended"])
def test_packed_bf16_as_close_to_fp32_as_unpacked(mode):
    """In bf16 both paths round, in different orders: the packed one is about as far from the fp32 result as the
    unpacked one. Over 12 seeds the ratio of mean errors was 0.71 to 1.12, of max errors 0.35 to 1.37; one CI run
    saw a mean ratio of 1.52 (seed not recorded), so the bound on the mean is 2x. Over 41 more seeds (2026-11-24)
    the mean ratio stayed <= 1.24 and the max ratio reached 2.20 and 2.64 (seed 421576498, which failed a CI run
    at the old 2x bound on the max; the code before this session's changes gives the same 2.64), so the max is
    bounded at 4x. A packing mistake (a wrong or misplaced weight) moves the logits by orders of magnitude more."""
    kw = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16)
    mcfg = MeteoraConfig(tuple(f"t{i}" for i in range(5)), 4, forced_expert=2)  # forced: no bf16 routing ties
    seed = int(np.random.default_rng().integers(1 << 30))
    f32, bf = fp32_and_bf16_models(kw, mcfg, seed)
    packed = pack_projections(copy(bf), mode=mode)
    tokens = jax.random.randint(jax.random.key(seed), (2, 11), 0, kw["vocab_size"])
    ref, unpacked, got = (np.asarray(m(tokens).logits) for m in (f32, bf, packed))
    assert np.abs(got - ref).mean() <= 2.0 * np.abs(unpacked - ref).mean(), f"seed {seed}"
    assert np.abs(got - ref).max() <= 4.0 * np.abs(unpacked - ref).max() + 2e-3, f"seed {seed}"


def test_load_model_pack_and_refusals(tiny_llama3, tmp_path):
    model = random_meteora(tiny_llama3[0], seed=1)
    checkpoint.save(tmp_path / "ckpt", model)
    packed = load_model(checkpoint=tmp_path / "ckpt", pack=True, top_k=1)
    assert is_packed(packed) and isinstance(packed, MeteoraLlama)
    tokens = jnp.asarray([PROMPTS[0]])
    np.testing.assert_allclose(packed(tokens).logits, set_routing(model, top_k=1)(tokens).logits, rtol=1e-5,
                               atol=1e-5)
    with pytest.raises(ValueError, match="packed"):
        checkpoint.save(tmp_path / "again", packed)
    assert not (tmp_path / "again").exists()
    with pytest.raises(ValueError, match="already packed"):
        pack_projections(packed)

    class Odd(Linear):
        pass

    odd = Odd(4, 3, use_bias=False, dtype="float32", param_dtype="float32", rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="cannot pack x: a Odd"):
        PackedProjection({"x": odd})
    base = Llama(tiny_llama3[0].config, rngs=nnx.Rngs(0))
    assert not is_packed(base)


def test_auto_mode_is_extended_with_fused_or_on_a_gpu(monkeypatch):
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16, dtype="float32", param_dtype="float32")
    modes = lambda m: {p.mode for p in packed_projections(m)}
    for strategy, want in (("dense", {"fold"}), ("fused", {"extended"})):
        model = MeteoraLlama(cfg, MeteoraConfig(("a", "b", "c"), 2, strategy=strategy), rngs=nnx.Rngs(0))
        assert modes(pack_projections(model)) == want, strategy
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    model = MeteoraLlama(cfg, MeteoraConfig(("a", "b", "c"), 2, strategy="dense"), rngs=nnx.Rngs(0))
    assert modes(pack_projections(model)) == {"extended"}
    with pytest.raises(ValueError, match="packing mode must be auto or one of"):
        pack_projections(MeteoraLlama(cfg, MeteoraConfig(("a",), 2, top_k=1), rngs=nnx.Rngs(0)), mode="nope")


def test_gemv_mode_decodes_through_the_one_launch_kernel(monkeypatch):
    """Mode `gemv` sends calls of at most gemv_max_tokens tokens to `meteora_gemv_expand` (one call per group) and
    longer ones to the XLA product on the transposed matrix."""
    from meteora_jax import packed as packed_mod

    calls = []

    def spy(x, *args, **kw):
        calls.append(x.shape)
        return packed_mod.__dict__["_real_gemv_expand"](x, *args, **kw)

    monkeypatch.setitem(packed_mod.__dict__, "_real_gemv_expand", packed_mod.meteora_gemv_expand)
    monkeypatch.setattr(packed_mod, "meteora_gemv_expand", spy)
    cfg = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=12, dtype="float32", param_dtype="float32")
    model = pack_projections(MeteoraLlama(cfg, MeteoraConfig(("a", "b", "c"), 3, top_k=2), rngs=nnx.Rngs(0)),
                             mode="gemv")
    assert all(p.kernel.shape[1] == 48 or p.kernel.shape[1] == 80 for p in packed_projections(model))  # [ldz, in]
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 3)))
    model(tokens, jnp.ones((2, 3), jnp.int32))
    assert calls == [(6, 48), (6, 48), (6, 48), (6, 80)] * 2  # qkv, o, gate/up, down; two layers
    calls.clear()
    model(jnp.tile(tokens, (1, 6)), jnp.ones((2, 18), jnp.int32))  # 36 tokens: no kernel call
    assert calls == []


def test_glu_decode_launch_takes_gate_up_only_when_it_can(monkeypatch, block_sizes):
    """With `BlockSizes.routed_glu`, a decode call of the packed gate/up (mode extended, both members with experts,
    no bias) asks the expand for silu(gate) * up; the other groups, prefill, and the flag off do not."""
    from meteora_jax import packed as packed_mod

    real, calls = packed_mod.meteora_routed_expand, []

    def spy(z, b, *args, glu=False, **kw):
        calls.append((b.shape[1], glu))
        return real(z, b, *args, glu=glu, **kw)

    monkeypatch.setattr(packed_mod, "meteora_routed_expand", spy)
    cfg = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=12, dtype="float32", param_dtype="float32")
    model = pack_projections(MeteoraLlama(cfg, MeteoraConfig(("a", "b", "c"), 3, top_k=2), rngs=nnx.Rngs(0)),
                             mode="extended")
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 3)))
    for flag in (True, False):
        block_sizes(routed_glu=flag)
        calls.clear()
        model(tokens, jnp.ones((2, 3), jnp.int32))
        assert calls == [(96, False), (48, False), (160, flag), (48, False)]  # qkv, o, gate/up, down
    calls.clear()
    block_sizes(routed_glu=True)
    model(jnp.tile(tokens, (1, 6)), jnp.ones((2, 18), jnp.int32))  # 36 tokens: the dense math, no launch
    assert calls == []
    with pytest.raises(ValueError, match=r"glu takes two members of one size, got \('q_proj', 'k_proj', 'v_proj'\)"):
        model.layers[0].self_attn.packed_qkv(jnp.ones((1, 48)), glu=True)


def test_z_low_decodes_from_a_bf16_product_as_close_as_unpacked(monkeypatch, block_sizes):
    """`BlockSizes.routed_z_low`: mode extended's decode product gives z in bf16 (the compute dtype), which the
    expand launch reads; prefill and the flag off keep f32. With every expert picked (top_k = E: no routing ties
    that bf16 logits could flip) the packed bf16 model is then about as far from the fp32 model as the unpacked
    bf16 model is (the bounds of `test_packed_bf16_as_close_to_fp32_as_unpacked`)."""
    from meteora_jax import packed as packed_mod

    real, zdtypes = packed_mod.meteora_routed_expand, []

    def spy(z, *args, **kw):
        zdtypes.append(jnp.dtype(z.dtype).name)
        return real(z, *args, **kw)

    monkeypatch.setattr(packed_mod, "meteora_routed_expand", spy)
    kw = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16)
    mcfg = MeteoraConfig(tuple(f"t{i}" for i in range(4)), 4, top_k=4, temperature=1.5)
    seed = int(np.random.default_rng().integers(1 << 30))
    f32, bf = fp32_and_bf16_models(kw, mcfg, seed)
    packed = pack_projections(copy(bf), mode="extended")
    tokens = jax.random.randint(jax.random.key(seed), (2, 5), 0, kw["vocab_size"])  # 10 tokens: the decode launch
    for low in (False, True):
        block_sizes(routed_z_low=low)
        zdtypes.clear()
        got = np.asarray(packed(tokens).logits)
        assert zdtypes == ["bfloat16" if low else "float32"] * 8, (low, zdtypes)  # 4 groups x 2 layers
    ref, unpacked = (np.asarray(m(tokens).logits) for m in (f32, bf))
    assert np.abs(got - ref).mean() <= 2.0 * np.abs(unpacked - ref).mean(), f"seed {seed}"
    assert np.abs(got - ref).max() <= 4.0 * np.abs(unpacked - ref).max() + 2e-3, f"seed {seed}"
    zdtypes.clear()
    packed(jnp.tile(tokens, (1, 4)))  # 40 tokens (prefill): the dense math on an f32 z, no launch
    assert zdtypes == []
