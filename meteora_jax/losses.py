"""The MeteoRA training loss: LM cross-entropy + coef x cross-entropy of every gate's logits vs token task ids.

Batch arrays (see `meteora_jax.data.Batch`): tokens [B, T], attention_mask [B, T], task_ids [B, T] (-1 on
padding), response [B, T] (token is part of a response).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def lm_loss(logits: jax.Array, batch: dict, response_only: bool) -> tuple[jax.Array, jax.Array]:
    """Mean next-token cross-entropy over real targets (response targets only if `response_only`); and count."""
    targets = batch["tokens"][:, 1:]
    weight = batch["attention_mask"][:, 1:] & batch["attention_mask"][:, :-1]
    if response_only:
        weight = weight & batch["response"][:, 1:]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), targets)
    w = weight.astype(jnp.float32)
    n = jnp.sum(w)
    return jnp.sum(ce * w) / jnp.maximum(n, 1.0), n


def gate_terms(aux: dict, task_ids: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(mean gate cross-entropy, mean top-1 accuracy, per-token accuracy [B, T]) over all layers and modules.

    `aux[module].logits` is `[L, B, T, E]`; tokens with task id -1 are ignored."""
    if not aux:
        z = jnp.zeros((), jnp.float32)
        return z, z, jnp.zeros(task_ids.shape, jnp.float32)
    valid = task_ids >= 0
    labels = jnp.maximum(task_ids, 0)
    ces, hits = [], []
    for routing in aux.values():
        logits = routing.logits.astype(jnp.float32)  # [L, B, T, E]
        lab = jnp.broadcast_to(labels, logits.shape[:-1])
        ces.append(optax.softmax_cross_entropy_with_integer_labels(logits, lab).mean(0))  # [B, T]
        hits.append((jnp.argmax(logits, -1) == lab).astype(jnp.float32).mean(0))
    ce = jnp.mean(jnp.stack(ces), 0)
    acc_tok = jnp.mean(jnp.stack(hits), 0)
    v = valid.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(v), 1.0)
    return jnp.sum(ce * v) / n, jnp.sum(acc_tok * v) / n, acc_tok * v


def meteora_loss(model, batch: dict, *, gate_coef: float, response_only: bool):
    """Total loss and metrics (`lm_loss`, `gate_loss`, `gate_acc`, `tokens`)."""
    out = model(batch["tokens"], batch["attention_mask"])
    lm, n = lm_loss(out.logits, batch, response_only)
    gate, acc, _ = gate_terms(out.aux, batch["task_ids"])
    total = lm + gate_coef * gate
    return total, {"loss": total, "lm_loss": lm, "gate_loss": gate, "gate_acc": acc, "tokens": n}
