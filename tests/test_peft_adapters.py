"""PEFT adapter folders -> MeteoRA experts: parity with transformers + PEFT, routing against a torch
implementation written here, the refusals, and the `python -m convert adapters` command.

Adapters are made by PEFT inside the tests (`init_lora_weights=False`: random non-zero B)."""

import json
import re

import numpy as np
import pytest
from conftest import assert_rel_close, hf_logits, left_padded_batch, make_hf_llama
from safetensors.numpy import load_file, save_file

import meteora_jax
from convert import ConversionError
from convert.__main__ import main as convert_main
from convert.hf_llama import load_hf_llama
from convert.peft_adapters import read_adapters
from meteora_jax import LlamaConfig, checkpoint
from meteora_jax.meteora import meteora_linears, set_routing

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

KIND = "llama3"  # GQA, head_dim 24: q/k/v/o are not square, so a transposed factor cannot slip through
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SPECS = {  # name -> LoraConfig arguments
    "r4": dict(r=4, lora_alpha=8, target_modules=ALL),
    "r8_rslora": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=ALL),
    "r16_qv": dict(r=16, lora_alpha=24, target_modules=["q_proj", "v_proj"]),
    "patterns": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "o_proj", "gate_proj", "down_proj"],
                     rank_pattern={"k_proj": 4, "model.layers.1.mlp.down_proj": 16},
                     alpha_pattern={"o_proj": 5, "layers.0.mlp.gate_proj": 40}),
    "layer1": dict(r=4, lora_alpha=4, target_modules=["k_proj", "up_proj"], layers_to_transform=[1]),
}
FAN_IN_FAN_OUT = "layer1"  # its saved config is edited to say fan_in_fan_out=true (PEFT ignores it on nn.Linear)


def _make_adapter(folder, seed, kind=KIND, model_kw=None, safe_serialization=True, **lora_kw):
    model = make_hf_llama(kind, **(model_kw or {}))
    torch.manual_seed(seed)
    pm = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **lora_kw))
    pm.save_pretrained(folder, safe_serialization=safe_serialization)
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    make_hf_llama(KIND).save_pretrained(root / "base")
    dirs = [_make_adapter(root / name, seed, **kw) for seed, (name, kw) in enumerate(SPECS.items())]
    cfg_file = root / FAN_IN_FAN_OUT / "adapter_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "fan_in_fan_out": True}))
    names = list(SPECS)
    pm = peft.PeftModel.from_pretrained(make_hf_llama(KIND), str(dirs[0]), adapter_name=names[0])
    for name, d in zip(names[1:], dirs[1:], strict=True):
        pm.load_adapter(str(d), adapter_name=name)
    pm.eval()
    tokens, mask = left_padded_batch(np.random.default_rng(3), 128, lengths=(9, 5, 1), total=9)
    return dict(root=root, base=root / "base", dirs=dirs, names=names, peft=pm, tokens=tokens, mask=mask)


def _logits(model, tokens, mask):
    return np.asarray(model(np.asarray(tokens), np.asarray(mask)).logits)


def _lora_layers(pm):
    """{(layer, module): PEFT LoraLayer} of a PeftModel."""
    out = {}
    for name, mod in pm.named_modules():
        m = re.search(r"layers\.(\d+)\.\w+\.(\w+_proj)$", name)
        if m and hasattr(mod, "lora_A"):
            out[(int(m.group(1)), m.group(2))] = mod
    return out


def test_forced_expert_equals_peft_and_off_equals_base(setup):
    s = setup
    model = meteora_jax.from_pretrained(s["base"], s["dirs"], strategy="gather")
    assert model.meteora_config.expert_names == tuple(s["names"])
    for i, name in enumerate(s["names"]):
        s["peft"].set_adapter(name)
        ref = hf_logits(s["peft"], s["tokens"], s["mask"])
        ours = _logits(set_routing(model, forced_expert=i), s["tokens"], s["mask"])
        assert_rel_close(ours, ref, s["mask"], 1e-4)
    base = hf_logits(make_hf_llama(KIND), s["tokens"], s["mask"])
    assert np.abs(ref - base)[s["mask"] == 1].max() > 1e-2 * np.abs(base).max()  # the adapter matters
    # forced by name, at construction
    by_name = meteora_jax.from_pretrained(s["base"], s["dirs"], forced_expert="r16_qv")
    s["peft"].set_adapter("r16_qv")
    assert_rel_close(_logits(by_name, s["tokens"], s["mask"]), hf_logits(s["peft"], s["tokens"], s["mask"]),
                     s["mask"], 1e-4)
    # adapters off: exactly the base model
    off = _logits(set_routing(model, forced_expert=None, adapters_enabled=False), s["tokens"], s["mask"])
    np.testing.assert_array_equal(off, _logits(load_hf_llama(s["base"]), s["tokens"], s["mask"]))


