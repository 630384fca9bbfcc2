"""MeteoRA checkpoint -> PEFT adapter folders (PEFT loads each, logits equal our forced expert; export then
import is bit-exact; original configs and ranks restored), the refusals, and `python -m convert info`."""

import json

import numpy as np
import pytest
from _helpers_meteora_ckpt import random_meteora
from conftest import assert_rel_close, hf_logits, left_padded_batch, make_hf_llama
from flax import nnx
from safetensors.numpy import load_file

from convert import ConversionError
from convert.__main__ import main as convert_main
from convert.export import export_peft
from convert.hf_llama import load_hf_llama
from convert.info import checkpoint_info, render_info
from meteora_jax import checkpoint
from meteora_jax.meteora import ExpertParam, ExpertScaling, GateParam, set_routing

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

KIND = "llama3"
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SPECS = {  # PEFT adapters of different ranks, alphas, rsLoRA, patterns and coverage
    "r4": dict(r=4, lora_alpha=8, target_modules=ALL),
    "r8_rslora": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
    "r16_qv": dict(r=16, lora_alpha=24, target_modules=["q_proj", "v_proj"]),
    "patterns": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "o_proj", "down_proj"],
                     rank_pattern={"k_proj": 4, "model.layers.1.mlp.down_proj": 2}, alpha_pattern={"o_proj": 5},
                     layers_to_transform=[0, 1]),
    "layer1": dict(r=4, lora_alpha=4, target_modules=["k_proj", "up_proj"], layers_to_transform=[1]),
}


def _flat(model):
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def _peft_with(dirs, names):
    pm = peft.PeftModel.from_pretrained(make_hf_llama(KIND), str(dirs[0]), adapter_name=names[0])
    for name, d in zip(names[1:], dirs[1:], strict=True):
        pm.load_adapter(str(d), adapter_name=name)
    return pm.eval()


def _check_forced_equals_peft(model, dirs, names):
    tokens, mask = left_padded_batch(np.random.default_rng(4), 128, lengths=(7, 3), total=7)
    pm = _peft_with(dirs, names)
    base = hf_logits(make_hf_llama(KIND), tokens, mask)
    for i, name in enumerate(names):
        pm.set_adapter(name)
        ref = hf_logits(pm, tokens, mask)
        assert np.abs(ref - base).max() > 1e-3, name  # the adapter matters
        set_routing(model, forced_expert=i)
        assert_rel_close(np.asarray(model(tokens, mask).logits), ref, mask, 1e-4)
    set_routing(model, forced_expert=None)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    make_hf_llama(KIND).save_pretrained(root / "base")
    dirs = []
    for seed, (name, kw) in enumerate(SPECS.items()):
        torch.manual_seed(20 + seed)
        pm = peft.get_peft_model(make_hf_llama(KIND), peft.LoraConfig(init_lora_weights=False, **kw))
        pm.save_pretrained(root / "in" / name)
        dirs.append(root / "in" / name)
    return dict(root=root, base=root / "base", dirs=dirs, names=list(SPECS))


