import os

# Triton kernels run on the CPU interpreter in tests; Triton reads this when kernels are defined,
# so it must be set before sparsediff is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def render_plan(tmp_path):
    """`sparsediff render`'s plan for the given arguments, with a one-prompt file and an output
    folder under tmp_path (the plan is made before any model loads)."""
    import argparse

    from sparsediff.pipelines import render

    def make(*argv: str) -> render.Plan:
        prompts = tmp_path / "plan-prompts.txt"
        prompts.write_text("a red ball\n")
        parser = argparse.ArgumentParser()
        render.add_arguments(parser)
        return render.make_plan(parser.parse_args([*argv, "--prompts", str(prompts), "--out", str(tmp_path / "out")]))

    return make
