"""Triton launches on the current CUDA device: the public entry points make the device of their
tensors current first, so that a pipeline spread over several GPUs (device_map) runs each call on
the GPU its tensors live on. Checked on the CPU with a stand-in for a tensor on cuda:1 and a
recording stand-in for torch.cuda.device (cuda:0 current)."""
import contextlib
from unittest import mock

import pytest
import torch

from sparsediff import attention
from sparsediff._runtime import on_tensor_device
from sparsediff.kernels import block_sparse_attn
from sparsediff.processors.controller import AttentionController


@pytest.fixture
def entered(monkeypatch):
    devices = []

    @contextlib.contextmanager
    def device(d):
        devices.append(d)
        yield

    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    return devices


def _cuda_tensor(index: int) -> mock.MagicMock:
    t = mock.MagicMock(spec=torch.Tensor)
    t.device = torch.device("cuda", index)
    return t


def test_the_first_tensor_argument_picks_the_device(entered):
    seen = []
    guarded = on_tensor_device(lambda *args, **kwargs: seen.append((args, kwargs)) or "out")
    x = _cuda_tensor(1)
    assert guarded("layer", x, _cuda_tensor(0), scale=2.0) == "out"
    assert entered == [torch.device("cuda", 1)]
    assert guarded(q=x) == "out" and entered[-1] == torch.device("cuda", 1)  # keyword tensors too
    assert len(seen) == 2
    assert guarded(_cuda_tensor(0)) == "out" and len(entered) == 2  # cuda:0 is current: nothing to switch


def test_cpu_tensors_and_no_tensors_leave_the_device_alone(entered):
    guarded = on_tensor_device(lambda *args: len(args))
    assert guarded(torch.zeros(1), 3) == 2
    assert guarded("no tensor") == 1
    assert entered == []


@pytest.mark.parametrize("fn", [attention.predict_block_mask, attention.predict_block_masks,
                                attention.sparse_attention, block_sparse_attn.block_sparse_attention,
                                AttentionController.attend])
def test_public_entry_points_are_guarded(fn):
    assert fn.__code__ is on_tensor_device(lambda: None).__code__, f"{fn.__qualname__} is not on_tensor_device"
    assert fn.__wrapped__.__name__ == fn.__name__
