"""`sparsediff demo` for real: the server in a subprocess (tiny-wan, Triton interpreter), driven in
headless Chromium with Playwright (leaves a screenshot in artifacts/demo.png); and the request checks
of `DemoSession`, in-process."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SERVE_TIMEOUT_S = 180  # imports and building tiny-wan, on 2 shared cores
RENDER_TIMEOUT_MS = 150_000  # dense + sparse render under the Triton interpreter


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log(path: Path) -> str:
    return path.read_text(errors="replace")[-4000:]


def _wait_until_served(proc: subprocess.Popen, url: str, log_path: Path) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy
    deadline = time.monotonic() + SERVE_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the demo exited with code {proc.returncode}:\n{_log(log_path)}")
        try:
            with opener.open(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"the demo did not serve {url} within {SERVE_TIMEOUT_S} s:\n{_log(log_path)}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The demo's URL while `python -m sparsediff demo --model tiny-wan` serves it; killed afterwards."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent: no browser to drive the page")
    tmp = tmp_path_factory.mktemp("demo")
    port = _free_port()
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
           "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": str(tmp / "gradio-cache")}
    log_path = tmp / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "sparsediff", "demo", "--model", "tiny-wan",
                                 "--port", str(port)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_until_served(proc, url, log_path)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    print(f"server log:\n{_log(log_path)}")


def _wrong_family_profile(path: Path) -> Path:
    """A valid profile, but for a FLUX model: the tiny-wan demo must refuse it."""
    from sparsediff.profile import LayerProfile, SparsityProfile

    layer = LayerProfile(heads=2, cdf_threshold=[0.9, 0.9], sim_threshold=[0.0, 0.0])
    SparsityProfile(model_id="tiny-flux", family="flux",
                    layers={"transformer.transformer_blocks.0.attn.processor": layer}).save(path)
    return path


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not found in the stats:\n{text}"
    return float(match.group(1))


def test_demo_page(server: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1100})
            page.goto(server)
            generate = page.locator("#generate")
            expect(generate).to_be_visible(timeout=30_000)

            # Bad input: a message in the page (where the numbers go, so that it stays), and the app goes on serving.
            stats = page.locator("#stats")
            generate.click()
            expect(stats).to_contain_text("Invalid input: Prompt: enter a prompt", timeout=30_000)

            page.locator("#prompt textarea").fill("a red circle moving to the right")
            page.locator("#source").get_by_text("profile", exact=True).click()
            page.locator("#profile-upload input[type=file]").set_input_files(
                str(_wrong_family_profile(tmp_path / "flux-profile.json")))
            # Gradio renders the file's stem and extension in separate cells: at times with a space between.
            expect(page.locator("#profile-upload")).to_contain_text(re.compile(r"flux-profile\s*\.json"), timeout=30_000)
            generate.click()
            expect(stats).to_contain_text("is a profile for the flux family", timeout=30_000)

            # A real render, kept small for the Triton interpreter: 5 frames of 256x256 are 512 video tokens
            # (4 query blocks, the fewest that run sparse), one dense and one sparse step, thresholds that
            # certainly skip blocks of this random model (sim 0 trusts every pooled block), through the FP8 path.
            page.locator("#source").get_by_text("thresholds", exact=True).click()
            for slider, value in (("#frames", "5"), ("#steps", "2"), ("#dense-steps", "1"),
                                  ("#cdf-threshold", "0.6"), ("#sim-threshold", "0")):
                box = page.locator(f"{slider} input[type=number]")
                box.fill(value)
                box.press("Enter")
                expect(box).to_have_value(value)
            page.get_by_label("FP8 attention").check()
            generate.click()
            # Off while the render runs: a click then would be dropped without a word.
            expect(generate).to_be_disabled(timeout=10_000)
            # Progress comes from the pipeline's step callback.
            expect(page.get_by_text(re.compile(r"(dense|sparse): step \d+/\d+")).first).to_be_visible(
                timeout=RENDER_TIMEOUT_MS)
            for output in ("#dense-output", "#sparse-output", "#difference-output"):
                expect(page.locator(f"{output} video")).to_be_attached(timeout=RENDER_TIMEOUT_MS)
            expect(stats).to_contain_text("speed-up", timeout=30_000)
            expect(generate).to_be_enabled(timeout=30_000)
            for plot in ("#heads-plot", "#steps-plot"):
                expect(page.locator(f"{plot} img")).to_be_attached(timeout=30_000)
            text = stats.inner_text()
            dense_s = _number(r"wall time, dense\s+([\d.]+) s", text)
            sparse_s = _number(r"wall time, sparse\s+([\d.]+) s", text)
            speedup = _number(r"speed-up \(dense / sparse\)\s+([\d.]+)×", text)
            sparsity = _number(r"blocks skipped\)\s+([\d.]+) %", text)
            assert dense_s > 0 and sparse_s > 0
            assert speedup == pytest.approx(dense_s / sparse_s, rel=0.05, abs=0.01)
            assert 0 < sparsity < 100, "cdf 0.6 with sim 0 must skip some blocks (and not all)"
            assert re.search(r"PSNR, sparse vs dense\s+([\d.]+ dB|∞)", text), text
            assert "cdf 0.6, sim 0, 1 dense step(s); FP8 (e4m3) attention" in text, \
                "the sparse settings shown must be the ones asked for"
            assert "a red circle moving to the right — seed 0, 256×256, 5 frames, 2 steps" in text, text

            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "demo.png"), full_page=True)

            # A refused request after a render clears that render's outputs: they belong to other inputs.
            page.locator("#prompt textarea").fill("")
            generate.click()
            expect(stats).to_contain_text("enter a prompt", timeout=30_000)
            expect(page.locator("#dense-output video")).not_to_be_attached(timeout=30_000)
        finally:
            browser.close()


@pytest.fixture(scope="module")
def session():
    """A DemoSession on tiny-wan without a default profile (no browser, no render)."""
    import torch

    from sparsediff.apps.demo import DemoSession
    from sparsediff.pipelines.recipes import get_recipe

    recipe = get_recipe("tiny-wan")
    return DemoSession(recipe, recipe.load("cpu"), torch.device("cpu"))


@pytest.mark.parametrize(("change", "message"), [
    ({"prompt": "   "}, "Prompt: enter a prompt"),
    ({"seed": -1}, "Seed: must be between 0 and"),
    ({"seed": 1.5}, "Seed: expected a whole number"),
    ({"steps": 9}, "Steps: must be between 1 and 8"),
    ({"height": 250}, "Height: tiny-wan needs a positive multiple of 16"),
    ({"frames": 4}, "Frames: tiny-wan needs k*4+1 frames"),
    ({"frames": 13}, "Frames: must be between 1 and 9"),
    ({"dense_steps": 4}, "the first 4 step(s) dense"),
    ({"cdf_threshold": 1.5}, "Thresholds: "),
    ({"source": "profile"}, "no profile is known for tiny-wan"),
    ({"fp8": "yes"}, "FP8: expected on or off"),
])
def test_bad_requests_are_refused_before_rendering(session, change: dict, message: str) -> None:
    from sparsediff.apps.demo import THRESHOLDS, InputError, Request

    fields = dict(prompt="a red circle", negative_prompt=None, seed=0, steps=4, height=256, width=256, frames=9,
                  source=THRESHOLDS, cdf_threshold=0.9, sim_threshold=0.0, dense_steps=2)
    rendered = []
    with pytest.raises(InputError, match=re.escape(message)):
        session.compare(Request(**{**fields, **change}), on_step=lambda *a: rendered.append(a))
    assert not rendered, "a refused request must not start a render"


def test_repeated_settings_reuse_the_sparse_handle(session) -> None:
    # Same sparse settings: the handle is reapplied, not applied anew (its CUDA graphs stay captured);
    # each comparison keeps its own stats. Other settings get a new handle.
    from sparsediff.apps.demo import THRESHOLDS, Request

    fields = dict(prompt="a red circle", negative_prompt=None, seed=0, steps=2, height=64, width=64, frames=1,
                  source=THRESHOLDS, cdf_threshold=0.5, sim_threshold=0.0, dense_steps=1)
    first = session.compare(Request(**fields))
    handle = session._handle
    second = session.compare(Request(**{**fields, "seed": 1}))
    assert session._handle is handle
    assert first.stats is not second.stats and first.stats.steps == [0, 1] == second.stats.steps
    session.compare(Request(**{**fields, "cdf_threshold": 0.6}))
    assert session._handle is not handle
    assert not any(type(p).__module__.startswith("sparsediff") for p in session.pipe.transformer.attn_processors.values())


def test_concurrent_requests_render_one_after_the_other(session) -> None:
    # Gradio's queue frees a cancelled request's slot while its render thread goes on: the next request
    # must wait for that render, not render beside it (its "dense" render would run with sparse processors).
    import threading

    from sparsediff.apps.demo import THRESHOLDS, Request

    request = Request(prompt="a red circle", negative_prompt=None, seed=0, steps=2, height=64, width=64, frames=1,
                      source=THRESHOLDS, cdf_threshold=0.5, sim_threshold=0.0, dense_steps=1)
    first_in_render, release, second_stepped = threading.Event(), threading.Event(), threading.Event()

    def hold(label: str, step: int, total: int) -> None:
        first_in_render.set()
        release.wait(timeout=60)

    errors = []

    def run(on_step) -> None:
        try:
            session.compare(request, on_step)
        except Exception as e:  # reported by the assertion below
            errors.append(e)

    first = threading.Thread(target=run, args=(hold,))
    first.start()
    assert first_in_render.wait(timeout=60)
    second = threading.Thread(target=run, args=(lambda *a: second_stepped.set(),))
    second.start()
    overlapped = second_stepped.wait(timeout=5)
    release.set()
    first.join(timeout=120)
    second.join(timeout=120)
    assert not overlapped, "a second request rendered while the first was rendering"
    assert not errors and second_stepped.is_set()


@pytest.mark.parametrize("host", ["127.0.0.1", "nonsense.invalid"])
def test_cli_refuses_an_address_it_cannot_serve_on_before_loading(host: str, capsys: pytest.CaptureFixture) -> None:
    # Gradio would fail only after the model load, with a traceback saying "Cannot find empty port" for any cause.
    from sparsediff.cli import main

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["demo", "--model", "tiny-wan", "--host", host, "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"sparsediff demo: error: --host/--port: cannot serve on {host}:{port}: " in err
    assert "loading" not in err


def test_cli_refuses_a_video_model_without_an_mp4_writer_before_loading(capsys, monkeypatch) -> None:
    # Without imageio-ffmpeg the page came up and every Generate failed once both renders were done.
    from sparsediff.cli import main

    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # not installed
    assert main(["demo", "--model", "tiny-wan", "--port", str(_free_port())]) == 2
    err = capsys.readouterr().err
    assert "sparsediff demo: error: writing MP4 needs the imageio-ffmpeg package" in err and "loading" not in err


def test_sigterm_removes_the_output_folder(tmp_path: Path) -> None:
    # SIGTERM used to kill the server at once, leaving its sparsediff-demo-* folder (and the videos in it).
    port = _free_port()
    env = {**os.environ, "TMPDIR": str(tmp_path), "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "GRADIO_TEMP_DIR": str(tmp_path / "gradio-cache")}
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "sparsediff", "demo", "--model", "tiny-wan", "--port", str(port)],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_until_served(proc, f"http://127.0.0.1:{port}/", log_path)
        assert list(tmp_path.glob("sparsediff-demo-*"))
        proc.terminate()
        assert proc.wait(timeout=30) == 0, _log(log_path)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not list(tmp_path.glob("sparsediff-demo-*")), _log(log_path)


def test_an_interrupt_while_gradio_starts_stops_the_server_cleanly(tmp_path: Path, monkeypatch) -> None:
    # A SIGTERM that came while Gradio's launch checked its own URL (after the page was served) ended the
    # demo with a KeyboardInterrupt traceback and exit 1 (seen in CI on 2026-12-06).
    import tempfile

    import gradio as gr

    from sparsediff.cli import main

    closed = []

    def interrupted_launch(self, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gr.Blocks, "launch", interrupted_launch)
    monkeypatch.setattr(gr.Blocks, "close", lambda self: closed.append(True))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    previous = signal.getsignal(signal.SIGTERM)
    try:
        assert main(["demo", "--model", "tiny-wan", "--port", str(_free_port())]) == 0
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert closed and not list(tmp_path.glob("sparsediff-demo-*"))


def test_the_page_shows_what_was_rendered_why_calls_ran_dense_and_the_models_warnings(session, monkeypatch) -> None:
    # The numbers named neither the prompt nor the seed they belong to, a 0 % sparsity came without the
    # reason (here: too few query blocks), and a prompt's unknown or truncated words were logged only.
    import logging

    from sparsediff.apps.demo import THRESHOLDS, DemoSession, Request, stats_markdown

    render = DemoSession._render

    def warned_render(self, *args, **kwargs):
        logging.getLogger("sparsediff.pipelines.toy_shapes.pipeline").warning("caption 'x': words the model does not know")
        return render(self, *args, **kwargs)

    monkeypatch.setattr(DemoSession, "_render", warned_render)
    c = session.compare(Request(prompt="a red | *circle*", negative_prompt=None, seed=3, steps=2, height=64, width=64,
                                frames=1, source=THRESHOLDS, cdf_threshold=0.5, sim_threshold=0.0, dense_steps=1))
    text = stats_markdown(c)
    assert "| rendered | a red \\| \\*circle\\* — seed 3, 64×64, 2 steps |" in text, text
    assert re.search(r"\| ran dense instead of sparse \| \d+ call\(s\): sequence of only a few query blocks \|", text), text
    logged = [note for note in c.notes if note.startswith("Logged: ")]
    assert logged == ["Logged: caption 'x': words the model does not know"], c.notes  # once, though logged twice


def test_a_profile_calibrated_at_other_settings_is_noted(session, tmp_path: Path) -> None:
    # As `sparsediff render` warns: the page says which of the profile's calibrated settings this render
    # differs from (here size and steps; tiny-wan's guidance is the calibrated one), and nothing when none.
    from sparsediff.apps.demo import PROFILE, Request
    from sparsediff.profile import SparsityProfile

    profile = SparsityProfile.uniform(session.pipe, model_id="tiny-wan", cdf_threshold=0.5, dense_steps=1)
    profile.calibration.extra.update(height=64, width=64, frames=1, steps=4, guidance_scale=5.0)
    path = tmp_path / "calibrated.json"
    profile.save(path)

    def calibration_notes(**size) -> list[str]:
        request = Request(prompt="a red circle", negative_prompt=None, seed=0, **{"steps": 2, **size},
                          frames=1, source=PROFILE, profile_file=str(path))
        return [note for note in session.compare(request).notes if "calibrated" in note]

    assert calibration_notes(height=64, width=64, steps=4) == []
    assert calibration_notes(height=32, width=64) == [
        "The profile was calibrated at other settings: height 64 (this render: 32); steps 4 (this render: 2). It "
        "holds each head within its error budget at the calibrated ones; here the sparse render may stray further "
        "from the dense one (PSNR and SSIM above say how far)."]


def test_the_smallest_size_offered_gets_its_comparison() -> None:
    # toy-shapes (the default model) offers frames down to 4 px; SSIM failed on them after both renders
    # ("Render failed: RuntimeError: ... Padding size should be less than the corresponding input dimension").
    import torch

    from sparsediff.apps.demo import THRESHOLDS, DemoSession, Request
    from sparsediff.pipelines.recipes import get_recipe

    recipe = get_recipe("toy-shapes")
    session = DemoSession(recipe, recipe.load("cpu"), torch.device("cpu"))
    m = recipe.size_multiple
    c = session.compare(Request(prompt="a red circle", negative_prompt=None, seed=0, steps=2, height=m, width=m,
                                frames=1, source=THRESHOLDS, cdf_threshold=0.5, sim_threshold=0.0, dense_steps=1))
    assert c.dense.shape == (1, m, m, 3) and 0.0 <= c.ssim <= 1.0


def test_warm_up_is_noted_at_each_new_size_not_only_the_first_generate(session) -> None:
    # A new size or frame count compiles and allocates again inside both timings; the note said so only
    # for the first Generate since start.
    from sparsediff.apps.demo import THRESHOLDS, Request

    def warm_up_noted(height: int, frames: int) -> bool:
        request = Request(prompt="a red circle", negative_prompt=None, seed=0, steps=2, height=height, width=64,
                          frames=frames, source=THRESHOLDS, cdf_threshold=0.5, sim_threshold=0.0, dense_steps=1)
        return any("warm-up" in note for note in session.compare(request).notes)

    session._warmed.clear()
    assert warm_up_noted(64, 1)
    assert not warm_up_noted(64, 1)
    assert warm_up_noted(32, 1)
    assert warm_up_noted(64, 5)
    assert not warm_up_noted(32, 1)


def test_checked_request_and_its_stats_table(session) -> None:
    # Mutation round 2: these went unnoticed: a dense-steps slider's 1.0 passed on unchecked (the profile
    # refuses a float), a seed one past the cap, a blank negative prompt kept as "  ", the width checked
    # against the height's limit (equal on square recipes), and the first sparse step left out of the
    # table's "in the sparse step(s)".
    import dataclasses
    import math

    import numpy as np
    import torch

    from sparsediff.apps.demo import MAX_SEED, THRESHOLDS, Comparison, DemoSession, InputError, Request, stats_markdown
    from sparsediff.processors.controller import SparsityStats

    fields = dict(prompt=" a red circle ", negative_prompt="  ", seed=MAX_SEED, steps=2.0, height=64, width=64,
                  frames=1, source=THRESHOLDS, cdf_threshold=0.5, sim_threshold=0.0, dense_steps=1.0)
    checked = session._check(Request(**fields))
    assert (checked.prompt, checked.negative_prompt, checked.seed, checked.steps, checked.dense_steps) == \
        ("a red circle", None, 2**32 - 1, 2, 1)
    assert type(checked.dense_steps) is int and session.sparse_profile(checked)[0].dense_steps == 1
    assert session._check(Request(**{**fields, "negative_prompt": " blur "})).negative_prompt == "blur"
    with pytest.raises(InputError, match=re.escape(f"Seed: must be between 0 and {MAX_SEED}, got {MAX_SEED + 1}")):
        session._check(Request(**{**fields, "seed": MAX_SEED + 1}))
    wide = DemoSession(dataclasses.replace(session.recipe, height=256, width=128), None, torch.device("cpu"))
    with pytest.raises(InputError, match=re.escape("Width: must be between 1 and 192, got 256")):
        wide._check(Request(**{**fields, "height": 256, "width": 256}))

    stats = SparsityStats(["l"], [2], dense_steps=1)
    stats.record("l", 0, torch.tensor([4.0, 4.0]), 4)  # the dense step keeps every pair
    stats.record("l", 1, torch.tensor([2.0, 2.0]), 4)
    c = Comparison(dense=np.zeros((1, 4, 4, 3)), sparse=np.zeros((1, 4, 4, 3)), dense_s=2.0, sparse_s=1.0,
                   stats=stats, settings="s", request=checked, psnr_db=math.inf, ssim=1.0, notes=[])
    assert "| sparsity (attention blocks skipped) | **50.0 %** in the sparse step 2; 25.0 % over all steps |" \
        in stats_markdown(c)
