"""The inference engine's options: their values, and the command-line flags that set them.

``kitseg-train evaluate`` and ``kitseg-predict`` run the same :class:`segcore.inference.Engine`
from two packages that may not import each other, so their engine flags are declared here once
(``add_engine_arguments``), and the service's settings (``app.settings``) name the same values (a
test compares them). This module imports no torch, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from typing import Any

#: ``Engine(precision=...)``. auto: bf16 on CUDA and on CPUs with native bf16, fp32 on other CPUs.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: ``Engine(backend=...)``. auto: ONNX Runtime for fp32 on CPU when it is installed, torch otherwise.
BACKENDS = ("auto", "torch", "onnxruntime")
#: ``Engine(compile=...)``. auto: on for torch bf16 on a CPU with a C++ compiler.
COMPILE_MODES = ("auto", "on", "off")
#: the :class:`~segcore.inference.Engine` keyword arguments that :func:`add_engine_arguments` sets.
ENGINE_FLAGS = ("device", "precision", "backend", "batch_size", "mirror", "body_crop", "compile")


def int_from(lo: int) -> Callable[[str], int]:
    """argparse type for a whole number >= ``lo`` (a count, a size, an index)."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {text}")
        return v

    return parse


def add_engine_arguments(
    parser: argparse.ArgumentParser, *, batch_size: int, notes: Mapping[str, str] | None = None
) -> None:
    """Add the engine's flags (:data:`ENGINE_FLAGS`) to ``parser``, with the service's defaults
    but ``batch_size`` and compiling (off: a command line segments one set of volumes).

    ``notes``: text to append to a flag's help, by its :data:`ENGINE_FLAGS` name.
    """
    extra = dict(notes or {})
    unknown = set(extra) - set(ENGINE_FLAGS)
    if unknown:
        raise ValueError(f"notes for flags that don't exist: {sorted(unknown)}")

    def help_for(name: str, text: str) -> str:
        return f"{text} {extra[name]}" if name in extra else text

    parser.add_argument("--device", default="auto", help=help_for("device", "auto (CUDA when available), cpu or cuda"))
    parser.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help=help_for(
            "precision",
            "auto: bf16 on CUDA and on CPUs with native bf16 (AVX-512 BF16 or AMX), fp32 on other CPUs; fp16 on CUDA only",
        ),
    )
    parser.add_argument(
        "--backend",
        default="auto",
        choices=BACKENDS,
        help=help_for("backend", "auto: ONNX Runtime for fp32 on CPU when installed (kitseg[onnx]), torch otherwise"),
    )
    parser.add_argument(
        "--batch-size",
        type=int_from(1),
        default=batch_size,
        help=help_for("batch_size", "slices per forward pass; bounds activation memory"),
    )
    parser.add_argument(
        "--mirror",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=help_for(
            "mirror",
            "test-time mirroring, as the service does by default: average the logits with those of the "
            "left-right flipped input (2x model time)",
        ),
    )
    parser.add_argument(
        "--body-crop",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=help_for(
            "body_crop",
            "as the service does by default: run the network only on the box around the body (above the "
            "checkpoint's lower HU clip) plus a margin, background outside; --no-body-crop for whole slices",
        ),
    )
    parser.add_argument(
        "--compile",
        choices=COMPILE_MODES,
        default="off",
        help=help_for(
            "compile",
            "torch.compile the network before the first volume (the same masks; 10-40 s of compiling on a "
            "2-core CPU, so it pays off over dozens of volumes). auto: on for torch bf16 on CPU with a C++ "
            "compiler, as the service does",
        ),
    )


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`~segcore.inference.Engine` keyword arguments parsed by :func:`add_engine_arguments`."""
    return {name: getattr(args, name) for name in ENGINE_FLAGS}
