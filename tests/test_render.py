"""`sparsediff render`, prompt files, atomic io and metrics — CPU, tiny models, no downloads."""
from __future__ import annotations

import csv
import json
import math
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from sparsediff.cli import main
from sparsediff.io import (TEMP_MARKER, atomic_output, atomic_write_json, atomic_write_text, pad_to_even,
                           remove_stale_temps, write_png, write_video_mp4)
from sparsediff.metrics import relative_l1, video_psnr, video_ssim
from sparsediff.pipelines.prompts import PromptFileError, load_prompts, slugify
from sparsediff.pipelines.recipes import Recipe
from sparsediff.pipelines.render import SIDECAR_KEYS

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a red ball bouncing", "A blue square, sliding left!", "# not a prompt", "", "green triangle spins"]
# tiny-wan at 64x64, 5 frames, 2 steps: a fraction of a second per prompt on a CPU.
FAST = ["--model", "tiny-wan", "--steps", "2", "--height", "64", "--width", "64", "--frames", "5"]


def _prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def _copy(rendered: Path, out: Path) -> Path:
    """A copy of the finished batch `rendered` in the new folder `out`."""
    out.mkdir()
    for path in rendered.iterdir():
        (out / path.name).write_bytes(path.read_bytes())
    return out


def _outputs(out: Path, ext: str = ".mp4") -> list[Path]:
    return sorted(p for p in out.iterdir() if p.suffix == ext and not p.name.startswith(".") and ".dense" not in p.name)


def _temps(out: Path) -> list[Path]:
    return [p for p in out.iterdir() if TEMP_MARKER in p.name]


def _summary(out: Path) -> list[dict[str, str]]:
    with open(out / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def _cli(*args: str, env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "sparsediff", *args], cwd=REPO, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    """One dense batch of three prompts, rendered in-process."""
    tmp = tmp_path_factory.mktemp("render")
    out = tmp / "out"
    assert main(["render", *FAST, "--dense", "--prompts", str(_prompts(tmp)), "--out", str(out)]) == 0
    return out


def test_batch_writes_videos_sidecars_and_summary(rendered: Path) -> None:
    videos = _outputs(rendered)
    assert [p.name for p in videos] == [
        "0000-a-red-ball-bouncing-s0.mp4", "0001-a-blue-square-sliding-left-s0.mp4", "0002-green-triangle-spins-s0.mp4"]
    for video in videos:
        frames = np.stack(list(iio.imiter(video)))
        assert frames.shape == (5, 64, 64, 3)
        assert iio.immeta(video)["fps"] == 8  # tiny-wan's fps
        sidecar = json.loads(video.with_suffix(".json").read_text())
        assert SIDECAR_KEYS <= sidecar.keys() and sidecar["status"] == "ok"
        assert sidecar["output"] == video.name and sidecar["seed"] == 0
        assert sidecar["settings"]["mode"] == "dense" and sidecar["sparsity"] is None
        assert sidecar["dense_fallbacks"] is None
        assert sidecar["peak_gpu_memory_bytes"] is None and sidecar["wall_time_s"] > 0
        assert sidecar["versions"]["torch"] == torch.__version__
    assert json.loads(videos[1].with_suffix(".json").read_text())["prompt"] == "A blue square, sliding left!"
    rows = _summary(rendered)
    assert [(r["index"], r["status"]) for r in rows] == [("0", "ok"), ("1", "ok"), ("2", "ok")]
    assert not _temps(rendered)


def test_rerun_skips_finished_items(rendered: Path, tmp_path: Path, monkeypatch) -> None:
    def no_load(*args, **kwargs):
        raise AssertionError("a finished batch must not load the model again")

    monkeypatch.setattr(Recipe, "load", no_load)
    before = {p: p.stat().st_mtime_ns for p in rendered.iterdir()}
    assert main(["render", *FAST, "--dense", "--prompts", str(_prompts(tmp_path)), "--out", str(rendered)]) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in before.items() if p.name != "summary.csv")
    assert [r["status"] for r in _summary(rendered)] == ["skipped"] * 3


