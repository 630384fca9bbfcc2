"""Original MeteoRA layout -> MeteoraLlama: bit-exact against the model the layout was made from, forward
equal to a torch implementation of the reference's MoE-LoRA math (written in the helpers), adapters' scalings
from PEFT folders (forced expert = PEFT), and the refusals."""

import json

import numpy as np
import pytest
from _helpers_meteora_ckpt import random_meteora, reference_hooks, save_safetensors
from conftest import assert_rel_close, hf_logits, make_hf_llama
from flax import nnx
from safetensors.numpy import load_file, save_file

from convert import ConversionError
from convert.__main__ import main as convert_main
from convert.hf_llama import load_hf_llama
from convert.meteora_ckpt import (
    PEFT_PREFIX,
    AdapterInfo,
    adapters_from_scalings,
    import_meteora,
    module_key,
    to_meteora_layout,
)
from meteora_jax import checkpoint
from meteora_jax.meteora import set_routing

torch = pytest.importorskip("torch")

NAMES = ("math", "code", "chat")
MODULES = ("q_proj", "v_proj", "o_proj", "up_proj", "down_proj")
SCALINGS = [0.5, 2.0, {"q_proj": 1.5, "v_proj": 0.25, "o_proj": 1.0, "up_proj": 3.0, "down_proj": 0.75}]


@pytest.fixture(scope="module", params=["llama2", "llama3"])
def case(request, tmp_path_factory):
    """A random MeteoRA model over a tiny transformers Llama, and its original-layout checkpoint on disk
    (llama2: one file, prefix base_model.model.; llama3: 3 shards with an index, no prefix)."""
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    hf = make_hf_llama(kind, seed=1)
    hf.save_pretrained(root / "hf")
    base = load_hf_llama(root / "hf")
    model = random_meteora(base, NAMES, 4, MODULES, SCALINGS, seed=2, top_k=2, temperature=5.0)
    prefix = PEFT_PREFIX if kind == "llama2" else ""
    layout = to_meteora_layout(model, prefix=prefix)
    src = save_safetensors(layout, root / "meteora", shards=1 if kind == "llama2" else 3)
    (src / "config.json").write_text((root / "hf" / "config.json").read_text())
    return dict(kind=kind, root=root, hf=hf, model=model, layout=layout, src=src, prefix=prefix)


def _flat(model):
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def _assert_same_state(a, b):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].dtype == fb[k].dtype, k
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=str(k))


def _per_expert(module):
    return [s[module] if isinstance(s, dict) else s for s in SCALINGS]


def test_layout_keys_and_shapes(case):
    lay, p, c = case["layout"], case["prefix"], case["model"].config
    q = c.num_attention_heads * c.head_dim
    assert lay[f"{p}model.layers.1.self_attn.q_proj.lora_A.weight"].shape == (3 * 4, c.hidden_size)
    assert lay[f"{p}model.layers.1.self_attn.q_proj.lora_B.weight"].shape == (q, 3 * 4)
    assert lay[f"{p}model.layers.1.self_attn.q_proj.moe_gate.weight"].shape == (3, c.hidden_size)
    # base weights: wrapped where a linear has experts, plain elsewhere; equal to transformers' own
    sd = case["hf"].state_dict()
    np.testing.assert_array_equal(lay[f"{p}model.layers.0.self_attn.q_proj.base_layer.weight"],
                                  sd["model.layers.0.self_attn.q_proj.weight"].numpy())
    np.testing.assert_array_equal(lay[f"{p}model.layers.0.self_attn.k_proj.weight"],
                                  sd["model.layers.0.self_attn.k_proj.weight"].numpy())
    assert f"{p}model.layers.0.self_attn.k_proj.lora_A.weight" not in lay
    # expert 1 of layer 0 down_proj is rows 4:8 of lora_A, transposed
    a = np.asarray(case["model"].layers[0].mlp.down_proj.lora_a[...])
    np.testing.assert_array_equal(lay[f"{p}model.layers.0.mlp.down_proj.lora_A.weight"][4:8], a[1].T)


