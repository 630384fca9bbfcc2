"""Per-row forced experts (`Llama.__call__(..., forced_experts=)`, `generate(..., forced_experts=)`): each row
equals the whole model run with that row's expert forced (`set_routing(forced_expert=)`), for every strategy and
packing mode, and generation equals transformers + PEFT with that adapter, in one batch and one compiled program."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_generate import PROMPTS, hf_generate, peft_tiny, random_meteora

from meteora_jax import generate as gen
from meteora_jax.config import LlamaConfig
from meteora_jax.meteora import MeteoraConfig, MeteoraLlama, override_routing, set_routing
from meteora_jax.packed import pack_projections

CFG = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=12, dtype="float32", param_dtype="float32")

# (strategy, packing mode): the kernel paths route by themselves for a few tokens; a forced row takes the dense math
PATHS = [("loop", None), ("gather", None), ("dense", None), ("fused", None), ("dense", "fold"), ("dense", "split"),
         ("loop", "routed"), ("loop", "extended"), ("loop", "gemv")]


def _forward(model, tokens, forced=None):
    out = model(jnp.asarray(tokens), forced_experts=None if forced is None else jnp.asarray(forced, jnp.int32))
    return np.asarray(out.logits), out.aux


KERNEL_PATHS = [("fused", None), ("loop", "routed"), ("loop", "extended"), ("loop", "gemv")]


# 3 tokens (t = 1): the decode kernels' range, on the paths that have one; 27 (t = 9): the many-token math, on all
@pytest.mark.parametrize("strategy,mode,t", [(*p, 1) for p in KERNEL_PATHS] + [(*p, 9) for p in PATHS],
                         ids=lambda v: str(v))
def test_rows_equal_whole_model_with_that_expert(strategy, mode, t):
    rng = np.random.default_rng()
    seed = int(rng.integers(1 << 30))
    mcfg = MeteoraConfig(tuple(f"t{i}" for i in range(4)), 3, top_k=2, temperature=2.0, strategy=strategy)
    ref = MeteoraLlama(CFG, mcfg, rngs=nnx.Rngs(seed))
    model = nnx.merge(*nnx.split(ref))
    if mode is not None:
        model = pack_projections(model, mode=mode)
    tokens = rng.integers(0, CFG.vocab_size, (3, t))
    forced = [2, -1, 0]
    got, aux = _forward(model, tokens, forced)
    for i, f in enumerate(forced):
        set_routing(ref, strategy="loop", forced_expert=None if f < 0 else f)
        want, ref_aux = _forward(ref, tokens)
        np.testing.assert_allclose(got[i], want[i], rtol=2e-5, atol=2e-5, err_msg=f"row {i}")
        for m, r in aux.items():
            e, w = np.asarray(r.experts)[:, i], np.asarray(r.weights)[:, i]  # [L, T, k]
            assert e.shape[-1] == 2, m
            if f < 0:
                np.testing.assert_array_equal(e, np.asarray(ref_aux[m].experts)[:, i], err_msg=m)
                np.testing.assert_allclose(w, np.asarray(ref_aux[m].weights)[:, i], rtol=1e-5, atol=1e-6)
            else:
                assert (e[..., 0] == f).all() and (w[..., 0] == 1).all() and (w[..., 1:] == 0).all(), m
    # rows differ with their experts: the forced rows are not the gate's routing
    set_routing(ref, forced_expert=None)
    auto, _ = _forward(ref, tokens)
    assert not np.allclose(got[0], auto[0], atol=1e-3) and not np.allclose(got[2], auto[2], atol=1e-3)


def test_override_routing_formula():
    rng = np.random.default_rng()
    experts = rng.integers(0, 5, (6, 2, 3)).astype(np.int32)
    weights = rng.random((6, 2, 3)).astype(np.float32)
    forced = np.array([-1, 4, 0, -1, 2, 1])
    e, w = map(np.asarray, override_routing(jnp.asarray(experts), jnp.asarray(weights), jnp.asarray(forced)))
    for n, f in enumerate(forced):
        if f < 0:
            np.testing.assert_array_equal(e[n], experts[n])
            np.testing.assert_array_equal(w[n], weights[n])
        else:
            assert (e[n, :, 0] == f).all() and (w[n, :, 0] == 1).all() and (w[n, :, 1:] == 0).all()
            np.testing.assert_array_equal(e[n, :, 1:], experts[n, :, 1:])


@pytest.mark.parametrize("strategy,mode", [("dense", None), ("fused", None), ("loop", "extended")], ids=str)
def test_generate_per_prompt_experts_equal_peft(tiny_llama3, strategy, mode):
    peft, ours = peft_tiny(tiny_llama3)
    set_routing(ours, strategy=strategy, forced_expert=None)
    if mode is not None:
        ours = pack_projections(ours, mode=mode)
    n = 7
    refs = {}
    for name in "ab":
        peft.set_adapter(name)
        refs[name] = [hf_generate(peft, p, n) for p in PROMPTS]
    auto = [gen.generate(ours, [p], max_new_tokens=n).tokens[0] for p in PROMPTS]
    assert refs["a"] != refs["b"]
    before = gen._decode._cache_size()
    for mix in ([0, 1, None], [1, -1, 0], [None, 0, 1]):
        res = gen.generate(ours, PROMPTS, max_new_tokens=n, forced_experts=mix, trace=True)
        for i, f in enumerate(mix):
            want = auto[i] if f in (None, -1) else refs["ab"[f]][i]
            assert res.tokens[i] == want, (mix, i)
            if f not in (None, -1):
                assert (res.trace.experts[i][..., 0] == f).all() and (res.trace.weights[i][..., 0] == 1).all()
    # the three mixes share one compiled decode (the first may compile it, with the trace on)
    assert gen._decode._cache_size() <= before + 1


def test_forced_experts_errors(tiny_llama3):
    model = random_meteora(tiny_llama3[0], num_experts=3)
    for bad, msg in (([0, 1], "one entry per prompt"), ([0, 3, None], r"forced_experts\[1\] = 3"),
                     ([0, -2, 1], r"forced_experts\[1\] = -2"), ([True, 0, 1], r"forced_experts\[0\] = True"),
                     (["task0", 0, 1], "expected an expert index")):
        with pytest.raises(ValueError, match=msg):
            gen.generate(model, PROMPTS, max_new_tokens=2, forced_experts=bad)
    with pytest.raises(ValueError, match="needs a MeteoraLlama"):
        gen.generate(tiny_llama3[0], PROMPTS, max_new_tokens=2, forced_experts=[0, 0, 0])
    with pytest.raises(ValueError, match="one entry per row"):
        model(jnp.asarray([PROMPTS[1], PROMPTS[1]]), forced_experts=jnp.asarray([0, 1, 2]))


def test_cli_expert_per_prompt(tiny_llama3, tmp_path, capsys):
    from test_generate import _word_level_tokenizer

    from convert.hf_llama import load_tokenizer
    from meteora_jax import checkpoint

    model = random_meteora(tiny_llama3[0], seed=int(np.random.default_rng().integers(1 << 30)), top_k=2)
    ckpt = checkpoint.save(tmp_path / "ckpt", model)
    tok_dir = tmp_path / "tok"
    _word_level_tokenizer(tok_dir)
    prompts = ["w3 w5 w7", "w9", "w2 w4"]
    args = ["--checkpoint", str(ckpt), "--tokenizer", str(tok_dir), "--max-new-tokens", "6", "--no-chat"]
    for p in prompts:
        args += ["--prompt", p]
    assert gen.main(args + ["--expert", "task1", "auto", "0"]) == 0
    out = capsys.readouterr().out
    want = gen.generate_text(checkpoint.load(ckpt), load_tokenizer(tok_dir), prompts, chat=False, max_new_tokens=6,
                             forced_experts=[1, None, 0]).text
    for i, (p, text) in enumerate(zip(prompts, want, strict=True)):
        assert f"--- prompt {i}: {p!r}\n{text}\n" in out
    with pytest.raises(SystemExit, match="one per prompt"):
        gen.main(args + ["--expert", "task1", "auto"])
    with pytest.raises(SystemExit, match="'nope' is not an expert name"):
        gen.main(args + ["--expert", "task1", "auto", "nope"])
