"""Generate the bad-input corpus: files that break trainers in the wild, made from code (never hand-collected).

  python scripts/make_bad_inputs.py [DEST]        (default: tests/bad_inputs)

DEST/dataset/   one training folder: every bad image/caption case beside a few good images, so a test can check
                that each case gets its own message and the rest still trains
DEST/uploads/   files offered to the UI upload path only (zips with '../' entries or symlinks, pickles)
DEST/models/    files offered as a base model or an adapter (pickles, a pickle renamed .safetensors, NaN/Inf weights)
DEST/masks/     one small dataset per case for data.masked_loss: an image with a broken, misshapen or empty mask
DEST/settings/  sparse config TOMLs laid over presets/tiny-test.toml that must be refused before anything loads
DEST/manifest.json   one entry per case: the files, what must happen (skip | warn | train | refuse) and a phrase
                the message must contain. Tests read it, so a case added here is tested everywhere.

Deterministic: the same bytes every run (fixed zip dates, no timestamps in images), so the corpus checked in
under tests/ can be compared with a fresh one.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
import struct
import sys
import zipfile
import zlib
from pathlib import Path

from PIL import Image, features

ROOT = Path(__file__).resolve().parent.parent
GOOD_SOURCE = ROOT / "examples" / "tiny-style"
ZIP_DATE = (2024, 1, 1, 0, 0, 0)


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def _pattern(size=(96, 96), mode="RGB") -> Image.Image:
    """A deterministic picture with detail (so JPEG/PNG data are long enough to truncate meaningfully)."""
    w, h = size
    img = Image.new("RGB", size)
    img.putdata([((x * 7 + y * 3) % 256, (x * y) % 256, (x * 13 ^ y * 5) % 256) for y in range(h) for x in range(w)])
    return img.convert(mode) if mode != "RGB" else img


def _bomb_png(side: int = 20000) -> bytes:
    """A 1-bit side×side PNG (400 Mpx at 20000) that is a few tens of KiB on disk: a decompression bomb.
    Written chunk by chunk so that making it never holds the pixels in memory."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" + b"\x00" * ((side + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _frames(n=3, size=(80, 80)) -> list[Image.Image]:
    return [Image.new("RGB", size, c) for c in ((220, 40, 40), (40, 220, 40), (40, 40, 220))[:n]]


def _zip(entries: list[tuple[zipfile.ZipInfo | str, bytes]], method: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        for info, data in entries:
            if isinstance(info, str):
                info = zipfile.ZipInfo(info, ZIP_DATE)
                info.compress_type = method
            zf.writestr(info, data)
    return buf.getvalue()


def _false_size(blob: bytes, size: int, local: bool = True) -> bytes:
    """The zip `blob` (one entry) with its uncompressed-size field set to `size`: in the central directory, which
    readers list from, and (local=True) in the local header too, so the two agree and only the data tells."""
    out = bytearray(blob)
    struct.pack_into("<I", out, out.rfind(b"PK\x01\x02") + 24, size)
    if local:
        struct.pack_into("<I", out, out.find(b"PK\x03\x04") + 22, size)
    return bytes(out)


def _adapter(value: float) -> bytes:
    """A small kohya-layout LoRA .safetensors whose up weight holds `value` (NaN or Inf) in one place."""
    import numpy as np
    from safetensors.numpy import save

    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    up = np.zeros((32, 4), dtype=np.float32)
    up[3, 1] = value
    return save({f"{key}.lora_down.weight": np.full((4, 32), 0.01, dtype=np.float32), f"{key}.lora_up.weight": up,
                 f"{key}.alpha": np.array(4.0, dtype=np.float32)}, metadata={"ss_network_dim": "4"})


class _Evil:
    """What a malicious .ckpt carries: unpickling it would call os.system. Nothing here ever unpickles it."""

    def __reduce__(self):
        return (eval, ("__import__('os').system('echo pwned > /tmp/style-lora-pwned')",))


def build(dest: Path) -> list[dict]:
    dest = Path(dest)
    shutil.rmtree(dest, ignore_errors=True)
    data, uploads, models, settings = dest / "dataset", dest / "uploads", dest / "models", dest / "settings"
    masks = dest / "masks"
    for d in (data, uploads, models, settings, masks):
        d.mkdir(parents=True)
    cases: list[dict] = []

    def case(name: str, files: dict[str, bytes], expect: str, says: str, where: str = "dataset", about: str = "",
             note: str = "") -> None:
        folder = {"dataset": data, "uploads": uploads, "models": models, "settings": settings, "masks": masks}[where]
        for rel, blob in files.items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(blob)
        cases.append({"name": name, "where": where, "files": sorted(files), "about": about or sorted(files)[0],
                      "expect": expect, "says": says, "note": note})

    # Good images: the rest of the dataset that must still train.
    for src in sorted(GOOD_SOURCE.glob("0[0-3]_*")):
        (data / src.name).write_bytes(src.read_bytes())

    good = _pattern()
    jpeg = io.BytesIO()
    good.save(jpeg, "JPEG", quality=90)
    png = _png(good)

    # --- images that cannot be used: skipped, each with a message
    case("zero-byte", {"zero_byte.png": b""}, "skip", "empty file (0 bytes)")
    case("truncated-png", {"truncated_png.png": png[: len(png) // 2]}, "skip", "cannot decode")
    case("truncated-jpeg", {"truncated_jpg.jpg": jpeg.getvalue()[: len(jpeg.getvalue()) // 2]}, "skip", "cannot decode")
    case("not-an-image", {"not_an_image.jpg": b"<html><body>404 Not Found</body></html>\n"}, "skip", "cannot decode")
    case("decompression-bomb", {"bomb_20000x20000.png": _bomb_png()}, "skip", "too large to decode safely")
    case("one-pixel", {"one_pixel.png": _png(Image.new("RGB", (1, 1), (255, 0, 0)))}, "skip", "too small (1x1 px")

    # --- unusual but valid images: train, converted correctly
    case("20000px-wide", {"wide_20000px.png": _png(Image.new("RGB", (20000, 48), (30, 120, 200)))}, "train", "",
         note="extreme aspect ratio: trains in the widest bucket")
    cmyk = io.BytesIO()
    _pattern().convert("CMYK").save(cmyk, "JPEG", quality=90)
    case("cmyk-jpeg", {"cmyk.jpg": cmyk.getvalue()}, "train", "")
    gray16 = Image.new("I;16", (80, 80))
    gray16.putdata([(x * 800) % 65536 for x in range(80 * 80)])
    case("16-bit", {"gray16.png": _png(gray16)}, "train", "", note="scaled to 8 bit, not clipped")
    pal = Image.new("P", (80, 80), 1)
    pal.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    pal.paste(0, (0, 0, 40, 80))
    case("palette-transparency", {"palette_alpha.png": _png(pal, transparency=0)}, "train", "",
         note="transparent pixels composited on white")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when shown
    rot = io.BytesIO()
    Image.new("RGB", (96, 64), (10, 160, 60)).save(rot, "JPEG", exif=exif.tobytes())
    case("exif-rotated", {"exif_rotated.jpg": rot.getvalue()}, "train", "", note="trained upright (64x96)")
    webp = io.BytesIO()
    good.save(webp, "WEBP", quality=80)
    case("webp", {"still_webp.webp": webp.getvalue()}, "train", "")
    if features.check("avif"):
        avif = io.BytesIO()
        good.save(avif, "AVIF", quality=60)
        case("avif", {"still_avif.avif": avif.getvalue()}, "train", "")

    # --- animated images: the first frame trains, with a warning
    gif = io.BytesIO()
    first, *rest = _frames()
    first.save(gif, "GIF", save_all=True, append_images=rest, duration=100, loop=0)
    case("animated-gif", {"animated_gif.gif": gif.getvalue()}, "warn", "animated image (3 frames): only the first frame")
    awebp = io.BytesIO()
    first.save(awebp, "WEBP", save_all=True, append_images=rest, duration=100, loop=0, lossless=True)
    case("animated-webp", {"animated_webp.webp": awebp.getvalue()}, "warn", "animated image (3 frames): only the first frame")

    # --- captions
    case("caption-bad-encoding", {"latin1_caption.png": png, "latin1_caption.txt": "café, crème brûlée".encode("cp1252")},
         "warn", "caption file is not UTF-8", about="latin1_caption.txt", note="image trains on the default caption")
    case("caption-utf16-bom", {"utf16_caption.png": png, "utf16_caption.txt": "zkstyle, utf16 caption".encode("utf-16")},
         "train", "", note="UTF-16 with BOM (Notepad 'Unicode') is read correctly")
    case("caption-without-image", {"orphan_caption.txt": b"a caption whose image is missing"}, "warn",
         "caption file has no matching image")
    case("caption-name-case", {"CaseCaption.png": png, "casecaption.txt": b"never used"}, "warn",
         "differs from image 'CaseCaption.png' only in letter case", about="casecaption.txt")
    case("caption-with-image-extension", {"double_ext.png": png, "double_ext.png.txt": b"named a.png.txt"}, "warn",
         "looks meant for 'double_ext.png'", about="double_ext.png.txt")

    case("caption-too-large", {"huge_caption.png": png, "huge_caption.txt": b"zkstyle, " * 8000}, "warn",
         "caption file is larger than 64 KiB", about="huge_caption.txt",
         note="read only up to the cap (a symlink to a huge file costs nothing); the image trains without it")

    # --- names
    case("duplicate-names-by-case", {"Dup_Case.png": png, "dup_case.png": _png(_pattern().rotate(90))}, "warn",
         "except for letter case", about="dup_case.png")
    case("same-stem-two-extensions", {"twin.png": png, "twin.jpg": jpeg.getvalue(), "twin.txt": b"shared caption"},
         "warn", "shares the caption file 'twin.txt'", about="twin.png")

    # --- uploads only: zips that try to escape, pickles
    case("zip-dotdot", {"zip_slip.zip": _zip([("../escape.png", png), ("../../etc/evil.png", png), ("ok/in_zip.png", png)])},
         "refuse", "path with '..' refused", where="uploads", note="ok/in_zip.png is still extracted")
    link = zipfile.ZipInfo("link.png", ZIP_DATE)
    link.external_attr = 0o120777 << 16
    case("zip-symlink", {"zip_symlink.zip": _zip([(link, b"/etc/passwd"), ("fine.png", png)])}, "refuse",
         "symlink refused", where="uploads")
    case("zip-absolute", {"zip_absolute.zip": _zip([("/tmp/abs.png", png)])}, "refuse", "absolute path refused",
         where="uploads")
    evil = pickle.dumps({"state_dict": _Evil()})
    case("ckpt-upload", {"model.ckpt": evil}, "refuse", "file type '.ckpt' refused", where="uploads")

    # --- uploads only: archive quotas and lying headers; a refused archive or entry leaves nothing behind
    case("zip-huge-repeats", {"zip_huge_repeats.zip": _zip([("99999999999_x/huge_repeats.png", png)])}, "refuse",
         "99999999999 repeats, over the limit", where="uploads", note="kohya folder: refused, not a MemoryError")
    case("zip-bomb", {"zip_bomb.zip": _zip([("bomb.png", bytes(20 * 2**20))], zipfile.ZIP_DEFLATED)}, "refuse",
         "compression ratio limit", where="uploads", note="20 MiB from ~20 KiB")
    case("zip-bomb-spread", {"zip_bomb_spread.zip": _zip([(f"flat_{i:03d}.bmp", bytes(512 * 1024)) for i in range(40)],
                                                         zipfile.ZIP_DEFLATED)},
         "refuse", "compression ratio limit", where="uploads", note="each entry small, the archive a bomb")
    case("zip-declared-huge", {"zip_declared_huge.zip": _false_size(_zip([("big.png", png)]), 3_000_000_000)}, "refuse",
         "uncompressed is over the", where="uploads", note="quota checked on the declared sizes, before extracting")
    case("zip-size-field-too-small", {"zip_short_size.zip": _false_size(_zip([("short_size.png", png)]), 100)},
         "refuse", "not stored", where="uploads", note="no 0-byte or partial short_size.png is left")
    case("zip-size-field-too-large",
         {"zip_long_size.zip": _false_size(_zip([("long_size.png", png)]), len(png) + 1000, local=False)},
         "refuse", "not the", where="uploads", note="the data ends before the declared size: not stored")
    case("zip-too-many-entries", {"zip_many.zip": _zip([(f"c{i:04d}.txt", b"") for i in range(1001)])}, "refuse",
         "file limit", where="uploads")
    case("zip-file-folder-clash", {"zip_clash.zip": _zip([("clash.png", png), ("clash.png/inner.png", png)])},
         "refuse", "already exists in the dataset", where="uploads",
         note="a name that is a file here and a folder there: one refused with a message, the other stored")

    # --- offered as a base model or an adapter
    case("pickle-base-ckpt", {"base.ckpt": evil}, "refuse", "pickles", where="models")
    case("pickle-adapter-pt", {"adapter.pt": evil}, "refuse", "pickles", where="models")
    case("pickle-renamed-safetensors", {"renamed_pickle.safetensors": evil}, "refuse", "not a readable .safetensors",
         where="models", note="as an adapter; as a base it is refused by the safetensors reader")

    case("adapter-nan", {"nan_adapter.safetensors": _adapter(float("nan"))}, "refuse", "NaN/Inf", where="models",
         note="as an adapter (preview, convert): it would render black images")
    case("adapter-inf", {"inf_adapter.safetensors": _adapter(float("inf"))}, "refuse", "NaN/Inf", where="models")

    # --- masks (data.masked_loss), one dataset each: a broken mask refuses the run before any model loads, naming
    # the file; an empty mask skips its image; all masks empty refuses the run
    def masked(name: str, mask: bytes, other_mask: bytes | None = None) -> dict[str, bytes]:
        white = _png(Image.new("L", (96, 96), 255))
        return {f"{name}/img.png": png, f"{name}/img.mask.png": mask, f"{name}/other.png": png,
                f"{name}/other.mask.png": white if other_mask is None else other_mask}

    for name, mask, expect, says in [
        ("mask-text", b"this is a text file, not a mask\n", "refuse", "cannot decode mask"),
        ("mask-zero-byte", b"", "refuse", "empty file (0 bytes)"),
        ("mask-bomb", _bomb_png(30000), "refuse", "mask too large to decode safely"),
        ("mask-wrong-shape", _png(Image.new("L", (96, 24), 255)), "refuse", "mask is 96x24 px but its image is 96x96"),
        ("mask-empty", _png(Image.new("L", (96, 96), 0)), "skip", "mask is empty where the image trains"),
    ]:
        case(name, masked(name.replace("-", "_"), mask), expect, says, where="masks",
             about=f"{name.replace('-', '_')}/img.mask.png")
    black = _png(Image.new("L", (96, 96), 0))
    case("mask-all-empty", masked("mask_all_empty", black, black), "refuse", "every mask is empty", where="masks",
         about="mask_all_empty/img.mask.png")

    # --- settings (over presets/tiny-test.toml): refused before any model loads, the message names the setting
    for name, toml, says in [
        ("sample-width-7", "[sample]\nwidth = 7\n", "sample.width"),
        ("sample-height-not-vae-multiple", "[sample]\nheight = 100\n", "sample.height: 100 is not a multiple of 8"),
        ("resolution-not-vae-multiple", "[data]\nresolution = 36\nbucket_step = 12\n",
         "data.resolution (36) is also the sample and report image size"),
        ("lr-inf", "[train]\nlr_unet = inf\n", "train.lr_unet: Input should be a finite number"),
        ("alpha-nan", "[lora]\nalpha = nan\n", "lora.alpha: Input should be a finite number"),
        ("noise-offset-nan", "[train]\nnoise_offset = nan\n", "train.noise_offset: Input should be a finite number"),
        ("steps-1e12", "[train]\nsteps = 1000000000000\n", "train.steps: Input should be less than or equal to"),
        ("resolution-100000", "[data]\nresolution = 100000\n", "data.resolution: Input should be less than or equal"),
        ("repeats-huge", "[data]\nrepeats = 99999999999\n", "data.repeats: Input should be less than or equal"),
    ]:
        case(name, {f"{name.replace('-', '_')}.toml": toml.encode()}, "refuse", says, where="settings")

    (dest / "manifest.json").write_text(json.dumps(cases, indent=1) + "\n")
    return cases


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tests" / "bad_inputs"
    print(f"{len(build(out))} cases in {out}")
