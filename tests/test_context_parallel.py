"""Sparse attention under diffusers' Ulysses context parallelism: two CPU processes (gloo) against one.

Each multi-process test spawns 2 processes running the tiny models of tests/tiny_models.py (2 heads:
one per rank after the all-to-all) for two steps, the first dense (the stock diffusers
context-parallel path), the second sparse (our all-to-all, then the Triton kernels under the
interpreter), and compares with the same two steps in this process.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import imageio.v3 as iio
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sparsediff import _runtime
from sparsediff.cli import main
from sparsediff.processors import AttentionController, apply, remove
from sparsediff.processors.context_parallel import enable_context_parallel
from sparsediff.profile import SparsityProfile
from tiny_models import GRID, TEXT_TOKENS, TINY

CDF = 0.5  # keeps about 60% of the blocks of the tiny random models
TIMESTEPS = (500.0, 400.0)  # step 0 dense, step 1 sparse (dense_steps=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_steps(family: str, world: int, apply_first: bool = True) -> dict:
    """Outputs, stats and what the hook read, of two forwards of the tiny `family` model."""
    build, make_inputs = TINY[family]
    model = build()
    if world > 1 and not apply_first:
        enable_context_parallel(model, world)
    handle = apply(model, cdf_threshold=CDF, sim_threshold=0.0, dense_steps=1)
    if world > 1 and apply_first:
        enable_context_parallel(model, world)
    seen = []
    begin = handle.controller.begin_forward
    handle.controller.begin_forward = lambda info, *rest: (seen.append((info.grid, info.text_tokens)), begin(info, *rest))
    with torch.no_grad():
        outputs = [model(**make_inputs(model, timestep=t))[0].clone() for t in TIMESTEPS]
    return {"outputs": outputs, "per_step": handle.stats.per_step(),
            "per_layer_head": handle.stats.per_layer_head(), "seen": seen}


def _worker(rank: int, world: int, port: int, family: str, apply_first: bool, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(_two_steps(family, world, apply_first), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    # The rank's result is saved: leave without the interpreter's finalization, in which Gloo's worker
    # threads can abort the process ("terminate called without an active exception"; one CI run in
    # the thirtieth session; pytorch/pytorch#179291 describes the teardown race).
    os._exit(0)


@pytest.fixture
def one_thread():
    """One torch thread here, as in the workers, so that both sides sum in the same order; restored
    after, or every later test of the session would run on one core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("family,apply_first", [("wan", False), ("flux", True)],
                         ids=["wan-enable-then-apply", "flux-apply-then-enable"])
def test_ulysses_two_processes_match_one(family, apply_first, tmp_path, one_thread):
    # Wan: our hook outside diffusers' split hooks; FLUX: inside them, so it must gather the inputs back.
    mp.spawn(_worker, args=(2, _free_port(), family, apply_first, str(tmp_path)), nprocs=2)
    single = _two_steps(family, 1)
    build, make_inputs = TINY[family]
    stock = build()
    with torch.no_grad():
        dense = stock(**make_inputs(stock, timestep=TIMESTEPS[1]))[0]

    assert single["per_step"][0] == 0.0 and single["per_step"][1] > 0.2  # really sparse at step 1
    assert not torch.allclose(single["outputs"][1], dense, atol=1e-4)
    full = {"wan": (GRID, None), "flux": ((1, 2 * GRID[1], GRID[2]), TEXT_TOKENS)}[family]
    assert single["seen"] == [full, full]
    for rank in range(2):
        parallel = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for got, want in zip(parallel["outputs"], single["outputs"]):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        # Every rank counts every head in its place, as one process does.
        torch.testing.assert_close(parallel["per_layer_head"], single["per_layer_head"])
        torch.testing.assert_close(parallel["per_step"], single["per_step"])
        assert parallel["seen"] == single["seen"]  # the grid and text length of the full sequence


def _context_parallel_config(**degrees: int) -> SimpleNamespace:
    from diffusers import ContextParallelConfig

    return SimpleNamespace(context_parallel_config=ContextParallelConfig(**degrees))


