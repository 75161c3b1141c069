"""The token gather (Triton interpreter, and the CPU fallback without it) against its torch reference,
over layouts, dtypes and tensor counts."""
import pytest
import torch

from sparsediff.kernels import gather_tokens as gather_tokens_module
from sparsediff.kernels.gather_tokens import gather_tokens
from sparsediff.kernels.gather_tokens_reference import gather_tokens_reference
from sparsediff.layout import stored_bnhd


def _tensor(layout: str, shape: tuple[int, int, int, int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A (B, H, N, D) view stored as `layout`; "odd": (N, D, B, H) storage, strides of no layout."""
    b, h, n, d = shape
    g = torch.Generator().manual_seed(seed)
    if layout == "BNHD":
        return torch.randn(b, n, h, d, generator=g).to(dtype).transpose(1, 2)
    if layout == "BHND":
        return torch.randn(b, h, n, d, generator=g).to(dtype)
    return torch.randn(n, d, b, h, generator=g).to(dtype).permute(2, 3, 0, 1)


@pytest.mark.parametrize("layouts", [("BNHD",) * 3, ("BHND",) * 3, ("BHND", "BNHD", "odd"), ("odd",), ("BNHD", "BHND")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 3, 70, 64), (2, 2, 33, 24)])
@pytest.mark.parametrize("interpret", ["1", "0"], ids=["triton-interpreter", "fallback"])
def test_kernel_equals_reference(layouts, dtype, shape, interpret, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    xs = [_tensor(layout, shape, dtype, seed) for seed, layout in enumerate(layouts)]
    index = torch.randperm(shape[2], generator=torch.Generator().manual_seed(5))
    outs = gather_tokens(xs, index)
    for x, out in zip(xs, outs):
        assert torch.equal(out, gather_tokens_reference(x, index)) and torch.equal(out, x[:, :, index])
        assert stored_bnhd(out) == stored_bnhd(xs[0])  # stored as the first tensor is


@pytest.mark.parametrize("layouts", [("BNHD",) * 3, ("BHND", "odd")])
def test_the_gpus_token_blocks_equal_reference(layouts, monkeypatch):
    # The interpreter copies up to INTERPRETER_BLOCK_T tokens a program; the GPU's BLOCK_T-token
    # programs (70 tokens: three, the last ragged), run by the interpreter, give the same copy.
    monkeypatch.setattr(gather_tokens_module, "triton_interpreting", lambda: False)
    xs = [_tensor(layout, (2, 3, 70, 24), torch.bfloat16, seed) for seed, layout in enumerate(layouts)]
    index = torch.randperm(70, generator=torch.Generator().manual_seed(5))
    for x, out in zip(xs, gather_tokens(xs, index)):
        assert torch.equal(out, x[:, :, index])


@pytest.mark.parametrize("interpret", ["1", "0"], ids=["triton-interpreter", "fallback"])
def test_a_shorter_index_and_given_outputs_are_written_in_place(interpret, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    xs = [_tensor("BHND", (1, 2, 40, 16), torch.float32, seed) for seed in range(3)]
    index = torch.tensor([39, 0, 7, 7, 12])  # any int64 index, repeats included
    outs = [torch.full((1, 5, 2, 16), float("nan")).transpose(1, 2) for _ in xs]  # stored (B, N, H, D)
    pointers = [o.data_ptr() for o in outs]
    assert gather_tokens(xs, index, outs=outs) == outs
    assert [o.data_ptr() for o in outs] == pointers
    for x, out in zip(xs, outs):
        assert torch.equal(out, x[:, :, index])


def test_a_strided_index_is_read_as_its_values():
    x = _tensor("BHND", (1, 2, 50, 16), torch.float32, 0)
    index = torch.randperm(50, generator=torch.Generator().manual_seed(5)).repeat_interleave(2)[::2]  # stride 2
    assert torch.equal(gather_tokens([x], index)[0], x[:, :, index])


def test_bad_arguments_are_refused():
    x = torch.randn(1, 2, 8, 16)
    index = torch.arange(8)
    with pytest.raises(ValueError, match="1 to 3 tensors"):
        gather_tokens([x] * 4, index)
    with pytest.raises(ValueError, match="one shape, dtype and device"):
        gather_tokens([x, x.half()], index)
    with pytest.raises(ValueError, match="index must be an int64"):
        gather_tokens([x], index.int())
    with pytest.raises(ValueError, match="outs must be 1 tensors of shape"):
        gather_tokens([x], index, outs=[torch.empty(1, 2, 7, 16)])
