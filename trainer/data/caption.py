"""Caption a folder of images with a local model: sentences from a transformers image-to-text model (BLIP, GIT,
Florence-2, VisionEncoderDecoder such as ViT-GPT2), or booru tags from a WD14-style ONNX tagger.

Models load from a local folder or a hub id, as safetensors or ONNX only: pickled weights (.bin, .pt, .ckpt) can
run code when loaded and are refused, and so is hub code (no trust_remote_code). Captions are written beside
each image as .txt, atomically, through trainer/data/caption_edit.py (so the command can be undone); an existing
caption is kept unless `overwrite`. Images that cannot be decoded are named and skipped.

transformers 5 removed pipeline("image-to-text") (it now maps to "image-text-to-text", which needs a chat
processor and a prompt), so this calls the processor and `generate` itself: the same three steps that pipeline
did, for every model it served.
"""

from __future__ import annotations

import csv
import re
import warnings
from pathlib import Path
from typing import Callable

from PIL import Image, ImageOps

from trainer.data.caption_edit import (caption_file, check_caption_extension, list_images, not_regular_files, strip_words,
                                  write_captions)
from trainer.data.images import to_rgb
from trainer.io import read_safetensors_header

SENTENCE, TAGS = "sentence", "tags"
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}
TAGS_CSV = "selected_tags.csv"  # WD14 taggers: one row per model output (tag_id,name,category,count)
RATING, CHARACTER = 9, 4  # WD14 categories; 0 = general
MAX_TAGGER_SIZE = 2048  # px; WD14 taggers take 448, and a 20000 px input would need 4.8 GB per image
# Florence-2 generates nothing without a task token; a content description is what a style LoRA wants.
DEFAULT_PROMPTS = {"florence2": "<DETAILED_CAPTION>"}

Captioner = Callable[[list[Image.Image]], list[str]]


class CaptionError(ValueError):
    """A captioning model or folder that cannot be used; the message names it and says why."""


def guess_mode(model: str) -> str:
    """tags for an ONNX file, a folder holding one, or a hub id that names a tagger; else sentence."""
    path = Path(model).expanduser()
    if path.suffix.lower() == ".onnx" or (path.is_dir() and any(path.glob("*.onnx"))):
        return TAGS
    return TAGS if not path.exists() and "tagger" in model.lower() else SENTENCE


def read_rgb(path: Path) -> Image.Image:
    """The image upright (EXIF), in RGB, transparency on white; raises with the decoder's reason."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            img.load()
            return to_rgb(ImageOps.exif_transpose(img))


# ----------------------------------------------------------------------------- sentence models


def _check_safetensors_folder(model: str) -> None:
    path = Path(model).expanduser()
    if path.is_file():
        kind = "pickle files can run code when loaded" if path.suffix.lower() in PICKLE_SUFFIXES else "a single file"
        raise CaptionError(f"{model}: {kind}; give the model's folder (config + .safetensors weights) or a hub id")
    if not path.is_dir():
        return  # a hub id: from_pretrained(use_safetensors=True) refuses a repo without safetensors
    if not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        why = (f" (found {', '.join(pickles)}: pickle files can run code when loaded and are refused)" if pickles
               else "")
        raise CaptionError(f"{model}: no .safetensors weights in this folder{why}")


def _check_weight_files(model: str) -> None:
    """Every shard index and .safetensors file of a local model folder, before the loader opens them."""
    path = Path(model).expanduser()
    if not path.is_dir():
        return  # a hub id: the loader checks what it downloads
    for index in sorted(path.glob("*.safetensors.index.json")):
        _check_shard_index(index)
    for weights in sorted(path.glob("*.safetensors")):
        _check_safetensors_file(weights)


def _check_shard_index(index: Path) -> None:
    """A sharded checkpoint's index names its shards; each must be a .safetensors file in the model's own folder,
    so a name such as '../../etc/passwd' is refused here rather than failing deep inside the loader."""
    import json

    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = set(weight_map.values())
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CaptionError(f"{index}: not a shard index with a 'weight_map' ({type(err).__name__}: {err})") from None
    for shard in sorted(map(str, shards)):
        if Path(shard).name != shard or not shard.endswith(".safetensors"):
            raise CaptionError(f"{index}: shard '{shard}' is not a .safetensors file name in the model's folder")
        if not (index.parent / shard).is_file():
            raise CaptionError(f"{index}: shard '{shard}' is missing from the model's folder")


def _check_safetensors_file(weights: Path) -> None:
    """The header parses and its tensors fit the file: a truncated or non-safetensors file is named here, in one
    line, instead of the loader's bare 'header too small'."""
    try:
        header = read_safetensors_header(weights)
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        with open(weights, "rb") as f:
            header_bytes = int.from_bytes(f.read(8), "little")
    except OSError as err:
        raise CaptionError(f"{weights}: cannot read the weights: {err.strerror or err}") from None
    except (ValueError, KeyError, TypeError, IndexError) as err:  # read_safetensors_header's messages name the file
        why = str(err) if str(weights) in str(err) else f"{weights}: unreadable .safetensors header ({err})"
        raise CaptionError(f"{why}; the weights file is broken, download it again") from None
    if 8 + header_bytes + end > weights.stat().st_size:
        raise CaptionError(f"{weights}: shorter than its header says (truncated); download it again")


