"""``torch.compile`` in the engine: the eager engine's masks, one compile paid in the warm-up and
none after it, a fallback to eager when compiling fails, and where ``auto`` turns it on."""

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

import segcore.inference
from segcore.inference import CompiledUNet, Engine
from segcore.io import Volume
from segcore.unet import UNetConfig
from tests.conftest import ORIENTATIONS, make_volume
from tests.segcore.test_ort import _meta, _random_net

CPU = torch.device("cpu")
CFG = UNetConfig(in_slices=3, base_width=4, depth=3)


def _ipl_volume() -> Volume:
    # The KiTS19 layout, (slices, H, W), with 21 slices: batches of 4 end with a batch of 1.
    hu, aff, _ = make_volume(ORIENTATIONS["IPL"], shape_ras=(72, 60, 21))
    hu = hu + np.random.default_rng(0).normal(0, 40, hu.shape).astype(np.float32)
    return Volume(hu, aff, nib.Nifti1Header(), (1.0, 1.0, 1.0))


@pytest.mark.parametrize("batch_size, block", [(4, "plain"), (18, "plain"), (4, "residual")])
def test_compiled_engine_gives_the_eager_mask_and_compiles_only_in_warmup(batch_size: int, block: str) -> None:
    vol = _ipl_volume()
    cfg = UNetConfig(in_slices=3, base_width=4, depth=3, block=block)
    meta = _meta(cfg, (1.3, 1.3))  # a model grid that needs the network's padding
    net = _random_net(cfg)
    assert vol.shape[0] == 21
    # 4: batches of 4 and a last one of 1 slice, on which dynamo would specialise. 18: one batch
    # past the convolution heuristics' 16, and a last one of 3 below it (two graphs, both warmed).
    kw = {"batch_size": batch_size, "precision": "fp32", "mirror": True, "backend": "torch"}
    ref = Engine(net, meta, CPU, compile="off", **kw).predict(vol)  # type: ignore[arg-type]
    eng = Engine(net, meta, CPU, compile="on", **kw)  # type: ignore[arg-type]
    assert isinstance(eng.model, CompiledUNet) and eng.compiled
    torch._dynamo.reset()
    counters.clear()
    eng.warmup((64, 64))  # a square size asked for: the warm-up must not compile for squares only
    compiled_frames = counters["frames"]["ok"]
    assert compiled_frames >= 1  # the warm-up compiled the network
    out = eng.predict(vol)
    assert eng.compiled  # no fallback to eager on the way
    assert counters["frames"]["ok"] == compiled_frames, "predict compiled again after the warm-up"
    assert len(np.unique(ref.mask)) == 3  # every class present: the comparison means something
    assert (out.mask != ref.mask).mean() < 1e-4  # float32 rounding may flip a rare argmax tie
    assert out.confidence == pytest.approx(ref.confidence, abs=1e-5)


def test_a_failing_compile_falls_back_to_eager_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls = []

    def broken_compile(fn: object, **kw: object) -> object:
        def run(x: torch.Tensor) -> torch.Tensor:
            calls.append(x.shape)
            raise RuntimeError("inductor: no working C++ compiler")

        return run

    monkeypatch.setattr(segcore.inference.torch, "compile", broken_compile)
    vol = _ipl_volume()
    meta = _meta(CFG, None)
    net = _random_net(CFG)
    ref = Engine(net, meta, CPU, precision="fp32", backend="torch").predict(vol)
    eng = Engine(net, meta, CPU, precision="fp32", backend="torch", compile="on")
    with caplog.at_level(logging.WARNING, logger="segcore.inference"):
        out = eng.predict(vol)
    assert len(calls) == 1  # tried once, then eager for good
    assert not eng.compiled
    assert "torch.compile failed" in caplog.text
    np.testing.assert_array_equal(out.mask, ref.mask)


def test_out_of_memory_in_the_compiled_model_propagates(monkeypatch: pytest.MonkeyPatch) -> None:
    # The worker retries an OOM with a smaller batch: it must not be taken for a compile failure.
    def oom_compile(fn: object, **kw: object) -> object:
        def run(x: torch.Tensor) -> torch.Tensor:
            raise torch.OutOfMemoryError("CUDA out of memory")

        return run

    monkeypatch.setattr(segcore.inference.torch, "compile", oom_compile)
    eng = Engine(_random_net(CFG), _meta(CFG, None), CPU, precision="fp32", backend="torch", compile="on")
    with pytest.raises(torch.OutOfMemoryError):
        eng.predict(_ipl_volume())
    assert eng.compiled


@pytest.mark.parametrize(
    "precision, compiler, expected",
    [("bf16", True, True), ("bf16", False, False), ("fp32", True, False)],
)
def test_auto_compiles_torch_bf16_on_cpu_with_a_compiler(
    monkeypatch: pytest.MonkeyPatch, precision: str, compiler: bool, expected: bool
) -> None:
    monkeypatch.setattr(segcore.inference, "cpp_compiler_available", lambda: compiler)
    eng = Engine(_random_net(CFG), _meta(CFG, None), CPU, precision=precision, compile="auto")
    assert eng.compiled is expected  # construction alone compiles nothing: the warm-up does
    assert isinstance(eng.model, CompiledUNet) is expected


def test_compile_on_chooses_torch_and_refuses_onnxruntime() -> None:
    net, meta = _random_net(CFG), _meta(CFG, None)
    assert Engine(net, meta, CPU, precision="fp32", compile="on").backend == "torch"
    with pytest.raises(ValueError, match="torch backend"):
        Engine(net, meta, CPU, precision="fp32", backend="onnxruntime", compile="on")
    with pytest.raises(ValueError, match="compile must be"):
        Engine(net, meta, CPU, compile="yes")


def test_cpp_compiler_available_needs_a_compiler_and_python_headers(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "Python.h").write_text("")
    monkeypatch.setattr(segcore.inference.sysconfig, "get_paths", lambda: {"include": str(tmp_path)})
    monkeypatch.setattr(segcore.inference.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert segcore.inference.cpp_compiler_available()
    monkeypatch.setattr(segcore.inference.shutil, "which", lambda name: None)
    assert not segcore.inference.cpp_compiler_available()  # no compiler
    monkeypatch.setattr(segcore.inference.shutil, "which", lambda name: f"/usr/bin/{name}")
    (tmp_path / "Python.h").unlink()
    assert not segcore.inference.cpp_compiler_available()  # no headers (a system Python without -dev)
