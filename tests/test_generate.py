"""Generation (KV cache, while_loop decode, sampling, stop rules, routing trace) against references:
full forwards without a cache, transformers / PEFT `generate`, and float64 numpy sampling formulas."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import left_padded_batch
from flax import nnx

from meteora_jax import generate as gen
from meteora_jax.llama import TARGET_MODULES, init_cache
from meteora_jax.meteora import ExpertWeights, MeteoraConfig, attach_experts, set_routing
from meteora_jax.trace import expert_mass, render_terminal, save_png

R, ALPHA = 4, 8.0


def random_meteora(base, seed=0, num_experts=3, **routing):
    rng = np.random.default_rng(seed)
    c = base.config
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    dims = {"q_proj": (c.hidden_size, q), "k_proj": (c.hidden_size, kv), "v_proj": (c.hidden_size, kv),
            "o_proj": (q, c.hidden_size), "gate_proj": (c.hidden_size, c.intermediate_size),
            "up_proj": (c.hidden_size, c.intermediate_size), "down_proj": (c.intermediate_size, c.hidden_size)}
    experts = {(i, m): ExpertWeights(rng.normal(0, 0.3, (num_experts, d[0], R)), rng.normal(0, 0.3, (num_experts, R,
                                                                                                     d[1])),
                                     np.full((num_experts,), ALPHA / R, np.float32))
               for i in range(c.num_hidden_layers) for m, d in dims.items()}
    gates = {k: rng.normal(0, 1.0, (dims[k[1]][0], num_experts)) for k in experts}
    mcfg = MeteoraConfig(tuple(f"task{e}" for e in range(num_experts)), R, **routing)
    return attach_experts(base, mcfg, experts, gates=gates)


# --------------------------------------------------------------------------------------------- cache
@pytest.mark.parametrize("meteora", [False, True])
def test_cached_decode_equals_full_forward(tiny_llama3, meteora):
    model = random_meteora(tiny_llama3[0], top_k=2, temperature=2.0) if meteora else tiny_llama3[0]
    rng = np.random.default_rng(7)
    tokens, mask = left_padded_batch(rng, 128, lengths=(6, 3, 1), total=6)
    more = rng.integers(1, 128, size=(3, 5))  # fed as 1 + 2 + 1 + 1 tokens
    full_t = np.concatenate([tokens, more], 1)
    full_m = np.concatenate([mask, np.ones_like(more)], 1)
    ref = model(jnp.asarray(full_t), jnp.asarray(full_m))
    step = nnx.jit(lambda m, t, mask, c: m(t, mask, cache=c))
    cache = init_cache(model.config, 3, 16)
    out = step(model, jnp.asarray(tokens), jnp.asarray(mask), cache)
    got, aux = [out.logits], [out.aux]
    start = 0
    for n in (1, 2, 1, 1):
        out = step(model, jnp.asarray(more[:, start:start + n]), None, out.cache)
        got.append(out.logits)
        aux.append(out.aux)
        start += n
    assert int(out.cache.index) == full_t.shape[1]
    got = jnp.concatenate(got, axis=1)
    sel = full_m.astype(bool)
    np.testing.assert_allclose(np.asarray(got)[sel], np.asarray(ref.logits)[sel], rtol=1e-5, atol=1e-5)
    if meteora:
        for m in TARGET_MODULES:
            experts = np.concatenate([np.asarray(a[m].experts) for a in aux], axis=2)  # [L, B, T, k]
            sel = full_m.astype(bool)
            np.testing.assert_array_equal(experts[:, sel], np.asarray(ref.aux[m].experts)[:, sel])


def test_prompt_longer_than_cache_fails_before_compute(tiny_llama3, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("compute started")

    monkeypatch.setattr(gen, "_prefill", boom)
    with pytest.raises(ValueError, match=r"prompt 1 has 20 tokens.*max_len=16"):
        gen.generate(tiny_llama3[0], [[3, 4], list(range(1, 21))], max_new_tokens=4, max_len=16)
    with pytest.raises(ValueError, match=r"prompt 0 has 10 tokens.*needs 18 cache slots"):
        gen.generate(tiny_llama3[0], [list(range(1, 11))], max_new_tokens=8, max_len=16)
    with pytest.raises(ValueError, match="outside 0..127"):
        gen.generate(tiny_llama3[0], [[1, 500]], max_new_tokens=2)


# ---------------------------------------------------------------------------------- vs transformers
def hf_generate(hf, prompt, n):
    import torch

    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


def peft_tiny(tiny_llama3):
    """PEFT model with adapters 'a', 'b' (random, all seven modules) and our MeteoraLlama built from them."""
    import torch
    from peft import LoraConfig, get_peft_model

    base, _, folder = tiny_llama3
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    lcfg = dict(r=R, lora_alpha=ALPHA, target_modules=list(TARGET_MODULES), init_lora_weights=False)
    torch.manual_seed(11)
    peft = get_peft_model(hf, LoraConfig(**lcfg), adapter_name="a")
    peft.add_adapter("b", LoraConfig(**lcfg))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.3)
    sd = {k: v.detach().numpy() for k, v in peft.state_dict().items()}
    experts = {}
    for i in range(base.config.num_hidden_layers):
        for m in TARGET_MODULES:
            blk = "self_attn" if m in TARGET_MODULES[:4] else "mlp"
            key = f"base_model.model.model.layers.{i}.{blk}.{m}"
            a = np.stack([sd[f"{key}.lora_A.{e}.weight"].T for e in "ab"])  # [E, in, r]
            b = np.stack([sd[f"{key}.lora_B.{e}.weight"].T for e in "ab"])  # [E, r, out]
            experts[(i, m)] = ExpertWeights(a, b, np.full((2,), ALPHA / R, np.float32))
    return peft, attach_experts(base, MeteoraConfig(("a", "b"), R), experts)


PROMPTS = [[5, 17, 99, 3, 42, 8, 1], [77, 12], [9, 31, 64, 2, 110]]


def test_forced_expert_equals_peft_generate(tiny_llama3):
    peft, ours = peft_tiny(tiny_llama3)
    n = 8
    got = {}
    for expert, name, strategies in ((0, "a", ["gather"]), (1, "b", ["loop", "gather", "dense"])):
        peft.set_adapter(name)
        ref = [hf_generate(peft, p, n) for p in PROMPTS]
        for strategy in strategies:
            set_routing(ours, forced_expert=expert, strategy=strategy)
            res = gen.generate(ours, PROMPTS, max_new_tokens=n, trace=True)
            assert res.tokens == ref, (name, strategy)
            assert all((e == expert).all() for e in res.trace.experts)
            assert all((w == 1).all() for w in res.trace.weights)
        got[name] = ref
    assert got["a"] != got["b"]  # the two adapters really differ
    with peft.disable_adapter():  # adapters off: the base model exactly
        set_routing(ours, forced_expert=None, adapters_enabled=False)
        res = gen.generate(ours, PROMPTS, max_new_tokens=n)
        assert res.tokens == [hf_generate(peft, p, n) for p in PROMPTS]
        assert res.tokens != got["a"]


@pytest.mark.slow
def test_smollm2_greedy_equals_transformers(smollm2):
    from convert.hf_llama import TorchStateSource, _abstract_model, load_params
    from meteora_jax.config import LlamaConfig
    from meteora_jax.llama import plain_linear

    path, hf, tok = smollm2
    config = LlamaConfig.from_hf_config(hf.config)
    ours = load_params(_abstract_model(config, plain_linear), TorchStateSource(dict(hf.state_dict()), str(path)),
                       param_dtype=jnp.float32)
    texts = ["The capital of France is", "def fibonacci(n):\n    if n < 2:", "Name three colours."]
    chat = [False, False, True]
    ids = [gen.encode_prompts(tok, [t], chat=c)[0] for t, c in zip(texts, chat, strict=True)]
    n = 10
    res = gen.generate(ours, ids, max_new_tokens=n, eos_token_ids=[tok.eos_token_id])  # one batch, left-padded
    refs = [hf_generate(hf, p, n) for p in ids]
    for i in range(3):
        assert res.tokens[i] == refs[i], (texts[i], tok.decode(res.tokens[i]), tok.decode(refs[i]))
    # stop strings: cut after the first occurrence, and the loop stops early
    full = tok.decode(refs[0])
    stop = full.strip().split()[1]
    cut = gen.generate_text(ours, tok, texts[:1], chat=False, max_new_tokens=n, stop_strings=[stop])
    assert cut.text[0] == full[:full.index(stop) + len(stop)]
    assert len(cut.tokens[0]) < n


# ------------------------------------------------------------------------------------ decode logic
def test_batch_equals_one_at_a_time_with_trace(tiny_llama3):
    model = random_meteora(tiny_llama3[0], seed=3, top_k=2, temperature=3.0)
    batch = gen.generate(model, PROMPTS, max_new_tokens=9, trace=True)
    for i, p in enumerate(PROMPTS):
        alone = gen.generate(model, [p], max_new_tokens=9, trace=True)
        assert alone.tokens[0] == batch.tokens[i]
        np.testing.assert_array_equal(alone.trace.experts[0], batch.trace.experts[i])
        np.testing.assert_allclose(alone.trace.weights[0], batch.trace.weights[i], atol=2e-4)
        # the trace equals the routing of a full forward over prompt + generated tokens
        seq = p + batch.tokens[i]
        assert batch.trace.tokens[i] == seq and batch.trace.prompt_lengths[i] == len(p)
        aux = model(jnp.asarray([seq])).aux
        ref_e = np.stack([np.asarray(aux[m].experts)[:, 0] for m in TARGET_MODULES], axis=2)  # [T, L..]
        ref_e = ref_e.transpose(1, 0, 2, 3)  # [T, L, M, k]
        np.testing.assert_array_equal(batch.trace.experts[i], ref_e)


def test_eos_and_stop_sequences(tiny_llama3):
    model = tiny_llama3[0]
    free = gen.generate(model, PROMPTS, max_new_tokens=12, eos_token_ids=[]).tokens
    row = free[0]
    eos = row[4]
    first = row.index(eos)
    got = gen.generate(model, PROMPTS[:1], max_new_tokens=12, eos_token_ids=[eos])
    assert got.tokens[0] == row[:first + 1]
    assert got.timings["decode_steps"] == first  # the loop stopped there
    seq = row[5:7]
    want = next(j for j in range(1, 12) if row[j - 1:j + 1] == seq) + 1
    got = gen.generate(model, PROMPTS, max_new_tokens=12, eos_token_ids=[], stop_sequences=[seq])
    assert got.tokens[0] == row[:want]
    for i in (1, 2):  # other rows go on unless they meet it too
        cut = [j + 2 for j in range(11) if free[i][j:j + 2] == seq]
        assert got.tokens[i] == free[i][:cut[0] if cut else 12]
    assert gen.generate(model, PROMPTS, max_new_tokens=3, eos_token_ids=[]).tokens == [r[:3] for r in free]


def test_min_new_tokens_equals_transformers(tiny_llama3):
    """EOS and stop tokens are masked for the first `min_new_tokens` new tokens: the same tokens as transformers'
    greedy `generate(min_new_tokens=...)` with both as its EOS ids, in one left-padded batch."""
    import torch

    model, hf, _ = tiny_llama3
    n = 10
    free = gen.generate(model, PROMPTS, max_new_tokens=n, eos_token_ids=[]).tokens
    eos, stop = free[0][1], free[1][2]  # tokens the rows would stop at early
    for m in (0, 1, 3, 6):
        got = gen.generate(model, PROMPTS, max_new_tokens=n, eos_token_ids=[eos], stop_token_ids=[stop],
                           min_new_tokens=m)
        for p, toks in zip(PROMPTS, got.tokens, strict=True):
            ids = torch.tensor([p])
            with torch.no_grad():
                ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=m,
                                  do_sample=False, eos_token_id=[eos, stop], pad_token_id=eos)[0, len(p):].tolist()
            while len(ref) > 1 and ref[-1] == eos and ref[-2] in (eos, stop):  # transformers pads a finished row
                ref = ref[:-1]
            assert toks == ref, (m, p)
            assert not {eos, stop} & set(toks[:m])
        if m == 0:  # without the rule, row 0 stops early
            assert got.tokens[0][-1] in (eos, stop) and len(got.tokens[0]) <= 2
    # the boundary: EOS may be new token m + 1 (index m), not token m (index m - 1); a model that does not repeat
    model = random_meteora(model, seed=3, top_k=2, temperature=3.0)
    row = gen.generate(model, PROMPTS[:1], max_new_tokens=n, eos_token_ids=[]).tokens[0]
    m = next(j for j in range(2, n) if row[j] not in row[:j] and row[j - 1] not in row[:j - 1])
    assert gen.generate(model, PROMPTS[:1], max_new_tokens=n, eos_token_ids=[row[m]], min_new_tokens=m
                        ).tokens[0] == row[:m + 1]
    masked = gen.generate(model, PROMPTS[:1], max_new_tokens=n, eos_token_ids=[row[m - 1]], min_new_tokens=m)
    assert masked.tokens[0][:m - 1] == row[:m - 1] and masked.tokens[0][m - 1] != row[m - 1]
    with pytest.raises(ValueError, match="min_new_tokens must be >= 0"):
        gen.generate(model, PROMPTS, max_new_tokens=4, min_new_tokens=-1)


def test_sampling_reproducible_and_greedy_limits(tiny_llama3):
    model = random_meteora(tiny_llama3[0], top_k=1)
    s = gen.Sampling(temperature=1.5, top_k=50, top_p=0.95, seed=4)
    a = gen.generate(model, PROMPTS, max_new_tokens=10, sampling=s).tokens
    assert a == gen.generate(model, PROMPTS, max_new_tokens=10, sampling=s).tokens
    other = gen.generate(model, PROMPTS, max_new_tokens=10, sampling=gen.Sampling(1.5, 50, 0.95, seed=5)).tokens
    assert other != a
    greedy = gen.generate(model, PROMPTS, max_new_tokens=10).tokens
    assert a != greedy
    for limit in (gen.Sampling(2.0, top_k=1, seed=1), gen.Sampling(2.0, top_p=1e-6, seed=1)):
        assert gen.generate(model, PROMPTS, max_new_tokens=10, sampling=limit).tokens == greedy


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (6, 1.0), (0, 0.7), (6, 0.8)])
def test_sampling_distribution_matches_formula(top_k, top_p):
    rng = np.random.default_rng(top_k + int(10 * top_p))
    logits = rng.normal(0, 2.0, 12)
    temp = 1.7
    x = logits / temp
    keep = np.ones(12, bool)
    order = np.argsort(-x)
    if top_k:
        keep[order[top_k:]] = False
    p = np.where(keep, np.exp(x - x.max()), 0.0)
    p /= p.sum()
    before = np.cumsum(p[order]) - p[order]
    drop = order[before >= top_p]
    p[drop] = 0.0
    p /= p.sum()
    n = 40000
    toks = gen.sample_tokens(jnp.asarray(np.tile(logits, (n, 1)), jnp.float32), jax.random.key(0), jnp.float32(temp),
                             jnp.float32(top_p), greedy=False, top_k=top_k, use_top_p=top_p < 1)
    freq = np.bincount(np.asarray(toks), minlength=12) / n
    assert (freq[p == 0] == 0).all()
    sigma = np.sqrt(p * (1 - p) / n)
    assert (np.abs(freq - p) <= 4.5 * sigma + 1e-9).all(), (freq, p)


def test_streaming_callback_sees_every_token(tiny_llama3):
    seen = []
    res = gen.generate(tiny_llama3[0], PROMPTS, max_new_tokens=7, eos_token_ids=[],
                       on_token=lambda step, toks, active: seen.append((step, toks.copy(), active.copy())))
    assert [s for s, _, _ in seen] == list(range(7))
    for i in range(3):
        assert [int(t[i]) for _, t, act in seen if act[i]] == res.tokens[i]
    assert not any(act[3] for _, _, act in seen[1:])  # the padding row of the batch bucket


# --------------------------------------------------------------------------------------- rendering
def test_trace_rendering(tiny_llama3, tmp_path):
    model = random_meteora(tiny_llama3[0], seed=1, top_k=2)
    res = gen.generate(model, PROMPTS[:2], max_new_tokens=6, trace=True)
    t = res.trace
    e, w = t.experts[0], t.weights[0]
    ref = np.zeros((e.shape[0], 3))
    for ti in range(e.shape[0]):
        for idx in np.ndindex(e.shape[1:]):
            ref[ti, e[ti][idx]] += w[ti][idx] / (e.shape[1] * e.shape[2])
    np.testing.assert_allclose(expert_mass(e, w, 3), ref, rtol=1e-6)
    np.testing.assert_allclose(ref.sum(1), 1.0, rtol=1e-5)
    texts = [[f"<{x}>" for x in toks] for toks in t.tokens]
    plain = render_terminal(t, 0, texts[0], color=False)
    assert plain.replace("│", "").count("«") >= 2 and "".join(texts[0]) in "".join(
        s.split(": ", 1)[-1].rstrip("»") for s in plain.replace("│", "").split("«"))
    top = ref.argmax(1)
    assert f"«task{top[0]}: {texts[0][0]}" in plain
    coloured = render_terminal(t, 0, texts[0])
    assert "\x1b[38;2;" in coloured and all(x in coloured for x in texts[0])
    pytest.importorskip("matplotlib")
    out = save_png(t, tmp_path / "trace.png", texts)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(FileExistsError):
        save_png(t, tmp_path / "trace.png", texts)


def test_cli_help_and_run(tiny_llama3, tmp_path, capsys):
    parser = gen.build_parser()
    for action in parser._actions:
        assert action.help, action.option_strings
    from meteora_jax import checkpoint

    model = random_meteora(tiny_llama3[0], seed=2, top_k=2)
    ckpt = checkpoint.save(tmp_path / "ckpt", model)
    tok_dir = tmp_path / "tok"
    _word_level_tokenizer(tok_dir)
    png = tmp_path / "out.png"
    args = ["--checkpoint", str(ckpt), "--tokenizer", str(tok_dir), "--prompt", "w3 w5 w7", "--prompt", "w9",
            "--max-new-tokens", "5", "--show-routing", "--expert", "task1", "--no-chat"]
    if _has_mpl():
        args += ["--trace", str(png)]
    assert gen.main(args) == 0
    out = capsys.readouterr().out
    assert "prompt 1: 'w9'" in out and "task1" in out
    assert png.exists() == _has_mpl()
    with pytest.raises(SystemExit, match="not an expert name"):
        gen.main(args[:-3] + ["--expert", "nope"])
    with pytest.raises(SystemExit, match="one prompt"):
        gen.main(args + ["--stream"])


def test_cli_low_precision_gate_decodes_from_a_bf16_product(tiny_llama3, tmp_path, capsys, monkeypatch):
    """`--pack --low-precision-gate` (a packed group's decode product in bf16, gate logits included): the decode
    launches read a bf16 z during that run only; the same command without the flag reads f32; without --pack it
    is refused."""
    from kernels.meteora_pallas import BlockSizes
    from meteora_jax import checkpoint
    from meteora_jax import packed as packed_mod

    real, zdtypes = packed_mod.meteora_routed_expand, []

    def spy(z, *args, **kw):
        zdtypes.append(jnp.dtype(z.dtype).name)
        return real(z, *args, **kw)

    monkeypatch.setattr(packed_mod, "meteora_routed_expand", spy)
    ckpt = checkpoint.save(tmp_path / "ckpt", random_meteora(tiny_llama3[0], seed=3, top_k=2))
    _word_level_tokenizer(tmp_path / "tok")
    args = ["--checkpoint", str(ckpt), "--tokenizer", str(tmp_path / "tok"), "--prompt", "w3 w5 w7", "--no-chat",
            "--max-new-tokens", "3", "--pack", "--strategy", "fused", "--dtype", "bfloat16"]
    assert gen.main(args + ["--low-precision-gate"]) == 0
    assert zdtypes and set(zdtypes) == {"bfloat16"}, zdtypes
    assert not BlockSizes.get_default().routed_z_low  # the process's defaults are back
    zdtypes.clear()
    assert gen.main(args) == 0
    assert zdtypes and set(zdtypes) == {"float32"}, zdtypes
    capsys.readouterr()
    with pytest.raises(SystemExit, match="--low-precision-gate applies to packed decoding: add --pack"):
        gen.main([a for a in args if a != "--pack"] + ["--low-precision-gate"])


def _has_mpl():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _word_level_tokenizer(folder):
    """A 128-word tokenizer ('w0'..'w127', whitespace split) saved as a Hugging Face folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(128)}
    t = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=t, unk_token="w0", eos_token="w2").save_pretrained(folder)
    json.loads((folder / "tokenizer_config.json").read_text())