def test_export_restores_each_adapter_and_import_is_bit_exact(adapters, tmp_path):
    from meteora_jax import from_pretrained

    a = adapters
    model = from_pretrained(a["base"], a["dirs"], top_k=2, temperature=3.0)
    assert model.meteora_config.rank == 16
    ck = checkpoint.save(tmp_path / "ck", model)
    assert convert_main(["export", "--checkpoint", str(ck), "--out", str(tmp_path / "out")]) == 0
    out_dirs = [tmp_path / "out" / n for n in a["names"]]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(a["names"])  # no temp folders left
    for src, dst in zip(a["dirs"], out_dirs, strict=True):
        orig = json.loads((src / "adapter_config.json").read_text())
        got = json.loads((dst / "adapter_config.json").read_text())
        for k in ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "layers_to_transform"):
            assert got.get(k) == orig.get(k), (src.name, k)
        assert sorted(got["target_modules"]) == sorted(orig["target_modules"])
        want, have = load_file(src / "adapter_model.safetensors"), load_file(dst / "adapter_model.safetensors")
        assert want.keys() == have.keys(), src.name  # same coverage, own rank (no zero padding)
        for k in want:
            np.testing.assert_array_equal(have[k], want[k], err_msg=f"{src.name} {k}")
    _check_forced_equals_peft(checkpoint.load(ck), out_dirs, a["names"])

    again = from_pretrained(a["base"], out_dirs, top_k=2, temperature=3.0)
    ours, theirs = _flat(model), _flat(again)
    assert ours.keys() == theirs.keys()
    for k in ours:
        if k[-1] != "gate":  # gates are not exported (both are the same seeded init here)
            np.testing.assert_array_equal(theirs[k], ours[k], err_msg=str(k))
    assert again.meteora_config == model.meteora_config


