"""`lora info`: what a LoRA file is, who wrote it, how it was trained, its hashes, and which consumers load it exactly.

Hashes (all over the file's bytes, as the tools compute them): sha256 of the whole file (A1111's and Civitai's
AutoV2 = its first 10 hex digits); A1111's legacy model hash (AutoV1: sha256 of 64 KiB at 1 MiB, 8 hex digits); the
hash of the tensor data after the header (sd-webui-additional-networks' addnet hash; Civitai's AutoV3 = its first 12
hex digits); kohya's sshs_model_hash / sshs_legacy_hash as stored in the header, checked against their recomputation
(kohya train_util.precalculate_safetensors_hashes: over a re-serialisation with only the ss_* metadata).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

from trainer.lora_tools.deltas import LoraFile, read_lora

TRAINING_KEYS = ("ss_output_name", "ss_sd_model_name", "ss_base_model_version", "ss_network_module", "ss_network_dim",
                 "ss_network_alpha", "ss_network_args", "ss_learning_rate", "ss_unet_lr", "ss_text_encoder_lr",
                 "ss_optimizer", "ss_lr_scheduler", "ss_steps", "ss_max_train_steps", "ss_epoch", "ss_batch_size_per_device",
                 "ss_resolution", "ss_num_train_images", "ss_seed", "ss_mixed_precision", "ss_v2",
                 "ss_v_parameterization", "ss_training_started_at", "ss_training_finished_at")
META_KEYS = ("modelspec.title", "modelspec.author", "modelspec.description", "modelspec.trigger_phrase",
             "modelspec.tags", "modelspec.license", "modelspec.architecture", "modelspec.date", "modelspec.resolution")
REPORT_KEY = "style_report"  # header entry the style report writes into a run's files (trainer.report)
# Which consumers apply a file exactly, by its layout and variant (the rows of docs/consumers.md).
NOT_EXACT = {
    ("kohya", "dora"): ("ComfyUI/Forge", "A1111 applies DoRA on the input axis only; kohya merge_lora.py and diffusers "
                        "ignore this dora_scale: use a plain LoRA (`lora resize`) for them"),
    ("lycoris", "loha"): ("A1111 1.10, ComfyUI/Forge", "kohya merge_lora.py and diffusers read no LyCORIS keys: "
                          "`lora resize` writes a plain LoRA for them"),
    ("diffusers", "dora"): ("diffusers (peft's DoRA)", "A1111 and ComfyUI read no diffusers keys"),
    ("diffusers", "lokr"): ("diffusers (`pipe.unet.load_lora_adapter`, peft for the text encoder) and this app's "
                            "Preview", "peft's LoKr layout: `pipe.load_lora_weights`, A1111 and ComfyUI do not read it "
                                       "(use the run's LyCORIS `.safetensors` file there)"),
}
NOT_EXACT[("lycoris", "lokr")] = NOT_EXACT[("lycoris", "loha")]


def file_hashes(path: Path, header: dict[str, str]) -> dict[str, str | bool]:
    """The hashes A1111, Civitai and kohya compute for `path`, and whether the stored kohya hashes are current."""
    data = Path(path).read_bytes()
    whole = hashlib.sha256(data).hexdigest()
    payload = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()
    out: dict[str, str | bool] = {
        "sha256": whole, "autov1": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8], "autov2": whole[:10],
        "addnet": payload, "autov3": payload[:12]}
    if "sshs_model_hash" in header:
        from safetensors.torch import load

        from trainer.lora_files.kohya_meta import addnet_hashes

        model_hash, legacy_hash = addnet_hashes(load(data), header)
        out.update(sshs_model_hash=header["sshs_model_hash"], sshs_legacy_hash=header.get("sshs_legacy_hash", ""),
                   sshs_current=header["sshs_model_hash"] == model_hash and
                   header.get("sshs_legacy_hash") == legacy_hash)
    return out


def module_group(key: str) -> str:
    """A module's group for the rank table: its part and block, e.g. unet.down_blocks.1, text_encoder."""
    part, _, module = key.partition(".")
    if part.startswith("text_encoder"):
        return part
    pieces = module.split(".")
    return ".".join([part, *pieces[:2]]) if len(pieces) > 1 and pieces[1].isdigit() else f"{part}.{pieces[0]}"


def rank_groups(file: LoraFile) -> dict[str, dict]:
    """{group: {modules, ranks, alphas}} (a full-ΔW module's rank is that of its factors, when the file has one)."""
    groups: dict[str, dict] = {}
    for key in file.deltas:
        rank, alpha = file.ranks.get(key, (None, None))
        group = groups.setdefault(module_group(key), {"modules": 0, "ranks": set(), "alphas": set()})
        group["modules"] += 1
        if rank:
            group["ranks"].add(rank)
        if alpha is not None:
            group["alphas"].add(round(alpha, 6))
    return {k: {"modules": g["modules"], "ranks": sorted(g["ranks"]), "alphas": sorted(g["alphas"])}
            for k, g in sorted(groups.items())}


