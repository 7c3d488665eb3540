"""Command line: everything the UI does, headless.

  python -m trainer train CONFIG.toml [--set section.key=value ...] [--run-dir DIR]
  python -m trainer resume RUN_DIR [--set ...]
  python -m trainer convert IN.safetensors OUT.safetensors --to kohya|diffusers [--base FAMILY] [--model BASE]
  python -m trainer lora info|resize|merge|bake|extract|meta ...   (the LoRA toolbox: trainer/lora_tools/cli.py)
  python -m trainer build-tiny DIR [--kind FAMILY]     (FAMILY: a base family of trainer/families/, e.g. sdxl)
  python -m trainer preview --base MODEL [--hotswap] [--compile]   (JSON-lines preview worker on stdin/stdout)
  python -m trainer grid RUN --x saves --y strength [--prompts P1 P2] [--strengths 0.5,1] [--seeds 0,1] --out grid.png
  python -m trainer report RUN [--save all|STEM|STEP]   (the style report on a run's saves)
  python -m trainer saves RUN [--use STEP|STEM] [--delete-others]   (list, keep one, free the disk)
  python -m trainer caption FOLDER --model PATH_OR_HUB_ID [--mode sentence|tags] [--overwrite] [--strip W1,W2]
                    [--prefix P] [--suffix S] [--replace FIND REPL] [--remove-tag T] [--undo] [--list-tags]
  accelerate launch --num_processes N -m trainer train CONFIG.toml     (data-parallel on N devices)
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from trainer import families
from trainer.data import caption_cli
from trainer.config import Config, ConfigError, load_config
from trainer.io import describe_os_error


def check_output_dir(cfg: Config, run_dir: str | Path | None = None) -> None:
    """Before any model loads: output.dir (and an explicit run folder) must be a folder this process can write, or
    one it can create. Raises ConfigError naming the setting and what to do."""
    for setting, path in (("output.dir", cfg.output.dir), ("--run-dir", run_dir)):
        if path is None:
            continue
        path = Path(path).expanduser()
        existing = next((p for p in (path, *path.parents) if os.path.exists(p)), Path("."))
        if existing == path and not path.is_dir():
            raise ConfigError(f"{setting} '{path}' is a file, not a folder: pick a folder (it is created if missing)")
        if not existing.is_dir():
            raise ConfigError(f"{setting} '{path}': '{existing}' is a file, so no folder can be made inside it: "
                              "pick another folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"{setting} '{path}': no permission to write in '{existing}': pick a folder you can "
                              "write to")


def new_run_dir(cfg: Config) -> Path:
    """outputs/<name>, or outputs/<name>-2, -3 ...: created here, exclusively (mkdir fails when the folder exists), so
    an earlier run is never overwritten and two runs started at once with one name never share a folder."""
    from trainer.io import make_unique_dir

    return make_unique_dir(Path(cfg.output.dir), cfg.output.name)


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _agree_on_run_dir(cfg: Config) -> Path:
    # Under `accelerate launch` every process parses the CLI; they must pick the same new folder, so rank 0
    # picks and the others read its choice from the environment variable accelerate passes to all.
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())  # must match the Accelerator the loop creates
    chosen = [str(new_run_dir(cfg))] if state.is_main_process else [None]
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(chosen, from_process=0)
    return Path(chosen[0])


def fail(err: BaseException, run_dir: Path | None) -> int:
    """A failure as the user sees it: one line on stderr (no traceback), exit code 2 for a setting, file or dataset
    the user can fix, 1 for anything else. The full traceback goes to the run's log (RUN/train.log)."""
    user_mistake = isinstance(err, ValueError)  # ConfigError, DatasetError, ModelError, DiskSpaceError, ...
    # The project's own errors (and the loop's "loss became nan") are written for users; anything else gets its type.
    ours = user_mistake or type(err).__module__.startswith("trainer.") or isinstance(err, FloatingPointError)
    if isinstance(err, OSError) and err.errno is not None:
        message = describe_os_error(err)
    elif ours or isinstance(err, OSError):
        message = str(err)
    else:
        message = f"{type(err).__name__}: {err}"
    where = ""
    if run_dir is not None and Path(run_dir).is_dir():
        try:
            with open(Path(run_dir) / "train.log", "a", encoding="utf-8") as log:
                log.write("".join(traceback.format_exception(err)))
            where = f" (details: {Path(run_dir) / 'train.log'})" if not user_mistake else ""
        except OSError:  # a full disk must not turn the message into a second traceback
            pass
    if os.environ.get("STYLE_LORA_TRACEBACK"):
        traceback.print_exception(err)
    print(f"error: {message.strip()}{where}", file=sys.stderr)
    return 2 if user_mistake or isinstance(err, FileNotFoundError) else 1


