"""Orbax checkpoints of meteora-jax models, with the model's config stored beside the arrays.

Layout of a checkpoint folder:

    CKPT/meteora_jax.json   {"format": ..., "version": 1, "llama": LlamaConfig, "meteora": {...} | absent, ...}
    CKPT/state/             orbax PyTree checkpoint of `nnx.state(model)`

A checkpoint is written to a temporary sibling folder and renamed into place, so an interrupted save
never leaves a half-written checkpoint under the final name, and an existing one is replaced only
after the new one is complete (and only with `overwrite=True`).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from meteora_jax.config import LlamaConfig
from meteora_jax.llama import Llama

FORMAT = "meteora-jax"
VERSION = 1
META_FILE = "meteora_jax.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, or does not fit the model asked for."""


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def check_writable(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing output path unless `overwrite`; call before any expensive work."""
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists (pass overwrite=True / --overwrite to replace it)")
    return path


def atomic_dir(path: Path, write: Callable[[Path], None], overwrite: bool) -> None:
    """Run `write(tmp)` on a fresh sibling folder, then move it to `path` (replacing it if `overwrite`)."""
    path = check_writable(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def model_metadata(model: Llama) -> dict[str, Any]:
    meta: dict[str, Any] = {"format": FORMAT, "version": VERSION, "llama": model.config.to_dict()}
    extra = getattr(model, "checkpoint_metadata", None)
    if callable(extra):
        meta.update(extra())
    return meta


def save(path: str | os.PathLike, model: Llama, *, overwrite: bool = False) -> Path:
    """Save `model` (all its nnx state) and its config to the folder `path`. Returns the absolute path."""
    from meteora_jax.packed import is_packed

    if is_packed(model):
        raise ValueError(f"not saving to {path}: the model is packed for inference (meteora_jax.packed); "
                         "save the model before packing it")
    meta = model_metadata(model)
    state = nnx.state(model)

    def write(tmp: Path):
        tmp.mkdir(parents=True)
        ckptr = _checkpointer()
        ckptr.save(tmp / "state", state)
        ckptr.wait_until_finished()
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))

    path = Path(path).absolute()
    atomic_dir(path, write, overwrite)
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    meta_file = path / META_FILE
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    if not meta_file.exists() or not (path / "state").is_dir():
        raise CheckpointError(f"{path}: not a meteora-jax checkpoint (expected {META_FILE} and state/)")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_file}: corrupt ({e})") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"{meta_file}: format {meta.get('format')!r} version {meta.get('version')!r}, "
                              f"expected {FORMAT!r} version {VERSION}")
    return meta


def _diff(a: dict, b: dict) -> list[str]:
    return [f"{k}: checkpoint {a.get(k)!r} != model {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]


def _check_fits(path: Path, meta: dict[str, Any], model: Llama) -> None:
    mine = json.loads(json.dumps(model_metadata(model)))  # tuples -> lists, as stored
    ignore = {"dtype", "param_dtype"}
    diffs = _diff({k: v for k, v in meta["llama"].items() if k not in ignore},
                  {k: v for k, v in mine["llama"].items() if k not in ignore})
    if ("meteora" in meta) != ("meteora" in mine):
        which = "checkpoint" if "meteora" in meta else "model"
        diffs.append(f"only the {which} has MeteoRA experts")
    elif "meteora" in meta:  # routing options may differ; the shapes may not
        from meteora_jax.meteora import MeteoraConfig

        diffs += _diff({k: meta["meteora"].get(k) for k in MeteoraConfig.STRUCTURAL},
                       {k: mine["meteora"].get(k) for k in MeteoraConfig.STRUCTURAL})
    if diffs:
        raise CheckpointError(f"{path}: checkpoint does not fit this model: " + "; ".join(diffs))


def _restore_state(path: Path, model: Llama):
    """Restore the arrays of `path` into the structure, shapes and dtypes of `model`'s state."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.state(model))
    try:
        return _checkpointer().restore(path / "state", abstract)
    except Exception as e:
        raise CheckpointError(f"{path / 'state'}: cannot restore ({type(e).__name__}: {e})") from None


def restore(path: str | os.PathLike, model: Llama) -> Llama:
    """Restore the checkpoint at `path` into `model` (in place) and return it.

    The stored config must equal the model's (dtypes aside); otherwise a `CheckpointError` lists the
    fields that differ.
    """
    path = Path(path).absolute()
    _check_fits(path, read_metadata(path), model)
    nnx.update(model, _restore_state(path, model))
    return model


def load(path: str | os.PathLike, *, dtype: str | None = None, param_dtype: str | None = None) -> Llama:
    """Build the model a checkpoint describes and restore its weights; no Hugging Face files needed.

    `dtype` / `param_dtype` override the compute / storage dtypes stored in the checkpoint.
    """
    path = Path(path).absolute()
    meta = read_metadata(path)
    over = {k: v for k, v in (("dtype", dtype), ("param_dtype", param_dtype)) if v}
    config = LlamaConfig.from_dict(meta["llama"]).replace(**over)
    abstract = nnx.eval_shape(lambda: build_model(config, meta))
    _check_fits(path, meta, abstract)
    graphdef, _ = nnx.split(abstract)
    return nnx.merge(graphdef, _restore_state(path, abstract))


def build_model(config: LlamaConfig, meta: dict[str, Any]) -> Llama:
    """The (randomly initialised) model a checkpoint's metadata describes."""
    if "meteora" in meta:
        from meteora_jax.meteora import model_from_metadata

        return model_from_metadata(config, meta)
    return Llama(config, rngs=nnx.Rngs(0))