def test_changed_settings_rerender(rendered: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    from sparsediff.pipelines.render import Renderer

    out = tmp_path / "out"
    out.mkdir()
    first = rendered / "0000-a-red-ball-bouncing-s0"
    for suffix in (".mp4", ".json", ".dense.mp4"):  # the last as an earlier --compare-dense run left it
        source = first.with_suffix(".mp4") if suffix == ".dense.mp4" else first.with_suffix(suffix)
        (out / (first.name + suffix)).write_bytes(source.read_bytes())
    prompts = tmp_path / "one.txt"
    prompts.write_text("a red ball bouncing\n")
    other = ["render", *FAST[:2], "--steps", "1", *FAST[4:], "--dense", "--prompts", str(prompts), "--out", str(out)]

    # A rerun with other settings that dies mid-item leaves no old sidecar that would pass new files as done.
    def dies(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(Renderer, "_generate", dies)
    assert main(other) == 1
    assert not (out / (first.name + ".json")).exists() and not (out / (first.name + ".mp4")).exists()
    monkeypatch.undo()
    for suffix in (".mp4", ".json"):
        (out / (first.name + suffix)).write_bytes(first.with_suffix(suffix).read_bytes())
    capsys.readouterr()
    # Same name, other step count: the old sidecar is stale, so the item is rendered again, and says so.
    assert main(other) == 0
    said = capsys.readouterr().out  # tqdm.write's
    assert "1 item(s) in" in said and "other settings (first: 0000-a-red-ball" in said \
        and "steps); rendering them again, replacing their files" in said
    sidecar = json.loads((out / first.with_suffix(".json").name).read_text())
    assert sidecar["settings"]["steps"] == 1
    assert not (out / (first.name + ".dense.mp4")).exists()  # no file of the earlier settings stays beside
    assert _summary(out)[0]["status"] == "ok"
    # Any setting of the sidecar counts, the negative prompt too.
    assert main([*other, "--negative-prompt", "blurry"]) == 0
    assert "negative_prompt); rendering them again" in capsys.readouterr().out
    assert json.loads((out / first.with_suffix(".json").name).read_text())["negative_prompt"] == "blurry"


def test_summary_parts_of_an_interrupted_multi_process_run_are_dropped(rendered: Path, tmp_path: Path,
                                                                       monkeypatch) -> None:
    def no_load(*args, **kwargs):
        raise AssertionError("a finished batch must not load the model again")

    monkeypatch.setattr(Recipe, "load", no_load)
    out = _copy(rendered, tmp_path / "out")
    (out / "summary.rank1-of-2.csv").write_text("index,status,prompt\n9,failed,an item of another batch\n")
    killed = out / f".0000-a-red-ball-bouncing-s0{TEMP_MARKER}x1y2z3w4.mp4"  # a killed rerun's, of other settings
    killed.write_bytes(b"partial")
    assert main(["render", *FAST, "--dense", "--prompts", str(_prompts(tmp_path)), "--out", str(out)]) == 0
    assert [r["index"] for r in _summary(out)] == ["0", "1", "2"] and not list(out.glob("summary.rank*"))
    assert not killed.exists()


def test_an_interrupted_batch_lists_the_items_it_did_not_reach(tmp_path: Path, monkeypatch, capsys) -> None:
    # The summary of a batch stopped after its first item read as a finished one-item batch.
    from sparsediff.pipelines.render import Renderer

    render = Renderer.render

    def stopped_at_the_second(self, item, rank, world):
        if item.index == 1:
            raise KeyboardInterrupt
        return render(self, item, rank, world)

    monkeypatch.setattr(Renderer, "render", stopped_at_the_second)
    out = tmp_path / "out"
    assert main(["render", *FAST, "--dense", "--prompts", str(_prompts(tmp_path)), "--out", str(out)]) == 130
    assert "interrupted; run the same command again to resume" in capsys.readouterr().err
    assert [(r["index"], r["status"]) for r in _summary(out)] == [("0", "ok"), ("1", "interrupted"), ("2", "interrupted")]
    monkeypatch.undo()
    assert main(["render", *FAST, "--dense", "--prompts", str(_prompts(tmp_path)), "--out", str(out)]) == 0
    assert [r["status"] for r in _summary(out)] == ["skipped", "ok", "ok"]


def _worker(code: str) -> subprocess.Popen:
    """A stand-in render worker: `code` in its own session, as _relaunch starts them."""
    return subprocess.Popen([sys.executable, "-c", code], start_new_session=True)


STOPS_ON_SIGINT = "import sys, time\ntry:\n    time.sleep(120)\nexcept KeyboardInterrupt:\n    sys.exit(130)"
IGNORES_SIGINT = "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(120)"


def test_supervisor_stops_the_other_workers_when_one_fails(monkeypatch) -> None:
    from sparsediff.pipelines import render as render_module

    assert render_module._supervise([_worker("pass"), _worker("pass")]) == 0
    # A worker's peers would wait for it at the final barrier: stopped by SIGINT (their summary parts
    # saved), or killed when they do not see it (blocked in the barrier).
    monkeypatch.setattr(render_module, "STOP_GRACE_S", 2.0)
    workers = [_worker("import sys; sys.exit(3)"), _worker(STOPS_ON_SIGINT), _worker(IGNORES_SIGINT)]
    start = time.monotonic()
    assert render_module._supervise(workers) == 1
    assert time.monotonic() - start < 30
    assert [w.returncode for w in workers] == [3, 130, -signal.SIGKILL]


def test_interrupted_launcher_stops_its_workers_once_each(monkeypatch) -> None:
    from sparsediff.pipelines import render as render_module

    started = []
    real_popen = subprocess.Popen

    def popen(cmd, env, start_new_session):
        assert start_new_session  # else Ctrl-C in a terminal would hit each worker a second time
        started.append((env["RANK"], env["WORLD_SIZE"]))
        return real_popen([sys.executable, "-c", STOPS_ON_SIGINT], start_new_session=True)

    def interrupted(workers):
        interrupted.workers = workers
        time.sleep(3)  # the workers are in their try block by then
        raise KeyboardInterrupt

    monkeypatch.setattr(render_module.subprocess, "Popen", popen)
    monkeypatch.setattr(render_module, "_forward_argv", lambda args: [])
    monkeypatch.setattr(render_module, "_supervise", interrupted)
    with pytest.raises(KeyboardInterrupt):
        render_module._relaunch(None, 2)
    assert started == [("0", "2"), ("1", "2")]
    assert [w.returncode for w in interrupted.workers] == [130, 130]  # stopped at their item, not killed


def _interrupt_inside_a_finalizer() -> None:
    class Finalized:
        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs at the next check of pending signals, still in __del__
                len("")

    Finalized()


def test_a_ctrl_c_that_a_finalizer_drops_is_raised_at_the_next_check_without_a_traceback(monkeypatch) -> None:
    # Python drops a KeyboardInterrupt raised in a finalizer after passing it to sys.unraisablehook (which
    # prints "Exception ignored ... Traceback"); a multi-process render's worker then rendered on into the
    # final barrier (1 run in 3 of the Ctrl-C test below).
    from sparsediff.pipelines.render import InterruptLatch

    reported = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    latch = InterruptLatch()
    previous_handler = signal.getsignal(signal.SIGINT)
    with latch.installed():
        _interrupt_inside_a_finalizer()  # dropped: no exception reaches this frame
        with pytest.raises(KeyboardInterrupt):
            latch.check()
    assert reported == []  # nothing printed
    assert signal.getsignal(signal.SIGINT) is previous_handler and sys.unraisablehook == reported.append
    with latch.installed():  # installing again forgets the interrupt; other dropped exceptions are still reported
        latch.check()

        class Failing:
            def __del__(self) -> None:
                raise ValueError("a finalizer's own error")

        Failing()
    assert [type(u.exc_value) for u in reported] == [ValueError]


def test_without_the_latch_a_finalizer_drops_the_ctrl_c(monkeypatch) -> None:
    # What the latch is for: under Python's own handler the interrupt only reaches the unraisable hook.
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    _interrupt_inside_a_finalizer()
    assert [type(u.exc_value) for u in reported] == [KeyboardInterrupt]


def test_ctrl_c_stops_a_multi_process_render_quietly_and_a_rerun_resumes(tmp_path: Path) -> None:
    # Through torchrun, Ctrl-C printed its SignalException traceback and torchrun hit each worker again.
    out = tmp_path / "out"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt number {i}\n" for i in range(8)))
    argv = ["render", *FAST, "--dense", "--num-processes", "2", "--prompts", str(prompts), "--out", str(out)]
    proc = _cli(*argv, start_new_session=True)
    deadline = time.monotonic() + 240
    # A finished sidecar, not the temporary one being written (".<stem>.tmp-<random>.json" matches "*.json" too):
    # interrupted there, no item was done and the rerun rendered all eight, none skipped.
    while not (out.is_dir() and _outputs(out, ".json")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C in a terminal: the launcher's process group
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "interrupted; run the same command again to resume" in stderr
    proc = _cli(*argv)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    statuses = [r["status"] for r in _summary(out)]
    assert len(statuses) == 8 and "skipped" in statuses and set(statuses) <= {"ok", "skipped"}


def test_same_seed_same_frames_and_seed_from_prompt_file(rendered: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a red ball bouncing"}) + "\n"
                       + json.dumps({"prompt": "a red ball bouncing", "seed": 7}) + "\n")
    out = tmp_path / "out"
    assert main(["render", *FAST, "--dense", "--prompts", str(prompts), "--out", str(out)]) == 0
    same = np.stack(list(iio.imiter(out / "0000-a-red-ball-bouncing-s0.mp4")))
    reference = np.stack(list(iio.imiter(rendered / "0000-a-red-ball-bouncing-s0.mp4")))
    other = np.stack(list(iio.imiter(out / "0001-a-red-ball-bouncing-s7.mp4")))
    np.testing.assert_array_equal(same, reference)
    assert np.abs(other.astype(int) - reference.astype(int)).mean() > 1.0


def test_killed_run_resumes_without_partial_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _cli("render", *FAST, "--dense", "--prompts", str(_prompts(tmp_path)), "--out", str(out))
    deadline = time.monotonic() + 180
    while not (out.is_dir() and _outputs(out)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no output appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    # Whatever the kill left: no output under a final name is partial.
    for video in _outputs(out):
        assert len(list(iio.imiter(video))) == 5
    assert main(["render", *FAST, "--dense", "--prompts", str(_prompts(tmp_path)), "--out", str(out)]) == 0
    assert len(_outputs(out)) == 3 and not _temps(out)
    for video in _outputs(out):
        assert len(list(iio.imiter(video))) == 5
        assert json.loads(video.with_suffix(".json").read_text())["status"] == "ok"
    assert {r["status"] for r in _summary(out)} <= {"ok", "skipped"} and len(_summary(out)) == 3


def test_two_processes_match_one(rendered: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    # One thread per process in both runs, so float reductions happen in the same order.
    proc = _cli("render", *FAST, "--dense", "--num-processes", "2", "--prompts", str(_prompts(tmp_path)),
                "--out", str(out), env={"OMP_NUM_THREADS": "1"})
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    single = tmp_path / "single"
    proc = _cli("render", *FAST, "--dense", "--prompts", str(_prompts(tmp_path)), "--out", str(single),
                env={"OMP_NUM_THREADS": "1"})
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert [p.name for p in _outputs(out)] == [p.name for p in _outputs(single)]
    ranks = set()
    for video in _outputs(out):
        np.testing.assert_array_equal(np.stack(list(iio.imiter(video))),
                                      np.stack(list(iio.imiter(single / video.name))))
        ranks.add(json.loads(video.with_suffix(".json").read_text())["process"]["rank"])
    assert ranks == {0, 1}  # the list really was shared
    assert [r["index"] for r in _summary(out)] == ["0", "1", "2"]
    assert not list(out.glob("summary.rank*"))


@pytest.mark.parametrize("fp8", [False, True])
def test_sparse_render_with_compare_dense(tmp_path: Path, fp8: bool) -> None:
    prompts = tmp_path / "p.txt"
    # bf16: a second item, whose sparse render reapplies the handle that the dense render removed
    prompts.write_text("a red ball bouncing\n" + ("" if fp8 else "a blue cube spinning\n"))
    out = tmp_path / "out"
    # tiny-wan's default 256x256, 9 frames: 768 video tokens, 6 query blocks (fewer run dense);
    # 2 steps, the first dense. sim 0: the random model's blocks are not self-similar enough for
    # the default similarity filter to trust any of them.
    assert main(["render", "--model", "tiny-wan", "--steps", "2", "--dense-steps", "1", "--cdf-threshold", "0.5",
                 "--sim-threshold", "0", *(["--fp8"] if fp8 else []),
                 "--compare-dense", "--prompts", str(prompts), "--out", str(out)]) == 0
    sidecar = json.loads((out / "0000-a-red-ball-bouncing-s0.json").read_text())
    assert sidecar["settings"]["mode"] == "sparse" and sidecar["profile"]["effective_dense_steps"] == 1
    assert sidecar["settings"].get("fp8", False) is fp8
    assert sidecar["sparsity"] is not None and 0.0 < sidecar["sparsity"] < 1.0
    assert sidecar["sparsity_per_step"][0] == 0.0 and sidecar["sparsity_per_step"][1] == pytest.approx(
        sidecar["sparsity"])  # step 0 dense; the mean counts the steps after it
    assert sidecar["dense_fallbacks"] == []  # every call after the dense step ran sparse
    comparison = sidecar["compare_dense"]
    # cdf 0.5 changes the random model's frames: a "dense" render that ran sparse would compare equal.
    assert not comparison["frames_identical"] and comparison["relative_l1"] > 0.0
    assert math.isfinite(comparison["psnr_db"]) and comparison["ssim"] < 1.0
    dense_frames = np.stack(list(iio.imiter(out / sidecar["dense_output"])))
    if not fp8:  # the dense output is a plain --dense render of the same item
        plain = tmp_path / "plain"
        assert main(["render", "--model", "tiny-wan", "--steps", "2", "--dense", "--prompts", str(prompts),
                     "--out", str(plain)]) == 0
        np.testing.assert_array_equal(dense_frames, np.stack(list(iio.imiter(plain / "0000-a-red-ball-bouncing-s0.mp4"))))
    row = _summary(out)[0]
    assert row["mode"] == "sparse" and row["ssim"] != ""
    if not fp8:
        second = json.loads((out / "0001-a-blue-cube-spinning-s0.json").read_text())
        assert 0.0 < second["sparsity"] < 1.0 and second["dense_fallbacks"] == []
        assert second["sparsity_per_step"][0] == 0.0  # the reapplied handle started its steps over


def test_failing_prompt_is_logged_and_batch_goes_on(tmp_path: Path, monkeypatch) -> None:
    from sparsediff.pipelines import render

    real = render.Renderer._generate

    def flaky(self, item):
        if item.index == 1:
            raise RuntimeError("boom on purpose")
        return real(self, item)

    monkeypatch.setattr(render.Renderer, "_generate", flaky)
    out = tmp_path / "out"
    assert main(["render", *FAST, "--dense", "--prompts", str(_prompts(tmp_path)), "--out", str(out)]) == 1
    assert [r["status"] for r in _summary(out)] == ["ok", "failed", "ok"]
    assert "boom on purpose" in _summary(out)[1]["error"]
    log = (out / "render-errors.log").read_text()
    assert "RuntimeError: boom on purpose" in log and "Traceback" in log
    assert len(_outputs(out)) == 2


# --------------------------------------------------------------------------- bad input, before any model


@pytest.fixture
def no_model(monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("bad input must be refused before a model is loaded")

    monkeypatch.setattr(Recipe, "load", no_load)


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("name,text,needle", [
    ("p.jsonl", '{"prompt": "ok"}\n\n{"prompt": "broken"\n', "p.jsonl:3: not valid JSON"),
    ("p.jsonl", '{"prompt": "ok"}\n{"prompt": "x", "seed": "abc"}\n', "p.jsonl:2: 'seed' must be an integer"),
    ("p.jsonl", '{"text": "no prompt field"}\n', "p.jsonl:1: unknown field(s) 'text'"),
    ("p.csv", 'prompt,seed\nfirst,1\nsecond,1,extra\n', "p.csv:3: more cells than header columns"),
    ("p.csv", 'text,seed\nfirst,1\n', "p.csv:1: the header has no 'prompt' column"),
    ("p.txt", "# only a comment\n\n", "p.txt: no prompts in the file"),
    ("p.yaml", "prompt: x\n", "unsupported prompt file type '.yaml'"),
    ("p.jsonl", '{"prompt": "ok"}\n{"prompt": "a \\ud800 b"}\n', "p.jsonl:2: 'prompt' holds a lone surrogate"),
    ("p.jsonl", '{"prompt": "a", "prompt": "b"}\n', "p.jsonl:1: key(s) 'prompt' given more than once"),
    ("p.jsonl", '{"prompt": "a", "seed": 18446744073709551616}\n', "p.jsonl:1: 'seed' must be <= 18446744073709551615"),
    ("p.csv", 'prompt,prompt\na,b\n', "p.csv:1: column(s) 'prompt' given more than once"),
])
def test_malformed_prompt_file_names_the_line(tmp_path, capsys, no_model, name, text, needle) -> None:
    path = tmp_path / name
    path.write_text(text)
    assert needle in _error(capsys, ["render", *FAST, "--prompts", str(path), "--out", str(tmp_path / "o")])


def test_bad_inputs_refused_before_loading(tmp_path, capsys, no_model) -> None:
    prompts = _prompts(tmp_path)
    base = ["render", "--prompts", str(prompts)]
    out = ["--out", str(tmp_path / "o")]
    assert "prompt file not found" in _error(capsys, ["render", "--prompts", str(tmp_path / "nope.txt"), *out])
    assert "nope: prompt file not found" in _error(capsys, ["render", "--prompts", str(tmp_path / "nope"), *out])
    assert "is a directory, not a prompt file" in _error(capsys, ["render", "--prompts", str(tmp_path), *out])
    assert "/dev/null: not a regular file" in _error(capsys, ["render", "--prompts", "/dev/null", *out])
    err = _error(capsys, [*base, *out, "--model", "no-such-model"])
    assert "unknown recipe 'no-such-model'" in err and "tiny-wan" in err
    not_dir = tmp_path / "file"
    not_dir.write_text("x")
    assert "is not a directory" in _error(capsys, [*base, "--model", "tiny-wan", "--out", str(not_dir)])
    assert "--height: tiny-wan needs a positive multiple of 16" in _error(
        capsys, [*base, *out, "--model", "tiny-wan", "--height", "65"])
    assert "--frames: tiny-wan needs k*4+1 frames" in _error(capsys, [*base, *out, "--model", "tiny-wan", "--frames", "6"])
    sized = tmp_path / "sized.jsonl"
    sized.write_text('{"prompt": "fine"}\n{"prompt": "odd", "width": 72}\n')
    assert "sized.jsonl:2: width: tiny-wan needs a positive multiple of 16" in _error(
        capsys, ["render", "--prompts", str(sized), *out, "--model", "tiny-wan"])
    assert "--fp8/--no-cuda-graphs/--compare-dense have no effect with --dense" in _error(
        capsys, [*base, *out, "--model", "tiny-wan", "--dense", "--fp8"])
    assert "have no effect with --dense" in _error(capsys, [*base, *out, "--model", "tiny-wan", "--dense", "--no-cuda-graphs"])
    assert "have no effect with --dense" in _error(capsys, [*base, *out, "--model", "tiny-wan", "--dense", "--compare-dense"])
    assert "--guidance-scale: must be a finite number, got nan" in _error(
        capsys, [*base, *out, "--model", "tiny-wan", "--guidance-scale", "nan"])
    assert "--seed: must be in [0, 18446744073709551615]" in _error(
        capsys, [*base, *out, "--model", "tiny-wan", "--seed", str(2**64)])
    # Threshold overrides out of a profile's ranges: refused here, not by every item after the model loads.
    for flag, value, needle in (("--cdf-threshold", "1.5", "numbers in (0.0, 1.0], got 1.5"),
                                ("--cdf-threshold", "0", "numbers in (0.0, 1.0], got 0.0"),
                                ("--sim-threshold", "-0.1", "numbers in [0.0, 1.0], got -0.1"),
                                ("--dense-steps", "-1", "dense_steps must be a non-negative int, got -1")):
        assert f"{flag}: " in (err := _error(capsys, [*base, *out, "--model", "tiny-wan", flag, value])) and needle in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit):  # argparse: the two are mutually exclusive
        main([*base, *out, "--model", "tiny-wan", "--dense", "--profile", str(tmp_path / "p.json")])
    assert "not allowed with" in capsys.readouterr().err


def test_a_process_count_unlike_the_launchers_is_refused(tmp_path, capsys, monkeypatch, no_model) -> None:
    # Under `accelerate launch --num_processes 2`, --num-processes 4 was ignored without a word.
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = ["render", "--prompts", str(_prompts(tmp_path)), "--out", str(tmp_path / "o"), "--model", "tiny-wan"]
    assert "one of 2 launched processes" in _error(capsys, [*argv, "--num-processes", "4"])
    assert "one of 2 launched processes" in _error(capsys, [*argv, "--context-parallel", "4"])
    assert not (tmp_path / "o").exists()


def test_more_processes_than_gpus_is_refused_before_any_start(tmp_path, capsys, monkeypatch, no_model) -> None:
    # On a 1-GPU machine --num-processes 2 started two workers, and the second failed on a GPU it did not have.
    from sparsediff.pipelines import render as render_module

    def no_start(*args):
        raise AssertionError("no worker may start")

    monkeypatch.setattr(render_module, "_relaunch", no_start)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    argv = ["render", "--prompts", str(_prompts(tmp_path)), "--out", str(tmp_path / "o"), "--model", "tiny-wan"]
    for flag in ("--num-processes", "--context-parallel"):
        assert "one GPU a process, and 1 GPU(s) are visible here" in _error(capsys, [*argv, flag, "2"])
    assert not (tmp_path / "o").exists()


def test_a_missing_mp4_writer_is_refused_before_any_render(tmp_path, capsys, monkeypatch, no_model) -> None:
    # Without imageio-ffmpeg every item rendered in full, then failed when its video was written.
    import imageio_ffmpeg

    argv = ["render", "--prompts", str(_prompts(tmp_path)), "--out", str(tmp_path / "o"), "--model", "tiny-wan"]
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "imageio_ffmpeg", None)  # not installed
        assert "writing MP4 needs the imageio-ffmpeg package, which is not installed" in _error(capsys, argv)

    def no_binary():
        raise RuntimeError("No ffmpeg exe could be found.")

    monkeypatch.setattr(imageio_ffmpeg, "get_ffmpeg_exe", no_binary)
    assert "writing MP4 needs an ffmpeg binary, and none was found (No ffmpeg exe could be found.)" in _error(capsys, argv)
    assert not (tmp_path / "o").exists()


def test_profile_for_another_model_is_refused(tmp_path, capsys, monkeypatch, no_model) -> None:
    layer = {"heads": 2, "cdf_threshold": [0.9, 0.9], "sim_threshold": [0.0, 0.0]}
    profile = {"format_version": 1, "model_id": "wan2.1-t2v-14b", "family": "wan",
               "layers": {"transformer.blocks.0.attn1.processor": layer}}
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile))
    argv = ["render", "--model", "tiny-wan", "--prompts", str(_prompts(tmp_path)), "--out", str(tmp_path / "o"),
            "--profile", str(path)]
    assert "is a profile for 'wan2.1-t2v-14b', not for tiny-wan" in _error(capsys, argv)
    path.write_text(json.dumps({**profile, "model_id": "flux.1-dev", "family": "flux"}))
    assert "for the flux family, but tiny-wan is wan" in _error(capsys, argv)
    path.write_text("{not json")
    assert "is not a valid sparsity profile" in _error(capsys, argv)
    assert not (tmp_path / "o").exists()  # a refused command leaves no empty --out folder behind
    # A profile naming no model is checked against the model once it loads: one failure for the batch.
    path.write_text(json.dumps({**profile, "model_id": ""}))
    monkeypatch.undo()  # the model may load now
    assert main(argv) == 1
    rows = _summary(tmp_path / "o")
    assert [r["status"] for r in rows] == ["failed"] * 3 and all("model load: " in r["error"] for r in rows)
    assert "--profile: " in rows[0]["error"] and "does not fit this model" in rows[0]["error"]
    for bad, needle in ((tmp_path / "missing.json", "missing.json: sparsity profile not found"),
                        (tmp_path, "is a directory, not a sparsity profile"),
                        (Path("/dev/null"), "/dev/null: not a regular file")):
        assert f"--profile: {bad}" in (err := _error(capsys, [*argv[:-1], str(bad)])) and needle in err


def test_a_profile_calibrated_at_other_settings_is_named(tmp_path, render_plan, caplog, monkeypatch) -> None:
    # Another size, step count or guidance than the profile's calibration changes the errors its thresholds
    # were chosen at: warned about once (by process 0 of a multi-process render), listing each, and still planned.
    layer = {"heads": 2, "cdf_threshold": [0.9, 0.9], "sim_threshold": [0.0, 0.0]}
    tiny_wan_settings = {"height": 256, "width": 256, "frames": 9, "steps": 4, "guidance_scale": 5.0}
    profile = {"format_version": 1, "model_id": "tiny-wan", "family": "wan",
               "layers": {"transformer.blocks.0.attn1.processor": layer},
               "calibration": {"budget": 0.1, "errors": {}, "sparsity": {}, "extra": dict(tiny_wan_settings)}}
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile))
    args = ["--model", "tiny-wan", "--profile", str(path)]
    with caplog.at_level("WARNING", logger="sparsediff"):
        assert render_plan(*args).guidance_scale == 5.0  # tiny-wan's own settings, the profile's: silent
        render_plan(*args, "--guidance-scale", "5", "--steps", "4", "--height", "256")
        assert not caplog.records
        plan = render_plan(*args, "--guidance-scale", "7.5", "--steps", "8", "--height", "128")
        assert (plan.guidance_scale, plan.items[0].steps, plan.items[0].height) == (7.5, 8, 128)
    assert [r.getMessage() for r in caplog.records] == [
        f"{path} was calibrated at other settings than this render's: height 256 (this render: 128); steps 4 (this "
        "render: 8); guidance 5 (this render: 7.5). Its thresholds hold each head within the error budget at "
        "the calibrated settings, and frames may stray further from dense at others (`sparsediff calibrate` with "
        "this render's settings fits them)"]
    caplog.clear()
    monkeypatch.setenv("RANK", "1")  # a launched worker: process 0 has said it
    with caplog.at_level("WARNING", logger="sparsediff"):
        render_plan(*args, "--guidance-scale", "7.5")
    assert not caplog.records
    monkeypatch.delenv("RANK")
    profile["calibration"]["extra"] = {}  # profiles that record none (the guidance is recorded since 2026-12-06)
    path.write_text(json.dumps(profile))
    with caplog.at_level("WARNING", logger="sparsediff"):
        render_plan(*args, "--guidance-scale", "7.5", "--steps", "8")
    assert not caplog.records