def test_recorded_ranks_alphas_scalings_match_peft(setup):
    s = setup
    stacked = read_adapters(s["dirs"], LlamaConfig.from_hf_config(make_hf_llama(KIND).config))
    assert stacked.rank == 16 and stacked.target_modules == tuple(ALL)
    layers = _lora_layers(s["peft"])
    for e, (name, src) in enumerate(zip(s["names"], stacked.sources, strict=True)):
        assert src["name"] == src["folder"] == name
        assert src["adapter_config"]["r"] == SPECS[name]["r"]
        covered = {(lay, mod) for (lay, mod), ll in layers.items() if name in ll.lora_A}
        ours = {(lay, mod) for mod, rec in src["modules"].items() for lay in rec["layers"]}
        assert ours == covered, name
        for mod, rec in src["modules"].items():
            for j, lay in enumerate(rec["layers"]):
                ll = layers[(lay, mod)]
                assert (rec["rank"][j], rec["alpha"][j]) == (ll.r[name], ll.lora_alpha[name])
                assert rec["scaling"][j] == pytest.approx(ll.scaling[name], rel=1e-12)
        for (lay, mod), w in stacked.experts.items():
            if (lay, mod) not in covered:
                assert w.scaling[e] == 0 and not w.a[e].any() and not w.b[e].any()
            else:
                r = layers[(lay, mod)].r[name]
                np.testing.assert_array_equal(w.a[e, :, :r], layers[(lay, mod)].lora_A[name].weight.detach().T)
                assert not w.a[e, :, r:].any() and not w.b[e, r:].any()


def _torch_meteora_logits(setup, model, top_k, temperature, routing):
    """Logits of the transformers base model with forward hooks adding sum_j w_j s_e (x A_e) B_e per target
    linear; factors and scalings from PEFT's own modules, gates copied from our model, routing in torch."""
    s = setup
    names, layers = s["names"], _lora_layers(s["peft"])
    gates = {(lay, mod): torch.tensor(np.asarray(lin.gate[...])) for lay, mod, lin in meteora_linears(model)}
    hf = make_hf_llama(KIND)

    def hook_for(key):
        ll = layers.get(key)

        def hook(module, inputs, out):
            x = inputs[0]
            logits = x @ gates[key]  # [B, T, E]
            if routing == "topk_softmax":
                vals, idx = torch.topk(logits, top_k, dim=-1)
                w = torch.softmax(vals / temperature, dim=-1)
            else:
                w, idx = torch.topk(torch.softmax(logits / temperature, dim=-1), top_k, dim=-1)
                w = w / w.sum(-1, keepdim=True)
            full = torch.zeros_like(logits).scatter(-1, idx, w)  # [B, T, E]
            for e, name in enumerate(names):
                if ll is not None and name in ll.lora_A:
                    a, b = ll.lora_A[name].weight, ll.lora_B[name].weight  # [r, in], [out, r]
                    out = out + full[..., e:e + 1] * ll.scaling[name] * ((x @ a.T) @ b.T)
            return out
        return hook

    for lay, block in enumerate(hf.model.layers):
        for mod in ALL:
            parent = block.self_attn if mod in ALL[:4] else block.mlp
            getattr(parent, mod).register_forward_hook(hook_for((lay, mod)))
    return hf_logits(hf, s["tokens"], s["mask"])


@pytest.mark.parametrize("top_k,routing,temperature,strategy", [
    (1, "topk_softmax", 1.0, "loop"), (2, "topk_softmax", 2.5, "gather"),
    (1, "softmax_topk", 1.0, "dense"), (2, "softmax_topk", 0.7, "gather")])
