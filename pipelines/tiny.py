"""Tiny random pipelines of the four families, built offline from configs.

Each builder returns a complete stock diffusers pipeline (transformer, VAE, text encoder(s),
tokenizer(s), scheduler) with random weights drawn from `seed`, so two builds with the same
seed are identical. Sizes are chosen so that at the recipe's default size the transformer sees
768 video tokens (enough query/key blocks for block sparsity to matter) while one render stays
a few seconds on a CPU. Tokenizers are byte-level (every prompt maps to distinct ids, no
vocabulary file), built with `tokenizers` and wrapped in `PreTrainedTokenizerFast`.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from sparsediff.pipelines.configs import WAN21_SCHEDULER

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline
    from transformers import PreTrainedTokenizerFast

# Attention geometry shared by the tiny transformers: head dim 64 is one of the real models'
# head dims (CogVideoX), so the sparse kernel runs on them rather than falling back.
HEADS = 2
HEAD_DIM = 64
# Rotary axes (t, h, w) summing to HEAD_DIM, as HunyuanVideo and FLUX need.
ROPE_AXES = (16, 24, 24)
TEXT_DIM = 32


def byte_tokenizer(model_max_length: int, *, bos: bool) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: ids 0..3 are <pad>, <s>, </s>, <unk>, then one id per byte.

    `bos=True` wraps each text as `<s> text </s>` (CLIP/Llama style), else `text </s>` (T5).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):  # alphabet() order varies between calls
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    single = "<s> $A </s>" if bos else "$A </s>"
    tok.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=model_max_length,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def _t5_encoder(vocab_size: int, umt5: bool = False) -> torch.nn.Module:
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    kwargs = dict(
        vocab_size=vocab_size, d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        pad_token_id=0, eos_token_id=2, decoder_start_token_id=0,
    )
    if umt5:
        return UMT5EncoderModel(UMT5Config(**kwargs))
    return T5EncoderModel(T5Config(**kwargs))


def _clip_encoder(vocab_size: int, hidden_size: int) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=64, projection_dim=hidden_size,
            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, hidden_act="gelu",
        )
    )


def build_tiny_wan(seed: int = 0) -> DiffusionPipeline:
    """WanPipeline (Wan2.1 T2V layout). 9 frames at 256x256 -> 3x16x16 = 768 video tokens."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    tokenizer = byte_tokenizer(64, bos=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=16,
            out_channels=16, text_dim=TEXT_DIM, freq_dim=64, ffn_dim=256, num_layers=2,
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=256,
        )
        vae = AutoencoderKLWan(
            base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
        )
        text_encoder = _t5_encoder(len(tokenizer), umt5=True)
    # The real Wan2.1 repos ship UniPC with flow matching.
    scheduler = UniPCMultistepScheduler(**WAN21_SCHEDULER)
    return WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder.eval(), vae=vae.eval(),
        scheduler=scheduler, transformer=transformer.eval(),
    )


def build_tiny_hunyuanvideo(seed: int = 0) -> DiffusionPipeline:
    """HunyuanVideoPipeline. 9 frames at 256x256 -> 3x16x16 = 768 video tokens (+ text tokens)."""
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from transformers import LlamaConfig, LlamaModel

    tokenizer = byte_tokenizer(256, bos=True)
    tokenizer_2 = byte_tokenizer(77, bos=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = HunyuanVideoTransformer3DModel(
            in_channels=4, out_channels=4, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM,
            num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1,
            guidance_embeds=True, text_embed_dim=TEXT_DIM, pooled_projection_dim=16, rope_axes_dim=ROPE_AXES,
        )
        vae = AutoencoderKLHunyuanVideo(
            in_channels=3, out_channels=3, latent_channels=4,
            block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
            spatial_compression_ratio=8, temporal_compression_ratio=4, mid_block_add_attention=True,
        )
        text_encoder = LlamaModel(
            LlamaConfig(
                vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                pad_token_id=0, bos_token_id=1, eos_token_id=2,
            )
        )
        text_encoder_2 = _clip_encoder(len(tokenizer_2), hidden_size=16)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0)
    return HunyuanVideoPipeline(
        text_encoder=text_encoder.eval(), tokenizer=tokenizer, transformer=transformer.eval(), vae=vae.eval(),
        scheduler=scheduler, text_encoder_2=text_encoder_2.eval(), tokenizer_2=tokenizer_2,
    )


