"""Tiny random transformers of the four families, built from configs (no downloads), and their inputs.

Every model has 2 heads of dim 32 and a latent grid of 2 x 16 x 24 = 768 video/image tokens, so a
sequence spans 6+ query blocks of 128 tokens: enough for block sparsity to matter, small enough for
the Triton interpreter. `TINY[family]` gives (build, inputs); `inputs(model, batch, timestep)`
returns the forward keyword arguments.
"""
from __future__ import annotations

from typing import Callable

import torch

HEADS, HEAD_DIM = 2, 32
GRID = (2, 16, 24)  # latent tokens (t, h, w) after patchifying
TEXT_TOKENS = 12


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed)).to(dtype)


def _timestep(batch: int, value: float) -> torch.Tensor:
    return torch.full((batch,), float(value))


# ---------------------------------------------------------------------------------------------- Wan

def build_wan(num_layers: int = 1, seed: int = 0) -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4,
        out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=num_layers, rope_max_seq_len=64,
    ).eval()


def wan_inputs(model: torch.nn.Module, batch: int = 1, timestep: float = 500.0, seed: int = 1) -> dict:
    t, h, w = GRID
    dtype = model.dtype
    return {
        "hidden_states": _randn(batch, 4, t, 2 * h, 2 * w, seed=seed, dtype=dtype),
        "timestep": _timestep(batch, timestep),
        "encoder_hidden_states": _randn(batch, TEXT_TOKENS, 32, seed=seed + 1, dtype=dtype),
        "return_dict": False,
    }


# ------------------------------------------------------------------------------------- HunyuanVideo

def build_hunyuan_video(num_layers: int = 1, seed: int = 0) -> torch.nn.Module:
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM,
        num_layers=num_layers, num_single_layers=num_layers, num_refiner_layers=1, patch_size=2,
        patch_size_t=1, text_embed_dim=32, pooled_projection_dim=16, guidance_embeds=False,
        rope_axes_dim=(8, 12, 12),
    ).eval()


def hunyuan_video_inputs(model: torch.nn.Module, batch: int = 1, timestep: float = 500.0, seed: int = 1) -> dict:
    t, h, w = GRID
    dtype = model.dtype
    # Right-padded text: the first batch element has 9 valid tokens, the others all 12.
    text_mask = torch.ones(batch, TEXT_TOKENS, dtype=torch.long)
    text_mask[0, 9:] = 0
    return {
        "hidden_states": _randn(batch, 4, t, 2 * h, 2 * w, seed=seed, dtype=dtype),
        "timestep": _timestep(batch, timestep),
        "encoder_hidden_states": _randn(batch, TEXT_TOKENS, 32, seed=seed + 1, dtype=dtype),
        "encoder_attention_mask": text_mask,
        "pooled_projections": _randn(batch, 16, seed=seed + 2, dtype=dtype),
        "return_dict": False,
    }


# ----------------------------------------------------------------------------------------- CogVideoX

def build_cogvideox(num_layers: int = 1, seed: int = 0) -> torch.nn.Module:
    from diffusers import CogVideoXTransformer3DModel

    t, h, w = GRID
    torch.manual_seed(seed)
    return CogVideoXTransformer3DModel(
        num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=4,
        time_embed_dim=32, text_embed_dim=32, num_layers=num_layers, sample_width=2 * w, sample_height=2 * h,
        sample_frames=(t - 1) * 4 + 1, patch_size=2, max_text_seq_length=TEXT_TOKENS,
        use_rotary_positional_embeddings=True,
    ).eval()


def cogvideox_inputs(model: torch.nn.Module, batch: int = 1, timestep: float = 500.0, seed: int = 1) -> dict:
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    t, h, w = GRID
    dtype = model.dtype
    # What CogVideoXPipeline._prepare_rotary_positional_embeddings gives at the model's sample size.
    rope = get_3d_rotary_pos_embed(
        embed_dim=HEAD_DIM, crops_coords=((0, 0), (h, w)), grid_size=(h, w), temporal_size=t,
    )
    return {
        "hidden_states": _randn(batch, t, 4, 2 * h, 2 * w, seed=seed, dtype=dtype),
        "encoder_hidden_states": _randn(batch, TEXT_TOKENS, 32, seed=seed + 1, dtype=dtype),
        "timestep": _timestep(batch, timestep).long(),
        "image_rotary_emb": rope,
        "return_dict": False,
    }


# ---------------------------------------------------------------------------------------------- FLUX

def build_flux(num_layers: int = 1, seed: int = 0) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=num_layers, num_single_layers=num_layers,
        attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=32,
        pooled_projection_dim=16, axes_dims_rope=(8, 12, 12),
    ).eval()


def flux_inputs(model: torch.nn.Module, batch: int = 1, timestep: float = 500.0, seed: int = 1) -> dict:
    _, h, w = GRID
    h, w = h * 2, w  # one image of 32 x 24 packed latents = 768 tokens
    dtype = model.dtype
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    return {
        "hidden_states": _randn(batch, h * w, 16, seed=seed, dtype=dtype),
        "encoder_hidden_states": _randn(batch, TEXT_TOKENS, 32, seed=seed + 1, dtype=dtype),
        "pooled_projections": _randn(batch, 16, seed=seed + 2, dtype=dtype),
        "timestep": _timestep(batch, timestep / 1000),  # the pipeline passes sigma-like t in [0, 1]
        "img_ids": img_ids.reshape(h * w, 3).to(dtype),
        "txt_ids": torch.zeros(TEXT_TOKENS, 3, dtype=dtype),
        "return_dict": False,
    }


TINY: dict[str, tuple[Callable[..., torch.nn.Module], Callable[..., dict]]] = {
    "wan": (build_wan, wan_inputs),
    "hunyuan_video": (build_hunyuan_video, hunyuan_video_inputs),
    "cogvideox": (build_cogvideox, cogvideox_inputs),
    "flux": (build_flux, flux_inputs),
}


# ---------------------------------------------------------------------------------- a WanPipeline

def build_wan_pipeline(num_layers: int = 1, seed: int = 0):
    """A WanPipeline of a tiny transformer, a tiny AutoencoderKLWan and FlowMatchEulerDiscreteScheduler,
    without text encoder or tokenizer: call it with prompt_embeds / negative_prompt_embeds
    (shape (B, TEXT_TOKENS, 32)) at height 256, width 384, num_frames 5 for the 2 x 16 x 24 grid."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()
    return WanPipeline(
        tokenizer=None, text_encoder=None, transformer=build_wan(num_layers, seed), vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
