"""Test helpers for the original-MeteoRA-layout and export tests: random experts, layout files on disk, and a
small torch implementation of the reference's MoE-LoRA linear (forward hooks on a transformers Llama)."""

from __future__ import annotations

import json

import numpy as np

from meteora_jax.meteora import ExpertWeights, MeteoraConfig, attach_experts


def linear_dims(config, module):
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    h, f = config.hidden_size, config.intermediate_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "gate_proj": (h, f),
            "up_proj": (h, f), "down_proj": (f, h)}[module]


def random_meteora(base, names, rank, modules, scalings, seed=0, **routing):
    """A MeteoraLlama over `base` with random experts `[E, in, r]` / `[E, r, out]` and random gates.

    `scalings[e]` is a float, or a `{module: float}` dict (per-module scalings of one expert)."""
    rng = np.random.default_rng(seed)
    mcfg = MeteoraConfig(tuple(names), rank, tuple(modules), **routing)
    e = len(names)
    experts, gates = {}, {}
    for layer in range(base.config.num_hidden_layers):
        for m in modules:
            d_in, d_out = linear_dims(base.config, m)
            s = np.array([sc[m] if isinstance(sc, dict) else sc for sc in scalings], np.float32)
            experts[(layer, m)] = ExpertWeights(
                (rng.standard_normal((e, d_in, rank)) / np.sqrt(d_in)).astype(np.float32),
                (rng.standard_normal((e, rank, d_out)) / np.sqrt(rank)).astype(np.float32), s)
            gates[(layer, m)] = rng.standard_normal((d_in, e)).astype(np.float32)
    return attach_experts(base, mcfg, experts, gates=gates)


def save_safetensors(tensors: dict, folder, shards: int = 1, name: str = "model"):
    """Write `tensors` as `name.safetensors`, or `shards` files plus `name.safetensors.index.json`."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(tensors)
    if shards == 1:
        save_file({k: tensors[k] for k in keys}, folder / f"{name}.safetensors", metadata={"format": "pt"})
        return folder
    weight_map = {}
    for i, part in enumerate(np.array_split(np.array(keys, dtype=object), shards)):
        fname = f"{name}-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k] for k in part}, folder / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    (folder / f"{name}.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def reference_hooks(hf_model, layout: dict, *, top_k: int, temperature: float, routing: str, scalings,
                    prefix: str = "base_model.model."):
    """Forward hooks on `hf_model`'s linears that add the reference's MoE-LoRA term, read from the layout:

        logits = x @ moe_gate.T                                   [N, E]
        accelerated path: w, idx = topk(logits, k); w = softmax(w / T)  (k == 1: w = 1)
        plain path:       p = softmax(logits); w, idx = topk(p, k); w /= sum(w)   (no temperature)
        y += sum_j w_j * s[idx_j] * (x @ lora_A[idx_j*r:(idx_j+1)*r].T) @ lora_B[:, idx_j*r:(idx_j+1)*r].T

    `scalings[e]`: float or `{module: float}`. Returns the hook handles (call `.remove()`)."""
    import torch

    handles = []
    for name, mod in hf_model.named_modules():
        key = f"{prefix}{name}.lora_A.weight"
        if key not in layout:
            continue
        a_cat = torch.from_numpy(np.asarray(layout[key], np.float32))
        b_cat = torch.from_numpy(np.asarray(layout[f"{prefix}{name}.lora_B.weight"], np.float32))
        gate = torch.from_numpy(np.asarray(layout[f"{prefix}{name}.moe_gate.weight"], np.float32))
        module = name.rsplit(".", 1)[1]
        s = [sc[module] if isinstance(sc, dict) else sc for sc in scalings]

        def hook(_mod, inputs, output, a_cat=a_cat, b_cat=b_cat, gate=gate, s=s):
            x = inputs[0].reshape(-1, inputs[0].shape[-1])
            e, r = gate.shape[0], a_cat.shape[0] // gate.shape[0]
            logits = x @ gate.T
            if routing == "topk_softmax":
                w, idx = torch.topk(logits, top_k, dim=-1)
                w = torch.ones_like(w) if top_k == 1 else torch.softmax(w / temperature, dim=-1)
            else:
                w, idx = torch.topk(torch.softmax(logits, dim=-1), top_k, dim=-1)
                w = w / w.sum(-1, keepdim=True)
            delta = torch.zeros(x.shape[0], b_cat.shape[0], dtype=x.dtype)
            for i in range(e):
                tok, slot = torch.where(idx == i)
                if len(tok):
                    y = (x[tok] @ a_cat[i * r:(i + 1) * r].T) @ b_cat[:, i * r:(i + 1) * r].T
                    delta.index_add_(0, tok, y * s[i] * w[tok, slot, None])
            return output + delta.reshape(*output.shape[:-1], -1)

        handles.append(mod.register_forward_hook(hook))
    assert handles, "no linear of the model has experts in the layout"
    return handles
