"""Carry a reproduction's trained weights in a few small files, and rebuild a working folder from them.

    python experiments/reproduce/bundle.py pack --work WORK --out DIR [--max-mb 15]
    python experiments/reproduce/bundle.py unpack --bundle DIR --work WORK2 --base BASE

`pack` writes DIR/bundle-NN.safetensors (each at most --max-mb MiB, so they fit the device machine's file limits):
every PEFT adapter under WORK/adapters and WORK/adapters_b in bfloat16 (with its adapter_config.json in the
header), and the trained gates of WORK/runs/gates/final in float32. `unpack` writes the adapter folders under
WORK2 (float32), rebuilds WORK2/ckpt/meteora and WORK2/ckpt/lora_b with `python -m convert adapters` from BASE
(the Hugging Face base folder), and saves WORK2/runs/gates/final: that checkpoint with the carried gates, so the
pipeline's evaluation stages run without retraining (`--no-gates`: no final checkpoint, the gates train anew).
The adapters travel in bfloat16: a rebuilt run is close to, not bit-equal with, the original.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent.parent
GROUPS = ("adapters", "adapters_b")


def gate_arrays(ckpt: Path) -> dict[str, np.ndarray]:
    """`{keystr: float32 array}` of every gate parameter of a MeteoRA checkpoint."""
    import jax
    from flax import nnx

    from meteora_jax import checkpoint
    from meteora_jax.meteora import GateParam

    model = checkpoint.load(ckpt)
    state = nnx.state(model, GateParam)
    return {jax.tree_util.keystr(p): np.asarray(x, np.float32) for p, x in jax.tree_util.tree_leaves_with_path(state)}


def pack(work: Path, out: Path, max_mb: float) -> list[Path]:
    import ml_dtypes
    from safetensors.numpy import load_file, save_file

    tensors, configs = {}, {}
    for group in GROUPS:
        for folder in sorted((work / group).glob("*/adapter_model.safetensors")):
            name = f"{group}/{folder.parent.name}"
            configs[name] = json.loads((folder.parent / "adapter_config.json").read_text())
            for k, v in load_file(str(folder)).items():
                tensors[f"{name}/{k}"] = v.astype(ml_dtypes.bfloat16)
    if not configs:
        raise SystemExit(f"error: no adapters under {work}/{{{','.join(GROUPS)}}}/*/adapter_model.safetensors")
    final = work / "runs" / "gates" / "final"
    if final.exists():
        tensors.update({f"gates/{k}": v for k, v in gate_arrays(final).items()})
    out.mkdir(parents=True, exist_ok=True)
    # each file: its tensors, plus a header of about (key + 96) bytes a tensor and the adapter configs
    limit = max_mb * 2**20 - len(json.dumps(configs)) - 1024
    cost = {k: v.nbytes + len(k) + 96 for k, v in tensors.items()}
    too_big = [k for k, c in cost.items() if c > limit]
    if too_big:
        raise SystemExit(f"error: --max-mb {max_mb}: tensor {too_big[0]} ({cost[too_big[0]]} bytes) does not fit")
    chunks, cur, size = [], {}, 0
    for k in sorted(tensors):
        if cur and size + cost[k] > limit:
            chunks.append(cur)
            cur, size = {}, 0
        cur[k], size = tensors[k], size + cost[k]
    chunks.append(cur)
    # one id for the whole pack: unpack refuses chunks of different packs (their boundaries differ)
    pack_id = hashlib.sha256(json.dumps([[k, list(tensors[k].shape)] for k in sorted(tensors)]).encode()
                             + np.random.default_rng().bytes(8)).hexdigest()[:16]
    paths = []
    for i, chunk in enumerate(chunks):
        path = out / f"bundle-{i:02d}.safetensors"
        tmp = path.with_name(path.name + ".tmp")
        save_file(chunk, str(tmp), metadata={"adapter_configs": json.dumps(configs), "chunk": str(i),
                                             "chunks": str(len(chunks)), "pack_id": pack_id})
        tmp.replace(path)
        paths.append(path)
    return paths


def unpack(bundle: Path, work: Path, base: Path, gates: bool = True) -> None:
    from safetensors import safe_open
    from safetensors.numpy import save_file

    files = sorted(bundle.glob("bundle-*.safetensors"))
    if not files:
        raise SystemExit(f"error: no bundle-*.safetensors in {bundle}")
    tensors, configs, ids = {}, None, {}
    for f in files:
        with safe_open(str(f), "flax") as g:  # numpy has no bfloat16
            meta = g.metadata() or {}
            if int(meta.get("chunks", -1)) != len(files):
                raise SystemExit(f"error: {f} is one of {meta.get('chunks')} chunks, {bundle} holds {len(files)}")
            configs = json.loads(meta["adapter_configs"])
            ids[f.name] = meta.get("pack_id")  # absent in bundles written before the id existed
            tensors.update({k: np.asarray(g.get_tensor(k).astype("float32")) for k in g.keys()})
    if len(set(ids.values())) > 1:
        raise SystemExit(f"error: {bundle} mixes chunks of different packs (pack_id per file: {ids}); "
                         f"use the files of one `pack` run together")
    # every adapter of one group has the same tensor names (same modules and layers): a missing one means the
    # chunks do not belong together
    for group in GROUPS:
        names = {n: sorted(k[len(n) + 1:] for k in tensors if k.startswith(n + "/")) for n in configs
                 if n.startswith(group + "/")}
        ref = next(iter(names.values()), None)
        bad = {n: len(v) for n, v in names.items() if v != ref}
        if bad:
            raise SystemExit(f"error: {bundle}: adapters of {group} hold different tensor sets ({len(ref)} in the "
                             f"first; {bad}): chunks of different packs?")
    for name, cfg in configs.items():
        folder = work / name
        folder.mkdir(parents=True, exist_ok=True)
        prefix = name + "/"
        save_file({k[len(prefix):]: v.astype(np.float32) for k, v in tensors.items() if k.startswith(prefix)},
                  str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    tasks = sorted(n.split("/", 1)[1] for n in configs if n.startswith("adapters/"))
    unions = sorted(n.split("/", 1)[1] for n in configs if n.startswith("adapters_b/"))
    py = sys.executable
    subprocess.run([py, "-m", "convert", "adapters", "--base", str(base), "--adapters",
                    *[str(work / "adapters" / t) for t in tasks], "--out", str(work / "ckpt" / "meteora"),
                    "--top-k", "2"], cwd=ROOT, check=True)
    for u in unions:
        subprocess.run([py, "-m", "convert", "adapters", "--base", str(base), "--adapters",
                        str(work / "adapters_b" / u), "--out", str(work / "ckpt" / u), "--top-k", "1"], cwd=ROOT,
                       check=True)
    gates = {k[len("gates/"):]: v for k, v in tensors.items() if k.startswith("gates/")} if gates else {}
    if gates:
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from meteora_jax import checkpoint
        from meteora_jax.meteora import GateParam

        model = checkpoint.load(work / "ckpt" / "meteora")
        state = nnx.state(model, GateParam)
        missing = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)
                   if jax.tree_util.keystr(p) not in gates]
        if missing:
            raise SystemExit(f"error: the bundle lacks gates {missing[:3]} (of {len(missing)}) of this model")
        state = jax.tree_util.tree_map_with_path(
            lambda p, x: jnp.asarray(gates[jax.tree_util.keystr(p)], x.dtype), state)
        nnx.update(model, state)
        checkpoint.save(work / "runs" / "gates" / "final", model, overwrite=True)
    print(f"unpacked {len(configs)} adapters{' and the gates' if gates else ''} into {work}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack", help="WORK's adapters and gates -> DIR/bundle-NN.safetensors")
    a.add_argument("--work", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--max-mb", type=float, default=15.0, help="largest file in MiB (15)")
    b = sub.add_parser("unpack", help="DIR/bundle-NN.safetensors -> adapter folders and checkpoints under WORK")
    b.add_argument("--bundle", required=True)
    b.add_argument("--work", required=True)
    b.add_argument("--base", required=True, help="the Hugging Face base folder the adapters were trained on")
    b.add_argument("--no-gates", action="store_true", help="leave the gates out (to train them anew)")
    args = p.parse_args(argv)
    if args.cmd == "pack":
        for path in pack(Path(args.work), Path(args.out), args.max_mb):
            print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    else:
        unpack(Path(args.bundle), Path(args.work), Path(args.base), gates=not args.no_gates)
    return 0


if __name__ == "__main__":
    sys.exit(main())
