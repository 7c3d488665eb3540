"""Tiny random captioners, saved to disk and loaded by path exactly like a real model (no weights can be
downloaded here): a BLIP and a VisionEncoderDecoder (ViT + BERT decoder) in safetensors, and a WD14-style ONNX
tagger whose tags depend on the image's colour, so tests can check which tags a red or a blue image gets."""

from __future__ import annotations

from pathlib import Path

WORDS = ["a", "cat", "dog", "red", "blue", "house", "tree", "watercolor", "painting", "of", "on", "with"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]

# (name, category, weights on mean B, G, R in 0..1, bias): sigmoid(w·mean + bias) is the tag's probability.
TAGGER_TAGS = [
    ("general", 9, (0, 0, 0), 5.0),  # a rating: never written
    ("red_theme", 0, (0, 0, 10), -5.0),
    ("blue_theme", 0, (10, 0, 0), -5.0),
    ("watercolor_(medium)", 0, (0, 0, 0), 1.0),  # p = 0.73 for every image
    ("^_^", 0, (0, 0, 0), 0.0),  # p = 0.5: a kaomoji keeps its underscore
    ("hatsune_miku", 4, (0, 0, 0), 1.0),  # character at 0.73: below the 0.85 character threshold
    ("kagamine_rin", 4, (0, 0, 0), 3.0),  # character at 0.95: written first
]


def _vocab(folder: Path):
    from transformers import BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(SPECIAL + WORDS) + "\n")
    return BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]")


def build_tiny_blip(folder: Path) -> Path:
    """BLIP with a 32 px vision tower and a 1-layer text decoder; special tokens are never generated, so every
    caption is max_new_tokens words of WORDS."""
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    folder = Path(folder)
    tokenizer = _vocab(folder)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("[DEC]", "[SEP]", "[PAD]")}
    config = BlipConfig(
        text_config=dict(vocab_size=len(SPECIAL) + len(WORDS), hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=37, max_position_embeddings=128,
                         bos_token_id=ids["[DEC]"], sep_token_id=ids["[SEP]"], eos_token_id=ids["[SEP]"],
                         pad_token_id=ids["[PAD]"], encoder_hidden_size=32),
        vision_config=dict(hidden_size=32, image_size=32, patch_size=8, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=37),
        projection_dim=32)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config)
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[: len(SPECIAL)] = -100.0
    model.save_pretrained(folder, safe_serialization=True)
    BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer).save_pretrained(folder)
    return folder


def build_tiny_vision_encoder_decoder(folder: Path) -> Path:
    """The ViT-GPT2 layout (an image processor and a tokenizer, no joint processor), with a BERT decoder."""
    import torch
    from transformers import (BertConfig, ViTConfig, ViTImageProcessor, VisionEncoderDecoderConfig,
                              VisionEncoderDecoderModel)

    folder = Path(folder)
    tokenizer = _vocab(folder)
    encoder = ViTConfig(hidden_size=32, image_size=32, patch_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=37)
    decoder = BertConfig(vocab_size=len(SPECIAL) + len(WORDS), hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=37, is_decoder=True, add_cross_attention=True,
                         max_position_embeddings=128)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    torch.manual_seed(0)
    model = VisionEncoderDecoderModel(config)
    for cfg in (model.config, model.generation_config):
        cfg.decoder_start_token_id = tokenizer.cls_token_id
        cfg.pad_token_id = tokenizer.pad_token_id
        cfg.eos_token_id = tokenizer.sep_token_id
    with torch.no_grad():
        model.decoder.cls.predictions.bias[: len(SPECIAL)] = -100.0
    model.save_pretrained(folder, safe_serialization=True)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_tiny_tagger(folder: Path, size: int = 32, batch: int | str = "batch") -> Path:
    """model.onnx (NHWC BGR 0-255 input, like WD14: mean colour -> linear -> sigmoid) + selected_tags.csv."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = np.array([w for _, _, w, _ in TAGGER_TAGS], dtype=np.float32).T / 255.0  # [3, tags]
    bias = np.array([b for *_, b in TAGGER_TAGS], dtype=np.float32)
    nodes = [
        helper.make_node("ReduceMean", ["input_1:0"], ["mean"], axes=[1, 2], keepdims=0),
        helper.make_node("MatMul", ["mean", "W"], ["logits0"]),
        helper.make_node("Add", ["logits0", "b"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny-tagger",
        [helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT, [batch, size, size, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, [batch, len(TAGGER_TAGS)])],
        initializer=[numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, folder / "model.onnx")
    rows = ["tag_id,name,category,count"] + [f"{i},{n},{c},100" for i, (n, c, _, _) in enumerate(TAGGER_TAGS)]
    (folder / "selected_tags.csv").write_text("\n".join(rows) + "\n")
    return folder
