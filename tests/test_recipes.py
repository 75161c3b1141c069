"""Model recipes and the tiny offline pipelines — CPU, no downloads."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch

from sparsediff.cli import main
from sparsediff.pipelines.recipes import (
    FAMILIES,
    RECIPES,
    ModelUnavailableError,
    available_recipes,
    default_recipe_name,
    get_recipe,
    toy_shapes_available,
)
from sparsediff.pipelines.tiny import build_tiny, byte_tokenizer, video_tokens

HUB_NAMES = ["wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.2-t2v-a14b", "wan2.2-ti2v-5b", "hunyuanvideo",
             "cogvideox-2b", "cogvideox-5b", "flux.1-dev", "flux.1-schnell"]
TINY = {"tiny-wan": "wan", "tiny-hunyuanvideo": "hunyuanvideo", "tiny-cogvideox": "cogvideox", "tiny-flux": "flux"}


def test_every_recipe_is_complete() -> None:
    assert set(HUB_NAMES) | set(TINY) <= set(RECIPES)
    for name, r in available_recipes().items():
        assert r.name == name and r.family in FAMILIES and r.description
        assert r.source in ("hub", "tiny", "toy-shapes")
        assert isinstance(r.torch_dtype(), torch.dtype)
        assert r.output in ("video", "image")
        assert r.steps >= 1 and r.guidance_scale >= 0
        if r.is_video:
            assert r.fps and r.fps > 0 and r.frames > 1
        else:
            assert r.fps is None and r.frames == 1
        r.check_size(r.height, r.width, r.frames)  # defaults must pass the recipe's own rules
        if r.source == "hub":
            assert r.hub_id and hasattr(diffusers, r.pipeline_class)
            assert r.hub_id.endswith("-Diffusers") or r.family != "wan"
        if r.source == "tiny":
            assert TINY[name] == r.family and r.hub_id is None
    assert get_recipe("flux.1-schnell").guidance_scale == 0.0 and get_recipe("flux.1-schnell").steps == 4
    assert get_recipe("wan2.2-ti2v-5b").size_multiple == 32


def test_unknown_recipe_lists_known_names() -> None:
    with pytest.raises(ValueError, match="unknown recipe 'wan3'") as err:
        get_recipe("wan3")
    assert all(name in str(err.value) for name in [*HUB_NAMES, *TINY])


def test_size_rules_name_the_argument() -> None:
    wan = get_recipe("tiny-wan")
    with pytest.raises(ValueError, match="height: .*multiple of 16"):
        wan.check_size(100, 64, 5)
    with pytest.raises(ValueError, match=r"frames: .*k\*4\+1"):
        wan.check_size(64, 64, 8)
    with pytest.raises(ValueError, match=r"frames: .*k\*8\+1"):
        get_recipe("tiny-cogvideox").check_size(64, 64, 5)
    with pytest.raises(ValueError, match="frames: .*must be 1"):
        get_recipe("tiny-flux").check_size(64, 64, 5)


def test_default_model() -> None:
    assert default_recipe_name() == ("toy-shapes" if toy_shapes_available() else "tiny-wan")
    assert default_recipe_name() in available_recipes()


@pytest.mark.parametrize("index,family,base", [
    ({"_class_name": "WanPipeline", "transformer_2": [None, None]}, "wan", "wan2.1-t2v-1.3b"),
    ({"_class_name": "WanPipeline", "transformer_2": ["diffusers", "WanTransformer3DModel"]}, "wan",
     "wan2.2-t2v-a14b"),
    ({"_class_name": "WanPipeline", "expand_timesteps": True}, "wan", "wan2.2-ti2v-5b"),
    ({"_class_name": "CogVideoXPipeline"}, "cogvideox", "cogvideox-5b"),
    ({"_class_name": "FluxPipeline"}, "flux", "flux.1-dev"),
])
def test_local_folder_family_from_model_index(tmp_path: Path, index, family, base) -> None:
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    r = get_recipe(str(tmp_path))
    assert r.family == family and r.hub_id == str(tmp_path) and r.source == "hub"
    assert (r.height, r.width, r.frames) == (RECIPES[base].height, RECIPES[base].width, RECIPES[base].frames)
    assert base in r.description and r.shipped_profile() is None


def test_local_folder_named_like_a_recipe_is_not_taken_for_it(tmp_path: Path, monkeypatch) -> None:
    """`hf download ... --local-dir wan2.1-t2v-1.3b`, then `--model ./wan2.1-t2v-1.3b`: the folder's recipe was
    named "wan2.1-t2v-1.3b", so --random-weights accepted it and renders and profiles named the hub model."""
    monkeypatch.chdir(tmp_path)
    for name in ("wan2.1-t2v-1.3b", "toy-shapes"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
        r = get_recipe(f"./{name}")
        assert r.name == r.hub_id == f"./{name}" and r.name not in available_recipes()
        assert name not in r.model_ids and r.shipped_profile() is None
        with pytest.raises(ValueError, match="is a local pipeline folder"):
            r.load("meta", random_weights=True)
    assert get_recipe("wan2.1-t2v-1.3b") is RECIPES["wan2.1-t2v-1.3b"]  # a recipe name still means the recipe


def test_local_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="without model_index.json"):
        get_recipe(str(tmp_path))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match="holds a StableDiffusionPipeline; supported pipelines: WanPipeline"):
        get_recipe(str(tmp_path))


def test_hub_model_neither_cached_nor_reachable_says_so_and_what_to_do(tmp_path: Path, monkeypatch, capsys) -> None:
    """No download: offline mode, and repo ids no cache holds. Wan loads its fp32 VAE first, whose error
    diffusers words as "does not appear to have a file named config.json"; calibrate printed a traceback."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for base in ("wan2.1-t2v-1.3b", "flux.1-schnell"):
        recipe = dataclasses.replace(RECIPES[base], hub_id=f"sparsediff-tests/not-cached-{base}")
        monkeypatch.setitem(RECIPES, base, recipe)
        with pytest.raises(ModelUnavailableError) as err:
            recipe.load("cpu")
        message = str(err.value)
        assert message.startswith(f"model: {base}: sparsediff-tests/not-cached-{base} is not (fully) in the local Hugging "
                                  "Face cache") and "HF_HUB_OFFLINE is set" in message
        assert f"`hf download sparsediff-tests/not-cached-{base}`" in message
    assert main(["calibrate", "--model", "wan2.1-t2v-1.3b", "--out", str(tmp_path / "p.json")]) == 1
    err = capsys.readouterr().err
    assert "sparsediff calibrate: error: model: wan2.1-t2v-1.3b: " in err and "Traceback" not in err