@pytest.mark.parametrize("degrees,mask,message", [
    ({"ring_degree": 2}, False, "ring attention"),
    ({"ulysses_degree": 2, "ulysses_anything": True}, False, "'anything' mode"),
    ({"ulysses_degree": 2}, True, "attention mask under context parallelism"),
    ({"ulysses_degree": 3}, False, "not divisible by the Ulysses degree"),
], ids=["ring", "ulysses-anything", "mask", "heads"])
def test_unsupported_context_parallel_runs_the_stock_path_and_says_so(degrees, mask, message, monkeypatch, caplog):
    monkeypatch.setattr(_runtime, "_said", set())
    profile = SparsityProfile.uniform(TINY["wan"][0](), cdf_threshold=CDF, sim_threshold=0.0, dense_steps=0)
    controller = AttentionController(profile)
    layer = controller.layer_names[0]
    q = torch.randn(1, 384, 2, 32)  # a rank's half of the sequence
    stock = torch.randn(1, 384, 2, 32)
    attention_mask = torch.ones(1, 1, 1, 384, dtype=torch.bool) if mask else None
    with caplog.at_level(logging.WARNING, logger="sparsediff"):
        for _ in range(2):
            out = controller.attend(layer, q, q, q, dense=lambda: stock, attention_mask=attention_mask,
                                    parallel_config=_context_parallel_config(**degrees))
            assert out is stock
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and message in messages[0] and "runs dense" in messages[0]
    assert controller.stats.mean_sparsity() == 0.0  # counted as dense calls over the full sequence
    [fallback] = controller.stats.fallback_summary()
    assert fallback["calls"] == 2 and message in fallback["reason"] and fallback["cause"].startswith("cp-")


def test_apply_and_remove_hand_the_parallel_config_and_backend_on():
    # What enable_parallelism / set_attention_backend left on the processors survives the swaps both
    # ways, so apply() may come before or after them and remove() leaves stock processors that work.
    model = TINY["wan"][0]()
    config = object()
    for processor in model.attn_processors.values():
        processor._parallel_config, processor._attention_backend = config, "native"
    stock = dict(model.attn_processors)
    for expected in ("ours", "stock"):
        if expected == "ours":
            apply(model)
        else:
            remove(model)
        for key, processor in model.attn_processors.items():
            assert (processor is stock[key]) == (expected == "stock" or "attn2" in key)
            assert processor._parallel_config is config and processor._attention_backend == "native"


def test_enable_context_parallel_refuses_what_cannot_work():
    with pytest.raises(ValueError, match="HunyuanVideoTransformer3DModel has no context-parallel plan"):
        enable_context_parallel(TINY["hunyuan_video"][0](), 2)
    with pytest.raises(ValueError, match="CogVideoXTransformer3DModel has no context-parallel plan"):
        enable_context_parallel(TINY["cogvideox"][0](), 2)
    with pytest.raises(ValueError, match="ulysses_degree must be an int >= 2 dividing the 2 attention heads"):
        enable_context_parallel(TINY["wan"][0](), 3)


def test_render_context_parallel_errors(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red ball bouncing\n")
    base = ["render", "--prompts", str(prompts), "--out", str(tmp_path / "out")]
    assert main([*base, "--model", "tiny-hunyuanvideo", "--context-parallel", "2"]) == 2
    assert "has no context-parallel plan; supported families: wan, flux" in capsys.readouterr().err
    assert main([*base, "--model", "tiny-cogvideox", "--context-parallel", "2"]) == 2
    assert "tiny-cogvideox is a cogvideox model" in capsys.readouterr().err
    assert main([*base, "--model", "tiny-wan", "--context-parallel", "2", "--num-processes", "3"]) == 2
    assert "--num-processes 3 and --context-parallel 2" in capsys.readouterr().err
    assert main([*base, "--model", "tiny-wan", "--context-parallel", "0"]) == 2


def test_render_context_parallel_matches_one_process(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red ball bouncing\n")
    # tiny-wan at 256x256, 5 frames: 512 tokens; step 0 dense, step 1 sparse; one thread per
    # process in both runs, so float reductions happen in the same order.
    common = ["render", "--model", "tiny-wan", "--steps", "2", "--frames", "5", "--dense-steps", "1",
              "--cdf-threshold", str(CDF), "--sim-threshold", "0", "--prompts", str(prompts)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {"parallel": ["--context-parallel", "2", "--compare-dense"], "single": []}
    for name, extra in runs.items():
        proc = subprocess.run([sys.executable, "-m", "sparsediff", *common, *extra, "--out", str(tmp_path / name)],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]

    name = "0000-a-red-ball-bouncing-s0"
    parallel, single = (json.loads((tmp_path / run / f"{name}.json").read_text()) for run in runs)
    assert parallel["process"] == {"rank": 0, "world_size": 2, "context_parallel": 2}
    assert parallel["sparsity"] == pytest.approx(single["sparsity"]) and single["sparsity"] > 0.2
    np.testing.assert_array_equal(np.stack(list(iio.imiter(tmp_path / "parallel" / f"{name}.mp4"))),
                                  np.stack(list(iio.imiter(tmp_path / "single" / f"{name}.mp4"))))
    # --compare-dense switched the processors back to stock (remove) under context parallelism too.
    assert (tmp_path / "parallel" / f"{name}.dense.mp4").is_file()
    assert parallel["compare_dense"]["relative_l1"] > 0
    assert sorted(p.name for p in (tmp_path / "parallel").glob("summary*")) == ["summary.csv"]
