"""The ``dfsmerge`` command line: a thin shell over the Python API. Errors print one line, not a traceback
(``--debug`` shows it)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from .plan import DTYPES
from .recipe import RecipeError

__all__ = ["main"]


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return ""


def cmd_merge(args: argparse.Namespace) -> None:
    from .merge import merge

    out = merge(args.recipe, args.output, dtype=args.dtype, device=args.device, max_shard_size=args.max_shard_size,
                force=args.force, quiet=args.quiet, cache_dir=args.cache_dir, format=args.format)
    if not args.quiet:
        print(f"wrote {out}")


def cmd_flatten(args: argparse.Namespace) -> None:
    from .compact import flatten

    out = flatten(args.input, args.output, dtype=args.dtype, max_shard_size=args.max_shard_size, force=args.force,
                  quiet=args.quiet, cache_dir=args.cache_dir)
    if not args.quiet:
        print(f"wrote {out}")


def cmd_plan(args: argparse.Namespace) -> None:
    from .merge import plan_recipe

    plan = plan_recipe(args.recipe, args.dtype, args.cache_dir)
    recipe = plan.recipe
    print(recipe.hop_table())
    print()
    for i, src in enumerate(recipe.sources):
        print(f"models[{i}]: {src} ({plan.configs[i].get('model_type')}, "
              f"{plan.configs[i]['num_hidden_layers']} layers)")
    print(f"output: {plan.config['architectures'][0]}, {len(recipe.hops)} layers "
          f"({len(recipe.used_layers())} distinct source layers)")
    print(f"parameters: {plan.num_params():,}")
    try:
        compact = _size(plan.compact_params() * DTYPES[args.dtype].itemsize)
    except RecipeError as exc:
        compact = f"not available ({exc})"
    print(f"size on disk ({args.dtype}): flat {_size(plan.nbytes(args.dtype))}, compact {compact}")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="output dtype (the folding math runs in float32 first)")
    p.add_argument("--cache-dir", default=None, help="Hugging Face cache folder for hub sources")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dfsmerge", description="Data-flow-space merging of language models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("merge", help="execute a recipe into a Hugging Face model folder")
    p.add_argument("recipe", help="recipe YAML (legacy or native format)")
    p.add_argument("output", help="output folder (must not exist unless --force)")
    _common(p)
    p.add_argument("--device", default="cpu", help="device for the folding math (cpu, cuda)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--format", default="flat", choices=["flat", "compact"],
                   help="flat (default): a plain model, one layer per hop; compact: each source layer stored once, "
                   "run by the modeling file the folder carries")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("flatten", help="turn a compact DFS checkpoint (ours, Sakana's EvoLLM layout, the affine "
                       "layout) into a plain model folder")
    p.add_argument("input", help="compact DFS checkpoint folder or hub ID")
    p.add_argument("output", help="output folder (must not exist unless --force)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="output dtype (default: the input's)")
    p.add_argument("--cache-dir", default=None, help="Hugging Face cache folder for a hub input")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_flatten)

    p = sub.add_parser("plan", help="show the hop table and output size, reading no weights")
    p.add_argument("recipe")
    _common(p)
    p.set_defaults(func=cmd_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    quiet = getattr(args, "quiet", False)
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except (RecipeError, FileExistsError) as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