def add_grid_parsers(sub) -> None:
    """`grid` (an X/Y grid over a run's saves, strengths, prompts, seeds) and `report` (the style report on saves)."""
    p = sub.add_parser("grid", help="X/Y grid of a run's saves x strengths x prompts x seeds, written as a PNG")
    p.add_argument("run", help="run folder")
    axes = ["saves", "strength", "prompts", "seeds", "weight2"]
    p.add_argument("--x", required=True, choices=axes)
    p.add_argument("--y", default="", choices=["", *axes])
    p.add_argument("--saves", help="saves for the saves axis (steps, stems or labels, comma-separated; default all)")
    p.add_argument("--strengths", help="strength axis values, e.g. 0.5,0.75,1")
    p.add_argument("--prompts", nargs="+", help="prompts for the prompts axis ({trigger} is replaced)")
    p.add_argument("--seeds", help="seed axis values, e.g. 0,1,2")
    p.add_argument("--weights2", help="second adapter weight axis values, e.g. 0,0.5,1")
    p.add_argument("--adapter2", help="a second adapter file mixed into every cell")
    p.add_argument("--prompt", help="the prompt when prompts is not an axis (default: the run's first sample prompt)")
    p.add_argument("--strength", type=float, help="strength when it is not an axis (default 1)")
    p.add_argument("--seed", type=int, help="seed of every cell when seeds is not an axis (default 0)")
    p.add_argument("--weight2", type=float, help="the second adapter's weight when it is not an axis (default 0.5)")
    for name, kind in (("steps", int), ("guidance", float), ("width", int), ("height", int)):
        p.add_argument(f"--{name}", type=kind, help="default: the run's [sample] settings")
    p.add_argument("--negative")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--out", required=True, help="the PNG to write")
    p_saves = sub.add_parser("saves", help="list a run's saves (JSON lines), use one as the downloads, delete the others")
    p_saves.add_argument("run", help="run folder")
    p_saves.add_argument("--use", metavar="SAVE", help="make this save (step, stem or label) the run's downloads")
    p_saves.add_argument("--delete-others", action="store_true", help="delete every save but the downloads and the "
                         "save in use")
    p_rep = sub.add_parser("report", help="the style report on a run's saves (save_report events)")
    p_rep.add_argument("run", help="run folder")
    p_rep.add_argument("--save", default="all", help="all (default), or one save's step, stem or label")