def top_tags(header: dict[str, str], count: int = 20) -> list[tuple[str, int]]:
    """The most frequent caption tags of kohya's ss_tag_frequency ({folder: {tag: count}}), over all folders."""
    try:
        folders = json.loads(header.get("ss_tag_frequency") or "{}")
    except json.JSONDecodeError:
        return []
    total: Counter = Counter()
    for tags in folders.values() if isinstance(folders, dict) else []:
        if isinstance(tags, dict):
            total.update({str(t): int(n) for t, n in tags.items() if isinstance(n, (int, float))})
    return total.most_common(count)


def consumers(file: LoraFile) -> dict[str, str]:
    """{"exact": the tools that apply this file exactly, "other": what the rest do, or how the file is written}."""
    from trainer import families

    family = families.get(file.family)
    if file.layout == "lycoris" and file.variant == "lokr" and any(rank for rank, _ in file.ranks.values()):
        return {"exact": "ComfyUI/Forge", "other": "A1111 1.10 fails on decomposed LoKr factors (lokr_w*_a/_b); "
                "kohya merge_lora.py and diffusers read no LyCORIS keys: `lora resize` writes a plain LoRA for them"}
    if (file.layout, file.variant) in NOT_EXACT:
        exact, other = NOT_EXACT[(file.layout, file.variant)]
        return {"exact": exact, "other": other}
    if file.layout == "diffusers":
        return {"exact": family.DIFFUSERS_TOOLS, "other": family.DIFFUSERS_NOTE.strip(" ()")}
    return {"exact": family.KOHYA_TOOLS, "other": family.KOHYA_NOTE}


def describe_file(path: Path, model=None, base: str | None = None) -> dict:
    """Everything `lora info` shows, as one JSON-able dict."""
    from trainer import families

    file = read_lora(path, model=model, base=base)
    header = file.header
    trained = {}
    if "style_lora_config" in header:
        import tomllib

        try:
            trained = tomllib.loads(header["style_lora_config"]).get("lora", {})
        except tomllib.TOMLDecodeError:
            trained = {}
    report = json.loads(header[REPORT_KEY]) if header.get(REPORT_KEY, "").startswith("{") else None
    return {
        "file": str(path), "bytes": Path(path).stat().st_size, "layout": file.layout, "trainer": file.trainer,
        "family": file.family, "base": families.get(file.family).LABEL, "variant": file.variant,
        "trained_variant": trained.get("variant"), "modules": len(file.deltas),
        "parts": dict(Counter(k.split(".", 1)[0] for k in file.deltas)), "groups": rank_groups(file),
        "training": {k: header[k] for k in TRAINING_KEYS if k in header},
        "metadata": {k: header[k] for k in META_KEYS if k in header},
        "thumbnail": "modelspec.thumbnail" in header or "ssmd_cover_images" in header,
        "tags": top_tags(header), "dataset": header.get("ss_dataset_dirs"), "report": report,
        "hashes": file_hashes(Path(path), header), "consumers": consumers(file),
    }


def info_text(info: dict) -> str:
    """`lora info` for people."""
    lines = [f"{info['file']}: {info['layout']} layout, {info['variant']}"
             + (f" (trained as {info['trained_variant']})" if info.get("trained_variant") else "")
             + f", for {info['base']}, written by {info['trainer']}; {info['modules']} modules"
             + f" ({', '.join(f'{p} {n}' for p, n in info['parts'].items())}), {info['bytes']:,} bytes"]
    lines.append("ranks / alphas by group:")
    for group, g in info["groups"].items():
        ranks = "/".join(map(str, g["ranks"])) or "-"
        alphas = "/".join(f"{a:g}" for a in g["alphas"]) or "-"
        lines.append(f"  {group}: {g['modules']} modules, rank {ranks}, alpha {alphas}")
    for title, items in (("training", info["training"]), ("metadata", info["metadata"])):
        if items:
            lines.append(f"{title}:")
            lines += [f"  {k}: {v if len(str(v)) < 200 else str(v)[:200] + '...'}" for k, v in items.items()]
    if info["tags"]:
        lines.append("tags: " + ", ".join(f"{t} ({n})" for t, n in info["tags"]))
    if info["report"]:
        lines.append(f"style report: {json.dumps(info['report'])}")
    h = info["hashes"]
    lines.append(f"hashes: AutoV2 {h['autov2']}, AutoV3 {h['autov3']}, legacy {h['autov1']}, sha256 {h['sha256']}")
    if "sshs_model_hash" in h:
        lines.append(f"kohya: sshs_model_hash {h['sshs_model_hash']}, sshs_legacy_hash {h['sshs_legacy_hash']} "
                     f"({'current' if h['sshs_current'] else 'STALE: they do not match the tensors'})")
    lines.append(f"loads exactly in: {info['consumers']['exact']}")
    if info["consumers"]["other"]:
        lines.append(f"note: {info['consumers']['other']}")
    return "\n".join(lines)
