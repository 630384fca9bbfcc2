"""Training on a device mesh equals training on one device (8 simulated CPU devices, in a subprocess)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from jax.sharding import PartitionSpec as P
from test_train import setup  # noqa: F401  (the tiny MeteoRA checkpoint, tokenizer and tasks)

from meteora_jax.sharding import make_mesh, parse_mesh, spec_for

SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests!r})
    import jax
    from test_train import _cfg
    from meteora_jax.train import train
    from pathlib import Path
    assert jax.device_count() == 8, jax.devices()
    root, out = Path({root!r}), {{}}
    for mesh, gates in {meshes!r}:
        run = root / ("run_" + str(mesh).replace(",", "_").replace("=", "") + gates)
        train(_cfg(root, run, steps=5, batch_size=8, lr=5e-2, train="gates,experts", mesh=mesh,
                   gate_sharding=gates, eval_every=5, eval_batches=0))
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        out[str(mesh) + gates] = rows
    print("RESULT" + json.dumps(out))
""")

MESHES = [(None, "split"), ("data=2,fsdp=2,tensor=2", "split"), ("fsdp=2,tensor=4", "replicated")]


@pytest.mark.slow
def test_losses_on_meshes_equal_one_device(setup):  # noqa: F811
    code = SCRIPT.format(tests=str(Path(__file__).parent), root=str(setup), meshes=MESHES)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads(r.stdout.split("RESULT", 1)[1])
    ref = res["Nonesplit"]
    for key, rows in res.items():
        assert len(rows) == len(ref)
        for a, b in zip(ref, rows, strict=True):
            if "loss" in a:
                for k in ("loss", "lm_loss", "gate_loss", "gate_acc"):
                    assert abs(a[k] - b[k]) <= 2e-5 * max(1.0, abs(a[k])), (key, a["step"], k, a[k], b[k])
            else:
                assert abs(a["eval"]["lm_loss"] - b["eval"]["lm_loss"]) <= 2e-5 * a["eval"]["lm_loss"], key


GEN_SCRIPT = textwrap.dedent("""
    import json
    import jax
    import numpy as np
    from flax import nnx
    from meteora_jax.config import LlamaConfig
    from meteora_jax.generate import Sampling, generate
    from meteora_jax.meteora import MeteoraConfig, MeteoraLlama, set_routing
    from meteora_jax.sharding import make_mesh
    assert jax.device_count() == 8
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model = MeteoraLlama(cfg, MeteoraConfig(expert_names=("a", "b", "c", "d"), rank=4, top_k=2), rngs=nnx.Rngs(3))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 96, n).tolist() for n in (5, 9, 3, 7)]
    out = {{}}
    for mesh in {meshes!r}:
        for strategy in ("dense",):
            set_routing(model, strategy=strategy)
            m = make_mesh(mesh) if mesh else None
            g = generate(model, prompts, max_new_tokens=8, eos_token_ids=(), mesh=m, trace=True)
            s = generate(model, prompts, max_new_tokens=8, eos_token_ids=(), mesh=m,
                         sampling=Sampling(temperature=0.8, top_k=20, seed=1))
            out[str(mesh) + strategy] = {{"greedy": g.tokens, "sampled": s.tokens,
                                         "experts": [np.asarray(e).tolist() for e in g.trace.experts]}}
    print("RESULT" + json.dumps(out))
""")


@pytest.mark.slow
def test_generation_on_meshes_equals_one_device():
    meshes = [None, "tensor=8", "fsdp=2,tensor=2,data=2"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    r = subprocess.run([sys.executable, "-c", GEN_SCRIPT.format(meshes=meshes)], capture_output=True, text=True,
                       env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads(r.stdout.split("RESULT", 1)[1])
    for strategy in ("dense",):
        ref = res["None" + strategy]
        assert all(len(t) == 8 for t in ref["greedy"])
        for mesh in meshes[1:]:
            got = res[str(mesh) + strategy]
            assert got["greedy"] == ref["greedy"], (mesh, strategy)
            assert got["sampled"] == ref["sampled"], (mesh, strategy)
            assert got["experts"] == ref["experts"], (mesh, strategy)


def test_mesh_flags_and_rules():
    assert parse_mesh("data=2,tensor=4") == {"data": 2, "fsdp": 1, "tensor": 4}
    with pytest.raises(ValueError, match="expected comma-separated axis=size"):
        parse_mesh("data=2,pipeline=2")
    with pytest.raises(ValueError, match="needs 4 devices, 1 are available"):
        make_mesh("data=4")
    mesh = make_mesh(None)
    assert spec_for("layers.0.self_attn.q_proj.lora_b", (4, 8, 32), mesh) == P(None, None, "tensor")
    assert spec_for("layers.3.mlp.down_proj.lora_a", (4, 64, 8), mesh) == P(None, "tensor", None)
    assert spec_for("opt_state.0.mu.layers.0.mlp.up_proj.gate", (32, 4), mesh) == P("fsdp", None)
    assert spec_for("layers.0.mlp.up_proj.gate", (32, 4), mesh, gates="replicated") == P()
