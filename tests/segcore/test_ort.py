"""The ONNX Runtime backend: the same masks as torch, on any input size and orientation, and a
clear choice of backend."""

import dataclasses
import importlib.util
import logging
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import segcore.inference
from segcore.checkpoint import KITS19_LABELS, CheckpointMeta
from segcore.inference import Engine
from segcore.io import Volume
from segcore.ort import OrtModel, export_onnx, onnxruntime_available
from segcore.postprocess import PostprocessConfig
from segcore.preprocessing import PreprocessConfig
from segcore.unet import UNet, UNetConfig, fold_batch_norm, padding
from tests.conftest import GEOM_PP, ORIENTATIONS, make_volume

needs_ort = pytest.mark.skipif(not onnxruntime_available(), reason="the onnx extra (kitseg[onnx]) is not installed")
CPU = torch.device("cpu")


def _random_net(cfg: UNetConfig, seed: int = 1) -> UNet:
    torch.manual_seed(seed)
    net = UNet(cfg).eval()
    with torch.no_grad():  # large random weights: every class wins somewhere
        for prm in net.parameters():
            prm.normal_(0.0, 0.5)
    return net


def _meta(cfg: UNetConfig, spacing: tuple[float, float] | None) -> CheckpointMeta:
    pp = PreprocessConfig(target_spacing_mm=spacing, clip_hu=GEOM_PP.clip_hu, mean=GEOM_PP.mean, std=GEOM_PP.std)
    meta = CheckpointMeta(cfg, pp, dict(KITS19_LABELS))
    return dataclasses.replace(meta, postprocessing=PostprocessConfig(keep_largest=False))


@needs_ort
@pytest.mark.parametrize("norm, block", [("batch", "plain"), ("instance", "plain"), ("batch", "residual")])
@pytest.mark.parametrize("hw", [(37, 53), (64, 64), (13, 9)])
def test_ort_model_matches_the_network_at_any_size(norm: str, block: str, hw: tuple[int, int]) -> None:
    # Sizes that need the internal padding (and, for instance norm, more of it) and one that doesn't.
    cfg = UNetConfig(in_slices=3, base_width=4, depth=3, norm=norm, block=block)
    net = fold_batch_norm(_random_net(cfg))
    x = torch.randn(3, 3, *hw)
    with torch.inference_mode():
        ref = net(x)
    out = OrtModel(net)(x)
    assert out.shape == ref.shape
    # float32 rounding of a different summation order, relative to the logits' scale
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


@needs_ort
@pytest.mark.parametrize("name, oblique, mirror", [("IPL", 0.0, True), ("LPS", 25.0, False), ("RAS", 0.0, True)])
def test_onnxruntime_engine_gives_the_torch_engines_mask(name: str, oblique: float, mirror: bool) -> None:
    hu, aff, _ = make_volume(ORIENTATIONS[name], oblique_deg=oblique)
    hu = hu + np.random.default_rng(0).normal(0, 40, hu.shape).astype(np.float32)
    vol = Volume(hu, aff, nib.Nifti1Header(), (1.0, 1.0, 1.0))
    cfg = UNetConfig(in_slices=3, base_width=4, depth=3)
    meta = _meta(cfg, (1.3, 1.3))  # a model grid that is not a multiple of 4
    net = _random_net(cfg)

    def run(backend: str) -> tuple[np.ndarray, dict[int, float]]:
        eng = Engine(net, meta, CPU, batch_size=4, precision="fp32", mirror=mirror, backend=backend)
        assert eng.backend == backend
        pred = eng.predict(vol)
        return pred.mask, pred.confidence

    ref, ref_conf = run("torch")
    out, conf = run("onnxruntime")
    assert len(np.unique(ref)) == 3  # all classes present: the comparison means something
    # Logits agree to ~1e-5; allow a rare argmax tie to fall the other way.
    assert (out != ref).mean() < 1e-4
    assert conf == pytest.approx(ref_conf, abs=1e-4)


@needs_ort
def test_auto_backend_is_onnxruntime_for_fp32_on_cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = UNetConfig(in_slices=1, base_width=4, depth=2)
    net, meta = UNet(cfg), _meta(cfg, None)
    assert Engine(net, meta, CPU, precision="fp32").backend == "onnxruntime"
    # precision auto: fp32 (so onnxruntime) on a CPU without native bf16, bf16 (so torch) with it.
    for fast, precision, backend in ((False, "fp32", "onnxruntime"), (True, "bf16", "torch")):
        monkeypatch.setattr(segcore.inference, "cpu_bf16_fast", lambda fast=fast: fast)
        eng = Engine(net, meta, CPU, precision="auto")
        assert (eng.precision, eng.backend) == (precision, backend)
    assert Engine(net, meta, CPU, precision="bf16").backend == "torch"
    with pytest.raises(ValueError, match="fp32 on CPU only"):
        Engine(net, meta, CPU, precision="bf16", backend="onnxruntime")