def test_models_command_prints_every_recipe(capsys) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in available_recipes())
    assert "Wan-AI/Wan2.1-T2V-1.3B-Diffusers" in out
    assert main(["models", "--json"]) == 0
    assert {r["name"] for r in json.loads(capsys.readouterr().out)} == set(available_recipes())


def test_byte_tokenizer_is_stable_and_lossless() -> None:
    a, b = byte_tokenizer(16, bos=True), byte_tokenizer(16, bos=True)
    ids = a("héllo wörld").input_ids
    assert ids == b("héllo wörld").input_ids and ids[0] == a.bos_token_id and ids[-1] == a.eos_token_id
    assert a.decode(ids, skip_special_tokens=True) == "héllo wörld"
    assert a("x" * 40, padding="max_length", truncation=True, max_length=16).input_ids[-1] == a.eos_token_id
    assert byte_tokenizer(16, bos=False)("ab").input_ids == a("ab").input_ids[1:]  # T5 style: no <s>


@pytest.mark.parametrize("name", list(TINY))
def test_tiny_pipeline_builds_deterministically_and_renders(name: str) -> None:
    recipe = get_recipe(name)
    pipe = recipe.load("cpu")
    # At the recipe's default size sparsity matters: at least 768 video/image tokens.
    assert video_tokens(pipe, recipe.height, recipe.width, recipe.frames) >= 768
    again = build_tiny(recipe.family, recipe.seed)
    for (k, v), (_, w) in zip(pipe.transformer.state_dict().items(), again.transformer.state_dict().items()):
        assert torch.equal(v, w), k
    other = build_tiny(recipe.family, recipe.seed + 1)
    assert not torch.equal(next(iter(pipe.transformer.parameters())), next(iter(other.transformer.parameters())))

    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a red ball", height=64, width=64, num_inference_steps=1, output_type="np",
                  guidance_scale=recipe.guidance_scale, generator=torch.Generator().manual_seed(0),
                  **dict(recipe.call_kwargs))
    if recipe.is_video:
        frames = 1 + recipe.frame_step  # the fewest frames above one the recipe allows
        out = pipe(num_frames=frames, **kwargs).frames
        assert out.shape == (1, frames, 64, 64, 3)
    else:
        out = pipe(**kwargs).images
        assert out.shape == (1, 64, 64, 3)
    assert np.isfinite(out).all() and 0.0 <= out.min() and out.max() <= 1.0


# --------------------------------------------------------------------------- random-weight builds