NO_TOKENIZER = ("no tokenizer (tokenizer.json, or vocab files such as vocab.txt / vocab.json + merges.txt): "
                "without one every caption would be empty; use the model's complete folder")


def _load_tokenizer(model: str, auto_tokenizer):
    try:
        return auto_tokenizer.from_pretrained(model, trust_remote_code=False)
    except (OSError, ValueError, TypeError):
        raise CaptionError(f"{model}: {NO_TOKENIZER}") from None


def _check_tokenizer(model: str, tokenizer) -> None:
    """A tokenizer built without its vocabulary files knows only its special tokens, which decoding drops: refuse
    it at load time rather than report 'empty caption' once per image."""
    if tokenizer is None or len(tokenizer) - len(set(tokenizer.all_special_ids)) <= 0:
        raise CaptionError(f"{model}: {NO_TOKENIZER}")


def load_sentence_model(model: str, device: str, prompt: str | None = None, max_new_tokens: int = 75,
                        num_beams: int = 3) -> Captioner:
    import torch
    import transformers
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoImageProcessor, AutoProcessor, AutoTokenizer

    _check_safetensors_folder(model)
    common = {"trust_remote_code": False}
    try:
        config = AutoConfig.from_pretrained(model, **common)  # first: it refuses repos that ship their own code
        _check_weight_files(model)
        if config.model_type == "vision-encoder-decoder":
            model_class = transformers.VisionEncoderDecoderModel
        else:  # BLIP, BLIP-2, GIT, Florence-2, LLaVA-style...: the class image-to-text pipelines loaded
            model_class = (getattr(transformers, "AutoModelForImageTextToText", None)
                           or transformers.AutoModelForVision2Seq)
        try:
            processor = AutoProcessor.from_pretrained(model, **common)
        except (OSError, ValueError, TypeError):
            processor = None
        if processor is None or not hasattr(processor, "image_processor"):  # VisionEncoderDecoder repos
            processor = None
            image_processor = AutoImageProcessor.from_pretrained(model, **common)
            tokenizer = _load_tokenizer(model, AutoTokenizer)
        else:
            image_processor, tokenizer = processor, getattr(processor, "tokenizer", None)
        _check_tokenizer(model, tokenizer)  # before the weights: nothing heavy loads for a model that cannot caption
        net = model_class.from_pretrained(model, use_safetensors=True, **common)
    except (OSError, ValueError, SafetensorError) as err:
        if isinstance(err, CaptionError):
            raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        if "trust_remote_code" in str(err):
            first = ("the repo needs its own Python code (trust_remote_code), which is refused like pickles; "
                     "use a version converted to transformers' built-in classes")
        raise CaptionError(f"{model}: cannot load an image-to-text model in safetensors: {first}") from None
    dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
    net.to(device, dtype).eval()
    prompt = prompt or DEFAULT_PROMPTS.get(config.model_type)
    if prompt and processor is None:
        raise CaptionError(f"{model}: --prompt needs a model whose processor takes text (BLIP, GIT, Florence-2)")

    def caption(images: list[Image.Image]) -> list[str]:
        if prompt:
            inputs = processor(images=images, text=[prompt] * len(images), return_tensors="pt", padding=True)
        else:
            inputs = image_processor(images=images, return_tensors="pt")
        inputs = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device)
                  for k, v in inputs.items() if hasattr(v, "to")}
        with torch.inference_mode():
            ids = net.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=num_beams)
        texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
        return [" ".join(t.split()) for t in texts]

    return caption


