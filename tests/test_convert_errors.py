"""Bad input to the Hugging Face converter: each case gets a clear error naming the file or key."""

import json

import numpy as np
import pytest
from conftest import make_hf_llama
from safetensors.numpy import load_file, save_file

from convert import ConversionError
from convert.__main__ import main as convert_main
from convert.hf_llama import load_hf_llama


@pytest.fixture
def saved(tmp_path):
    model = make_hf_llama("llama2")
    model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def _edit(folder, fn):
    f = folder / "model.safetensors"
    tensors = load_file(f)
    fn(tensors)
    save_file(tensors, f, metadata={"format": "pt"})
    return f


def test_missing_config(saved):
    (saved / "config.json").unlink()
    with pytest.raises(ConversionError, match=r"hf: missing config\.json"):
        load_hf_llama(saved)


def test_missing_key(saved):
    f = _edit(saved, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ConversionError, match=r"safetensors: missing key\(s\) \[.model\.layers\.1\.mlp\.up"):
        load_hf_llama(saved)
    assert f.exists()


def test_unexpected_key(saved):
    _edit(saved, lambda t: t.__setitem__("model.layers.0.extra.weight", np.ones(3, np.float32)))
    with pytest.raises(ConversionError, match=r"model\.safetensors: unexpected key\(s\) \['model\.layers\.0\.extra"):
        load_hf_llama(saved)


def test_wrong_shape(saved):
    _edit(saved, lambda t: t.__setitem__("model.norm.weight", np.ones(7, np.float32)))
    with pytest.raises(ConversionError, match=r"tensor 'model\.norm\.weight' has shape \(7,\), expected \(64,\)"):
        load_hf_llama(saved)


def test_truncated_safetensors(saved):
    f = saved / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match=r"model\.safetensors: (truncated|not a readable)"):
        load_hf_llama(saved)


def test_corrupt_safetensors(saved):
    (saved / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + b"\0" * 64)
    with pytest.raises(ConversionError, match=r"model\.safetensors: not a readable safetensors file"):
        load_hf_llama(saved)


def test_not_llama(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["model_type"] = "mistral"
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match=r"config\.json: model_type is 'mistral', expected 'llama'"):
        load_hf_llama(saved)


def test_missing_shard(tmp_path):
    make_hf_llama("llama2").save_pretrained(tmp_path, max_shard_size="20KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(ConversionError, match=rf"lists shard {victim.name}, which is missing"):
        load_hf_llama(tmp_path)


def test_cli_refuses_existing_output_and_writes_nothing_on_error(saved, tmp_path, capsys):
    out = tmp_path / "ck"
    assert convert_main(["hf", "--src", str(saved), "--out", str(out), "--prompt", ""]) == 0
    before = sorted(p.name for p in out.rglob("*"))
    assert convert_main(["hf", "--src", str(saved), "--out", str(out), "--prompt", ""]) == 2
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in out.rglob("*")) == before
    # a failing conversion leaves no output folder behind
    (saved / "config.json").unlink()
    out2 = tmp_path / "ck2"
    assert convert_main(["hf", "--src", str(saved), "--out", str(out2), "--prompt", ""]) == 2
    assert "missing config.json" in capsys.readouterr().err
    assert not out2.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ck", "hf"]
