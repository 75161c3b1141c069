"""The `sparsediff` command. Each subcommand lives in its own module, imported only when used."""
from __future__ import annotations

import argparse
import importlib
import itertools
import os
import sys

# (words, module, help). Each module defines `add_arguments(parser)` and `run(args) -> int`.
COMMANDS: list[tuple[tuple[str, ...], str, str]] = [
    (("bench", "kernel"), "sparsediff.bench.kernel", "time block_sparse_attention against cuDNN SDPA, FA2 SDPA and FlexAttention"),
    (("render",), "sparsediff.pipelines.render", "batch-render a prompt file with a model recipe, sparse or dense; resumable, multi-GPU"),
    (("models",), "sparsediff.pipelines.recipes", "list the model recipes usable with --model"),
    (("calibrate",), "sparsediff.calibration.cli", "find per-layer/per-head sparsity thresholds within an error budget; writes a profile"),
    (("calibrate-sweep",), "sparsediff.calibration.sweep", "the sparsity-quality curve: one calibrated, validated profile per error budget; JSON + plot"),
    (("bench", "predict"), "sparsediff.bench.predict", "block-mask predictors vs the oracle: sparsity at an error budget, P·V skip, overhead and speed vs cuDNN"),
    (("bench", "e2e"), "sparsediff.bench.e2e", "one transformer forward at real configs: dense (cuDNN SDPA) vs sparse; time, sparsity, error"),
    (("demo",), "sparsediff.apps.demo", "Gradio page: one prompt rendered dense and sparse side by side, with times, sparsity, PSNR/SSIM"),
]


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The whole command line; with `argv`, only the subcommand it names gets its options (its module
    imported), so that `sparsediff --help` and one command's start do not import every command's."""
    chosen = None
    if argv is not None:
        asked = tuple(itertools.takewhile(lambda arg: not arg.startswith("-"), argv))
        chosen = next((cmd for cmd, _, _ in COMMANDS if asked[: len(cmd)] == cmd), ())
    parser = argparse.ArgumentParser(prog="sparsediff", description=__doc__)
    top = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for words, module, help_text in COMMANDS:
        subparsers = top
        for i, word in enumerate(words[:-1]):
            key = " ".join(words[: i + 1])
            if key not in groups:
                group = subparsers.add_parser(word, help=f"{word} subcommands")
                groups[key] = group.add_subparsers(dest=f"{word}_command", required=True, metavar="SUBCOMMAND")
            subparsers = groups[key]
        sub = subparsers.add_parser(words[-1], help=help_text, description=help_text)
        sub.set_defaults(_module=module)
        if chosen is None or chosen == words:
            importlib.import_module(module).add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser(argv).parse_args(argv)
        return int(importlib.import_module(args._module).run(args) or 0)
    except ValueError as error:  # an argument found bad after parsing (the benches check theirs in run)
        print(f"sparsediff: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl+C before a command's own handler (imports, planning, loading)
        print("\nsparsediff: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into a reader that stopped (`sparsediff models | head`)
        # Python would report the pipe again when it flushes stdout at exit: point stdout at nowhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports a command a closed pipe stopped


if __name__ == "__main__":
    sys.exit(main())
