import dataclasses
import json
import os

import numpy as np
import pytest

from sparsediff.profile import (
    DEFAULT_CDF_THRESHOLD,
    FORMAT_VERSION,
    CalibrationInfo,
    LayerProfile,
    SparsityProfile,
)
from tiny_models import build_flux, build_wan


def _profile() -> SparsityProfile:
    return SparsityProfile(
        model_id="tiny-wan",
        family="wan",
        layers={
            "transformer.blocks.0.attn1.processor": LayerProfile(
                heads=2, cdf_threshold=[0.9, 0.95], sim_threshold=[0.1, 0.2], pv_threshold=[0.01, 0.02]),
            "transformer.blocks.1.attn1.processor": LayerProfile(
                heads=2, cdf_threshold=[1.0, 1.0], sim_threshold=[0.0, 0.0], dense=True),
        },
        dense_steps=3,
        token_order="raster",
        tile=(2, 8, 8),
        method="pooled",
        calibration=CalibrationInfo(budget=0.05, errors={"transformer.blocks.0.attn1.processor": [0.04, 0.05]},
                                    sparsity={"transformer.blocks.0.attn1.processor": [0.6, 0.7]},
                                    extra={"prompts": 4}),
    )


def test_json_round_trip(tmp_path):
    profile = _profile()
    path = tmp_path / "p.json"
    profile.save(path)
    assert os.listdir(tmp_path) == ["p.json"]  # the temp file was renamed, none left behind
    data = json.loads(path.read_text())
    assert data["format_version"] == FORMAT_VERSION
    assert SparsityProfile.load(path) == profile


def test_calibration_differences_name_each_setting_a_render_changes():
    profile = _profile()
    profile.calibration.extra.update(height=480, width=832, frames=81, steps=50, guidance_scale=5.0)
    assert profile.calibration_differences(height=[480], width=[832, None], steps=[50, 50.0]) == []
    assert profile.calibration_differences(height=[720, 480, 360, 720], frames=[81], guidance_scale=[6.0]) == [
        "height 480 (this render: 360, 720)", "guidance 5 (this render: 6)"]
    del profile.calibration.extra["guidance_scale"]  # not recorded (profiles before 2026-12-06): not compared
    assert profile.calibration_differences(guidance_scale=[6.0]) == []
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['fps'\]"):
        profile.calibration_differences(fps=[24])


def test_uniform_profile_covers_the_sparse_layers():
    profile = SparsityProfile.uniform(build_wan(num_layers=2), model_id="tiny-wan")
    assert list(profile.layers) == ["transformer.blocks.0.attn1.processor", "transformer.blocks.1.attn1.processor"]
    assert all(layer.heads == 2 and layer.cdf_threshold == [DEFAULT_CDF_THRESHOLD] * 2
               for layer in profile.layers.values())
    profile.check_fits(build_wan(num_layers=2))


def test_overrides_replace_every_head():
    profile = _profile().with_overrides(cdf_threshold=0.5, dense_steps=0, token_order="tiles")
    assert all(layer.cdf_threshold == [0.5, 0.5] for layer in profile.layers.values())
    assert profile.layers["transformer.blocks.0.attn1.processor"].sim_threshold == [0.1, 0.2]
    assert (profile.dense_steps, profile.token_order) == (0, "tiles")
    # An override out of range is named as given, not as the first layer's list of heads.
    for override, match in ((dict(cdf_threshold=1.5), r"^cdf_threshold values must be numbers in \(0.0, 1.0\], got 1.5"),
                            (dict(sim_threshold=-1.0), r"^sim_threshold values"),
                            (dict(pv_threshold=2.0), r"^pv_threshold values"),
                            (dict(dense_steps=-2), r"^dense_steps must be a non-negative int, got -2")):
        with pytest.raises(ValueError, match=match):
            _profile().with_overrides(**override)


def test_profile_that_does_not_fit_is_refused_with_what_differs():
    profile = SparsityProfile.uniform(build_wan(num_layers=2), model_id="tiny-wan")
    with pytest.raises(ValueError, match=r"1 profile layer\(s\) not in the model: transformer.blocks.1.attn1"):
        profile.check_fits(build_wan(num_layers=1))
    with pytest.raises(ValueError, match="family: profile 'wan', model 'flux'"):
        profile.check_fits(build_flux())
    wrong_heads = _profile()
    wrong_heads.layers["transformer.blocks.0.attn1.processor"] = LayerProfile(
        heads=3, cdf_threshold=[0.9] * 3, sim_threshold=[0.0] * 3)
    with pytest.raises(ValueError, match=r"head counts differ in 1 layer\(s\): transformer.blocks.0.attn1.processor "
                                         r"\(profile 3, model 2\)"):
        wrong_heads.check_fits(build_wan(num_layers=2))
    # A model with layers the profile lacks does not fit either (apply() would leave them without thresholds).
    with pytest.raises(ValueError, match=r"1 model layer\(s\) missing from the profile: transformer.blocks.2.attn1"):
        profile.check_fits(build_wan(num_layers=3))


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, True, float(FORMAT_VERSION), str(FORMAT_VERSION)])
def test_unknown_format_version_is_refused(tmp_path, version):
    # true and 1.0 equal 1 in Python: they were read as version 1.
    data = _profile().to_dict()
    data["format_version"] = version
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"format_version {version!r} is not supported"):
        SparsityProfile.load(path)
    with pytest.raises(ValueError, match="is not supported"):
        dataclasses.replace(_profile(), format_version=version)