def test_auto_routing_equals_torch_hooks(setup, top_k, routing, temperature, strategy):
    s = setup
    model = meteora_jax.from_pretrained(s["base"], s["dirs"], seed=11, top_k=top_k, routing=routing,
                                        temperature=temperature, strategy=strategy)
    out = model(np.asarray(s["tokens"]), np.asarray(s["mask"]))
    chosen = np.asarray(out.aux["q_proj"].experts)[:, s["mask"] == 1]
    assert len(np.unique(chosen)) > 2  # tokens really go to different experts
    ref = _torch_meteora_logits(s, model, top_k, temperature, routing)
    assert_rel_close(np.asarray(out.logits), ref, s["mask"], 1e-4)


def test_bin_weights_read_like_safetensors(tmp_path):
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    st = _make_adapter(tmp_path / "st", 0, kind="llama2", **kw)
    binf = _make_adapter(tmp_path / "bin", 0, kind="llama2", safe_serialization=False, **kw)
    assert (binf / "adapter_model.bin").exists() and not (binf / "adapter_model.safetensors").exists()
    cfg = LlamaConfig.from_hf_config(make_hf_llama("llama2").config)
    a, b = read_adapters([st], cfg), read_adapters([binf], cfg)
    assert b.sources[0]["weights_file"] == "adapter_model.bin"
    for key, w in a.experts.items():
        for x, y in zip(w, b.experts[key], strict=True):
            np.testing.assert_array_equal(x, y)


# ------------------------------------------------------------------------------------------ refusals
def _edit_weights(folder, fn):
    f = folder / "adapter_model.safetensors"
    t = load_file(f)
    fn(t)
    save_file(t, f)
    return folder


