"""The Triton kernels fit a Hopper SM (H100/H200: 227 KiB of shared memory a block) at the tile
configs their launchers use, and the FP8 variant's dots are e4m3 wgmma (both operands K-major, V
read transposed); the token gather and the FP8 channel statistics compile too. Compiled ahead of time for sm90 on the CPU (Triton's own ptxas), in a
subprocess: the test session runs Triton as its interpreter, which does not compile."""
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

HOPPER_SHARED_BYTES = 232448  # a block's limit
HOPPER_SM_SHARED_BYTES = 233472  # an SM's
HOPPER_SM_REGISTERS = 65536

COMPILE_SCRIPT = textwrap.dedent("""
    import itertools, json, re, sys
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from sparsediff.kernels import block_select as bs
    from sparsediff.kernels import block_stats as bst
    from sparsediff.kernels import block_sparse_attn as bsa
    from sparsediff.kernels import channel_stats as cs
    from sparsediff.kernels import gather_tokens as gt
    from sparsediff.kernels import quantize_fp8 as qf
    from sparsediff.kernels import row_order as ro

    target = GPUTarget("cuda", 90, 32)

    waits_first = {}

    def compile_kernel(fn, constexprs, pointers, int_args_aligned, **options):
        constexprs = {**constexprs, "PDL": True}
        signature = {}
        for name in fn.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name in pointers:
                signature[name] = pointers[name]
            else:
                signature[name] = "fp32" if "scale" in name or "threshold" in name else "i32"
        # Every runtime int 16-divisible: the specialisation that vectorises loads and pipelines most.
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
                 if (signature[name] == "i32" or signature[name].startswith("*")) and int_args_aligned}
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=target, options=options)
        ptx = compiled.asm["ptx"]
        # As launched on Hopper (programmatic dependent launch): the wait for the kernel before
        # comes ahead of the first global memory access, and the next kernel is let launch.
        wait = ptx.find("griddepcontrol.wait")
        access = re.search(r"\\b(ld|st|atom|red|cp\\.async)(\\.[\\w:]+)*\\.global|cp\\.async\\.bulk", ptx)
        waits_first[fn.__name__] = (0 <= wait < (access.start() if access else len(ptx))
                                    and "griddepcontrol.launch_dependents" in ptx)
        return compiled.metadata.shared, sorted(set(re.findall(r"wgmma\\.mma_async[\\w.]*", ptx)))

    rows = []
    for dtype, dot_fp32, s, rk in (("bf16", False, 1, 64), ("fp32", True, 1, 64), ("fp32", True, 1, 1),
                                   ("bf16", False, 8, 8), ("fp32", True, 8, 8)):
        for long_keys, loop in itertools.product((False, True), (True, False)):
            config = bs.PARTIAL_CONFIGS[2 if dtype == "bf16" else 4, long_keys]
            consts = dict(D=128, DP=128, S=s, RK=rk, K_TOKENS=64 // rk, QT=config.query_rows, KT=bs.KEY_ROWS,
                          HAS_LENS=True, HAS_TRUST=rk == 1, DOT_FP32=dot_fp32, HAS_Q_ROWS=s == 1,
                          sqd=1, skd=1)
            if not loop:
                consts["tiles_per_program"] = 1
            # S == 1 reads its key tiles through a tensor descriptor, strided rows through a pointer.
            keys = f"tensordesc<{dtype}[1,1,{bs.KEY_ROWS},128]>" if s == 1 else "*" + dtype
            pointers = {"q_ptr": "*" + dtype, "q_rows_ptr": "*i64", "k_src": keys, "lens_ptr": "*i32",
                        "trust_ptr": "*i8", "part_ptr": "*fp32", "tmax_ptr": "*fp32"}
            shared, _ = compile_kernel(bs._partial_mass_kernel, consts, pointers, True,
                                       num_warps=config.num_warps, num_stages=config.num_stages)
            rows.append(["partial_mass", dtype, s, rk, long_keys, loop, shared])
    nkp, sr, warps = bs._select_geometry(bs.MAX_KEY_BLOCKS)
    pointers = {"part_ptr": "*fp32", "tmax_ptr": "*fp32", "thr_ptr": "*fp32", "mass_ptr": "*fp32", "mask_ptr": "*i8",
                "kv_lens_ptr": "*i32", "dense_rows_ptr": "*i8", "dense_cols_ptr": "*i8", "counts_ptr": "*i32",
                "indices_ptr": "*i16"}
    for rq in (1, 2, 16):  # the first threshold's selection, which builds its lookup table too
        shared, _ = compile_kernel(bs._combine_select_kernel,
                                   dict(RQ=rq, KB=64, NKP=nkp, SR=sr, SELECT=True, LUT=True, BLOCK_N=bsa.BLOCK_N,
                                        HAS_KV_LENS=True, HAS_DENSE_ROWS=True, HAS_DENSE_COLS=True),
                                   pointers, True, num_warps=warps)
        rows.append(["combine_select", "fp32", 1, rq, False, shared])
    # Each declared config with and without the P·V skip (pv_threshold; it keeps the running maximum).
    for ((arch, head_dim, dtype), config), pv_skip in itertools.product(bsa.TILE_CONFIGS.items(), (False, True)):
        name = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float8_e4m3fn": "fp8e4nv"}[str(dtype)]
        fp8 = name == "fp8e4nv"
        tma = bsa.uses_tma(config, fp8)
        # FP8 reads V transposed, (B, H, D, N): its key stride is 1.
        consts = dict(HEAD_D=head_dim, BLOCK_D=head_dim, BLOCK_M=bsa.BLOCK_M, BLOCK_N=bsa.BLOCK_N,
                      STEP_BLOCKS=config.step_blocks, HAS_KV_LENS=True, PV_SKIP=pv_skip, COUNT_SKIPS=False,
                      DOT_FP32=False, WARP_SPECIALIZE=config.warp_specialize, FP8=fp8, ROUND_E4M3=False,
                      HEAVY_FIRST=config.heavy_rows_first,
                      FIXED_MAX=bsa.uses_fixed_max(config, fp8, 0.01 if pv_skip else None), TMA=tma,
                      stride_qd=1, stride_kd=1, stride_od=1, **({"stride_vn": 1} if fp8 else {"stride_vd": 1}))
        # With TMA the unmasked steps read key and value tiles through descriptors of one key block.
        tiles = f"tensordesc<{name}[1,1,{bsa.BLOCK_N},{head_dim}]>" if tma else "*" + name
        pointers = {"Q": "*" + name, "K": "*" + name, "V": "*" + name, "K_desc": tiles, "V_desc": tiles,
                    "O": "*" + ("bf16" if fp8 else name),
                    "counts_ptr": "*i32", "lut_ptr": "*i16", "order_ptr": "*i32", "kv_lens_ptr": "*i32", "skips_ptr": "*i32",
                    "q_scale_ptr": "*fp32", "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32"}
        shared, mma = compile_kernel(bsa._block_sparse_attn_kernel, consts, pointers, True,
                                     num_warps=config.num_warps, num_stages=config.num_stages,
                                     maxnreg=config.max_registers)
        rows.append(["block_sparse_attn", name, head_dim, config.step_blocks, mma, tma, config.num_warps,
                     config.max_registers, shared])
    consts = dict(HEAD_D=128, BLOCK_D=128, BLOCK_M=bsa.BLOCK_M, BLOCK_N=bsa.BLOCK_N, HAS_KV_LENS=True, ROUND_E4M3=False,
                  stride_qd=1, stride_kd=1, stride_vd=1)
    pointers = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "kv_lens_ptr": "*i32", "k_mean_ptr": "*fp32",
                "v_inv_ptr": "*fp32", "q8_ptr": "*fp8e4nv", "k8_ptr": "*fp8e4nv", "vt_ptr": "*fp8e4nv",
                "q_scale_ptr": "*fp32", "k_scale_ptr": "*fp32"}
    shared, _ = compile_kernel(qf._quantize_fp8_kernel, consts, pointers, True, num_warps=qf.NUM_WARPS)
    rows.append(["quantize_fp8", "bf16", 128, 1, [], shared])
    shared, _ = compile_kernel(cs._channel_partials_kernel,
                               dict(HEAD_D=128, BLOCK_D=128, TILE_ROWS=cs.TILE_ROWS, HAS_KV_LENS=True, stride_kd=1, stride_vd=1),
                               {"k_ptr": "*bf16", "v_ptr": "*bf16", "lens_ptr": "*i32", "k_sum_ptr": "*fp32",
                                "v_max_ptr": "*fp32"}, True, num_warps=cs.PARTIALS_NUM_WARPS)
    rows.append(["channel_partials", "bf16", 128, 1, [], shared])
    shared, _ = compile_kernel(cs._channel_finish_kernel, dict(HEAD_D=128, BLOCK_D=128, HAS_KV_LENS=True),
                               {name: "*fp32" for name in ("k_sum_ptr", "v_max_ptr", "k_mean_ptr", "v_scale_ptr",
                                                           "v_inverse_ptr")} | {"lens_ptr": "*i32"}, True, num_warps=1)
    rows.append(["channel_finish", "fp32", 128, 1, [], shared])
    shared, _ = compile_kernel(ro._heavy_rows_first_kernel, dict(LEVELS_P2=16, CHUNK=ro.CHUNK, HEAD_CHUNK=ro.CHUNK),
                               {"counts_ptr": "*i32", "order_ptr": "*i32"}, False, num_warps=ro.NUM_WARPS)
    rows.append(["heavy_rows_first", "i32", 0, 1, [], shared])
    pointers = {name: "*bf16" for name in ("src0", "src1", "src2", "dst0", "dst1", "dst2")}
    shared, _ = compile_kernel(gt._gather_tokens_kernel, dict(HEAD_D=128, BLOCK_D=128, BLOCK_T=gt.BLOCK_T),
                               {"index_ptr": "*i64", **pointers}, True, num_warps=gt.NUM_WARPS)
    rows.append(["gather_tokens", "bf16", 128, 1, [], shared])
    shared, _ = compile_kernel(bs._select_kernel, dict(NKP=nkp, SR=sr), {"mass_ptr": "*fp32", "thr_ptr": "*fp32",
                                                                         "mask_ptr": "*i8"}, True, num_warps=warps)
    rows.append(["select", "fp32", 0, 1, [], shared])
    lut_rows, lut_warps = bsa._lut_geometry(bs.MAX_KEY_BLOCKS)
    shared, _ = compile_kernel(bsa._build_lut_kernel,
                               dict(BLOCK_N=bsa.BLOCK_N, ROWS=lut_rows, KB_P2=bs.MAX_KEY_BLOCKS, HAS_KV_LENS=True,
                                    HAS_DENSE_ROWS=True, HAS_DENSE_COLS=True, WRITE_MASK=True, stride_mk=1),
                               {"mask_ptr": "*u8", "kv_lens_ptr": "*i32", "dense_rows_ptr": "*i8",
                                "dense_cols_ptr": "*i8", "out_mask_ptr": "*i8", "counts_ptr": "*i32",
                                "indices_ptr": "*i16"}, True, num_warps=lut_warps)
    rows.append(["build_lut", "u8", 0, 1, [], shared])
    shared, _ = compile_kernel(bst._block_stats_kernel,
                               dict(D=128, DP=128, BLOCK=bsa.BLOCK_M, CHUNK=bst.CHUNK_ROWS, POOLED=True, HAS_LENS=True,
                                    BELOW=True, sxd=1),
                               {"x_ptr": "*bf16", "pooled_ptr": "*fp32", "sim_ptr": "*fp32", "lens_ptr": "*i32",
                                "thr_ptr": "*fp32", "below_ptr": "*i8"}, True, num_warps=bst.NUM_WARPS)
    rows.append(["block_stats", "bf16", 128, 1, [], shared])
    print(json.dumps({"rows": rows, "waits_first": waits_first}))
""")


