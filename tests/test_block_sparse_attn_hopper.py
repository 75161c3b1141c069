"""The Gluon Hopper kernel (`block_sparse_attn_hopper`): which calls it takes, how `attention_from_lut`
routes to it, that both its grids (one program a row, persistent) build for sm90 within an SM's resources
(on the CPU, Triton's own ptxas), that their barrier protocol holds (a CPU model of it), and on a Hopper
GPU their output against the torch reference over layouts, dtypes, ragged lengths, kv_lens, rows that
keep nothing and both row orders. Gluon has no interpreter: the CPU cannot run it."""
import json
import os
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

hopper = pytest.importorskip("sparsediff.kernels.block_sparse_attn_hopper")
from sparsediff.kernels import block_sparse_attn as bsa  # noqa: E402

HOPPER_SHARED_BYTES = 232448  # a block's limit


def _bhnd(B=2, H=3, N=300, D=128, dtype=torch.bfloat16):
    return torch.randn(B, H, N, D, dtype=dtype)


def _bnhd(B=2, H=3, N=300, D=128, dtype=torch.bfloat16):
    return torch.randn(B, N, H, D, dtype=dtype).transpose(1, 2)


def test_row_geometry_of_the_layouts_processors_pass():
    # (B, H, N, D) contiguous: every slice is N whole rows of D.
    assert hopper._row_geometry(_bhnd()) == (2 * 3 * 300, 128)
    # (B, N, H, D) viewed as (B, H, N, D): rows of H * D, the heads side by side.
    assert hopper._row_geometry(_bnhd()) == (2 * 300, 3 * 128)
    # Padded rows (a slice of a wider buffer): rows of the buffer's stride, slices at whole rows.
    padded = torch.randn(2, 3, 300, 192, dtype=torch.bfloat16)[..., :128]
    assert hopper._row_geometry(padded) == (2 * 3 * 300, 128)
    # No row view: the head dim not contiguous, or heads interleaved within a row's D.
    assert hopper._row_geometry(_bhnd().transpose(2, 3)[..., :128, :]) is None
    interleaved = torch.randn(2, 300, 128, 3, dtype=torch.bfloat16).permute(0, 3, 1, 2)
    assert hopper._row_geometry(interleaved) is None
    assert hopper._row_geometry(_head_offset_by_half_a_row()) is None


def _head_offset_by_half_a_row():
    # Aligned for TMA, but each head starts half a row in: its rows straddle the row view's rows.
    storage = torch.randn(2 * 3 * 300 * 128 + 4096, dtype=torch.bfloat16)
    return storage.as_strided((2, 3, 300, 128), (3 * 300 * 128 + 1024, 300 * 128 + 64, 128, 1))


@pytest.mark.parametrize("make", [_bhnd, _bnhd, lambda: torch.randn(2, 3, 300, 192, dtype=torch.bfloat16)[..., :128]])
def test_row_view_holds_every_slice_where_the_kernel_reads_it(make):
    # The kernel reads slice (b, h) at row offset // stride(2) and column offset % stride(2) of this view,
    # offset = b * stride(0) + h * stride(1) (`_slice_origin`), N rows of D columns from there.
    t = make()
    n_rows, width = hopper._row_geometry(t)
    view = t.as_strided((n_rows, width), (t.stride(2), 1))
    B, H, N, D = t.shape
    for b in range(B):
        for h in range(H):
            row, col = divmod(b * t.stride(0) + h * t.stride(1), t.stride(2))
            assert torch.equal(view[row:row + N, col:col + D], t[b, h])


@pytest.mark.parametrize(
    "change, reason",
    [
        (lambda q, k, v: (q[..., :64], k[..., :64], v[..., :64]), "head dim 64"),
        (lambda q, k, v: (q.float(), k.float(), v.float()), "dtype torch.float32"),
        (lambda q, k, v: (_head_offset_by_half_a_row(), k, v), "q: strides"),
        (lambda q, k, v: (q, k, v.transpose(1, 2).contiguous().transpose(1, 2)), "k and v strides differ"),
        (lambda q, k, v: (q, k, v), "not a Hopper"),  # a good call, but on the CPU
    ],
)
def test_hopper_unsupported_names_the_reason(change, reason):
    q, k, v = change(_bhnd(), _bhnd(), _bhnd())
    assert reason in hopper.hopper_unsupported(q, k, v, torch.empty_like(q))


