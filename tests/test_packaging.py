"""Our top-level package `kernels` shares its import name with an unrelated Hugging Face package that
transformers probes for: with ours installed, transformers and PEFT must still work."""

import subprocess
import sys

CODE = """
import kernels, meteora_jax, convert
assert kernels.__file__.endswith("kernels/__init__.py"), kernels.__file__
import torch, transformers, peft
from transformers.utils.import_utils import is_kernels_available
assert not is_kernels_available(), "transformers mistook our `kernels` for Hugging Face's"
from transformers import LlamaConfig, LlamaForCausalLM
m = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2))
cfg = peft.LoraConfig(r=2, target_modules=["q_proj"])
pm = peft.get_peft_model(m, cfg)
out = pm(torch.tensor([[1, 2, 3]])).logits
assert out.shape == (1, 3, 32) and torch.isfinite(out).all()
print("ok")
"""


def test_transformers_and_peft_work_beside_our_kernels_package(tmp_path):
    # run from an unrelated folder so the installed package, not the source tree, is imported
    r = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().endswith("ok")
