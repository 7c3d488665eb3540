"""Tiny random-weight SD3.5 Medium and Large pipelines, built in-process like trainer.families.tiny's SD1.5 one.

Same classes, config keys and folder layout as the real stabilityai/stable-diffusion-3.5-* repos, so loading,
training, export and preview run the real code paths: an MMDiT (SD3Transformer2DModel) with RMS qk-norm, in
Medium's MMDiT-X shape with a second, image-only attention in its first block; two CLIP text encoders with
projections whose pooled outputs are concatenated; a T5 encoder whose hidden states the CLIP ones are zero-padded to
and joined with; a 16-channel VAE with SD3's shift and scale; a flow-matching scheduler. Sizes follow diffusers' own
SD3 tests. Weights are random: samples are noise. About 1 MB each, built in about a second.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

from trainer.families.tiny import _WORDS, save_pipeline
from trainer.families.tiny_xl import TINY_TEXT, _text_config, _tokenizer

# The MMDiT: diffusers' SD3/SD3.5 transformer tests (tests/models/transformers/test_models_transformer_sd3.py),
# with SD3's 16 latent channels. inner dim = heads * head dim = 32.
TINY_MMDIT = dict(sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
                  num_attention_heads=4, caption_projection_dim=32, qk_norm="rms_norm")
# 64 x 64 patch positions: latents up to 128 (patch 2, as SD3's), images up to 1024 px with the VAE's factor 8, as
# the real bases: the SD3.5 presets run on this base unchanged (their 1024 px samples included).
POS_EMBED_MAX_SIZE = 64
# The pooled text is both CLIPs' projections side by side: 32 + 32 = the MMDiT's pooled_projection_dim.
PROJECTION_DIM = 32
# T5's width is the MMDiT's joint_attention_dim. It is twice the concatenated CLIP hidden states (2 x 32), as 4096 is
# twice CLIP-L + bigG's 768 + 1280, so the pipeline's zero-padding of the CLIP states runs as on the real bases. (With
# diffusers' test value 32, `F.pad` by a negative amount would crop text_encoder_2's hidden states away.)
T5_WIDTH = 2 * 2 * TINY_TEXT["hidden_size"]
# SD3's VAE config (stabilityai/stable-diffusion-3.5-*/vae/config.json): 16 channels, shift and scale, no quant convs.
VAE_SHIFT, VAE_SCALE = 0.0609, 1.5035
# The SD3.5 repos' scheduler/scheduler_config.json.
SCHEDULER_SHIFT = 3.0


def build_t5_tokenizer():
    """A T5 tokenizer (Unigram, `▁` word marker, `</s>` appended) over tiny.py's words and single characters.

    Built with the `tokenizers` library, so nothing is downloaded and no sentencepiece model is needed; the pipeline
    saves it as tokenizer.json, which T5TokenizerFast loads back. Whole words score above spelling them out.
    """
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{word}", -1.0) for word in _WORDS]
    pieces += [(char, -5.0) for char in string.ascii_letters + string.digits + string.punctuation]
    tok = Tokenizer(Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    # extra_ids=0: T5's 100 sentinel tokens only matter for its span-corruption pretraining.
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
                           model_max_length=512)


def _t5_encoder(tokenizer):
    """A 2-layer T5 v1.1-style encoder (gated GELU, as SD3's t5xxl) of width T5_WIDTH."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=len(tokenizer), d_model=T5_WIDTH, d_kv=8, d_ff=T5_WIDTH, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      decoder_start_token_id=tokenizer.pad_token_id)
    return T5EncoderModel(config)


def _vae():
    """SD3's 16-channel VAE layout, tiny: factor-8 downsampling (four levels) as SD3's, its shift and scale."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(16, 16, 32, 32), in_channels=3, out_channels=3, latent_channels=16,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         norm_num_groups=16, sample_size=64, shift_factor=VAE_SHIFT, scaling_factor=VAE_SCALE,
                         use_quant_conv=False, use_post_quant_conv=False)


def build_tiny_sd35(folder: str | Path, seed: int = 0, medium: bool = True) -> Path:
    """Write a tiny SD3.5 pipeline (StableDiffusion3Pipeline) to `folder` and return it.

    medium=True is SD3.5 Medium's MMDiT-X: block 0 also has the image-only second attention (`attn2`), as Medium's
    first 13 blocks do. medium=False is SD3.5 Large: plain joint blocks. Both have RMS qk-norm, which SD3.0 lacks.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer, tokenizer_3 = _tokenizer(), build_t5_tokenizer()
    transformer = SD3Transformer2DModel(
        **TINY_MMDIT, joint_attention_dim=T5_WIDTH, pooled_projection_dim=2 * PROJECTION_DIM,
        pos_embed_max_size=POS_EMBED_MAX_SIZE, dual_attention_layers=(0,) if medium else (),
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, vae=_vae(), scheduler=FlowMatchEulerDiscreteScheduler(shift=SCHEDULER_SHIFT),
        text_encoder=CLIPTextModelWithProjection(_text_config(tokenizer, projection_dim=PROJECTION_DIM)),
        # bigG's activation is gelu (CLIP-L's quick_gelu is the config default)
        text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer, projection_dim=PROJECTION_DIM,
                                                                hidden_act="gelu")),
        text_encoder_3=_t5_encoder(tokenizer_3), tokenizer=tokenizer, tokenizer_2=tokenizer, tokenizer_3=tokenizer_3,
    )
    return save_pipeline(pipe, folder)


def build_tiny_sd35_large(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny SD3.5 Large-layout pipeline (no dual attention) to `folder` and return it."""
    return build_tiny_sd35(folder, seed, medium=False)