@pytest.mark.parametrize("heavy_rows_first", [True, False])
def test_attention_from_lut_routes_to_the_hopper_kernel(monkeypatch, heavy_rows_first):
    q, k, v = _bhnd(N=256), _bhnd(N=256), _bhnd(N=256)
    mask = torch.rand(2, 3, 2, 4) < 0.5
    lut = bsa.build_block_lut(mask, 256)
    calls = []
    monkeypatch.setattr(hopper, "hopper_unsupported", lambda *args: None)

    def launch(q_, k_, v_, out, counts, indices, order, scale, kv_lens):
        calls.append((order, scale, kv_lens))
        out.fill_(7.0)

    monkeypatch.setattr(hopper, "block_sparse_attention_hopper", launch)
    config = bsa.TileConfig(step_blocks=1, num_warps=4, num_stages=2, heavy_rows_first=heavy_rows_first, hopper=True)
    lens = torch.tensor([256, 100], dtype=torch.int32)
    out, skips = bsa.attention_from_lut(q, k, v, lut, 0.5, kv_lens=lens, config=config, return_pv_skips=True)
    assert len(calls) == 1 and bool((out == 7.0).all()) and not skips.any()
    order, scale, kv_lens = calls[0]
    assert (order is lut.order) == heavy_rows_first and (order is None) == (not heavy_rows_first)
    assert scale == 0.5 and kv_lens is lens
    # What it does not implement goes to the Triton kernel: P·V skipping, FP8, a config without it.
    for kwargs in ({"pv_threshold": 0.01}, {"config": bsa.TileConfig(step_blocks=1, num_warps=4, num_stages=2)}):
        bsa.attention_from_lut(q, k, v, lut, 0.5, **({"config": config} | kwargs))
    assert len(calls) == 1
    assert not bsa.uses_hopper_kernel(config, q, k, v, q, True, None)


def test_declared_hopper_tiles_are_d128_sm90_bf16_and_fp16():
    hoppers = {key for key, config in bsa.TILE_CONFIGS.items() if config.hopper}
    assert hoppers == {("sm90", 128, torch.bfloat16), ("sm90", 128, torch.float16)}
    # It reads the Triton kernel's LUT: its blocks must be the LUT's.
    assert (2 * hopper.HALF, hopper.KEY_BLOCK) == (bsa.BLOCK_M, bsa.BLOCK_N)