# --------------------------------------------------------------------------- prompts, io, metrics


def test_prompt_files_in_three_formats(tmp_path: Path) -> None:
    txt = tmp_path / "p.txt"
    txt.write_text("# header\n first prompt \n\nsecond\n")
    assert [(s.prompt, s.line) for s in load_prompts(txt)] == [("first prompt", 2), ("second", 4)]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a", "seed": 3, "frames": 9, "negative_prompt": "blur"}\n\n{"prompt": "b"}\n')
    a, b = load_prompts(jsonl)
    assert (a.seed, a.frames, a.negative_prompt, a.line) == (3, 9, "blur", 1) and (b.seed, b.line) == (None, 3)
    csv_path = tmp_path / "p.csv"
    csv_path.write_text('prompt,seed,steps\n"one, with comma",5,\ntwo,,10\n')
    one, two = load_prompts(csv_path)
    assert (one.prompt, one.seed, one.steps) == ("one, with comma", 5, None)
    assert (two.seed, two.steps, two.line) == (None, 10, 3)
    with pytest.raises(PromptFileError, match="p.csv:3: 'steps' must be >= 1"):
        csv_path.write_text("prompt,steps\nok,2\nbad,0\n")
        load_prompts(csv_path)
    # Blank lines before the header are skipped as those between rows are (the header was the blank line:
    # "the header has no 'prompt' column (got )"); lines keep their numbers in the file.
    csv_path.write_text("\n  \r\nprompt,seed\n\nx,4\n")
    assert [(s.prompt, s.seed, s.line) for s in load_prompts(csv_path)] == [("x", 4, 5)]
    with pytest.raises(PromptFileError, match="p.csv:5: 'steps' must be >= 1"):
        csv_path.write_text("\n\nprompt,steps\nok,2\nbad,0\n")
        load_prompts(csv_path)
    with pytest.raises(PromptFileError, match="p.csv:2: the header has no 'prompt' column"):
        csv_path.write_text("\ntext\nx\n")
        load_prompts(csv_path)
    # Only "\n" ends a line: U+2028, U+0085 and form feeds inside a prompt stay in it (CRLF files still read).
    jsonl.write_text(json.dumps({"prompt": "a\u2028b\x85c"}, ensure_ascii=False) + "\r\n" + '{"prompt": "d"}\n')
    assert [(s.prompt, s.line) for s in load_prompts(jsonl)] == [("a\u2028b\x85c", 1), ("d", 2)]
    txt.write_text("one\x0cstill one\r\ntwo\n")
    assert [(s.prompt, s.line) for s in load_prompts(txt)] == [("one\x0cstill one", 1), ("two", 2)]
    assert slugify("  Ünïcode: A/B test!! ") == "unicode-a-b-test" and slugify("???") == "prompt"


