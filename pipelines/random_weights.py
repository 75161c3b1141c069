"""Full-size pipelines with random weights, built from configs (`sparsediff render --random-weights`).

For time and memory at the real size where no hub weights can be downloaded: every component is
built at its published config (`pipelines/configs.py`) directly on the target device (a
`torch.device` context) in the recipe's dtype (the VAE in fp32 where the recipe decodes in fp32),
so a GPU build takes seconds and never touches the CPU's memory. Weights are drawn from `seed`:
the same seed on the same device type gives the same weights. The outputs are noise: read the time,
memory and sparsity of a render, never its quality, and not the sparsity as what a trained model
or a calibrated profile would reach.

Supported recipes: wan2.1-t2v-1.3b, built as
- transformer: WanTransformer3DModel at Wan2.1-T2V-1.3B's config (1.42B parameters);
- vae: AutoencoderKLWan at Wan2.1's config (its defaults; 127M, fp32 as the recipe decodes);
- text_encoder: UMT5EncoderModel at google/umt5-xxl's full config (5.68B parameters, 11.4 GB in bf16);
- tokenizer: `pipelines.tiny.byte_tokenizer` (no vocabulary can be downloaded): prompts are
  byte-tokenized, one token per UTF-8 byte plus `</s>`, truncated at 512 tokens. WanPipeline pads
  the text to 512 tokens either way, so the transformer's work is the real pipeline's;
- scheduler: Wan2.1 T2V's UniPC flow-matching scheduler (the recipe's scheduler_config on top).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sparsediff.pipelines import configs

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

    from sparsediff.pipelines.recipes import Recipe

# Recipe name -> component -> constructor keyword arguments.
_CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "wan2.1-t2v-1.3b": {
        "transformer": configs.WAN21_T2V_1_3B_TRANSFORMER,
        "vae": configs.WAN21_VAE,
        "text_encoder": configs.UMT5_XXL_ENCODER,
        "scheduler": configs.WAN21_SCHEDULER,
    },
}
RANDOM_WEIGHT_RECIPES: tuple[str, ...] = tuple(_CONFIGS)
# WanPipeline's default max_sequence_length.
TEXT_TOKENS = 512


def check_random_weights(recipe: Recipe) -> None:
    """Raise ValueError (naming `random_weights`) unless `recipe` can be built with random weights."""
    if recipe.name in _CONFIGS:
        return
    if recipe.source == "tiny":
        why = f"{recipe.name} is a tiny recipe (random weights already, built offline)"
    elif recipe.source == "toy-shapes":
        why = f"{recipe.name} is the project's trained model (its weights ship with it)"
    elif recipe.hub_id and Path(recipe.hub_id).is_dir():
        why = f"{recipe.name} is a local pipeline folder"
    else:
        why = f"{recipe.name} has no random-weight build"
    raise ValueError(f"random_weights: supported for {', '.join(RANDOM_WEIGHT_RECIPES)} only; {why}")


def random_pipeline_configs(
    recipe: Recipe, overrides: Mapping[str, Mapping[str, Any]] | None = None
) -> dict[str, dict[str, Any]]:
    """component -> constructor keyword arguments of `recipe`'s random-weight build.

    `overrides` (component -> keys to replace) builds a smaller pipeline of the same layout, e.g. in tests.
    """
    check_random_weights(recipe)
    components = _CONFIGS[recipe.name]
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(components))
    if unknown:
        raise ValueError(f"overrides: unknown component(s) {', '.join(unknown)}; known: {', '.join(components)}")
    return {name: {**config, **overrides.get(name, {})} for name, config in components.items()}


def build_random_pipeline(
    recipe: Recipe,
    device: str | torch.device = "cpu",
    torch_dtype: torch.dtype | None = None,
    *,
    seed: int = 0,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> DiffusionPipeline:
    """`recipe`'s pipeline at its published configs with random weights from `seed`, built on `device`.

    Components are in `torch_dtype` (default: the recipe's), the VAE in fp32 where `recipe.vae_fp32`.
    `overrides`: see `random_pipeline_configs`.
    """
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from sparsediff.pipelines.tiny import byte_tokenizer

    config = random_pipeline_configs(recipe, overrides)
    device = torch.device(device)
    dtype = torch_dtype or recipe.torch_dtype()
    vae_dtype = torch.float32 if recipe.vae_fp32 else dtype
    tokenizer = byte_tokenizer(TEXT_TOKENS, bos=False)
    if config["text_encoder"]["vocab_size"] < len(tokenizer):
        raise ValueError(f"overrides: text_encoder vocab_size {config['text_encoder']['vocab_size']} is below "
                         f"the byte tokenizer's {len(tokenizer)} ids")
    rng_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    previous_dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=rng_devices), torch.device(device):
        torch.manual_seed(seed)
        try:
            torch.set_default_dtype(dtype)
            transformer = WanTransformer3DModel(**config["transformer"])
            text_encoder = UMT5EncoderModel(UMT5Config(**config["text_encoder"]))
            torch.set_default_dtype(vae_dtype)
            vae = AutoencoderKLWan(**config["vae"])
        finally:
            torch.set_default_dtype(previous_dtype)
    return WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder.eval(), vae=vae.eval(),
        scheduler=UniPCMultistepScheduler(**config["scheduler"]), transformer=transformer.eval(),
    )
