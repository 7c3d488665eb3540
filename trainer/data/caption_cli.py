"""`python -m trainer caption FOLDER ...`: caption with a model, bulk-edit captions, undo, list tags.

  python -m trainer caption my-data --model Salesforce/blip-image-captioning-large --strip "painting,watercolor"
  python -m trainer caption my-data --model SmilingWolf/wd-swinv2-tagger-v3          (booru tags, ONNX)
  python -m trainer caption my-data --prefix zkstyle --remove-tag "watermark" --replace "girl" "woman"
  python -m trainer caption my-data --undo          (puts back what the last caption-changing command changed;
                                                     again: the one before it)
  python -m trainer caption my-data --clear-undo    (forget the undo history)
  python -m trainer caption my-data --list-tags     (tag frequency)

One command is one undo step. Commands that change the captions of one folder run one at a time: a second one
is refused while the first runs. Order within a command: model captions (with --strip), then --strip on existing
captions when no --model, --remove-tag, --replace, --prefix, --suffix.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

from trainer.data import caption_edit as ce


def add_parser(sub) -> None:
    p = sub.add_parser("caption", help="caption a folder with a local model (BLIP/GIT/Florence-2 or a WD14 ONNX "
                       "tagger), bulk-edit captions, undo", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="folder of images; captions are the .txt files beside them")
    p.add_argument("--model", help="local folder or hub id: an image-to-text model in safetensors, or a WD14-style "
                   "tagger (model.onnx + selected_tags.csv)")
    p.add_argument("--mode", choices=["sentence", "tags"], help="default: tags for an ONNX tagger, else sentence")
    p.add_argument("--overwrite", action="store_true", help="replace existing captions (default: keep them)")
    p.add_argument("--strip", default="", metavar="W1,W2", help="style words to remove from the generated captions "
                   "(without --model: from the existing ones), e.g. 'watercolor,painting'")
    p.add_argument("--prompt", help="text prompt for models that take one (Florence-2 default: <DETAILED_CAPTION>)")
    p.add_argument("--max-new-tokens", type=int, default=75)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threshold", type=float, default=0.35, help="tagger: minimum confidence of a general tag")
    p.add_argument("--character-threshold", type=float, default=0.85, help="tagger: of a character tag")
    p.add_argument("--device", help="sentence models: default cuda if available, else cpu")
    p.add_argument("--prefix", help="add this text first in every caption (e.g. a trigger word), unless already there")
    p.add_argument("--suffix", help="add this text last in every caption, unless already there")
    p.add_argument("--replace", nargs=2, metavar=("FIND", "REPLACEMENT"), help="literal find/replace in captions")
    p.add_argument("--remove-tag", action="append", default=[], metavar="TAG", help="remove a tag everywhere")
    p.add_argument("--only", action="append", metavar="IMAGE", help="limit to these images (paths relative to "
                   "FOLDER; repeatable)")
    p.add_argument("--undo", action="store_true", help="undo the last command that changed captions here (repeat "
                   "to go further back)")
    p.add_argument("--clear-undo", action="store_true", help="forget the undo history of this folder's captions")
    p.add_argument("--list-tags", action="store_true", help="print the tag frequency table")
    p.add_argument("--caption-extension", default=".txt", help="a text extension (.txt, .caption); never an "
                   "image type")
    p.add_argument("--json-progress", action="store_true", help="one JSON object per line (for the web UI)")


def _emit(json_lines: bool, event: dict) -> None:
    if json_lines:
        print(json.dumps(event, ensure_ascii=False), flush=True)
        return
    status = event.get("status", event.get("event", ""))
    detail = event.get("caption") or event.get("reason") or event.get("message") or ""
    where = f"[{event['done']}/{event['total']}] {event['file']}: " if "file" in event else ""
    print(f"{where}{status}{': ' + detail if detail else ''}", flush=True)


def _edits(args) -> list:
    # --strip edits existing captions only without --model; with one it applies to the generated captions
    return ce.plan_edits("" if args.model else args.strip, args.remove_tag, args.replace, args.prefix or "",
                         args.suffix or "")


def run(args) -> int:
    folder = Path(args.folder).expanduser()
    emit = partial(_emit, args.json_progress)
    edits = _edits(args)
    args.caption_extension = ce.check_caption_extension(args.caption_extension)
    if args.undo or args.clear_undo:
        if args.model or edits or (args.undo and args.clear_undo):
            raise ce.EditError("--undo and --clear-undo run alone (nothing else in the same command)")
        with ce.caption_lock(folder, "undo" if args.undo else "clear undo"):
            if args.clear_undo:
                emit({"event": "undo", "message": f"history cleared ({ce.clear_undo(folder)} steps)"})
            else:
                emit({"event": "undo", "message": ce.undo_last(folder).message()})
        return 0
    if not (args.model or edits or args.list_tags):
        raise ce.EditError("nothing to do: give --model, a bulk edit (--prefix, --suffix, --replace, --remove-tag, "
                           "--strip), --undo or --list-tags")
    ce.list_images(folder, args.only)  # a wrong folder or selection fails before a model loads
    label = " + ".join(filter(None, [f"caption with {args.model}" if args.model else "",
                                     *(label for label, _, _ in edits)]))
    code = 0
    if label:
        with ce.caption_lock(folder, label):
            undo = ce.start_undo(label)
            code = _change_captions(args, folder, edits, undo, emit)
            ce.finish_undo(folder, undo)
    if args.list_tags:
        table = ce.tag_table(folder, args.caption_extension)
        if args.json_progress:
            emit({"event": "tags", "tags": [[tag, n] for tag, n, _ in table]})
        else:
            for tag, n, _ in table:
                print(f"{n:6d}  {tag}")
    return code


def _change_captions(args, folder: Path, edits: list, undo: dict, emit) -> int:
    """Model captions, then the bulk edits, under one undo record. Returns the exit code."""
    code = 0
    if args.model:
        from trainer.data.caption import caption_folder, load_captioner

        emit({"event": "loading", "message": f"loading {args.model}"})
        captioner, mode = load_captioner(args.model, args.mode, args.device, args.prompt, args.max_new_tokens,
                                         args.threshold, args.character_threshold)
        result = caption_folder(folder, captioner, undo, overwrite=args.overwrite,
                                strip=[w for w in args.strip.split(",") if w.strip()], as_tags=mode == "tags",
                                batch_size=args.batch_size, only=args.only, ext=args.caption_extension,
                                progress=emit)
        emit({"event": "captioned", "message": f"{len(result['written'])} written, {len(result['kept'])} kept "
              f"(existing), {len(result['bad'])} skipped", **result})
        code = 1 if result["bad"] and not result["written"] and not result["kept"] else 0
    for message in ce.apply_edits(folder, edits, undo, args.only, args.caption_extension):
        emit({"event": "edited", "message": message})
    return code


def main(argv: list[str]) -> int:  # for `python -m trainer.data.caption_cli` while debugging
    parser = argparse.ArgumentParser(prog="python -m trainer")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(["caption", *argv]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