def test_atomic_writes_leave_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "x.json"
    atomic_write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("interrupted")
    assert json.loads(target.read_text()) == {"a": 1} and not _temps(tmp_path)
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant: nan"):
        atomic_write_json(target, {"a": float("nan")})
    assert json.loads(target.read_text()) == {"a": 1} and not _temps(tmp_path)


def test_atomic_writes_take_the_longest_names_a_folder_allows(tmp_path: Path) -> None:
    # A name of 255 bytes (a plain open() writes it): the temporary beside it must fit as well.
    for stem in ("p" * 250, "\u00e9" * 125):
        target = tmp_path / f"{stem}.json"
        assert len(os.fsencode(target.name)) == 255
        atomic_write_json(target, {"a": 1})
        assert json.loads(target.read_text()) == {"a": 1} and not _temps(tmp_path)
        with pytest.raises(KeyboardInterrupt):
            with atomic_output(target) as tmp:  # an interrupted write's temporary is found again
                assert _temps(tmp_path) == [tmp] and remove_stale_temps(target) == [tmp]
                raise KeyboardInterrupt
        target.unlink()
    # A suffix leaving no room for the shortened stem's hash tag: the shortening never ended.
    for stem, x_count in (("q", 240), ("q" * 10, 235)):  # 0 and 5 bytes left for the stem
        target = tmp_path / f"{stem}.{'x' * x_count}"
        atomic_write_text(target, "hi")
        assert target.read_text() == "hi" and not _temps(tmp_path)
        target.unlink()
    with pytest.raises(ValueError, match=r"a suffix of 250 bytes leaves no room for the temporary name"):
        atomic_write_text(tmp_path / ("q." + "x" * 249), "hi")
    assert not list(tmp_path.iterdir())


