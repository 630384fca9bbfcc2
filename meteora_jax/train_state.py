"""Training checkpoints: trained params + optimizer state, every N steps, keeping the last K.

    CKPTS/step_00000040/state/          orbax PyTree {"params": ..., "opt": ...}
    CKPTS/step_00000040/manifest.json   {"step": 40, "files": {relative path: sha256}} written last

Each is written to a temporary folder and renamed into place. On restore, a checkpoint whose manifest is
missing (partial) or whose files do not match their hashes (corrupt) is refused with a message, and the
previous one is used.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import jax
from flax import nnx

from meteora_jax.checkpoint import CheckpointError, _checkpointer, atomic_dir

MANIFEST = "manifest.json"


def _hash_files(root: Path) -> dict[str, str]:
    out = {}
    for f in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST):
        out[str(f.relative_to(root))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


class TrainCheckpoints:
    def __init__(self, folder: Path, keep: int):
        self.folder, self.keep = Path(folder).absolute(), max(int(keep), 1)

    def path(self, step: int) -> Path:
        return self.folder / f"step_{step:08d}"

    def steps(self) -> list[int]:
        if not self.folder.exists():
            return []
        return sorted(int(p.name[5:]) for p in self.folder.glob("step_*") if p.name[5:].isdigit())

    def save(self, step: int, model, optimizer, wrt) -> Path:
        tree = {"params": nnx.state(model, wrt), "opt": nnx.state(optimizer)}

        def write(tmp: Path):
            tmp.mkdir(parents=True)
            c = _checkpointer()
            c.save(tmp / "state", tree)
            c.wait_until_finished()
            manifest = {"step": step, "files": _hash_files(tmp)}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))

        path = self.path(step)
        atomic_dir(path, write, overwrite=True)
        for old in self.steps()[:-self.keep]:
            shutil.rmtree(self.path(old), ignore_errors=True)
        return path

    def verify(self, step: int) -> None:
        """Raise `CheckpointError` if the checkpoint of `step` is partial or corrupt."""
        path = self.path(step)
        mf = path / MANIFEST
        if not mf.exists():
            raise CheckpointError(f"{path}: partial checkpoint (no {MANIFEST})")
        try:
            manifest = json.loads(mf.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{mf}: corrupt ({e})") from None
        have = _hash_files(path)
        for name, digest in manifest["files"].items():
            if name not in have:
                raise CheckpointError(f"{path}: partial checkpoint ({name} is missing)")
            if have[name] != digest:
                raise CheckpointError(f"{path}: corrupt checkpoint ({name} does not match its sha256)")

    def restore_latest(self, model, optimizer, wrt) -> int:
        """Restore the newest good checkpoint into model/optimizer; returns its step (0 if none)."""
        for step in reversed(self.steps()):
            try:
                self.verify(step)
                target = {"params": nnx.state(model, wrt), "opt": nnx.state(optimizer)}
                abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), target)
                restored = _checkpointer().restore(self.path(step) / "state", abstract)
            except CheckpointError as e:
                print(f"warning: {e}; trying the previous checkpoint")
                continue
            except Exception as e:  # orbax could not read it
                print(f"warning: {self.path(step)}: cannot restore ({type(e).__name__}: {e}); "
                      "trying the previous checkpoint")
                continue
            nnx.update(model, restored["params"])
            nnx.update(optimizer, restored["opt"])
            return step
        if self.steps():
            print(f"warning: no usable checkpoint in {self.folder}; starting from step 0")
        return 0