COMPILE_SCRIPT = textwrap.dedent("""
    import json, re, subprocess, tempfile
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type
    from sparsediff.kernels import block_sparse_attn_hopper as hk

    rows = []
    builds = ((hk._block_sparse_attn_hopper_kernel, torch.bfloat16, True, True, {}),
              (hk._block_sparse_attn_hopper_kernel, torch.float16, False, False, {}),
              (hk._block_sparse_attn_hopper_persistent_kernel, torch.bfloat16, True, True, {"DYNAMIC": True}),
              (hk._block_sparse_attn_hopper_persistent_kernel, torch.float16, False, False, {"DYNAMIC": False}))
    for kernel, dtype, kv_lens, heavy, grid in builds:
        x = torch.zeros(2, 3, 256, 128, dtype=dtype)
        signature = {name: mangle_type(hk._descriptor(x, rows_)) for name, rows_ in
                     (("q_desc", hk.HALF), ("k_desc", hk.KEY_BLOCK), ("v_desc", hk.KEY_BLOCK), ("o_desc", hk.HALF))}
        signature.update(o_ptr="*bf16" if dtype == torch.bfloat16 else "*fp16", counts_ptr="*i32", lut_ptr="*i16",
                         order_ptr="*i32", kv_lens_ptr="*i32", work_ptr="*i32", qk_scale="fp32")
        constexprs = {"HAS_KV_LENS": kv_lens, "HEAVY_FIRST": heavy, "STAGES": hk.STAGES, **grid}
        signature = {name: signature.get(name, "constexpr" if name in constexprs else "i32")
                     for name in kernel.arg_names}
        src = GluonASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": 4, "maxnreg": hk.LAUNCH_REGISTERS})
        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
            f.write(compiled.asm["ptx"])
            f.flush()
            report = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", "-o", "/dev/null", f.name],
                                    capture_output=True, text=True, check=True)
        text = report.stdout + report.stderr
        spills = sum(int(n) for n in re.findall(r"(\\d+) bytes spill stores", text))
        registers = int(re.search(r"Used (\\d+) registers", text).group(1))
        ptx = compiled.asm["ptx"]
        setmaxnreg = sorted(set(re.findall(r"setmaxnreg\\.\\w+\\.sync\\.aligned\\.u32\\s+(\\d+)", ptx)))
        rows.append({"kernel": kernel.__name__, "grid": grid, "dtype": str(dtype), "shared": compiled.metadata.shared,
                     "spill_bytes": spills, "registers": registers, "setmaxnreg": setmaxnreg,
                     "wgmma": sorted(set(re.findall(r"wgmma\\.mma_async[\\w.]*", ptx))),
                     "atomics": re.findall(r"atom\\.global\\.[\\w.]+", ptx)})
    print(json.dumps(rows))
""")


def _run_compiled(script: str) -> list:
    """The JSON that `script` prints last, run in a subprocess with Triton compiling (the test session
    runs its interpreter, and Gluon has none)."""
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_hopper_kernel_builds_for_sm90_within_an_sms_resources():
    pytest.importorskip("triton.backends.nvidia")
    rows = _run_compiled(COMPILE_SCRIPT)
    assert len(rows) == 4
    for row in rows:
        persistent = "persistent" in row["kernel"]
        # Two stages of two 128 x 128 tiles (K and V) and the query block (two with the persistent grid:
        # the next row's Q loads while this row finishes): 160 or 192 KiB, and the barriers.
        assert (192 if persistent else 160) * 1024 <= row["shared"] <= HOPPER_SHARED_BYTES, row
        # Launched at LAUNCH_REGISTERS; the partitions then trade registers (producer down, consumers up).
        assert row["registers"] <= hopper.LAUNCH_REGISTERS, row
        traded = {str(hopper.PRODUCER_REGISTERS.value), str(hopper.CONSUMER_REGISTERS.value)}
        assert traded <= set(row["setmaxnreg"]), row
        assert row["spill_bytes"] <= 16, row  # Triton 3.6's build spills a word; none on the loop's path
        dtype = "bf16" if "bfloat16" in row["dtype"] else "f16"
        assert any(f"m64n128k16.f32.{dtype}.{dtype}" in m for m in row["wgmma"]), row
        # The dynamic grid's counter: one relaxed fetch-and-add a row, the finishing count, the reset.
        want = (["atom.global.gpu.relaxed.add.u32", "atom.global.gpu.acq_rel.add.u32"]
                + ["atom.global.gpu.relaxed.exch.b32"] * 2) if row["grid"].get("DYNAMIC") else []
        assert row["atomics"] == want, row


def test_barrier_protocol_holds_and_its_check_catches_each_mutation():
    # The CPU model of both grids' barriers (scripts/hopper_protocol_check.py): it asserts the kernel's
    # protocol passes every case and that each deliberate error in MUTATIONS fails one.
    check = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "hopper_protocol_check.py"))
    check["main"](interleavings=60)


def test_persistent_launch_rejects_a_grid_of_no_programs():
    q = _bhnd(N=256)
    counts, indices = torch.ones(2, 3, 2, dtype=torch.int32), torch.zeros(2, 3, 2, 4, dtype=torch.int16)
    with pytest.raises(ValueError, match="programs must be None or at least 1, got 0"):
        hopper.block_sparse_attention_hopper(q, q, q, torch.empty_like(q), counts, indices, None, 1.0, programs=0)