def test_cpu_bf16_fast_needs_native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    # Without AVX-512 BF16 or AMX, oneDNN's bf16 is emulated (AVX-512) or absent (AVX2): never "fast".
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert segcore.inference.cpu_bf16_fast() is False
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    onednn = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert segcore.inference.cpu_bf16_fast() is bool(onednn)


def test_backend_choice_without_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = UNetConfig(in_slices=1, base_width=4, depth=2)
    net, meta = UNet(cfg), _meta(cfg, None)
    monkeypatch.setattr(segcore.inference, "onnxruntime_available", lambda: False)
    monkeypatch.setattr("segcore.ort.onnxruntime_available", lambda: False)
    assert Engine(net, meta, CPU, precision="fp32").backend == "torch"
    with pytest.raises(ImportError, match=r"kitseg\[onnx\]"):
        Engine(net, meta, CPU, precision="fp32", backend="onnxruntime")
    with pytest.raises(ValueError, match="backend must be one of"):
        Engine(net, meta, CPU, backend="tensorrt")


def test_forward_is_padding_then_forward_padded_then_crop() -> None:
    cfg = UNetConfig(in_slices=3, base_width=4, depth=3)
    net = _random_net(cfg)
    x = torch.randn(2, 3, 21, 30)
    ph, pw = padding(cfg, 21, 30)
    assert (ph, pw) == (3, 2)
    with torch.inference_mode():
        manual = net.forward_padded(F.pad(x, (0, pw, 0, ph), mode="replicate"))[..., :21, :30]
        torch.testing.assert_close(net(x), manual)


def test_auto_falls_back_to_torch_when_the_export_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = UNetConfig(in_slices=1, base_width=4, depth=2)
    net, meta = UNet(cfg), _meta(cfg, None)

    def broken(*_: object, **__: object) -> None:
        raise RuntimeError("exporter removed")

    monkeypatch.setattr(segcore.inference, "onnxruntime_available", lambda: True)
    monkeypatch.setattr(segcore.inference, "OrtModel", broken)
    assert Engine(net, meta, CPU, precision="fp32").backend == "torch"  # the service still starts
    with pytest.raises(RuntimeError, match="exporter removed"):
        Engine(net, meta, CPU, precision="fp32", backend="onnxruntime")  # asked for: no silent fallback