def test_import_is_bit_exact_and_matches_torch_reference(case):
    adapters = [AdapterInfo(n, modules={module_key(i, m): (4, 4 * _per_expert(m)[e], _per_expert(m)[e])
                                        for i in range(2) for m in MODULES}) for e, n in enumerate(NAMES)]
    back = import_meteora(case["src"], adapters, top_k=2, temperature=5.0)
    _assert_same_state(case["model"], back)
    assert back.meteora_config == case["model"].meteora_config

    tokens = np.random.default_rng(5).integers(1, 128, size=(2, 6))
    mask = np.ones_like(tokens)
    for top_k, temp, routing in [(2, 5.0, "topk_softmax"), (1, 1.0, "topk_softmax"), (2, 1.0, "softmax_topk")]:
        set_routing(back, top_k=top_k, temperature=temp, routing=routing)
        ours = np.asarray(back(tokens, mask).logits)
        handles = reference_hooks(case["hf"], case["layout"], top_k=top_k, temperature=temp, routing=routing,
                                  scalings=SCALINGS, prefix=case["prefix"])
        try:
            ref = hf_logits(case["hf"], tokens, mask)
        finally:
            for h in handles:
                h.remove()
        assert_rel_close(ours, ref, mask, 1e-4)
        assert np.abs(ref - hf_logits(case["hf"], tokens, mask)).max() > 1e-3  # the experts matter


def test_cli_names_and_scalings_without_base_weights(case, tmp_path):
    """A layout holding only the experts takes its base from --base; uniform scalings from --scalings."""
    experts_only = {k: v for k, v in case["layout"].items() if k.split(".")[-2] in ("lora_A", "lora_B", "moe_gate")}
    src = save_safetensors(experts_only, tmp_path / "bare", name="meteora")
    rc = convert_main(["meteora", "--src", str(src / "meteora.safetensors"), "--names", *NAMES, "--scalings",
                       "0.5", "2", "1.25", "--ranks", "4", "4", "4", "--base", str(case["root"] / "hf"),
                       "--out", str(tmp_path / "ck"), "--top-k", "1"])
    assert rc == 0
    back = checkpoint.load(tmp_path / "ck")
    assert back.meteora_config.expert_names == NAMES and back.meteora_config.top_k == 1
    want = _flat(case["model"])
    for p, v in _flat(back).items():
        if p[-1] == "scaling":
            np.testing.assert_array_equal(v, np.array([0.5, 2.0, 1.25], np.float32))
        else:
            np.testing.assert_array_equal(v, want[p], err_msg=str(p))