Q = "base_model.model.model.layers.0.self_attn.q_proj"
REFUSALS = {  # case -> (make adapter in folder, expected reason)
    "dora": (lambda d: _make_adapter(d, 0, "llama2", use_dora=True, target_modules=["q_proj"]), r"use_dora.*DoRA"),
    "bias": (lambda d: _make_adapter(d, 0, "llama2", bias="lora_only", target_modules=["q_proj"]),
             r"bias is 'lora_only'"),
    "embed": (lambda d: _make_adapter(d, 0, "llama2", target_modules=["embed_tokens", "q_proj"]),
              r"LoRA on embed_tokens is not supported"),
    "lm_head": (lambda d: _make_adapter(d, 0, "llama2", target_modules=["lm_head"]), r"LoRA on lm_head"),
    "lora_bias": (lambda d: _make_adapter(d, 0, "llama2", lora_bias=True, target_modules=["q_proj"]),
                  r"lora_bias is set"),
    "modules_to_save": (lambda d: _make_adapter(d, 0, "llama2", target_modules=["q_proj"], modules_to_save=["lm_head"]),
                        r"modules_to_save \['lm_head'\] carry weights"),
    "hidden": (lambda d: _make_adapter(d, 0, "llama2", model_kw=dict(hidden_size=32), target_modules=["v_proj"]),
               r"do not fit the base model's v_proj \[in=64, out=64\] \(hidden_size 64\)"),
    "layers": (lambda d: _make_adapter(d, 0, "llama2", model_kw=dict(num_hidden_layers=3), target_modules=["q_proj"]),
               r"for layer 2, but the base model has 2 layers"),
    "no_config": (lambda d: (_make_adapter(d, 0, "llama2", target_modules=["q_proj"]) / "adapter_config.json").unlink(),
                  r"missing adapter_config\.json"),
    "no_weights": (lambda d: (_make_adapter(d, 0, "llama2", target_modules=["q_proj"])
                              / "adapter_model.safetensors").unlink(), r"missing weights"),
    "unexpected": (lambda d: _edit_weights(_make_adapter(d, 0, "llama2", target_modules=["q_proj"]),
                                           lambda t: t.__setitem__(f"{Q}.extra.weight", np.ones(3, np.float32))),
                   r"unexpected key '.*q_proj\.extra\.weight'"),
    "rank": (lambda d: _edit_weights(_make_adapter(d, 0, "llama2", r=4, target_modules=["q_proj"]),
                                     lambda t: t.__setitem__(f"{Q}.lora_A.weight", np.ones((3, 64), np.float32))),
             r"q_proj: lora_A \(3, 64\) and lora_B \(64, 4\) do not have the rank 4"),
    "unpaired": (lambda d: _edit_weights(_make_adapter(d, 0, "llama2", target_modules=["q_proj"]),
                                         lambda t: t.pop(f"{Q}.lora_B.weight")), r"has lora_A but no lora_B"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_name_folder_and_reason(tmp_path, case):
    make, reason = REFUSALS[case]
    folder = tmp_path / f"adapter_{case}"
    make(folder)
    cfg = LlamaConfig.from_hf_config(make_hf_llama("llama2").config)
    with pytest.raises(ConversionError, match=re.escape(f"adapter {folder}: ") + ".*" + reason):
        read_adapters([folder], cfg)


def test_duplicate_names_and_dropped_modules_to_save(tmp_path):
    cfg = LlamaConfig.from_hf_config(make_hf_llama("llama2").config)
    a = _make_adapter(tmp_path / "a" / "same", 0, "llama2", target_modules=["q_proj"])
    b = _make_adapter(tmp_path / "b" / "same", 1, "llama2", target_modules=["v_proj"])
    with pytest.raises(ConversionError, match=re.escape(f"adapter {b}: duplicate adapter name 'same' (also {a})")):
        read_adapters([a, b], cfg)
    assert read_adapters([a, b], cfg, names=["x", "y"]).names == ("x", "y")
    m = _make_adapter(tmp_path / "mts", 2, "llama2", target_modules=["q_proj"], modules_to_save=["lm_head"])
    with pytest.warns(UserWarning, match=r"dropping modules_to_save weights \['base_model\.model\.lm_head\.weight'\]"):
        stacked = read_adapters([m], cfg, drop_modules_to_save=True)
    assert stacked.sources[0]["dropped_modules_to_save"] == ["base_model.model.lm_head.weight"]


# ------------------------------------------------------------------------------------------- the CLI
def test_cli_writes_checkpoint_that_reloads(setup, tmp_path, capsys):
    s = setup
    out = tmp_path / "meteora"
    args = ["adapters", "--base", str(s["base"]), "--adapters", *map(str, s["dirs"]), "--out", str(out),
            "--top-k", "2", "--temperature", "3", "--seed", "5"]
    assert convert_main(args) == 0
    ref = meteora_jax.from_pretrained(s["base"], s["dirs"], top_k=2, temperature=3.0, seed=5)
    back = checkpoint.load(out)
    assert back.meteora_config == ref.meteora_config
    np.testing.assert_array_equal(_logits(back, s["tokens"], s["mask"]), _logits(ref, s["tokens"], s["mask"]))
    meta = checkpoint.read_metadata(out)
    assert [src["name"] for src in meta["expert_sources"]] == s["names"]
    # an existing --out is refused before any work, and left intact
    assert convert_main(args) == 2
    assert "already exists" in capsys.readouterr().err
    # a meteora-jax checkpoint of the plain base works as --base; the MeteoRA checkpoint loads with a named expert
    base_ckpt = checkpoint.save(tmp_path / "base_ckpt", load_hf_llama(s["base"]))
    args2 = ["adapters", "--base", str(base_ckpt), "--adapters", *map(str, s["dirs"]), "--out", str(tmp_path / "m2"),
             "--top-k", "2", "--temperature", "3", "--seed", "5"]
    assert convert_main(args2) == 0
    np.testing.assert_array_equal(_logits(checkpoint.load(tmp_path / "m2"), s["tokens"], s["mask"]),
                                  _logits(back, s["tokens"], s["mask"]))
    forced = meteora_jax.from_pretrained(out, forced_expert="patterns")
    assert forced.meteora_config.forced_expert == s["names"].index("patterns")
    # bad arguments: a clear error, nothing written
    assert convert_main(["adapters", "--base", str(s["base"]), "--adapters", str(s["dirs"][0]), "--out",
                         str(tmp_path / "m3"), "--top-k", "2"]) == 2
    assert "top_k must be in 1..1" in capsys.readouterr().err and not (tmp_path / "m3").exists()