GPU_SCRIPT = textwrap.dedent("""
    import itertools, json, torch
    from sparsediff.kernels import block_sparse_attn as bsa
    from sparsediff.kernels import block_sparse_attn_hopper as hk
    from sparsediff.kernels.block_sparse_attn_reference import block_sparse_attention_reference
    from sparsediff.metrics import relative_l1

    torch.manual_seed(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    results = []
    for dtype, layout, (n_q, n_k), lens, heavy in itertools.product(
            (torch.bfloat16, torch.float16), ("bhnd", "bnhd"), ((1024, 1024), (1000, 1000), (300, 777), (128, 64)),
            (False, True), (True, False)):
        B, H = 2, 3
        def make(n):
            x = torch.randn(B, n, H, 128, device="cuda", dtype=dtype)
            return x.transpose(1, 2) if layout == "bnhd" else x.transpose(1, 2).contiguous()
        q, k, v = make(n_q), make(n_k), make(n_k)
        kb = -(-n_k // bsa.BLOCK_N)
        mask = torch.rand(B, H, -(-n_q // bsa.BLOCK_M), kb, device="cuda") < 0.45
        mask[0, 0, 0] = False  # a row that keeps nothing
        mask[0, 1, 0] = True  # a row that keeps everything
        if kb > 1:
            mask[1, 2, -1] = False
            mask[1, 2, -1, :3] = True  # an odd count
        kv_lens = torch.tensor([n_k, max(1, n_k * 2 // 3 - 5)], device="cuda", dtype=torch.int32) if lens else None
        config = bsa.TileConfig(step_blocks=1, num_warps=8, num_stages=2, heavy_rows_first=heavy, hopper=True)
        lut = bsa.build_block_lut(mask, n_k, kv_lens)
        out = torch.empty_like(q)
        assert hk.hopper_unsupported(q, k, v, out) is None, hk.hopper_unsupported(q, k, v, out)
        assert bsa.uses_hopper_kernel(config, q, k, v, out, False, None)
        got = bsa.attention_from_lut(q, k, v, lut, 128 ** -0.5, kv_lens=kv_lens, config=config)
        want = block_sparse_attention_reference(q, k, v, mask, 128 ** -0.5, block_m=bsa.BLOCK_M, block_n=bsa.BLOCK_N,
                                                kv_lens=kv_lens)
        # The persistent grids compute each row as one program a row does: bit for bit the same output,
        # one program taking every row (its buffers wrap many times), or a few taking rows from the counter.
        persistent_equal = []
        for programs, dynamic in ((1, False), (5, True), (sms, True)):
            other = torch.empty_like(q)
            hk.block_sparse_attention_hopper(q, k, v, other, lut.counts, lut.indices, lut.order if heavy else None,
                                             128 ** -0.5, kv_lens, programs=programs, dynamic=dynamic)
            persistent_equal.append(torch.equal(other, got))
        torch.cuda.synchronize()
        results.append({"case": [str(dtype), layout, n_q, n_k, lens, heavy],
                        "rel_l1": float(relative_l1(got.float(), want.float())),
                        "max_abs": (got.float() - want.float()).abs().max().item(),
                        "finite": bool(got.isfinite().all()), "strides_kept": got.stride() == q.stride(),
                        "persistent_equal": all(persistent_equal),
                        "counters_zero": all(not c.any() for c in hk._WORK_COUNTERS.values())})
    print(json.dumps(results))
""")


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="needs a Hopper (sm90) GPU")
def test_hopper_kernel_matches_the_reference_on_the_gpu():
    results = _run_compiled(GPU_SCRIPT)
    assert len(results) == 64
    print(f"{len(results)} cases: worst rel L1 {max(r['rel_l1'] for r in results):.2e}, "
          f"worst max abs {max(r['max_abs'] for r in results):.2e}")
    bad = [r for r in results if not (r["finite"] and r["strides_kept"] and r["rel_l1"] < 1e-2 and r["max_abs"] < 3e-2
                                      and r["persistent_equal"] and r["counters_zero"])]
    assert not bad, bad