@needs_ort
@pytest.mark.skipif(importlib.util.find_spec("onnxscript") is None, reason="the dynamo exporter needs onnxscript")
def test_without_the_torchscript_exporter_the_model_is_exported_through_torch_export(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A torch whose TorchScript exporter is gone (it is deprecated): ONNX Runtime still runs,
    # from the torch.export graph, with the network's logits at any batch and size.
    cfg = UNetConfig(in_slices=3, base_width=4, depth=3)
    net = fold_batch_norm(_random_net(cfg))
    real = torch.onnx.export
    calls: list[bool] = []

    def export(*args: object, dynamo: bool = True, **kwargs: object) -> object:
        calls.append(dynamo)
        if not dynamo:
            raise RuntimeError("the TorchScript exporter was removed")
        return real(*args, dynamo=dynamo, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.onnx, "export", export)
    with caplog.at_level(logging.WARNING, logger="segcore.ort"):
        model = OrtModel(net)
    assert calls == [False, True]
    assert "TorchScript ONNX exporter failed" in caplog.text
    for shape in [(1, 3, 13, 9), (4, 3, 37, 53), (2, 3, 64, 64)]:
        x = torch.randn(shape)
        with torch.inference_mode():
            ref = net(x)
        out = model(x)
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


def test_an_unknown_exporter_is_refused() -> None:
    with pytest.raises(ValueError, match="exporter must be"):
        export_onnx(UNet(UNetConfig(in_slices=1, base_width=4, depth=2)), "tflite")


@needs_ort
def test_allocation_failure_is_a_memory_error_for_the_oom_retry() -> None:
    from onnxruntime.capi.onnxruntime_pybind11_state import RuntimeException

    cfg = UNetConfig(in_slices=1, base_width=4, depth=2)
    model = OrtModel(fold_batch_norm(UNet(cfg).eval()))

    class _Session:
        def __init__(self, exc: Exception) -> None:
            self.exc = exc

        def run(self, *_: object) -> None:
            raise self.exc

    model.session = _Session(RuntimeException("Failed to allocate memory for requested buffer of size 123"))  # type: ignore[assignment]
    with pytest.raises(MemoryError, match="allocate"):
        model(torch.zeros(1, 1, 8, 8))
    model.session = _Session(RuntimeException("Non-zero status code returned while running Conv node"))  # type: ignore[assignment]
    with pytest.raises(RuntimeException):
        model(torch.zeros(1, 1, 8, 8))


@needs_ort
def test_the_arena_is_given_back_after_every_volume_even_a_cancelled_one(monkeypatch: pytest.MonkeyPatch) -> None:
    hu, aff, _ = make_volume(ORIENTATIONS["IPL"])
    vol = Volume(hu, aff, nib.Nifti1Header(), (1.0, 1.0, 1.0))
    cfg = UNetConfig(in_slices=3, base_width=4, depth=3)
    eng = Engine(_random_net(cfg), _meta(cfg, None), CPU, batch_size=4, precision="fp32", backend="onnxruntime")
    assert eng.ort is not None
    calls = []
    monkeypatch.setattr(eng.ort, "release", lambda: calls.append(1))
    eng.predict(vol)
    assert len(calls) == 1

    def cancel(done: int, total: int) -> None:
        raise TimeoutError("job cancelled")  # what the worker's progress hook does between batches

    with pytest.raises(TimeoutError):
        eng.predict(vol, progress=cancel)
    assert len(calls) == 2


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS"))


@needs_ort
@pytest.mark.skipif(sys.platform != "linux", reason="reads VmRSS from /proc")
def test_release_returns_the_arenas_memory() -> None:
    # Base 16 on a 256x256 grid, batch 8: the arena holds a few hundred MB of activations while
    # a volume runs. Measured both ways, so the test fails if release() stops releasing.
    cfg = UNetConfig(in_slices=3, base_width=16, depth=4)
    eng = Engine(_random_net(cfg), _meta(cfg, None), CPU, batch_size=8, precision="fp32", backend="onnxruntime")
    assert eng.ort is not None
    x = torch.randn(8, 3, 256, 256)
    eng.ort(x)
    eng.ort.release()
    base = _rss_mb()
    eng.ort(x)
    held = _rss_mb() - base
    eng.ort.release()
    after = _rss_mb() - base
    assert held > 100, f"the arena held only {held:.0f} MB: the test can't tell release from no release"
    assert after < 0.3 * held, f"release kept {after:.0f} of {held:.0f} MB"


@needs_ort
def test_an_exported_checkpoint_is_a_self_describing_onnx_model_with_the_networks_logits(tmp_path: Path) -> None:
    import onnx
    import onnxruntime as ort

    from segcore.checkpoint import load_checkpoint, read_meta, save_checkpoint
    from segcore.errors import CheckpointError
    from segcore.ort import ONNX_META_KEY, export_checkpoint

    cfg = UNetConfig(in_slices=3, base_width=4, depth=3)
    net = _random_net(cfg)
    with torch.no_grad():  # BatchNorm statistics that folding must carry into the convolutions
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    save_checkpoint(tmp_path / "m.safetensors", net, _meta(cfg, (1.5, 1.5)))
    diff = export_checkpoint(tmp_path / "m.safetensors", tmp_path / "m.onnx")
    proto = onnx.load(str(tmp_path / "m.onnx"))
    props = {p.key: p.value for p in proto.metadata_props}
    assert props[ONNX_META_KEY] == read_meta(tmp_path / "m.safetensors").to_json()
    assert "multiples of 4" in props["kitseg.input"]
    # Any batch, and any H and W that are multiples of 2**(depth-1): the unfolded network's logits.
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    model, _ = load_checkpoint(tmp_path / "m.safetensors")
    for shape in ((1, 3, 20, 12), (3, 3, 36, 44)):
        x = torch.randn(*shape)
        with torch.inference_mode():
            ref = model.eval()(x)
        out = torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    assert 0 <= diff < 1e-3
    # A tampered checkpoint is refused, and nothing is written.
    raw = bytearray((tmp_path / "m.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (tmp_path / "bad.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError):
        export_checkpoint(tmp_path / "bad.safetensors", tmp_path / "bad.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors", "m.onnx", "m.safetensors"]