# ----------------------------------------------------------------------------- WD14 taggers


def _tagger_files(model: str) -> tuple[Path, Path]:
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".onnx":
            raise CaptionError(f"{model}: a tagger must be an .onnx file (pickled or other weights are refused)")
        onnx_path, csv_path = path, path.parent / TAGS_CSV
    elif path.is_dir():
        graphs = sorted(path.glob("*.onnx"))
        onnx_path = path / "model.onnx" if (path / "model.onnx").is_file() else graphs[0] if len(graphs) == 1 else None
        if onnx_path is None:
            found = f"several .onnx files ({', '.join(g.name for g in graphs)}), none named model.onnx" if graphs \
                else "no .onnx file"
            raise CaptionError(f"{model}: {found}")
        csv_path = path / TAGS_CSV
    else:  # a hub id, e.g. SmilingWolf/wd-swinv2-tagger-v3
        from huggingface_hub import hf_hub_download

        try:
            onnx_path = Path(hf_hub_download(model, "model.onnx"))
            csv_path = Path(hf_hub_download(model, TAGS_CSV))
        except Exception as err:  # offline, no such repo, no such file: one line
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise CaptionError(f"{model}: not a local tagger and cannot fetch model.onnx + {TAGS_CSV}: "
                               f"{first}") from None
    if not csv_path.is_file():
        raise CaptionError(f"{model}: {TAGS_CSV} (the tag names) is missing beside {onnx_path.name}")
    return onnx_path, csv_path


def read_tag_names(csv_path: Path) -> tuple[list[str], list[int]]:
    """(names, categories) in model-output order. Underscores become spaces except in kaomoji such as '^_^'."""
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        names = [r["name"] for r in rows]
        categories = [int(r["category"]) for r in rows]
    except (KeyError, ValueError, TypeError, UnicodeDecodeError, csv.Error) as err:
        raise CaptionError(f"{csv_path}: needs 'name' and 'category' columns ({type(err).__name__}: {err})") from None
    return [n.replace("_", " ") if re.search(r"[A-Za-z]{2}", n) else n for n in names], categories