def test_export_without_sources_loads_in_peft(tmp_path):
    hf = make_hf_llama(KIND)
    hf.save_pretrained(tmp_path / "hf")
    names = ("plain", "scaled", "per/module")
    scalings = [1.0, 0.375, {"q_proj": 2.0, "v_proj": 0.5, "down_proj": 1.25}]
    model = random_meteora(load_hf_llama(tmp_path / "hf"), names, 4, ("q_proj", "v_proj", "down_proj"), scalings)
    folders = export_peft(model, tmp_path / "out")
    assert [f.name for f in folders] == ["plain", "scaled", "per_module"]
    cfg = json.loads((folders[2] / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    assert cfg["lora_alpha"] == 8.0 and sorted(cfg["alpha_pattern"].values()) == [2.0, 2.0, 5.0, 5.0]
    assert json.loads((folders[1] / "adapter_config.json").read_text())["lora_alpha"] == 1.5
    _check_forced_equals_peft(model, folders, ["plain", "scaled", "per_module"])


# ---------------------------------------------------------------------------------------------- bad input
@pytest.fixture
def small_ck(tmp_path):
    make_hf_llama(KIND).save_pretrained(tmp_path / "hf")
    base = load_hf_llama(tmp_path / "hf")
    model = random_meteora(base, ("a", "b"), 4, ("q_proj",), [1.0, 2.0])
    return tmp_path, base, model, checkpoint.save(tmp_path / "ck", model)


def test_existing_output_refused_and_atomic(small_ck, monkeypatch, capsys):
    tmp, _, model, ck = small_ck
    out = tmp / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    assert convert_main(["export", "--checkpoint", str(ck), "--out", str(out)]) == 2
    assert "out: already exists" in capsys.readouterr().err and (out / "keep").read_text() == "x"

    import safetensors.numpy

    calls = []

    def failing(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(tensors, path, metadata=metadata)

    real = safetensors.numpy.save_file
    monkeypatch.setattr(safetensors.numpy, "save_file", failing)
    with pytest.raises(OSError, match="disk full"):
        export_peft(model, out, overwrite=True)
    assert sorted(p.name for p in tmp.iterdir()) == ["ck", "hf", "out"] and (out / "keep").exists()
    monkeypatch.setattr(safetensors.numpy, "save_file", real)
    assert convert_main(["export", "--checkpoint", str(ck), "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a", "b"]


def test_refusals(small_ck, tmp_path):
    tmp, base, model, _ = small_ck
    plain = checkpoint.save(tmp / "plain", base)
    with pytest.raises(ConversionError, match=r"plain: a plain Llama checkpoint, no MeteoRA experts"):
        export_peft(plain, tmp / "o1")
    with pytest.raises(ConversionError, match=r"nowhere: no such checkpoint folder"):
        export_peft(tmp / "nowhere", tmp / "o2")
    clash = random_meteora(base, ("x/y", "x_y"), 4, ("q_proj",), [1.0, 2.0])
    with pytest.raises(ConversionError, match=r"give the same folder name 'x_y'"):
        export_peft(clash, tmp / "o3")
    # a source that no longer describes the expert: weights beyond the adapter's rank, or another scaling
    src = {"name": "a", "adapter_config": {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q_proj"]}}
    model.expert_sources = (json.dumps(src), json.dumps({**src, "name": "b"}))
    with pytest.raises(ConversionError, match=r"expert 'a': model\.layers\.0\.self_attn\.q_proj has non-zero weights "
                                              r"beyond its adapter's rank 2 \(checkpoint rank 4\)"):
        export_peft(model, tmp / "o4")
    for lin in (model.layers[0].self_attn.q_proj, model.layers[1].self_attn.q_proj):
        lin.lora_a[...] = lin.lora_a[...].at[:, :, 2:].set(0.0)
    with pytest.raises(ConversionError, match=r"expert 'b': model\.layers\.0\.self_attn\.q_proj has scaling 2\.0 but "
                                              r"its source gives 1\.0"):
        export_peft(model, tmp / "o5")
    assert not any((tmp / f"o{i}").exists() for i in range(1, 6))


# ---------------------------------------------------------------------------------------------- info
def test_info_of_meteora_and_plain_checkpoints(small_ck, capsys):
    tmp, base, _, _ = small_ck
    model = random_meteora(base, ("math", "code", "chat"), 4, ("q_proj", "down_proj"),
                           [0.5, 2.0, {"q_proj": 1.5, "down_proj": 0.25}], top_k=1, temperature=7.0)
    ck = checkpoint.save(tmp / "m", model)
    info = checkpoint_info(ck)
    m = info["meteora"]
    assert m["experts"] == ["math", "code", "chat"] and m["rank"] == 4
    assert m["target_modules"] == ["q_proj", "down_proj"]
    assert m["scalings"] == {"math": 0.5, "code": 2.0, "chat": {"q_proj": 1.5, "down_proj": 0.25}}
    assert m["routing"]["top_k"] == 1 and m["routing"]["temperature"] == 7.0
    # counts against the model's own arrays
    counts = {"gate": 0, "experts": 0, "base": 0}
    for _, v in nnx.to_flat_state(nnx.state(model)):
        kind = ("gate" if isinstance(v, GateParam) else "experts" if isinstance(v, ExpertParam)
                else None if isinstance(v, ExpertScaling) else "base")
        if kind:
            counts[kind] += np.asarray(v.get_value()).size
    assert {k: info["params"][k]["count"] for k in counts} == counts
    assert info["params"]["experts"]["bytes"] == 4 * counts["experts"]
    c = base.config
    assert counts["gate"] == c.num_hidden_layers * 3 * (c.hidden_size + c.intermediate_size)
    text = render_info(info)
    assert "3 experts, rank 4, targets q_proj, down_proj" in text and "top_k 1, temperature 7" in text
    assert "chat  q_proj 1.5, down_proj 0.25" in text

    plain = checkpoint_info(checkpoint.save(tmp / "plain", base))
    assert plain["kind"] == "llama" and "meteora" not in plain
    hf_count = sum(p.numel() for p in make_hf_llama(KIND).parameters())  # tied embeddings counted once
    assert plain["params"]["base"]["count"] == plain["params"]["total"]["count"] == hf_count
    assert plain["base"]["layers"] == 2 and plain["base"]["vocab_size"] == 128 and plain["base"]["dtype"] == "float32"
    assert convert_main(["info", str(tmp / "plain")]) == 0
    out = capsys.readouterr().out
    assert "Llama, 2 layers, hidden 64" in out and "\nmeteora " not in out and "experts" not in out
    assert convert_main(["info", "--json", str(ck)]) == 0
    assert json.loads(capsys.readouterr().out)["meteora"]["experts"] == ["math", "code", "chat"]
    assert convert_main(["info", str(tmp / "nowhere")]) == 2