def test_nnx_model_unchanged_by_generation(tiny_llama3):
    model = random_meteora(tiny_llama3[0], seed=9)
    before = jax.tree.map(np.asarray, nnx.state(model))
    gen.generate(model, PROMPTS, max_new_tokens=4, trace=True)
    after = jax.tree.map(np.asarray, nnx.state(model))
    jax.tree.map(np.testing.assert_array_equal, before, after)


def _greedy_by_full_forward(model, prompt, n):
    """Greedy tokens from full forwards over the whole sequence (no cache, no jit): the reference."""
    toks = list(prompt)
    for _ in range(n):
        logits = model(jnp.asarray([toks]), jnp.ones((1, len(toks)), bool)).logits
        toks.append(int(jnp.argmax(logits[0, -1])))
    return toks[len(prompt):]


def test_repeated_calls_reuse_programs_and_see_changed_weights(tiny_llama3):
    """`generate` hands the model to its jitted programs as a flattened pytree: a second call on the same model
    compiles nothing, weights replaced in place are seen by the next call (still without compiling), and a
    changed routing option (a static attribute) compiles anew and is obeyed."""
    model = random_meteora(tiny_llama3[0], seed=4, top_k=2)
    rng = np.random.default_rng()
    prompt = rng.integers(1, 128, size=5).tolist()
    first = gen.generate(model, [prompt], max_new_tokens=6, eos_token_ids=[])
    assert first.tokens[0] == _greedy_by_full_forward(model, prompt, 6)
    sizes = (gen._prefill._cache_size(), gen._decode._cache_size())
    assert gen.generate(model, [prompt], max_new_tokens=6, eos_token_ids=[]).tokens == first.tokens
    emb = model.embed_tokens.embedding
    for _ in range(5):  # new weights, same structure, that change the greedy tokens (so the check can tell)
        emb.value = jnp.asarray(rng.normal(0, 1.0, emb.value.shape), emb.value.dtype)
        want = _greedy_by_full_forward(model, prompt, 6)
        if want != first.tokens[0]:
            break
    assert want != first.tokens[0]
    again = gen.generate(model, [prompt], max_new_tokens=6, eos_token_ids=[])
    assert (gen._prefill._cache_size(), gen._decode._cache_size()) == sizes  # nothing compiled since the first
    assert again.tokens[0] == want
    set_routing(model, forced_expert=2)
    forced = gen.generate(model, [prompt], max_new_tokens=6, eos_token_ids=[], trace=True)
    assert gen._decode._cache_size() > sizes[1]
    assert forced.tokens[0] == _greedy_by_full_forward(model, prompt, 6)
    assert all((e == 2).all() for e in forced.trace.experts)