def build_tiny_cogvideox(seed: int = 0) -> DiffusionPipeline:
    """CogVideoXPipeline (CogVideoX-5B layout: rotary embeddings, DPM scheduler).

    9 frames at 256x256 -> 3x16x16 = 768 video tokens (+ text tokens).
    """
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDPMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )

    tokenizer = byte_tokenizer(226, bos=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = CogVideoXTransformer3DModel(
            num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=4,
            time_embed_dim=32, text_embed_dim=TEXT_DIM, num_layers=2, sample_width=32, sample_height=32,
            sample_frames=9, patch_size=2, temporal_compression_ratio=4, max_text_seq_length=32,
            use_rotary_positional_embeddings=True,
        )
        vae = AutoencoderKLCogVideoX(
            block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2,
            temporal_compression_ratio=4, sample_height=256, sample_width=256,
        )
        text_encoder = _t5_encoder(len(tokenizer))
    scheduler = CogVideoXDPMScheduler(
        prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True,
        beta_schedule="scaled_linear", clip_sample=False, snr_shift_scale=1.0, set_alpha_to_one=True,
    )
    return CogVideoXPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder.eval(), vae=vae.eval(),
        transformer=transformer.eval(), scheduler=scheduler,
    )


def build_tiny_flux(seed: int = 0) -> DiffusionPipeline:
    """FluxPipeline (FLUX.1-dev layout, guidance-distilled). 512x384 -> 32x24 = 768 image tokens."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tokenizer = byte_tokenizer(77, bos=True)
    tokenizer_2 = byte_tokenizer(64, bos=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=HEAD_DIM,
            num_attention_heads=HEADS, joint_attention_dim=TEXT_DIM, pooled_projection_dim=16,
            guidance_embeds=True, axes_dims_rope=ROPE_AXES,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
            use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
        )
        text_encoder = _clip_encoder(len(tokenizer), hidden_size=16)
        text_encoder_2 = _t5_encoder(len(tokenizer_2))
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler, vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
        text_encoder_2=text_encoder_2.eval(), tokenizer_2=tokenizer_2, transformer=transformer.eval(),
    )


BUILDERS: dict[str, Callable[[int], DiffusionPipeline]] = {
    "wan": build_tiny_wan,
    "hunyuanvideo": build_tiny_hunyuanvideo,
    "cogvideox": build_tiny_cogvideox,
    "flux": build_tiny_flux,
}


def build_tiny(family: str, seed: int = 0) -> DiffusionPipeline:
    """The tiny random pipeline of `family` ("wan", "hunyuanvideo", "cogvideox", "flux")."""
    if family not in BUILDERS:
        raise ValueError(f"family: no tiny pipeline for {family!r}; known: {', '.join(BUILDERS)}")
    return BUILDERS[family](seed)


def video_tokens(pipe: DiffusionPipeline, height: int, width: int, frames: int = 1) -> int:
    """Video/image tokens the pipeline's transformer sees at this size (text tokens not counted)."""
    cfg = pipe.transformer.config
    if hasattr(pipe, "vae_scale_factor_spatial"):  # the video pipelines
        s, t = pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal
        if isinstance(cfg.patch_size, (tuple, list)):  # Wan: (t, h, w)
            pt, ph, pw = cfg.patch_size
        else:
            pt, ph, pw = getattr(cfg, "patch_size_t", None) or 1, cfg.patch_size, cfg.patch_size
        return ((frames - 1) // t + 1) // pt * (height // s // ph) * (width // s // pw)
    # FLUX packs 2x2 latents into one token.
    s = pipe.vae_scale_factor * 2
    return (height // s) * (width // s)