def run_saves_command(args) -> int:
    import json

    if args.command == "saves":
        from trainer.report import saves

        if args.use:
            print(json.dumps(saves.use_save(Path(args.run), args.use)))
        if args.delete_others:
            print(json.dumps(saves.delete_other_saves(Path(args.run))))
        if not (args.use or args.delete_others):
            for s in saves.list_saves(Path(args.run)):
                print(json.dumps({"save": s.label(), "stem": s.stem, "step": s.step, "train_loss": s.train_loss,
                                  "val_loss": s.val_loss, "verdict": s.verdict, "bytes": s.bytes, "in_use": s.in_use}))
        return 0
    if args.command == "report":
        from trainer.report.save_report import report_saves

        done = report_saves(Path(args.run), args.save)
        return 0 if all(r is not None for r in done) else 1
    from trainer.report.save_grid import draw_headless, run_spec

    values = {"saves": args.saves, "strength": args.strengths, "prompts": args.prompts, "seeds": args.seeds,
              "weight2": args.weights2}
    adapter2 = ["adapter2", str(Path(args.adapter2).resolve())] if args.adapter2 else None
    spec = run_spec(Path(args.run), args.x, args.y, {k: v for k, v in values.items() if v},
                    prompt=args.prompt, strength=args.strength, seed=args.seed, weight2=args.weight2,
                    adapter2=adapter2, steps=args.steps, guidance=args.guidance, width=args.width,
                    height=args.height, negative=args.negative)
    summary = draw_headless(spec, Path(args.out), device=args.device)
    print(f"grid: {summary['out']} ({summary['size'][0]}x{summary['size'][1]} px, {summary['cells']} cells, "
          f"{summary['ms_per_cell']} ms per cell)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer", description="Style-LoRA trainer for Stable Diffusion")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train a LoRA from a config or preset TOML")
    p_train.add_argument("config", help="TOML file: a preset from presets/ or a run's config.toml")
    p_train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override a setting, e.g. --set train.steps=500 --set data.path=/my/images")
    p_train.add_argument("--run-dir", help="run folder (default: output.dir/output.name, made unique)")
    p_resume = sub.add_parser("resume", help="continue a run from its latest checkpoint")
    p_resume.add_argument("run_dir")
    p_resume.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p_conv = sub.add_parser("convert", help="convert a LoRA .safetensors between the kohya/A1111 and diffusers layouts")
    p_conv.add_argument("src")
    p_conv.add_argument("dst")
    p_conv.add_argument("--to", required=True, choices=["kohya", "diffusers"])
    p_conv.add_argument("--base", choices=families.NAMES,
                        help="base family, only needed when the file's metadata and keys do not tell")
    p_conv.add_argument("--model", help="base model (folder, hub id, .safetensors, builtin:...): needed only for DoRA "
                        "files, whose kohya dora_scale is relative to the base weights (ComfyUI's formula)")
    p_tiny = sub.add_parser("build-tiny", help="write a tiny random test model of a base family's layout")
    p_tiny.add_argument("folder")
    p_tiny.add_argument("--kind", choices=families.NAMES, default=families.FALLBACK.NAME)
    p_prev = sub.add_parser("preview", help="preview worker: one base in memory, adapters switched by JSON-lines "
                            "requests on stdin (see trainer/preview/previewer.py)")
    p_prev.add_argument("--base", required=True, help="base model: diffusers folder, hub id, .safetensors, builtin:...")
    p_prev.add_argument("--single-file-config", help="for a single-file base: a diffusers folder of its architecture")
    p_prev.add_argument("--device", help="default: cuda if available, else cpu")
    p_prev.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="default: bf16 on CUDA, fp32 on CPU")
    p_prev.add_argument("--max-adapters", type=int, default=8, help="adapters kept loaded (LRU)")
    p_prev.add_argument("--hotswap", action="store_true", help="one UNet slot, adapters hot-swapped in place")
    p_prev.add_argument("--compile", action="store_true", help="torch.compile the UNet (CUDA; implies --hotswap)")
    p_prev.add_argument("--max-rank", type=int, default=64, help="hot-swap slot rank (largest adapter or mix rank)")
    add_grid_parsers(sub)
    caption_cli.add_parser(sub)
    from trainer.lora_tools import cli as lora_cli

    lora_cli.add_parser(sub)
    args = parser.parse_args(argv)
    from trainer.versions import incompatible_versions

    if problem := incompatible_versions():  # before any model code: a known-bad install fails here, in one line
        print(f"error: {problem}", file=sys.stderr)
        return 2

    run_dir = None
    try:
        if args.command == "caption":
            return caption_cli.run(args)
        if args.command == "build-tiny":
            print(families.get(args.kind).build_tiny(args.folder))
            return 0
        if args.command == "preview":
            from trainer.preview.worker import serve

            return serve(args.base, single_file_config=args.single_file_config, device=args.device, dtype=args.dtype,
                         max_adapters=args.max_adapters, hotswap=args.hotswap, compile=args.compile,
                         max_rank=args.max_rank)
        if args.command == "lora":
            return lora_cli.run(args)
        if args.command in ("grid", "report", "saves"):
            return run_saves_command(args)
        if args.command == "convert":
            from trainer.lora_files.convert import convert_file

            print(convert_file(Path(args.src), Path(args.dst), args.to, base=args.base, model=args.model))
            return 0
        if args.command == "resume":
            cfg = load_config(Path(args.run_dir) / "config.toml", [*args.overrides, 'train.resume="latest"'])
            check_output_dir(cfg, args.run_dir)
            run_dir = Path(args.run_dir)
        else:
            cfg = load_config(args.config, args.overrides)
            check_output_dir(cfg, args.run_dir)  # every setting is checked before any model loads
            run_dir = Path(args.run_dir) if args.run_dir else _agree_on_run_dir(cfg)
        from trainer.training.loop import train

        if _is_main_process():
            print(f"run folder: {run_dir}")
        final = train(cfg, run_dir)
        if _is_main_process():
            print(f"adapter: {final.with_name(final.name.replace('.diffusers', ''))}  (A1111/Forge/ComfyUI)")
            print(f"adapter: {final}  (diffusers)")
            from trainer.report.style_report import run_report

            run_report(cfg, run_dir)  # never raises: a failed report is a report_failed event, the run stands
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        return fail(err, run_dir)
