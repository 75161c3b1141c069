import os

# Triton kernels run on the CPU interpreter in tests; Triton reads this when kernels are defined,
# so it must be set before sparsediff is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