def test_kernels_fit_hopper_shared_memory_and_fp8_dots_are_e4m3_wgmma():
    pytest.importorskip("triton.backends.nvidia")
    from sparsediff.kernels.block_sparse_attn import TILE_CONFIGS

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    rows = result["rows"]
    assert len(result["waits_first"]) == 11 and all(result["waits_first"].values()), result["waits_first"]
    assert len(rows) == 20 + 3 + 2 * len(TILE_CONFIGS) + 8
    too_big = [row for row in rows if row[-1] > HOPPER_SHARED_BYTES]
    assert not too_big, f"kernels asking for more shared memory than an sm90 block has: {too_big}"
    # A config that caps its registers does so to run two programs an SM: registers and shared
    # memory (each block's plus the 1 KiB the driver reserves) must allow it.
    capped = [row for row in rows if row[0] == "block_sparse_attn" and row[7] is not None]
    assert capped, "no attention tile config caps its registers"
    assert any(row[5] for row in capped), "no attention tile config reads its key tiles through TMA"
    for row in capped:
        warps, registers, shared = row[6:]
        assert 2 * warps * 32 * registers <= HOPPER_SM_REGISTERS and 2 * (shared + 1024) <= HOPPER_SM_SHARED_BYTES, row
    fp8 = [row for row in rows if row[:2] == ["block_sparse_attn", "fp8e4nv"]]
    assert fp8, "no FP8 tile config declared for sm90"
    for row in fp8:  # Q·K (n = 64 keys a block) and P·V (n = head dim), both in e4m3
        mma = row[4]
        assert mma and all(re.search(r"\.f32\.e4m3\.e4m3$", m) for m in mma), row
        assert any(f"n{row[2]}k32" in m for m in mma) and any("n64k32" in m for m in mma), row


def test_dependent_launch_is_on_for_capable_gpus_unless_turned_off(monkeypatch):
    import torch

    from sparsediff import kernels

    assert kernels.dependent_launch(torch.device("cpu")) == {"PDL": False, "launch_pdl": False}
    monkeypatch.setattr(kernels, "_pdl_capable", lambda index: index == 0)  # GPU 0 Hopper, GPU 1 older
    monkeypatch.delenv("SPARSEDIFF_PDL", raising=False)
    assert kernels.dependent_launch(torch.device("cuda", 0)) == {"PDL": True, "launch_pdl": True}
    assert kernels.dependent_launch(torch.device("cuda", 1)) == {"PDL": False, "launch_pdl": False}
    monkeypatch.setenv("SPARSEDIFF_PDL", "0")
    assert kernels.dependent_launch(torch.device("cuda", 0)) == {"PDL": False, "launch_pdl": False}