def test_stale_temporaries_are_only_those_of_the_name_asked(tmp_path: Path) -> None:
    # Two 255-byte names sharing their first 249 bytes shortened to one temporary prefix, and "a.json"'s
    # pattern matched the temporaries of a file named "a.tmp-x.json": cleaning one removed the other's.
    for mine, other in (("q" * 249 + "1.json", "q" * 249 + "2.json"), ("a.json", "a.tmp-x.json")):
        with atomic_output(tmp_path / other) as other_tmp:
            with pytest.raises(KeyboardInterrupt):
                with atomic_output(tmp_path / mine) as tmp:
                    assert remove_stale_temps(tmp_path / mine) == [tmp]
                    raise KeyboardInterrupt
            assert other_tmp.exists() and remove_stale_temps(tmp_path / other) == [other_tmp]
            other_tmp.write_text("{}")  # atomic_output's exit moves it onto `other`
        (tmp_path / other).unlink()
    assert not list(tmp_path.iterdir())


def test_pad_to_even_keeps_every_pixel_and_repeats_the_edge() -> None:
    x = np.random.default_rng(0).integers(0, 256, (2, 17, 21, 3), dtype=np.uint8)
    y = pad_to_even(x)
    assert y.shape == (2, 18, 22, 3)
    np.testing.assert_array_equal(y[:, :17, :21], x)
    np.testing.assert_array_equal(y[:, 17, :21], x[:, 16])
    np.testing.assert_array_equal(y[:, :17, 21], x[:, :, 20])
    assert pad_to_even(y) is y