def test_scalings_from_peft_adapter_folders_forced_expert_equals_peft(tmp_path):
    """Build the layout as the reference does from PEFT folders (concatenate each adapter's lora_A along rows,
    lora_B along columns, add a gate); import with --adapters; forced expert i equals PEFT with adapter i."""
    peft = pytest.importorskip("peft")
    specs = {"a8": dict(r=4, lora_alpha=8), "rs": dict(r=4, lora_alpha=16, use_rslora=True),
             "pat": dict(r=8, lora_alpha=16, rank_pattern={"q_proj": 4, "v_proj": 4}, alpha_pattern={"v_proj": 3})}
    expected = {"a8": {"q_proj": 2.0, "v_proj": 2.0}, "rs": {"q_proj": 8.0, "v_proj": 8.0},
                "pat": {"q_proj": 4.0, "v_proj": 0.75}}
    make_hf_llama("llama2").save_pretrained(tmp_path / "hf")
    dirs = []
    for seed, (name, kw) in enumerate(specs.items()):
        torch.manual_seed(10 + seed)
        pm = peft.get_peft_model(make_hf_llama("llama2"), peft.LoraConfig(
            init_lora_weights=False, target_modules=["q_proj", "v_proj"], **kw))
        pm.save_pretrained(tmp_path / name)
        dirs.append(tmp_path / name)
    base_sd = load_file(tmp_path / "hf" / "model.safetensors")
    adapters = [load_file(d / "adapter_model.safetensors") for d in dirs]
    rng = np.random.default_rng(0)
    layout = {}
    for k, v in base_sd.items():
        wrapped = k.endswith(("q_proj.weight", "v_proj.weight"))
        layout[PEFT_PREFIX + (k.replace(".weight", ".base_layer.weight") if wrapped else k)] = v
        if wrapped:
            stem = PEFT_PREFIX + k[: -len(".weight")]
            layout[f"{stem}.lora_A.weight"] = np.concatenate([a[f"{stem}.lora_A.weight"] for a in adapters], 0)
            layout[f"{stem}.lora_B.weight"] = np.concatenate([a[f"{stem}.lora_B.weight"] for a in adapters], 1)
            layout[f"{stem}.moe_gate.weight"] = rng.standard_normal((3, v.shape[1])).astype(np.float32)
    src = save_safetensors(layout, tmp_path / "meteora")
    rc = convert_main(["meteora", "--src", str(src), "--adapters", *map(str, dirs), "--base", str(tmp_path / "hf"),
                       "--out", str(tmp_path / "ck")])
    assert rc == 0
    model = checkpoint.load(tmp_path / "ck")
    assert model.meteora_config.expert_names == tuple(specs)
    lin = model.layers[1].self_attn.v_proj
    np.testing.assert_allclose(np.asarray(lin.scaling[...]), [expected[n]["v_proj"] for n in specs], rtol=1e-6)
    sources = [json.loads(s) for s in model.expert_sources]
    assert [s["adapter_config"]["lora_alpha"] for s in sources] == [8, 16, 16]
    assert sources[2]["modules"]["v_proj"] == {"layers": [0, 1], "rank": [4, 4], "alpha": [3.0, 3.0],
                                               "scaling": [0.75, 0.75]}

    tokens = np.random.default_rng(1).integers(1, 128, size=(2, 5))
    mask = np.ones_like(tokens)
    pm = peft.PeftModel.from_pretrained(make_hf_llama("llama2"), str(dirs[0]), adapter_name="a8")
    for name, d in zip(list(specs)[1:], dirs[1:], strict=True):
        pm.load_adapter(str(d), adapter_name=name)
    pm.eval()
    for i, name in enumerate(specs):
        pm.set_adapter(name)
        set_routing(model, forced_expert=i)
        assert_rel_close(np.asarray(model(tokens, mask).logits), hf_logits(pm, tokens, mask), mask, 1e-4)
    # routed: the torch reference of the layout with the adapters' scalings
    set_routing(model, forced_expert=None, top_k=2, temperature=3.0)
    hf = make_hf_llama("llama2")
    handles = reference_hooks(hf, layout, top_k=2, temperature=3.0, routing="topk_softmax",
                              scalings=[expected[n] for n in specs])
    assert_rel_close(np.asarray(model(tokens, mask).logits), hf_logits(hf, tokens, mask), mask, 1e-4)
    for h in handles:
        h.remove()

    # an adapter folder whose rank disagrees with the layout's E*r
    bad = tmp_path / "r8"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({**json.loads((dirs[0] / "adapter_config.json").read_text()),
                                                         "r": 8}))
    with pytest.raises(ConversionError, match=r"adapter 'r8' \(r8\): rank 8 at model\.layers\.0\.self_attn\.q_proj"
                                              r", but .*lora_A\.weight' has 12 rows = E\*r with E = 3, r = 4"):
        import_meteora(src, [_from(bad), _from(dirs[1]), _from(dirs[2])], base=tmp_path / "hf")


def _from(folder):
    from convert.meteora_ckpt import adapter_from_folder, llama_config

    return adapter_from_folder(folder, llama_config(folder, config=folder.parent / "hf" / "config.json"))


