"""Where kernels can run, and log-once messages for fallbacks."""
from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger("sparsediff")

_said: set[str] = set()


def triton_interpreting() -> bool:
    """True when Triton kernels run on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kernels_available(device: torch.device) -> bool:
    """Whether our Triton kernels can run on tensors living on `device`."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and triton_interpreting()


def warn_once(cause: str, message: str) -> None:
    """Log `message` the first time `cause` is seen in this process."""
    if cause not in _said:
        _said.add(cause)
        logger.warning(message)