def test_video_and_png_writers(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    frames = rng.random((3, 17, 21, 3), dtype=np.float32)  # odd sizes: padded to even for yuv420p
    write_video_mp4(tmp_path / "v.mp4", frames, fps=12)
    back = np.stack(list(iio.imiter(tmp_path / "v.mp4")))
    assert back.shape == (3, 18, 22, 3) and iio.immeta(tmp_path / "v.mp4")["fps"] == 12
    flat = np.full((2, 16, 16, 3), 0.5, dtype=np.float32)
    write_video_mp4(tmp_path / "flat.mp4", flat, fps=8)
    assert np.abs(np.stack(list(iio.imiter(tmp_path / "flat.mp4"))).astype(int) - 128).max() <= 2
    write_png(tmp_path / "i.png", frames[0])
    np.testing.assert_array_equal(iio.imread(tmp_path / "i.png"), (frames[0] * 255 + 0.5).astype(np.uint8))
    with pytest.raises(ValueError, match="frames"):
        write_video_mp4(tmp_path / "bad.mp4", frames[0], fps=8)
    assert not _temps(tmp_path)


def test_metrics() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.rand(4, 24, 24, 3, generator=g)
    noisy = (a + 0.05 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    assert video_psnr(a, a) == float("inf") and video_ssim(a, a) == pytest.approx(1.0, abs=1e-5)
    mse = float(((noisy - a) ** 2).mean())
    assert video_psnr(noisy, a) == pytest.approx(10 * np.log10(1.0 / mse), rel=1e-4)
    assert 0.0 < video_ssim(noisy, a) < 0.99
    assert video_psnr(a.numpy(), noisy.numpy()) == pytest.approx(video_psnr(a, noisy))
    assert video_ssim(a[0], noisy[0]) == pytest.approx(video_ssim(a[:1], noisy[:1]))  # an image is one frame
    with pytest.raises(ValueError, match="does not match"):
        video_psnr(a, a[:2])
    out, ref = torch.tensor([1.0, -2.0, 3.5]), torch.tensor([1.0, -1.0, 3.0])
    assert float(relative_l1(out, ref)) == pytest.approx(1.5 / 5.0)
    assert relative_l1(out.half(), ref.bfloat16()).dtype == torch.float32
    assert float(relative_l1(torch.zeros(3), torch.zeros(3))) == 0.0
    assert float(relative_l1(torch.ones(3), torch.zeros(3))) == float("inf")


def test_atomic_writes_give_files_the_mode_a_plain_open_gives(tmp_path: Path) -> None:
    # mkstemp creates 0600 files: a profile, sidecar or video written atomically would be unreadable to others.
    plain = tmp_path / "plain.txt"
    plain.write_text("{}")
    atomic_write_json(tmp_path / "x.json", {"a": 1})
    write_png(tmp_path / "i.png", np.zeros((4, 4, 3), dtype=np.uint8))
    for name in ("x.json", "i.png"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


def test_an_output_folder_that_cannot_be_written_is_refused_at_once(tmp_path: Path, monkeypatch) -> None:
    import tempfile

    from sparsediff.io import writable_dir

    assert writable_dir(tmp_path / "new" / "sub") == tmp_path / "new" / "sub" and (tmp_path / "new" / "sub").is_dir()
    assert not list((tmp_path / "new" / "sub").iterdir())  # the write check leaves nothing behind

    def read_only(*args, **kwargs):  # as a read-only mount or a folder of another user answers
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)
    with pytest.raises(ValueError, match=r"^--dir: cannot write to .* \(Permission denied\)$"):
        writable_dir(tmp_path, "--dir")


def test_prompt_file_fields_are_checked_by_type_and_range(tmp_path: Path) -> None:
    # Mutation round 2: these went unnoticed: seed 0 refused as steps 0 is, a JSON true read as seed 1,
    # a number taken as the negative prompt, a short CSV row ending in AttributeError, a CSV row of empty
    # cells refused for its missing prompt instead of skipped, and an upper-case suffix refused.
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a", "seed": 0}\n')
    assert [(s.prompt, s.seed) for s in load_prompts(jsonl)] == [("a", 0)]
    for line, message in (('{"prompt": "a", "seed": true}', "p.jsonl:1: 'seed' must be an integer, got True"),
                          ('{"prompt": "a", "negative_prompt": 5}', "p.jsonl:1: 'negative_prompt' must be a string")):
        jsonl.write_text(line + "\n")
        with pytest.raises(PromptFileError, match=re.escape(message)):
            load_prompts(jsonl)
    csv_path = tmp_path / "p.csv"
    csv_path.write_text("prompt,seed\nonly\n")
    with pytest.raises(PromptFileError, match="p.csv:2: fewer cells than header columns"):
        load_prompts(csv_path)
    csv_path.write_text("prompt,seed\n,\nx,1\n")
    assert [(s.prompt, s.seed, s.line) for s in load_prompts(csv_path)] == [("x", 1, 3)]
    upper = tmp_path / "P.TXT"
    upper.write_text("hi\n")
    assert [(s.prompt, s.line) for s in load_prompts(upper)] == [("hi", 1)]


def test_writers_clip_pixels_and_refuse_a_frame_rate_that_is_not_positive(tmp_path: Path) -> None:
    # Float pixels a little outside [0, 1] (a decoder's overshoot) are clipped, not wrapped around in uint8.
    write_png(tmp_path / "c.png", np.array([[[1.25, -0.5, 0.5]]], dtype=np.float32))
    np.testing.assert_array_equal(iio.imread(tmp_path / "c.png"), [[[255, 0, 128]]])
    frames = np.zeros((2, 16, 16, 3), dtype=np.float32)
    for fps in (0, -8, float("nan")):
        with pytest.raises(ValueError, match="fps: must be positive"):
            write_video_mp4(tmp_path / "v.mp4", frames, fps=fps)
    assert not list(tmp_path.glob("*.mp4")) and not _temps(tmp_path)


def test_ssim_of_frames_smaller_than_its_window_and_only_float_pixels() -> None:
    g = torch.Generator().manual_seed(0)
    # 8x10: an even side (8) shrinks the window to 7; 5x5 and 3x40: the window (and its sigma) shrink below 6.
    for h, w in ((8, 10), (5, 5), (3, 40)):
        a = torch.rand(2, h, w, 3, generator=g)
        noisy = (a + 0.1 * torch.randn(a.shape, generator=g)).clamp(0, 1)
        assert video_ssim(a, a) == pytest.approx(1.0, abs=1e-5)
        assert 0.0 < video_ssim(noisy, a) < 0.99
    with pytest.raises(ValueError, match="too small for SSIM"):
        video_ssim(torch.rand(1, 2, 8, 3), torch.rand(1, 2, 8, 3))
    # uint8 frames (0-255) against data_range 1.0 would give meaningless numbers: refused.
    pixels = np.zeros((1, 8, 8, 3), dtype=np.uint8)
    for metric in (video_psnr, video_ssim):
        with pytest.raises(ValueError, match=r"a: expected float pixels in \[0, 1\], got torch.uint8"):
            metric(pixels, pixels.astype(np.float32))


# --------------------------------------------------------------------------- --random-weights


def test_random_weights_refused_for_tiny_and_unsupported_recipes(tmp_path, capsys, no_model) -> None:
    argv = ["render", "--prompts", str(_prompts(tmp_path)), "--out", str(tmp_path / "o"), "--random-weights"]
    assert "--random-weights: supported for wan2.1-t2v-1.3b only; tiny-wan is a tiny recipe" in _error(
        capsys, [*argv, "--model", "tiny-wan"])
    assert "--random-weights: supported for wan2.1-t2v-1.3b only; cogvideox-5b has no random-weight build" in _error(
        capsys, [*argv, "--model", "cogvideox-5b"])


def test_random_weights_render_records_it_in_sidecars(tmp_path: Path, monkeypatch) -> None:
    """The CLI path of --random-weights, with the builder shrunk to the reduced layout of test_recipes."""
    import argparse

    from sparsediff.pipelines import random_weights, render
    from test_recipes import SMALL_WAN

    full = random_weights.build_random_pipeline

    def small(recipe, device, dtype, *, seed):
        return full(recipe, device, dtype, seed=seed, overrides=SMALL_WAN)

    monkeypatch.setattr(random_weights, "build_random_pipeline", small)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red ball bouncing\n")
    out = tmp_path / "out"
    argv = ["render", "--model", "wan2.1-t2v-1.3b", "--random-weights", "--dense", "--steps", "1", "--height", "64",
            "--width", "64", "--frames", "5", "--prompts", str(prompts), "--out", str(out)]
    assert main(argv) == 0
    sidecar = json.loads((out / "0000-a-red-ball-bouncing-s0.json").read_text())
    assert sidecar["model"]["random_weights"] is True and sidecar["settings"]["random_weights"] is True
    assert sidecar["model"]["name"] == "wan2.1-t2v-1.3b" and (out / sidecar["output"]).is_file()
    assert [r["status"] for r in _summary(out)] == ["ok"]
    parser = argparse.ArgumentParser()
    render.add_arguments(parser)
    assert "--random-weights" in render._forward_argv(parser.parse_args(argv[1:]))
    sparse_argv = [a for a in argv[1:] if a != "--dense"] + ["--fp8"]
    assert "--fp8" in render._forward_argv(parser.parse_args(sparse_argv))  # relaunched workers keep it
    assert "--no-cuda-graphs" in render._forward_argv(parser.parse_args(sparse_argv + ["--no-cuda-graphs"]))
    assert "--no-cuda-graphs" not in render._forward_argv(parser.parse_args(sparse_argv))


def test_another_output_type_replaces_the_earlier_items_files(tmp_path: Path) -> None:
    # An image model's rerun of a video model's item kept the old .mp4 beside the new .png and its sidecar.
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red ball\n")
    out = tmp_path / "out"
    size = ["--height", "64", "--width", "64", "--steps", "1", "--dense", "--prompts", str(prompts), "--out", str(out)]
    assert main(["render", "--model", "tiny-wan", "--frames", "5", *size]) == 0
    assert sorted(p.name for p in out.glob("0000-*")) == ["0000-a-red-ball-s0.json", "0000-a-red-ball-s0.mp4"]
    assert main(["render", "--model", "tiny-flux", *size]) == 0
    assert sorted(p.name for p in out.glob("0000-*")) == ["0000-a-red-ball-s0.json", "0000-a-red-ball-s0.png"]


def test_a_render_within_the_dense_steps_says_it_runs_dense(tmp_path: Path, caplog, monkeypatch) -> None:
    from sparsediff import _runtime

    monkeypatch.setattr(_runtime, "_said", set())  # warnings are logged once a process
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red ball\n")
    with caplog.at_level("WARNING", logger="sparsediff"):
        assert main(["render", *FAST, "--dense-steps", "2", "--prompts", str(prompts), "--out", str(tmp_path / "o")]) == 0
    assert "2 step(s) lie within the profile's 2 dense step(s): the render runs dense throughout" in caplog.text
    assert json.loads(next((tmp_path / "o").glob("*.json")).read_text())["sparsity"] is None


def test_relaunched_workers_parse_values_starting_with_a_dash() -> None:
    from sparsediff.cli import build_parser
    from sparsediff.pipelines import render as render_module

    parser = build_parser()
    args = parser.parse_args(["render", "--prompts=-p.txt", "--out=-out", "--negative-prompt=-blurry",
                              "--guidance-scale=-1", "--num-processes", "2"])
    again = parser.parse_args(render_module._forward_argv(args))
    assert (again.prompts, again.out, again.negative_prompt, again.guidance_scale) == \
        (args.prompts, args.out, "-blurry", -1.0)


def test_summary_parts_of_another_process_count_are_dropped(rendered: Path, tmp_path: Path, monkeypatch) -> None:
    import accelerate

    class TwoProcesses:  # rank 0 of a 2-process run; its share is done, so no collective is needed
        def __init__(self, **kwargs):
            self.process_index, self.num_processes, self.is_main_process = 0, 2, True
            self.device = torch.device("cpu")

        def wait_for_everyone(self):
            pass

    def no_load(*args, **kwargs):
        raise AssertionError("a finished batch must not load the model again")

    monkeypatch.setattr(accelerate, "PartialState", TwoProcesses)
    monkeypatch.setattr(Recipe, "load", no_load)
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = _copy(rendered, tmp_path / "out")
    (out / "summary.rank3-of-4.csv").write_text("index,status,prompt\n9,failed,an item of an interrupted run\n")
    argv = ["render", *FAST, "--dense", "--num-processes", "2", "--prompts", str(_prompts(tmp_path)), "--out", str(out)]
    assert main(argv) == 0
    assert [r["index"] for r in _summary(out)] == ["0", "2"]  # rank 0's share
    assert not list(out.glob("summary.rank*"))


# --------------------------------------------------------------------------- resume: what counts as done


def test_rerun_renders_again_an_item_whose_output_is_gone(rendered: Path, tmp_path: Path) -> None:
    # A sidecar marks its item done only beside its output: a video deleted by hand is rendered again.
    out = _copy(rendered, tmp_path / "out")
    gone = out / "0001-a-blue-square-sliding-left-s0.mp4"
    gone.unlink()
    assert main(["render", *FAST, "--dense", "--prompts", str(_prompts(tmp_path)), "--out", str(out)]) == 0
    assert [r["status"] for r in _summary(out)] == ["skipped", "ok", "skipped"]
    assert len(list(iio.imiter(gone))) == 5


def test_rerun_with_compare_dense_needs_the_dense_output_too(tmp_path: Path, monkeypatch) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red ball\n")
    out = tmp_path / "out"
    argv = ["render", *FAST, "--compare-dense", "--prompts", str(prompts), "--out", str(out)]
    assert main(argv) == 0
    dense = out / "0000-a-red-ball-s0.dense.mp4"
    assert dense.is_file()
    dense.unlink()
    assert main(argv) == 0
    assert [r["status"] for r in _summary(out)] == ["ok"] and dense.is_file()

    def no_load(*args, **kwargs):
        raise AssertionError("a finished item must not load the model again")

    monkeypatch.setattr(Recipe, "load", no_load)
    assert main(argv) == 0
    assert [r["status"] for r in _summary(out)] == ["skipped"]


def test_a_sidecar_missing_keys_does_not_mark_its_item_done(rendered: Path, tmp_path: Path) -> None:
    # A sidecar without every key of SIDECAR_KEYS (an older sparsediff's, or one cut by hand) is not trusted.
    out = _copy(rendered, tmp_path / "out")
    sidecar = out / "0002-green-triangle-spins-s0.json"
    data = json.loads(sidecar.read_text())
    del data["versions"]
    sidecar.write_text(json.dumps(data))
    assert main(["render", *FAST, "--dense", "--prompts", str(_prompts(tmp_path)), "--out", str(out)]) == 0
    assert [r["status"] for r in _summary(out)] == ["skipped", "skipped", "ok"]
    assert SIDECAR_KEYS <= json.loads(sidecar.read_text()).keys()


def test_what_makes_an_earlier_sidecar_stale(render_plan, tmp_path: Path) -> None:
    from sparsediff.pipelines.render import _changes

    layer = {"heads": 2, "cdf_threshold": [0.9, 0.9], "sim_threshold": [0.0, 0.0]}
    profile = {"format_version": 1, "model_id": "", "family": "wan",
               "layers": {"transformer.blocks.0.attn1.processor": layer}}
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile))
    plan = render_plan("--model", "tiny-wan", "--profile", str(path))
    item = plan.items[0]
    # As read back from the sidecar an earlier run wrote.
    earlier = json.loads(json.dumps({"prompt": item.prompt, "negative_prompt": item.negative_prompt,
                                     "seed": item.seed, "settings": item.settings(plan)}))
    assert _changes(plan, item, earlier) == []

    def changes(*argv: str) -> list[str]:
        again = render_plan("--model", "tiny-wan", "--profile", str(path), *argv)
        return _changes(again, again.items[0], earlier)

    assert changes("--guidance-scale", "7.25") == ["guidance_scale"]
    assert changes("--cdf-threshold", "0.5") == ["cdf_threshold"]
    # The same profile path with other thresholds in it: its hash changed.
    path.write_text(json.dumps({**profile, "layers": {"transformer.blocks.0.attn1.processor": {
        **layer, "cdf_threshold": [0.8, 0.8]}}}))
    assert changes() == ["profile_sha256"]
    path.write_text(json.dumps(profile))
    # A prompt differing only where its slug does not (same file name) is another prompt.
    assert slugify("A red ball!") == slugify(item.prompt)
    assert _changes(plan, item, {**earlier, "prompt": "A red ball!"}) == ["prompt"]


