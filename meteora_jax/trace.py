"""Drawing a routing trace (`meteora_jax.generate.RoutingTrace`): which expert each token used.

    mass = expert_mass(experts [T, L, M, k], weights [T, L, M, k], E)   -> [T, E]
    mass[t, e] = mean over layers l and modules m of  sum_j weights[t, l, m, j] * (experts[t, l, m, j] == e)

Each row of `mass` sums to 1 (the routing weights of one token sum to 1 per linear). `save_png` draws it as
the paper's Figure 4 (experts by tokens, one panel per prompt, a line where generation starts);
`render_terminal` prints the tokens coloured by their dominant expert (ANSI 24-bit colour), with a legend.
"""

from __future__ import annotations

import colorsys
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def expert_mass(experts: np.ndarray, weights: np.ndarray, num_experts: int) -> np.ndarray:
    """`[T, E]` float64: each token's routing weight per expert, averaged over layers and modules."""
    experts, weights = np.asarray(experts), np.asarray(weights, np.float64)
    t = experts.shape[0]
    per_token = int(np.prod(experts.shape[1:-1]))  # L * M
    mass = np.zeros((t, num_experts))
    rows = np.broadcast_to(np.arange(t).reshape((t,) + (1,) * (experts.ndim - 1)), experts.shape)
    np.add.at(mass, (rows.ravel(), experts.ravel()), weights.ravel())
    return mass / per_token


def token_texts(tokenizer, ids: Sequence[int]) -> list[str]:
    """Each token's own text (special tokens as their names)."""
    return [tokenizer.convert_tokens_to_string([t]) for t in tokenizer.convert_ids_to_tokens(list(ids))]


def palette(n: int) -> list[tuple[int, int, int]]:
    """`n` distinguishable RGB colours (hues spread, lightness alternating)."""
    out = []
    for i in range(n):
        h = (i * 0.618033988749895) % 1.0
        light = (0.62, 0.5, 0.72)[i % 3]
        out.append(tuple(int(255 * c) for c in colorsys.hls_to_rgb(h, light, 0.85)))
    return out


def render_terminal(trace, row: int, texts: Sequence[str], *, color: bool = True) -> str:
    """Prompt `row`'s tokens, each coloured by its dominant expert; generation begins after `│`.

    With `color=False`, runs of tokens that share a dominant expert are written `«name: text»` instead."""
    names = trace.expert_names
    mass = expert_mass(trace.experts[row], trace.weights[row], len(names))
    top = mass.argmax(axis=1)
    cols = palette(len(names))
    n_prompt = trace.prompt_lengths[row]
    used = sorted(set(top.tolist()))
    if color:
        legend = "  ".join(f"\x1b[1;38;2;{cols[e][0]};{cols[e][1]};{cols[e][2]}m{names[e]}\x1b[0m" for e in used)
        parts = []
        for i, (txt, e) in enumerate(zip(texts, top, strict=True)):
            if i == n_prompt:
                parts.append("\x1b[0m│")
            parts.append(f"\x1b[38;2;{cols[e][0]};{cols[e][1]};{cols[e][2]}m{txt}")
        return f"experts: {legend}\n" + "".join(parts) + "\x1b[0m"
    out, run, cur = [], [], None
    for i, (txt, e) in enumerate(zip(texts, top, strict=True)):
        if (e != cur or i == n_prompt) and run:
            out.append(f"«{names[cur]}: {''.join(run)}»")
            run = []
        if i == n_prompt:
            out.append("│")
        cur = e
        run.append(txt)
    if run:
        out.append(f"«{names[cur]}: {''.join(run)}»")
    return "".join(out)


def save_png(trace, path: str | os.PathLike, texts: Sequence[Sequence[str]], *, title: str | None = None,
             overwrite: bool = False, max_labels: int = 160) -> Path:
    """Draw every prompt's `expert_mass` (experts x tokens) into one PNG at `path` (written atomically)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("saving a routing picture needs matplotlib: pip install matplotlib") from None
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists (pass overwrite=True / --overwrite to replace it)")
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path}: expected a .png file name")
    names = trace.expert_names
    rows = len(trace.experts)
    longest = max(len(t) for t in trace.tokens)
    width = min(40.0, max(7.0, 2.5 + 0.18 * longest))
    fig, axes = plt.subplots(rows, 1, figsize=(width, rows * (1.2 + 0.22 * len(names))), squeeze=False)
    for i, ax in enumerate(axes[:, 0]):
        mass = expert_mass(trace.experts[i], trace.weights[i], len(names))
        im = ax.imshow(mass.T, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(1e-9, float(mass.max())),
                       interpolation="nearest")
        ax.set_yticks(range(len(names)), names, fontsize=7)
        step = max(1, -(-len(texts[i]) // max_labels))
        ax.set_xticks(range(0, len(texts[i]), step), [repr(t)[1:-1] for t in texts[i][::step]], rotation=90,
                      fontsize=6)
        ax.axvline(trace.prompt_lengths[i] - 0.5, color="white", linewidth=1.5)
        ax.set_ylabel("expert")
        ax.set_title(f"prompt {i}: mean routing weight per expert over layers and modules\n"
                     "(generated tokens right of the white line)", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.02, pad=0.01)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()
    return path
