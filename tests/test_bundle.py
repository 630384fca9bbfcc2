"""experiments/reproduce/bundle.py: trained adapters and gates out to small safetensors files and back into a
working folder whose checkpoints equal the originals (gates exactly, adapters to bfloat16 rounding)."""

from __future__ import annotations

import json

import jax
import ml_dtypes
import numpy as np
import peft
import pytest
import torch
from _helpers_reproduce import load_script
from conftest import make_hf_llama
from flax import nnx
from safetensors.numpy import load_file

from meteora_jax import checkpoint
from meteora_jax.api import load_model
from meteora_jax.meteora import ExpertParam, GateParam

bundle = load_script("bundle")
KIND = "llama3"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A reproduction working folder: base, two task adapters, a LoRA-B and trained (random) gates."""
    root = tmp_path_factory.mktemp("work")
    make_hf_llama(KIND).save_pretrained(root / "base")
    for i, (group, name) in enumerate([("adapters", "alpha"), ("adapters", "beta"), ("adapters_b", "lora_b")]):
        torch.manual_seed(100 + i)
        pm = peft.get_peft_model(make_hf_llama(KIND), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                                      init_lora_weights=False))
        pm.save_pretrained(root / group / name)
    model = load_model(base=root / "base", adapters=[root / "adapters" / "alpha", root / "adapters" / "beta"])
    rng = np.random.default_rng()
    state = nnx.state(model, GateParam)
    nnx.update(model, jax.tree_util.tree_map(lambda x: rng.standard_normal(x.shape).astype(np.float32), state))
    checkpoint.save(root / "runs" / "gates" / "final", model)
    return root


def _leaves(model, kind):
    return jax.tree_util.tree_leaves(nnx.state(model, kind))


def test_pack_unpack_round_trip(work, tmp_path):
    files = bundle.pack(work, tmp_path / "b", max_mb=0.03)
    assert len(files) > 1 and all(f.stat().st_size <= 0.03 * 2**20 for f in files)
    bundle.unpack(tmp_path / "b", tmp_path / "w2", work / "base")
    for group, name in [("adapters", "alpha"), ("adapters", "beta"), ("adapters_b", "lora_b")]:
        old, new = load_file(str(work / group / name / "adapter_model.safetensors")), \
            load_file(str(tmp_path / "w2" / group / name / "adapter_model.safetensors"))
        assert sorted(old) == sorted(new)
        for k in old:
            np.testing.assert_array_equal(new[k], old[k].astype(ml_dtypes.bfloat16).astype(np.float32))
        assert json.loads((tmp_path / "w2" / group / name / "adapter_config.json").read_text()) == \
            json.loads((work / group / name / "adapter_config.json").read_text())
    a = checkpoint.load(work / "runs" / "gates" / "final")
    b = checkpoint.load(tmp_path / "w2" / "runs" / "gates" / "final")
    assert a.meteora_config == b.meteora_config
    for x, y in zip(_leaves(a, GateParam), _leaves(b, GateParam), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for x, y in zip(_leaves(a, ExpertParam), _leaves(b, ExpertParam), strict=True):
        x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
        np.testing.assert_allclose(y, x, rtol=2**-8, atol=1e-30)
        assert not np.array_equal(x, y) or not x.any()  # rounded to bfloat16 on the way
    assert (tmp_path / "w2" / "ckpt" / "lora_b").is_dir()


def test_unpack_without_gates_and_errors(work, tmp_path):
    bundle.pack(work, tmp_path / "b", max_mb=15)
    bundle.unpack(tmp_path / "b", tmp_path / "w2", work / "base", gates=False)
    assert (tmp_path / "w2" / "ckpt" / "meteora").is_dir() and not (tmp_path / "w2" / "runs").exists()
    with pytest.raises(SystemExit, match="no bundle-"):
        bundle.unpack(tmp_path / "nothing", tmp_path / "w3", work / "base")
    (tmp_path / "b" / "bundle-01.safetensors").write_bytes((tmp_path / "b" / "bundle-00.safetensors").read_bytes())
    with pytest.raises(SystemExit, match="one of 1 chunks"):
        bundle.unpack(tmp_path / "b", tmp_path / "w3", work / "base")
    with pytest.raises(SystemExit, match="does not fit"):
        bundle.pack(work, tmp_path / "b3", max_mb=0.002)
    with pytest.raises(SystemExit, match="no adapters"):
        bundle.pack(tmp_path / "empty", tmp_path / "b2", max_mb=15)


def test_unpack_refuses_chunks_of_two_packs(work, tmp_path):
    """Chunks of two pack runs (a new last chunk with retrained gates beside old ones) are refused, by pack id and,
    for files without one, by the adapters' incomplete tensor sets."""
    a = bundle.pack(work, tmp_path / "a", max_mb=0.03)
    b = bundle.pack(work, tmp_path / "b", max_mb=0.03)
    assert len(a) == len(b) > 2
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for i, f in enumerate(a):
        (mixed / f.name).write_bytes((b if i == len(a) - 1 else a)[i].read_bytes())
    with pytest.raises(SystemExit, match="different packs"):
        bundle.unpack(mixed, tmp_path / "w", work / "base")
    # files of a pack without ids (written before ids existed) where one chunk's boundary moved: the adapters'
    # tensor sets tell
    from safetensors import safe_open
    from safetensors.numpy import save_file

    def rewrite(src, dst, drop=()):
        with safe_open(str(src), "np") as g:
            meta = {k: v for k, v in g.metadata().items() if k != "pack_id"}
            data = {k: g.get_tensor(k) for k in g.keys() if k not in drop}
        save_file(data, str(dst), metadata=meta)

    old = tmp_path / "old"
    old.mkdir()
    with safe_open(str(a[1]), "np") as g:
        victim = sorted(k for k in g.keys() if k.startswith("adapters/"))[0]
    for f in a:
        rewrite(f, old / f.name, drop=(victim,))
    with pytest.raises(SystemExit, match="different tensor sets"):
        bundle.unpack(old, tmp_path / "w2", work / "base")