def test_summary_rows_are_in_index_order_and_identical_frames_read_inf(render_plan, tmp_path: Path) -> None:
    from sparsediff.pipelines.render import _row, _write_summary

    plan = render_plan("--model", "tiny-wan")
    item = plan.items[0]
    sidecar = {"wall_time_s": 1.0, "sparsity": 0.5, "peak_gpu_memory_bytes": None,
               "compare_dense": {"psnr_db": None, "frames_identical": True, "ssim": 1.0}}
    assert _row(item, plan, "ok", sidecar)["psnr_db"] == "inf"  # JSON's null, not a blank cell
    # Indices past 9 sort as numbers, also where a merge read them back from the processes' CSV parts as text.
    rows = [{"index": i, "status": "ok"} for i in ("10", "2", "1", "11")]
    _write_summary(tmp_path / "s.csv", rows)
    with open(tmp_path / "s.csv", newline="") as f:
        assert [r["index"] for r in csv.DictReader(f)] == ["1", "2", "10", "11"]


def test_merged_summary_of_several_processes_says_whether_any_item_failed(tmp_path: Path) -> None:
    from sparsediff.pipelines.render import _merge_summaries

    header = "index,status,prompt\n"
    (tmp_path / "summary.rank0-of-2.csv").write_text(header + "0,ok,a\n2,ok,c\n")
    (tmp_path / "summary.rank1-of-2.csv").write_text(header + "1,failed,b\n")
    assert _merge_summaries(tmp_path, 2) is True  # the exit code of a multi-process batch with a failure is 1
    assert [(r["index"], r["status"]) for r in _summary(tmp_path)] == [("0", "ok"), ("1", "failed"), ("2", "ok")]
    assert not list(tmp_path.glob("summary.rank*"))
    (tmp_path / "summary.rank0-of-2.csv").write_text(header + "0,ok,a\n")
    (tmp_path / "summary.rank1-of-2.csv").write_text(header + "1,skipped,b\n")
    assert _merge_summaries(tmp_path, 2) is False