# A reduced Wan2.1 layout: the same components and code paths in a few MB.
SMALL_WAN = {
    "transformer": dict(num_layers=2, num_attention_heads=2, ffn_dim=64, text_dim=32, freq_dim=32),
    "text_encoder": dict(vocab_size=320, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
    "vae": dict(base_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1),
}


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_random_weights_full_size_on_meta_device() -> None:
    """The full wan2.1-t2v-1.3b build through Recipe.load, on the meta device: shapes only, no memory."""
    from transformers import UMT5EncoderModel

    from sparsediff.pipelines.configs import UMT5_XXL_ENCODER, WAN21_T2V_1_3B_TRANSFORMER

    pipe = get_recipe("wan2.1-t2v-1.3b").load("meta", random_weights=True)
    assert isinstance(pipe, diffusers.WanPipeline)
    for key, value in WAN21_T2V_1_3B_TRANSFORMER.items():
        got = pipe.transformer.config[key]
        assert (list(got) if isinstance(got, (list, tuple)) else got) == (
            list(value) if isinstance(value, tuple) else value), key
    assert isinstance(pipe.text_encoder, UMT5EncoderModel)
    te = pipe.text_encoder.config
    assert (te.d_model, te.d_ff, te.num_layers, te.num_heads, te.d_kv, te.vocab_size, te.feed_forward_proj) == (
        4096, 10240, 24, 64, 64, 256384, "gated-gelu")
    assert all(getattr(te, k) == v for k, v in UMT5_XXL_ENCODER.items())
    assert pipe.vae.config.base_dim == 96 and list(pipe.vae.config.dim_mult) == [1, 2, 4, 4]
    assert round(_params(pipe.transformer) / 1e6) == 1419 and round(_params(pipe.text_encoder) / 1e6) == 5681
    assert round(_params(pipe.vae) / 1e6) == 127
    for name, dtype in (("transformer", torch.bfloat16), ("text_encoder", torch.bfloat16), ("vae", torch.float32)):
        params = list(getattr(pipe, name).parameters())
        assert {p.dtype for p in params} == {dtype} and {p.device.type for p in params} == {"meta"}, name
    assert isinstance(pipe.scheduler, diffusers.UniPCMultistepScheduler)
    assert pipe.scheduler.config.flow_shift == 3.0 and pipe.scheduler.config.use_flow_sigmas
    assert pipe.tokenizer.model_max_length == 512  # byte-tokenized prompts, as WanPipeline's 512 text tokens
    assert pipe.tokenizer("ab").input_ids == byte_tokenizer(512, bos=False)("ab").input_ids


def test_random_weights_small_build_is_deterministic_and_renders() -> None:
    from sparsediff.pipelines.random_weights import build_random_pipeline

    recipe = get_recipe("wan2.1-t2v-1.3b")
    pipe = build_random_pipeline(recipe, "cpu", seed=0, overrides=SMALL_WAN)
    again = build_random_pipeline(recipe, "cpu", seed=0, overrides=SMALL_WAN)
    other = build_random_pipeline(recipe, "cpu", seed=1, overrides=SMALL_WAN)
    for name in ("transformer", "text_encoder", "vae"):
        state, same = getattr(pipe, name).state_dict(), getattr(again, name).state_dict()
        assert all(torch.equal(v, same[k]) for k, v in state.items()), name
    assert not torch.equal(next(pipe.transformer.parameters()), next(other.transformer.parameters()))
    assert next(pipe.transformer.parameters()).dtype == torch.bfloat16
    assert next(pipe.vae.parameters()).dtype == torch.float32  # the recipe decodes in fp32
    assert torch.get_default_dtype() == torch.float32  # restored after the build

    pipe.set_progress_bar_config(disable=True)
    frames = pipe(prompt="a red ball", height=64, width=64, num_frames=5, num_inference_steps=1, guidance_scale=5.0,
                  output_type="np", generator=torch.Generator().manual_seed(0)).frames
    assert frames.shape == (1, 5, 64, 64, 3) and np.isfinite(frames).all()


def test_random_weights_refused_with_the_supported_names(tmp_path: Path) -> None:
    from sparsediff.pipelines.random_weights import build_random_pipeline

    for name, why in (("tiny-wan", "tiny-wan is a tiny recipe"), ("hunyuanvideo", "hunyuanvideo has no random-weight")):
        with pytest.raises(ValueError, match=f"random_weights: supported for wan2.1-t2v-1.3b only; {why}"):
            get_recipe(name).load("meta", random_weights=True)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    with pytest.raises(ValueError, match="is a local pipeline folder"):
        get_recipe(str(tmp_path)).load("meta", random_weights=True)
    wan = get_recipe("wan2.1-t2v-1.3b")
    with pytest.raises(ValueError, match="overrides: unknown component.*unet"):
        build_random_pipeline(wan, "meta", overrides={"unet": {}})
    with pytest.raises(ValueError, match="overrides: text_encoder vocab_size 100 is below"):
        build_random_pipeline(wan, "meta", overrides={"text_encoder": {"vocab_size": 100}})


@pytest.mark.parametrize("argv,name", [
    (["bench", "e2e", "--steps", "1"], "--steps"),
    (["bench", "e2e", "--modes", "compiled"], "--modes"),
    (["bench", "e2e", "--steps", "2", "--modes", "jit"], "--modes"),
    (["bench", "e2e", "--steps", "2", "--settings", "A,C"], "--settings"),
    (["bench", "e2e", "--cdf", "0"], "--cdf must be in (0.0, 1.0], got 0.0"),
    (["bench", "e2e", "--sim", "1.5"], "--sim must be in [0.0, 1.0], got 1.5"),
    (["bench", "kernel", "--keeps", "0,0.5"], "--keeps"),
    (["bench", "kernel", "--shapes", "wan,sd3"], "--shapes must be a comma list of flux, cogvideox, wan, hunyuan, small,"),
    (["bench", "kernel", "--masks", "banded"], "--masks must be a comma list of random, local,"),
    (["bench", "kernel", "--keeps", "1", "--masks", "random", "--rep-ms", "0"], "--rep-ms must be a finite number > 0"),
    (["bench", "kernel", "--keeps", "1", "--masks", "random", "--warmup-ms", "-1"], "--warmup-ms must be a finite"),
    (["bench", "predict", "--budget", "1.5"], "--budget"),
    (["bench", "predict", "--grid", "1x8x16", "--seed", str(2**64)], "--seed must be in [0, 18446744073709551615]"),
    (["bench", "predict", "--grid", "1x8x16", "--seed", "-1"], "--seed must be in [0,"),
    # A 0 was replaced by the default (6 heads of dim 64 on the CPU): a small grid runs quickly if it is.
    (["bench", "predict", "--grid", "1x8x16", "--heads", "0"], "heads must be >= 1 and head_dim even and >= 8, got 0, 64"),
    (["bench", "predict", "--grid", "1x8x16", "--head-dim", "0"], "heads must be >= 1 and head_dim even and >= 8, got 6, 0"),
])
def test_cli_names_a_bad_argument_instead_of_a_traceback(argv, name, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparsediff: error:") and name in err and "Traceback" not in err


def test_cli_help_imports_only_the_command_asked_for() -> None:
    # `sparsediff --help` imported every command's module, and with them torch and diffusers (~10 s).
    import subprocess
    import sys

    probe = ("import sys\nfrom sparsediff.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in ('torch', 'diffusers', 'sparsediff.bench.kernel') if m in sys.modules))")
    def imported(*argv: str) -> str:
        return subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True,
                              check=True).stdout.splitlines()[-1]

    assert imported("--help") == "[]"
    assert imported("bench", "--help") == "[]"
    assert imported("bench", "kernel", "--help") == "['sparsediff.bench.kernel']"
    # `sparsediff models` loaded diffusers (~5 s) for the toy model's defaults.
    assert imported("models") == "['torch']"


def test_output_piped_into_a_reader_that_stops_ends_quietly() -> None:
    # `sparsediff models | head -1` ended in a BrokenPipeError traceback.
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line is written
    try:
        done = subprocess.run([sys.executable, "-m", "sparsediff", "models"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (141, "")


def test_a_bad_size_suggests_the_valid_sizes_beside_it() -> None:
    # --height 60 suggested 48 only, though 64 is as near.
    wan = get_recipe("tiny-wan")
    with pytest.raises(ValueError, match=r"^height: tiny-wan needs a positive multiple of 16, got 60 \(e.g. 48 or 64\)$"):
        wan.check_size(60, 64, 5)
    with pytest.raises(ValueError, match=r"got 8 \(e.g. 16\)$"):
        wan.check_size(64, 8, 5)
    with pytest.raises(ValueError, match=r"^frames: tiny-wan needs k\*4\+1 frames, got 7 \(e.g. 5 or 9\)$"):
        wan.check_size(64, 64, 7)
    with pytest.raises(ValueError, match=r"got 0 \(e.g. 1\)$"):
        wan.check_size(64, 64, 0)


def test_sizes_below_one_step_are_refused_with_the_neighbours_named() -> None:
    # Mutation round 2: height 0 (a multiple of 16) and frames -3 (-4 is a multiple of 4) passed unnoticed
    # without their lower bounds, and 20 suggested only 16 where 32 is as valid.
    wan = get_recipe("tiny-wan")
    with pytest.raises(ValueError, match=r"^height: tiny-wan needs a positive multiple of 16, got 0 \(e.g. 16\)$"):
        wan.check_size(0, 64, 5)
    with pytest.raises(ValueError, match=r"^frames: tiny-wan needs k\*4\+1 frames, got -3 \(e.g. 1\)$"):
        wan.check_size(64, 64, -3)
    with pytest.raises(ValueError, match=r"^width: tiny-wan needs a positive multiple of 16, got 20 \(e.g. 16 or 32\)$"):
        wan.check_size(64, 20, 5)


def test_ctrl_c_before_a_commands_own_handler_is_one_line(monkeypatch, capsys) -> None:
    # Ctrl+C during the first seconds (imports, planning) printed a KeyboardInterrupt traceback.
    from sparsediff.pipelines import recipes

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(recipes, "run", interrupted)
    assert main(["models"]) == 130
    assert capsys.readouterr().err == "\nsparsediff: interrupted\n"


def test_bench_kernel_module_entry_names_a_bad_argument_instead_of_a_traceback(capsys) -> None:
    # `python -m sparsediff.bench.kernel --keeps 0` ended in a ValueError traceback.
    from sparsediff.bench import kernel

    assert kernel.main(["--keeps", "0"]) == 2
    err = capsys.readouterr().err
    assert "sparsediff: error: --keeps must lie in (0, 1]" in err and "Traceback" not in err


def test_output_folder_that_is_a_file_is_refused_before_any_work(tmp_path: Path, capsys) -> None:
    not_dir = tmp_path / "file"
    not_dir.write_text("x")
    for argv in (["bench", "predict"], ["bench", "kernel"], ["calibrate-sweep", "--model", "toy-shapes"]):
        assert main([*argv, "--out", str(not_dir)]) == 2
        assert f"error: --out: {not_dir} exists and is not a directory" in capsys.readouterr().err
    assert main(["bench", "kernel", "--out", str(not_dir / "sub")]) == 2
    assert f"--out: cannot write to {not_dir / 'sub'}" in capsys.readouterr().err


def test_bench_e2e_times_the_chosen_modes_and_settings():
    import argparse

    from sparsediff.bench import e2e

    parser = argparse.ArgumentParser()
    e2e.add_arguments(parser)
    args = parser.parse_args(["--steps", "5", "--modes", "compiled", "--settings", "B"])
    e2e._parse(args)
    settings = e2e._settings(args)
    assert list(settings) == ["setting_b"]
    assert settings["setting_b"]["fp8"] and settings["setting_b"]["dense_steps"] == 1  # 10% of 5, at least one
    args = parser.parse_args(["--steps", "10"])
    e2e._parse(args)
    assert {name: s["dense_steps"] for name, s in e2e._settings(args).items()} == {"setting_a": 2, "setting_b": 1}
    assert e2e._items(args.modes) == ["eager"]


def _steps_report(time: str, speedup: float, with_labels: bool = True) -> dict:
    settings = {"setting_a": {"fp8": False}, "setting_b": {"fp8": True}}
    result = {"family": "wan", "frames": 81, "steps": 10}
    if with_labels:
        settings = {name: {**s, "label": name[-1].upper(), "dense_steps": 2 if name == "setting_a" else 1}
                    for name, s in settings.items()}
    else:  # the format before 2026-12-02: one count of dense steps for the report
        result["dense_steps"] = 2
    row = {"dense_s": 10.0, "attention_free_s": 3.0, "setting_a_speedup": speedup, "setting_a_bound_speedup": 2.0,
           "setting_b_speedup": 2.2, "setting_b_bound_speedup": 2.5}
    return {"bench": "e2e-steps", "time": time, "device": "GPU", "versions": {"torch": "t", "triton": "tr"},
            "results": [{**result, **settings, "runs": {"compiled": row}}]}


def test_bench_e2e_plot_draws_the_latest_report_of_each_bar(tmp_path: Path, monkeypatch) -> None:
    from matplotlib.axes import Axes

    from sparsediff.bench import e2e

    drawn, real_bar, real_hlines = [], Axes.bar, Axes.hlines

    def bar(self, x, height, *args, **kwargs):
        drawn.append(round(height, 3))
        return real_bar(self, x, height, *args, **kwargs)

    def hlines(self, y, *args, **kwargs):
        drawn.append(("ceiling", round(y, 3)))
        return real_hlines(self, y, *args, **kwargs)

    monkeypatch.setattr(Axes, "bar", bar)
    monkeypatch.setattr(Axes, "hlines", hlines)
    older = _steps_report("2026-12-01T00:00:00+00:00", 1.5, with_labels=False)  # pre-label report format
    newer = _steps_report("2026-12-02T00:00:00+00:00", 1.8)
    e2e.plot_steps([newer, older], tmp_path / "e2e.png")
    assert (tmp_path / "e2e.png").stat().st_size > 0
    # A achieved / bound / ceiling from the newer report (10 / (2 + 8 * 0.3)), then B (FP8, one dense step).
    assert drawn == [1.8, 2.0, ("ceiling", 2.273), 2.2, 2.5, ("ceiling", 2.703)]
    drawn.clear()
    e2e.plot_steps([newer, older], tmp_path / "b.png", settings=["B"])
    assert drawn == [2.2, 2.5, ("ceiling", 2.703)]
    with pytest.raises(ValueError, match="bench e2e --steps"):
        e2e.plot_steps([{**newer, "bench": "e2e"}], tmp_path / "x.png")


def test_bench_e2e_bound_and_ceiling_of_a_denoising_loop() -> None:
    from sparsediff.bench.e2e import attainable_speedup

    # CogVideoX compiled, 2026-12-06 (H100): 10 steps, 2 dense, attention 0.139 of its dense time at setting A.
    loop = (6.872, 2.963, 10, 2)
    assert attainable_speedup(*loop, 0.139) == pytest.approx(1.644, abs=5e-4)  # the report's bound
    assert attainable_speedup(*loop, 0.0) == pytest.approx(10 / (2 + 8 * 2.963 / 6.872))  # attention free
    assert attainable_speedup(*loop, 1.0) == pytest.approx(1.0)  # attention as slow as dense: no gain
    assert attainable_speedup(6.872, 2.963, 10, 10, 0.0) == pytest.approx(1.0)  # every step dense


def test_bench_kernel_plot_and_table_show_kernel_whole_call_and_graphed_call(tmp_path: Path, monkeypatch) -> None:
    import matplotlib.axes

    from sparsediff.bench.kernel import _plot, _table

    base = {"shape": "wan", "B": 1, "H": 12, "N": 32760, "D": 128}
    rows = [{**base, "impl": "cudnn", "mask": "dense", "keep": 1.0, "ms": 10.0, "tflops": 500.0, "graph_ms": 9.875}]
    for keep in (1.0, 0.25):
        rows.append({**base, "impl": "ours", "mask": "random", "keep": keep, "ms": 12.0 * keep, "kernel_ms": 11.0 * keep,
                     "tflops": 400.0, "vs_dense_baseline": 0.8, "rel_l1_vs_dense": 0.001, "flex_tflops": 350.0,
                     "vs_flex": 1.14, "flex_ms": 13.0 * keep, "flex_graph_ms": 12.5 * keep, "graph_ms": 11.5 * keep,
                     "vs_dense_graphed": 0.86, "vs_flex_graphed": 1.21})
        rows.append({**base, "impl": "ours-fp8", "mask": "random", "keep": keep, "ms": 10.0 * keep, "tflops": 480.0,
                     "vs_dense_baseline": 1.0, "rel_l1_vs_dense": 0.05})
    labels, lines_drawn, levels = [], [], []
    plot, axhline = matplotlib.axes.Axes.plot, matplotlib.axes.Axes.axhline
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda self, *a, **kw: labels.append(kw.get("label"))
                        or lines_drawn.append(list(a[1])) or plot(self, *a, **kw))
    monkeypatch.setattr(matplotlib.axes.Axes, "axhline", lambda self, y, **kw: levels.append((y, kw.get("label")))
                        or axhline(self, y, **kw))
    _plot(rows, tmp_path / "kernel.png", "title")
    assert (tmp_path / "kernel.png").stat().st_size > 0
    assert labels == ["ours fp8 random, whole call", "ours random, whole call", "ours random, kernel",
                      "ours random, whole call graphed", "flex random, graphed"]
    # Dense and Flex at their graphed times where timed so: the ratios' yardsticks.
    assert levels == [(500.0 * 10.0 / 9.875, "cudnn dense, graphed")]
    assert lines_drawn[-1] == [350.0 * 13.0 / 12.5] * 2
    lines = _table(rows).splitlines()
    assert lines[0].split()[-6:] == ["graph", "ms", "xdense", "g", "xflex", "g"]
    assert lines[2].split()[-1] == "9.875"  # cuDNN's graphed time
    assert lines[3].split()[-3:] == ["11.500", "0.86", "1.21"]  # ours: graphed time and both graphed ratios
    assert lines[4].split()[-3:] == ["-", "-", "-"]  # FP8 row without graphed timings


def test_bench_e2e_attention_free_keeps_key_and_value_under_compile() -> None:
    # The attention-free loop stands for "everything but attention": under torch.compile the key and
    # value projections must still run, as they do before a real attention call (a stub returning
    # the query let the compiler drop them as dead code, and overstated attention's share).
    import torch.nn.functional as F
    from torch._dynamo.backends.common import aot_autograd

    from sparsediff.bench import e2e

    matmuls = []

    def count_matmuls(gm, example_inputs):
        matmuls.append(sum(1 for n in gm.graph.nodes if n.op == "call_function" and "mm" in str(n.target)))
        return gm

    wq, wk, wv = (torch.randn(16, 16) for _ in range(3))

    def block(x):
        q, k, v = (x @ w for w in (wq, wk, wv))
        return F.scaled_dot_product_attention(q[None], k[None], v[None])[0] @ wq

    x = torch.randn(8, 16)
    with e2e._attention_free(None):
        torch._dynamo.reset()
        out = torch.compile(block, backend=aot_autograd(fw_compiler=count_matmuls))(x)
    torch._dynamo.reset()
    assert matmuls == [4]  # q, k, v and the output projection
    torch.testing.assert_close(out, (x @ wq) @ wq)


def test_bench_predict_takes_graphed_times_against_cudnns_graphed_call(monkeypatch) -> None:
    # Plain timings against cuDNN's plain call, CUDA-graph replays against its replay: at FLUX's
    # length the plain call carries the host's launch, which flattered the graphed ratios.
    from sparsediff.bench import kernel as bench_kernel
    from sparsediff.bench import predict

    tiny = bench_kernel.BenchShape("tiny", 1, 2, 256, 64, (2, 8, 16), 0)
    monkeypatch.setattr(bench_kernel, "GPU_SHAPES", ("tiny",))
    monkeypatch.setattr(bench_kernel, "SHAPES", {**bench_kernel.SHAPES, "tiny": tiny,
                                                 **{name: tiny for name in ("cogvideox", "wan", "hunyuan")}})

    class Graphed:
        def __init__(self, fn):
            self.fn = fn

    def timeit(fn, device, reps=10):  # seconds: cuDNN 10 ms plain / 8 ms graphed, ours 2 / 1
        dense = "cudnn_dense" in (fn.fn if isinstance(fn, Graphed) else fn).__code__.co_names
        return {(True, False): 0.010, (True, True): 0.008, (False, False): 0.002, (False, True): 0.001}[
            dense, isinstance(fn, Graphed)]

    monkeypatch.setattr(predict, "cuda_graphed", Graphed)
    monkeypatch.setattr(predict, "_timeit", timeit)
    monkeypatch.setattr(predict, "cudnn_dense", lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    cpu = torch.device("cpu")
    (row,) = predict._overhead(cpu)
    assert (row["cudnn_dense_ms"], row["cudnn_dense_graph_ms"]) == (10.0, 8.0)
    assert row["sampled_fraction_of_dense"] == pytest.approx(0.2)
    assert row["sampled_graph_fraction_of_dense"] == pytest.approx(0.125)
    rows = predict._speed(cpu, seed=0)
    assert [r["shape"] for r in rows] == ["cogvideox", "wan", "hunyuan"]
    for r in rows:
        assert (r["speedup"], r["speedup_graph"], r["fp8_speedup"], r["fp8_speedup_graph"]) == pytest.approx((5, 8, 5, 8))


def test_bench_predict_writes_its_report_where_the_oracle_reaches_no_sparsity(tmp_path: Path, monkeypatch) -> None:
    # Every sweep point skips blocks and errs above a strict budget: the oracle reaches sparsity 0 there,
    # and the fractions of it are undefined. They were NaN, which the strict JSON writer refused after
    # the whole run, so nothing was written.
    from sparsediff.bench import predict

    monkeypatch.setattr(predict, "CDF_SWEEP", (0.5,))
    monkeypatch.setattr(predict, "PV_SWEEP", (0.5,))
    argv = ["bench", "predict", "--device", "cpu", "--grid", "2x8x8", "--heads", "1", "--head-dim", "16",
            "--budget", "1e-9", "--out", str(tmp_path)]
    assert main(argv) == 0
    report = json.loads((tmp_path / "predict-cpu.json").read_text())
    assert [acc["fraction_of_oracle"]["oracle"] for acc in report["accuracy"]] == ["nan", "nan"]
    assert (tmp_path / "predict-cpu.png").stat().st_size > 0


def test_bench_predict_plot_is_written_atomically(tmp_path: Path, monkeypatch) -> None:
    # A savefig cut short (a crash, Ctrl-C) left a truncated PNG under the final name.
    import matplotlib.figure

    from sparsediff.bench import predict

    def interrupted_savefig(self, fname, **kwargs):
        Path(fname).write_bytes(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", interrupted_savefig)
    acc = {"order": "raster", "curves": {"oracle": [{"cdf": 0.9, "sparsity": 0.5, "error": 0.01}]},
           "fraction_of_oracle": {"oracle": 1.0}}
    with pytest.raises(KeyboardInterrupt):
        predict._plot({"accuracy": [acc], "budget": 0.05, "workload": {"grid": [2, 8, 8]}}, tmp_path / "predict-cpu.png")
    assert list(tmp_path.iterdir()) == []


def test_bench_predict_report_names_its_date_and_versions(tmp_path: Path, monkeypatch) -> None:
    # As bench kernel's and e2e's reports do: a predict-cuda.json did not say which torch and Triton it timed.
    import triton

    from sparsediff.bench import predict

    acc = {"order": "raster", "sparsity_at_budget": {"oracle": 0.5}, "fraction_of_oracle": {"oracle": 1.0},
           "curves": {"oracle": [{"cdf": 0.9, "sparsity": 0.5, "error": 0.01}]}, "pv_skip": {"sweep": "skipped"}}
    monkeypatch.setattr(predict, "_accuracy", lambda w, order, device, budget: {**acc, "order": order})
    assert main(["bench", "predict", "--device", "cpu", "--grid", "2x8x8", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "predict-cpu.json").read_text())
    assert (report["torch"], report["triton"]) == (torch.__version__, triton.__version__)
    assert report["date"].endswith("+00:00")


def test_bench_e2e_records_a_non_finite_sparse_output_instead_of_losing_the_report(monkeypatch, capsys) -> None:
    # Its relative L1 error is NaN, which the strict JSON writer refused after every family had run.
    import argparse

    from tiny_models import build_wan, wan_inputs

    from sparsediff.bench import e2e
    from sparsediff.processors.controller import AttentionController

    outputs = []

    def time_forward(model, inputs, reps):  # dense, then a sparse forward gone non-finite
        with torch.no_grad():
            out = model(**inputs)[0]
        outputs.append(out if not outputs else out * float("nan"))
        return 1.0, outputs[-1]

    monkeypatch.setattr(e2e, "_build", lambda case, frames: (model := build_wan(), wan_inputs(model)))
    monkeypatch.setattr(e2e, "_time_forward", time_forward)
    monkeypatch.setattr(AttentionController, "can_run_sparse", lambda self, device: False)  # no interpreter: quick
    parser = argparse.ArgumentParser()
    e2e.add_arguments(parser)
    _, (result,) = e2e._run_forward(["wan"], {}, parser.parse_args(["--families", "wan"]))
    assert (result["rel_l1"], result["finite"]) == ("nan", False)
    json.dumps(result, allow_nan=False)
    assert capsys.readouterr().out.splitlines()[-1].endswith("nan  NON-FINITE")


def test_bench_values_record_every_non_finite_number_as_text() -> None:
    # A reference of zeros gives a relative L1 of inf, which the strict JSON writer refuses as it does NaN.
    from sparsediff.bench.values import as_text, finite, recorded_rel_l1

    assert [finite(x) for x in (0.25, float("nan"), float("inf"), float("-inf"))] == [0.25, "nan", "inf", "-inf"]
    recorded = recorded_rel_l1(torch.ones(4), torch.zeros(4))
    assert recorded == "inf" and json.loads(json.dumps({"rel_l1": recorded}, allow_nan=False)) == {"rel_l1": "inf"}
    assert recorded_rel_l1(torch.zeros(4), torch.zeros(4)) == 0.0
    assert (as_text(recorded, ".4f"), as_text(0.25, ".2f")) == ("inf", "0.25")


def test_bench_e2e_kernel_ratio_takes_graphed_times_against_cudnns_graphed_call(monkeypatch) -> None:
    # The bound's kernel time is a CUDA-graph replay (GPU time alone); cuDNN's, its yardstick, was a
    # plain call, which carries the host's launch: two conditions in one ratio.
    import triton.testing

    from sparsediff.bench import e2e, timing

    class Graphed:
        def __init__(self, fn):
            self.fn = fn

    def do_bench(fn, *args, **kwargs):  # ms: cuDNN 10 plain / 8 graphed, ours 4 graphed
        code = (fn.fn if isinstance(fn, Graphed) else fn).__code__
        dense = "cudnn_dense" in code.co_freevars  # imported in _kernel_ratio: a closure variable
        return {(True, False): 10.0, (True, True): 8.0, (False, True): 4.0}[dense, isinstance(fn, Graphed)]

    for name in ("randn", "rand"):  # the tensors on the CPU: nothing runs but the lookup table's build
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *shape, real=real, device=None, **kwargs: real(*shape, **kwargs))
    monkeypatch.setattr(timing, "cuda_graphed", Graphed)
    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    assert e2e._kernel_ratio(heads=1, tokens=256, head_dim=64, keep=0.5) == pytest.approx(0.5)
