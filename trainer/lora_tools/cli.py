"""`python -m trainer lora <command>`: the LoRA toolbox on the command line (trainer.lora_tools).

Every command that writes takes --out, writes the layout it read unless --to says otherwise, and refuses to replace
an existing file without --overwrite. Each prints what it did in words; with --json, one JSON object (the web UI's
Tools tab reads it).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")


def _rank_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--rank", type=int, help=f"{what} rank (with --dynamic: the largest rank allowed)")
    p.add_argument("--dynamic", choices=METHODS, help="choose each module's rank from its singular values, as kohya's "
                   "resize_lora.py does: sv_ratio (keep s ≥ s_max/X), sv_fro (keep X of ‖ΔW‖_F), sv_cumulative "
                   "(keep X of the sum of singular values)")
    p.add_argument("--param", type=float, help="the --dynamic method's X")


def _write_args(p: argparse.ArgumentParser, folder: bool = False) -> None:
    p.add_argument("--out", required=True, help="the file to write" + (" (or a folder: a diffusers pipeline)" if folder
                                                                      else ""))
    p.add_argument("--overwrite", action="store_true", help="replace --out when it exists")
    if not folder:
        p.add_argument("--to", choices=["kohya", "diffusers"], help="layout of the output (default: the input's)")


def add_parser(sub) -> None:
    """The `lora` subcommand and its commands."""
    lora = sub.add_parser("lora", help="LoRA toolbox: info, resize, merge, bake, extract, meta")
    cmds = lora.add_subparsers(dest="lora_command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON object (for scripts and the web UI)")
    common.add_argument("--model", help="base model (folder, hub id, .safetensors, builtin:...): needed for DoRA "
                        "files (their scale is relative to the base weights) and to check a file against a base")
    common.add_argument("--single-file-config", help="for a single-file base read offline: a diffusers folder of "
                        "its architecture (bake, extract)")
    from trainer import families

    family = argparse.ArgumentParser(add_help=False)  # extract's --base is its original checkpoint, as kohya's
    family.add_argument("--base", choices=families.NAMES, help="base family, when a file's keys and metadata do not "
                        "tell")

    p = cmds.add_parser("info", parents=[common, family],
                        help="layout, base, variant, ranks, metadata, hashes, consumers")
    p.add_argument("file")
    p = cmds.add_parser("resize", parents=[common, family],
                        help="any LoRA variant -> a plain LoRA of another rank (SVD)")
    p.add_argument("file")
    _rank_args(p, "new")
    p.add_argument("--conv-rank", type=int, help="rank of 3x3 convolutions (LoCon; with --dynamic: their largest), "
                   "as kohya's --new_conv_rank (default: --rank)")
    _write_args(p)
    p = cmds.add_parser("merge", parents=[common, family], help="one LoRA whose ΔW is the weighted sum of several")
    p.add_argument("files", nargs="+", metavar="FILE[:WEIGHT]")
    _rank_args(p, "output")
    _write_args(p)
    p = cmds.add_parser("bake", parents=[common], help="merge LoRAs into a base checkpoint")
    p.add_argument("checkpoint", metavar="BASE", help="the base: a single-file checkpoint, a diffusers folder, ...")
    p.add_argument("files", nargs="+", metavar="FILE[:WEIGHT]")
    _write_args(p, folder=True)
    p = cmds.add_parser("extract", parents=[common], help="a LoRA from the difference of two checkpoints")
    p.add_argument("--base", "--from", dest="source", required=True, metavar="BASE",
                   help="the original checkpoint (what TUNED was fine-tuned from)")
    p.add_argument("--tuned", required=True, help="the fine-tuned checkpoint")
    _rank_args(p, "LoRA")
    p.add_argument("--conv-rank", type=int, default=0, help="also 3x3 convolutions, as LoCon of this rank (default: "
                   "linear layers and 1x1 convolutions only)")
    p.add_argument("--min-diff", type=float, default=0.0, help="skip modules whose largest weight change is below this")
    p.add_argument("--text-encoders", action=argparse.BooleanOptionalAction, default=True,
                   help="extract the text encoders' change too (default: yes)")
    _write_args(p)
    p = cmds.add_parser("meta", parents=[common, family],
                        help="edit title, author, trigger, tags, thumbnail; tensors untouched")
    p.add_argument("file")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="title, author, description, trigger, tags, license, or any ss_*/modelspec.* key")
    p.add_argument("--thumbnail", help="an image: ModelSpec's thumbnail (data URI) and the A1111 cover image")
    p.add_argument("--out", help="the file to write (default with --overwrite: edit FILE in place)")
    p.add_argument("--overwrite", action="store_true", help="replace --out (or FILE) when it exists")


def weighted(items: list[str]) -> list[tuple[Path, float]]:
    """FILE[:WEIGHT] arguments as (path, weight); a missing weight is 1.0."""
    out = []
    for item in items:
        path, sep, weight = item.rpartition(":")
        if not sep or not path or "/" in weight or "\\" in weight or Path(item).is_file():  # a name may hold ':'
            path, weight = item, "1"
        try:
            out.append((Path(path), float(weight)))
        except ValueError:
            raise ValueError(f"{item}: the weight after ':' must be a number, e.g. {path}:0.7") from None
    return out


def run(args) -> int:
    """Run one `lora` command; returns the exit code (errors raise ValueError with a message naming the file)."""
    command = args.lora_command
    if command == "info":
        from trainer.lora_tools.info import describe_file, info_text

        result = describe_file(Path(args.file), model=args.model, base=args.base)
        print(json.dumps({**result, "summary": info_text(result)}, default=str) if args.json else info_text(result))
        return 0
    if command == "resize":
        from trainer.lora_tools.resize import resize_file

        result = resize_file(Path(args.file), Path(args.out), rank=args.rank, dynamic=args.dynamic, param=args.param,
                             to=args.to, model=args.model, base=args.base, overwrite=args.overwrite,
                             conv_rank=args.conv_rank)
    elif command == "merge":
        from trainer.lora_tools.merge import merge_files

        result = merge_files(weighted(args.files), Path(args.out), rank=args.rank, dynamic=args.dynamic,
                             param=args.param, to=args.to, model=args.model, base=args.base, overwrite=args.overwrite)
    elif command == "bake":
        from trainer.lora_tools.bake import bake

        result = bake(args.checkpoint, weighted(args.files), Path(args.out), overwrite=args.overwrite,
                      single_file_config=args.single_file_config)
    elif command == "extract":
        from trainer.lora_tools.extract import extract

        result = extract(args.source, args.tuned, Path(args.out), rank=args.rank, dynamic=args.dynamic,
                         param=args.param, conv_rank=args.conv_rank, min_diff=args.min_diff,
                         text_encoders=args.text_encoders, to=args.to or "kohya", overwrite=args.overwrite,
                         single_file_config=args.single_file_config)
    else:
        from trainer.lora_tools.meta import edit_metadata

        result = edit_metadata(Path(args.file), dict(s.split("=", 1) if "=" in s else (s, "") for s in args.sets),
                               thumbnail=args.thumbnail, out=Path(args.out) if args.out else None,
                               overwrite=args.overwrite)
    print(json.dumps(result, default=str) if args.json else result.get("summary", json.dumps(result, default=str)))
    return 0