@pytest.mark.parametrize("budget", [None, 1e-6, 0.15, 0.999])
def test_budgets_inside_zero_one_are_kept(budget):
    # (0, 1) open, as `calibrate --budget` takes it: 1.0 is refused, a budget just under it is not
    data = _profile().to_dict()
    data["calibration"]["budget"] = budget
    assert SparsityProfile.from_dict(data).calibration.budget == budget


@pytest.mark.parametrize("edit,match", [
    (lambda d: d.update(typo=1), r"unknown key\(s\) \['typo'\]"),
    (lambda d: d.pop("family"), r"lacks required key\(s\) \['family'\]"),
    (lambda d: d.update(family="sd3"), "family must be one of"),
    (lambda d: d.update(token_order="zigzag"), "token_order"),
    (lambda d: d.update(dense_steps=-1), "dense_steps"),
    (lambda d: d.update(method="magic"), "method must be None or one of"),
    (lambda d: d.update(tile=5), r"tile must be None or three positive ints \(t, h, w\), got 5"),
    (lambda d: d["calibration"].update(budget=float("nan")), r"calibration.budget must be None or a number in \(0, 1\)"),
    (lambda d: d["calibration"].update(budget=-5), "calibration.budget"),
    (lambda d: d.update(calibration=0), "calibration must be a JSON object"),
    (lambda d: d.update(calibration=None), "calibration must be a JSON object"),
    (lambda d: d.update(tile=[2, True, 8]), "tile must be None or three positive ints"),
    (lambda d: d["layers"]["transformer.blocks.0.attn1.processor"].update(cdf_threshold=[0.9]), "one per head"),
    (lambda d: d["layers"]["transformer.blocks.0.attn1.processor"].update(cdf_threshold=[0.0, 0.5]), r"\(0.0, 1.0\]"),
    (lambda d: d["layers"]["transformer.blocks.0.attn1.processor"].update(sim_threshold=[2.0, 0.5]), "sim_threshold"),
    (lambda d: d["layers"]["transformer.blocks.0.attn1.processor"].update(
        heads=0, cdf_threshold=[], sim_threshold=[], pv_threshold=[]), r"heads must be a positive int, got 0"),
    (lambda d: d["layers"]["transformer.blocks.0.attn1.processor"].update(dense="false"), "dense must be a bool"),
    # A layer's keys are checked as the top level's: a typo was a TypeError from LayerProfile(**entry).
    (lambda d: d["layers"]["transformer.blocks.0.attn1.processor"].update(cdf=[0.9, 0.9]), r"unknown key\(s\) \['cdf'\]"),
    (lambda d: d["layers"]["transformer.blocks.0.attn1.processor"].pop("heads"), r"lacks required key\(s\) \['heads'\]"),
    (lambda d: d.update(tile=[0, 8, 8]), r"tile must be None or three positive ints \(t, h, w\), got \(0, 8, 8\)"),
    (lambda d: d.update(dense_steps=True), "dense_steps must be a non-negative int, got True"),
    (lambda d: d["calibration"].update(budget=0.0), r"calibration.budget must be None or a number in \(0, 1\)"),
    (lambda d: d["calibration"].update(budget=1.0), r"calibration.budget must be None or a number in \(0, 1\)"),
])
def test_malformed_profiles_are_refused(edit, match):
    data = _profile().to_dict()
    edit(data)
    with pytest.raises(ValueError, match=match):
        SparsityProfile.from_dict(data)


def test_not_json_is_refused(tmp_path):
    path = tmp_path / "p.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        SparsityProfile.load(path)


def test_numpy_thresholds_are_numbers_and_save_as_json(tmp_path):
    profile = _profile().with_overrides(cdf_threshold=np.float32(0.5), sim_threshold=np.float64(0.25))
    layer = profile.layers["transformer.blocks.0.attn1.processor"]
    assert layer.cdf_threshold == [0.5, 0.5] and layer.sim_threshold == [0.25, 0.25]
    layer.pv_threshold = [np.float32(0.125), np.float32(0.25)]  # as a user's numpy arithmetic leaves them
    profile.save(tmp_path / "p.json")
    loaded = SparsityProfile.load(tmp_path / "p.json")
    assert loaded.layers["transformer.blocks.0.attn1.processor"].pv_threshold == [0.125, 0.25]
    with pytest.raises(ValueError, match="tile must be None or three positive ints"):
        _profile().with_overrides(tile=5)


def test_save_refuses_a_profile_made_invalid_after_construction(tmp_path):
    # Fields are plain attributes: a profile edited in code after it was built is checked again on save,
    # so no file is written that load() would refuse.
    path = tmp_path / "p.json"
    profile = _profile()
    profile.save(path)
    before = path.read_text()
    profile.layers["transformer.blocks.0.attn1.processor"].cdf_threshold = [0.9, 1.5]
    with pytest.raises(ValueError, match=r"cdf_threshold values must be numbers in \(0.0, 1.0\], got 1.5"):
        profile.save(path)
    profile = _profile()
    profile.dense_steps = -1
    with pytest.raises(ValueError, match="dense_steps must be a non-negative int, got -1"):
        profile.save(path)
    assert path.read_text() == before and os.listdir(tmp_path) == ["p.json"]
