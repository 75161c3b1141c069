"""Published configs of the real models, as constructor keyword arguments (plain data, no imports).

Transformers: `transformer/config.json` of each hub model for diffusers 0.42.1 (keys that differ
from the diffusers defaults are all spelled out; the rest restate the defaults so the shape is
explicit). Used by `sparsediff bench e2e` (one transformer forward) and by `--random-weights`
renders (`pipelines/random_weights.py`, the whole pipeline).
"""
from __future__ import annotations

from typing import Any

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers: WanTransformer3DModel.
WAN21_T2V_1_3B_TRANSFORMER: dict[str, Any] = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024,
)
# Wan2.1's VAE (every Wan2.1 repo's vae/config.json): AutoencoderKLWan's defaults are exactly it
# (base_dim 96, z_dim 16, dim_mult [1, 2, 4, 4], 2 res blocks, temporal downsampling [F, T, T],
# Wan2.1 latents_mean/std).
WAN21_VAE: dict[str, Any] = {}
# Wan2.1's text encoder (text_encoder/config.json): google/umt5-xxl's encoder, transformers.UMT5Config.
UMT5_XXL_ENCODER: dict[str, Any] = dict(
    vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
    layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
)
# Wan2.1 T2V's scheduler (scheduler/scheduler_config.json): UniPC with flow matching.
WAN21_SCHEDULER: dict[str, Any] = dict(
    prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, num_train_timesteps=1000,
)

# hunyuanvideo-community/HunyuanVideo: HunyuanVideoTransformer3DModel.
HUNYUANVIDEO_TRANSFORMER: dict[str, Any] = dict(
    in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
    num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
    guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768, rope_theta=256.0,
    rope_axes_dim=(16, 56, 56),
)

# THUDM/CogVideoX-5b: CogVideoXTransformer3DModel.
COGVIDEOX_5B_TRANSFORMER: dict[str, Any] = dict(
    num_attention_heads=48, attention_head_dim=64, in_channels=16, out_channels=16, flip_sin_to_cos=True,
    freq_shift=0, time_embed_dim=512, text_embed_dim=4096, num_layers=42, dropout=0.0, attention_bias=True,
    sample_width=90, sample_height=60, sample_frames=49, patch_size=2, temporal_compression_ratio=4,
    max_text_seq_length=226, activation_fn="gelu-approximate", timestep_activation_fn="silu",
    norm_elementwise_affine=True, norm_eps=1e-5, spatial_interpolation_scale=1.875,
    temporal_interpolation_scale=1.0, use_rotary_positional_embeddings=True,
    use_learned_positional_embeddings=False,
)

# black-forest-labs/FLUX.1-dev: FluxTransformer2DModel.
FLUX1_DEV_TRANSFORMER: dict[str, Any] = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