def _tagger_pixels(image: Image.Image, size: int):
    """WD14 input: padded to a white square, resized, BGR float32 0-255, NHWC."""
    import numpy as np

    side = max(image.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    square = square.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(square, dtype=np.float32)[:, :, ::-1]


def load_tagger(model: str, threshold: float = 0.35, character_threshold: float = 0.85) -> Captioner:
    import numpy as np
    import onnxruntime as ort

    onnx_path, csv_path = _tagger_files(model)
    names, categories = read_tag_names(csv_path)
    wanted = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    try:
        session = ort.InferenceSession(str(onnx_path), providers=wanted)
    except Exception as err:  # onnxruntime raises its own exception types for a bad graph
        raise CaptionError(f"{onnx_path}: not a loadable ONNX model: {str(err).splitlines()[0]}") from None
    graph_input = session.get_inputs()[0]
    shape = graph_input.shape  # WD14: [batch, size, size, 3]
    if len(shape) != 4 or shape[3] != 3 or not isinstance(shape[1], int):
        raise CaptionError(f"{onnx_path}: input shape {shape} is not a WD14 tagger's [batch, size, size, 3]")
    if shape[2] != shape[1] or not 0 < shape[1] <= MAX_TAGGER_SIZE:  # every image becomes size² x 3 floats
        raise CaptionError(f"{onnx_path}: input size {shape[1]}x{shape[2]} px is not a square of at most "
                           f"{MAX_TAGGER_SIZE} px (WD14 taggers take 448); this graph is not a usable tagger")
    one_at_a_time = shape[0] == 1

    def caption(images: list[Image.Image]) -> list[str]:
        batch = np.stack([_tagger_pixels(img, shape[1]) for img in images])
        chunks = [batch[i:i + 1] for i in range(len(batch))] if one_at_a_time else [batch]
        probs = np.concatenate([session.run(None, {graph_input.name: c})[0] for c in chunks])
        if probs.shape[-1] != len(names):
            raise CaptionError(f"{onnx_path}: {probs.shape[-1]} outputs but {len(names)} tags in {csv_path.name}")
        out = []
        for row in probs:
            chars = [(p, n) for p, n, c in zip(row, names, categories) if c == CHARACTER and p >= character_threshold]
            general = [(p, n) for p, n, c in zip(row, names, categories)
                       if c not in (CHARACTER, RATING) and p >= threshold]
            out.append(", ".join(n for _, n in sorted(chars, reverse=True) + sorted(general, reverse=True)))
        return out

    return caption


def load_captioner(model: str, mode: str | None = None, device: str | None = None, prompt: str | None = None,
                   max_new_tokens: int = 75, threshold: float = 0.35, character_threshold: float = 0.85
                   ) -> tuple[Captioner, str]:
    """(captioner, mode). mode None: guessed from the model (guess_mode)."""
    mode = mode or guess_mode(model)
    if mode == TAGS:
        return load_tagger(model, threshold, character_threshold), mode
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return load_sentence_model(model, device, prompt, max_new_tokens), mode


# ----------------------------------------------------------------------------- folders


def _caption_batch(captioner: Captioner, images: list[Image.Image]) -> list[str | Exception]:
    """Captions for a batch; when the batch fails, each image alone, so one odd image fails alone. When every
    image fails alone too, the fault is the model's: raise it."""
    try:
        return list(captioner(images))
    except CaptionError:
        raise
    except Exception:
        if len(images) == 1:
            raise
    results: list[str | Exception] = []
    for image in images:
        try:
            results.append(captioner([image])[0])
        except CaptionError:
            raise
        except Exception as err:
            results.append(err)
    if all(isinstance(r, Exception) for r in results):
        raise results[0]
    return results


def caption_folder(folder: Path, captioner: Captioner, undo: dict, *, overwrite: bool = False,
                   strip: list[str] = (), as_tags: bool = False, batch_size: int = 4,
                   only: list[str] | None = None, ext: str = ".txt",
                   progress: Callable[[dict], None] = lambda event: None) -> dict[str, list[str]]:
    """Caption every image of `folder` (or the `only` ones) that has no caption yet (all with `overwrite`).
    `progress` gets one dict per image: done, total, file, status (written | kept | bad) and caption or reason.
    Returns {"written": [...], "kept": [...], "bad": ["file: reason", ...]}."""
    folder = Path(folder)
    ext = check_caption_extension(ext)
    images = list_images(folder, only)
    special = [] if only else not_regular_files(folder)
    result: dict[str, list[str]] = {"written": [], "kept": [], "bad": []}
    total, todo = len(images) + len(special), []

    def report(rel: str, status: str, **extra) -> None:
        result[status].append(rel if status != "bad" else f"{rel}: {extra['reason']}")
        progress({"done": sum(map(len, result.values())), "total": total, "file": rel, "status": status, **extra})

    for path in special:
        report(path.relative_to(folder).as_posix(), "bad", reason="not a regular file (a pipe, socket or device)")
    for image in images:
        if caption_file(image, ext).exists() and not overwrite:
            report(image.relative_to(folder).as_posix(), "kept", reason="caption exists (--overwrite replaces it)")
        else:
            todo.append(image)
    for start in range(0, len(todo), max(1, batch_size)):
        loaded = []
        for image in todo[start:start + max(1, batch_size)]:
            try:
                loaded.append((image, read_rgb(image)))
            except Exception as err:  # Pillow raises many types for bad files
                report(image.relative_to(folder).as_posix(), "bad", reason=f"cannot decode image: {err}")
        if not loaded:
            continue
        texts = _caption_batch(captioner, [img for _, img in loaded])
        new, done = {}, []
        for (image, _), text in zip(loaded, texts):
            if isinstance(text, Exception):
                report(image.relative_to(folder).as_posix(), "bad", reason=f"model failed on it: {text}")
                continue
            text = strip_words(text, list(strip), as_tags) if strip else text
            if not text.strip():  # an empty caption file would only hide that the image has no caption
                why = "nothing left after --strip" if strip else "the model returned an empty caption"
                report(image.relative_to(folder).as_posix(), "bad", reason=why)
                continue
            new[caption_file(image, ext)] = text
            done.append(image)
        refused = dict(line.split(": ", 1) for line in write_captions(folder, new, undo))
        for image in done:
            rel, cap = image.relative_to(folder).as_posix(), caption_file(image, ext).relative_to(folder).as_posix()
            if cap in refused:
                report(rel, "bad", reason=f"caption {cap} {refused[cap]}")
            else:
                report(rel, "written", caption=new[caption_file(image, ext)])
    return result
