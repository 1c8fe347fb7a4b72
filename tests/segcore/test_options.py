"""The engine's command-line flags, declared once for kitseg-train evaluate and kitseg-predict."""

from __future__ import annotations

import argparse
import inspect

import pytest

from segcore.inference import Engine
from segcore.options import BACKENDS, COMPILE_MODES, ENGINE_FLAGS, PRECISIONS, add_engine_arguments, engine_options


def parser(batch_size: int = 8) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="t", exit_on_error=False)
    add_engine_arguments(ap, batch_size=batch_size, notes={"backend": "NOTE-XYZ"})
    return ap


def test_the_flags_are_engine_keyword_arguments() -> None:
    # Their defaults are the service's (tests/app/test_api.py compares them with app.settings).
    params = inspect.signature(Engine.__init__).parameters
    got = engine_options(parser(batch_size=3).parse_args([]))
    assert tuple(got) == ENGINE_FLAGS and set(got) <= set(params)
    assert got["batch_size"] == 3 and got["compile"] == "off"


def test_the_flags_parse_and_refuse_what_the_engine_would() -> None:
    ap = parser()
    a = ap.parse_args(["--precision", "bf16", "--backend", "torch", "--batch-size", "4", "--no-mirror"])
    got = engine_options(a)
    assert (got["precision"], got["backend"], got["batch_size"], got["mirror"], got["body_crop"]) == (
        "bf16",
        "torch",
        4,
        False,
        True,
    )
    for bad in (["--batch-size", "0"], ["--batch-size", "x"], ["--precision", "fp8"], ["--compile", "yes"]):
        with pytest.raises((argparse.ArgumentError, SystemExit)):
            ap.parse_args(bad)
    assert "NOTE-XYZ" in ap.format_help()
    with pytest.raises(ValueError, match="nonsense"):
        add_engine_arguments(argparse.ArgumentParser(), batch_size=1, notes={"nonsense": "x"})


def test_the_engine_refuses_values_outside_the_lists() -> None:
    assert "onnxruntime" in BACKENDS and "fp16" in PRECISIONS and "off" in COMPILE_MODES
    for kw in ({"precision": "fp8"}, {"backend": "tensorrt"}, {"compile": "yes"}):
        with pytest.raises(ValueError, match="must be one of"):
            Engine.__new__(Engine).__init__(None, None, None, **kw)  # type: ignore[arg-type, misc]