# ---------------------------------------------------------------------------------------------- bad input
@pytest.fixture
def small(tmp_path):
    hf = make_hf_llama("llama2", seed=3)
    hf.save_pretrained(tmp_path / "hf")
    model = random_meteora(load_hf_llama(tmp_path / "hf"), NAMES, 4, ("q_proj", "down_proj"), [1.0, 2.0, 3.0])
    layout = to_meteora_layout(model)
    src = save_safetensors(layout, tmp_path / "m")
    (src / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    return src


def _edit(src, fn):
    t = load_file(src / "model.safetensors")
    fn(t)
    save_file(t, src / "model.safetensors")


def test_missing_key(small):
    _edit(small, lambda t: t.pop(PEFT_PREFIX + "model.layers.1.mlp.down_proj.lora_B.weight"))
    with pytest.raises(ConversionError, match=r"m/model\.safetensors: missing key base_model\.model\.model\.layers"
                                              r"\.1\.mlp\.down_proj\.lora_B\.weight"):
        import_meteora(small, adapters_from_scalings(NAMES, [1, 2, 3]))


def test_missing_base_weight(small):
    _edit(small, lambda t: t.pop(PEFT_PREFIX + "model.layers.0.self_attn.q_proj.base_layer.weight"))
    with pytest.raises(ConversionError, match=r"missing key\(s\) \['model\.layers\.0\.self_attn\.q_proj\.weight'\]"):
        import_meteora(small, adapters_from_scalings(NAMES, [1, 2, 3]))


def test_wrong_rows_not_e_times_r(small):
    key = PEFT_PREFIX + "model.layers.0.self_attn.q_proj.lora_A.weight"
    _edit(small, lambda t: t.__setitem__(key, t[key][:-1]))
    with pytest.raises(ConversionError, match=r"m/model\.safetensors: 'base_model\.model\.model\.layers\.0\.self_attn"
                                              r"\.q_proj\.lora_A\.weight' has shape \(11, 64\), expected \[E\*r, 64\] "
                                              r"with E = 3"):
        import_meteora(small, adapters_from_scalings(NAMES, [1, 2, 3]))


def test_lora_b_disagrees_with_lora_a(small):
    key = PEFT_PREFIX + "model.layers.1.mlp.down_proj.lora_B.weight"
    _edit(small, lambda t: t.__setitem__(key, t[key][:, :9]))
    with pytest.raises(ConversionError, match=r"down_proj\.lora_B\.weight' has shape \(64, 9\), expected "
                                              r"\[64, E\*r\] = \[64, 12\] \(lora_A gives r = 4\)"):
        import_meteora(small, adapters_from_scalings(NAMES, [1, 2, 3]))


def test_names_count_differs_from_experts(small):
    with pytest.raises(ConversionError, match=r"moe_gate\.weight' has 3 experts but 2 adapter names were given "
                                              r"\(\['math', 'code'\]\)"):
        import_meteora(small, adapters_from_scalings(NAMES[:2], [1, 2]))
    with pytest.raises(ConversionError, match="3 names but 2 scalings"):
        adapters_from_scalings(NAMES, [1, 2])
    with pytest.raises(ConversionError, match="unique"):
        import_meteora(small, adapters_from_scalings(["a", "a", "b"], [1, 2, 3]))


def test_rank_disagrees(small):
    with pytest.raises(ConversionError, match=r"adapter 'code': rank 8 at model\.layers\.0\.mlp\.down_proj, "
                                              r"but .* has 12 rows"):
        import_meteora(small, adapters_from_scalings(NAMES, [1, 2, 3], ranks=[4, 8, 4]))


def test_unexpected_expert_key_and_no_experts(small, tmp_path):
    _edit(small, lambda t: t.__setitem__(PEFT_PREFIX + "lm_head.lora_A.weight", np.ones((12, 64), np.float32)))
    with pytest.raises(ConversionError, match=r"unexpected key 'base_model\.model\.lm_head\.lora_A\.weight'"):
        import_meteora(small, adapters_from_scalings(NAMES, [1, 2, 3]))
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "model.safetensors").write_bytes((tmp_path / "hf" / "model.safetensors").read_bytes())
    with pytest.raises(ConversionError, match=r"plain: no MeteoRA expert keys"):
        import_meteora(plain, adapters_from_scalings(NAMES, [1, 2, 3]), base=tmp_path / "hf")


def test_missing_config_and_files(small, tmp_path):
    (small / "config.json").unlink()
    with pytest.raises(ConversionError, match=r"m: no config\.json beside the checkpoint; pass --config"):
        import_meteora(small, adapters_from_scalings(NAMES, [1, 2, 3]))
    with pytest.raises(ConversionError, match=r"nowhere: no such file or folder"):
        import_meteora(tmp_path / "nowhere", adapters_from_scalings(NAMES, [1, 2, 3]))
    with pytest.raises(ConversionError, match=r"hf: no adapter_config\.json"):
        _from(tmp_path / "hf")


def test_cli_refuses_existing_output_and_bad_arguments(small, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    args = ["meteora", "--src", str(small), "--names", *NAMES, "--scalings", "1", "2", "3", "--out", str(out)]
    assert convert_main(args) == 2
    assert "already exists" in capsys.readouterr().err and (out / "keep").read_text() == "x"
    assert convert_main(args[:-1] + [str(tmp_path / "o2"), "--top-k", "4"]) == 2
    assert "top_k must be in 1..3" in capsys.readouterr().err and not (tmp_path / "o2").exists()
    assert convert_main(["meteora", "--src", str(small), "--names", *NAMES, "--out", str(tmp_path / "o3")]) == 2
    assert "--names NAME ... --scalings" in capsys.readouterr().err
    assert convert_main(args[:-1] + [str(tmp_path / "o4"), "--overwrite"]) == 0
