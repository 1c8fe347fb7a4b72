"""ONNX Runtime as the engine's CPU backend (the optional ``kitseg[onnx]`` extra).

On the 2-core AVX2 development CPU, ONNX Runtime runs the demo U-Net's model stage 1.05-1.4x
faster than torch (docs/benchmarks.md: mostly because its memory arena keeps activation buffers
for the length of a volume), with logits equal to about 2e-5. The checkpoint stays the one
source of truth: the BatchNorm-folded network is exported to ONNX when an engine is built (a
fraction of a second, through a temporary file that is removed at once; about 8 s through
``torch.export`` on a torch without the deprecated TorchScript exporter). CUDA keeps torch, with
AMP and channels_last.
"""

from __future__ import annotations

import importlib.util
import logging
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from segcore.unet import UNet, padded_call

log = logging.getLogger(__name__)


def onnxruntime_available() -> bool:
    """Whether the ``onnx`` extra is installed: the exporter needs ``onnx``, the runtime ``onnxruntime``."""
    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))


class _Padded(nn.Module):
    def __init__(self, net: UNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_padded(x)


def export_onnx(model: UNet, exporter: str = "auto") -> bytes:
    """The eval-mode network as ONNX bytes, with dynamic batch, height and width.

    Only :meth:`UNet.forward_padded` is exported: the padding to a multiple of ``2**(depth-1)``
    depends on the input's size, so :class:`OrtModel` does it around the session with
    :func:`segcore.unet.padded_call`, as :meth:`UNet.forward` does around the network.

    ``exporter``: ``torchscript`` (a fraction of a second here), ``dynamo`` (``torch.export``
    through onnxscript: about 8-10 s for the demo network on the 2-core development CPU, the
    same logits to 2e-5) or ``auto``: TorchScript, and ``dynamo`` where TorchScript fails. torch
    has deprecated its TorchScript exporter; this graph has no control flow, so both are exact,
    and ``auto`` keeps ONNX Runtime working on a torch without it.
    """
    if exporter not in ("auto", "torchscript", "dynamo"):
        raise ValueError(f"exporter must be auto, torchscript or dynamo, got {exporter!r}")
    if exporter == "auto":
        try:
            return export_onnx(model, "torchscript")
        except Exception as e:
            if importlib.util.find_spec("onnxscript") is None:
                raise
            log.warning(
                "the TorchScript ONNX exporter failed (%s); exporting through torch.export instead (about 10 s)", e
            )
            return export_onnx(model, "dynamo")
    m = model.config.multiple
    dynamo = exporter == "dynamo"
    axes = {0: "batch", 2: "height", 3: "width"}
    kwargs: dict[str, Any]
    if dynamo:
        # A batch above 1 and a slice that isn't square: torch.export specialises on size 1, and
        # on equal sizes would take height == width for every input.
        sample = torch.zeros(2, model.config.in_slices, 2 * m, 3 * m)
        kwargs = {
            "dynamic_shapes": ({d: torch.export.Dim.DYNAMIC for d in axes},),
            "external_data": False,  # one file, weights inside, as the session reads bytes
            "verbose": False,
            "opset_version": 18,
        }
    else:
        sample = torch.zeros(1, model.config.in_slices, 2 * m, 2 * m)
        kwargs = {"dynamic_axes": {"x": axes, "logits": axes}, "opset_version": 17}
    with tempfile.TemporaryDirectory(prefix="kitseg-onnx-") as tmp, warnings.catch_warnings():
        path = Path(tmp) / "unet.onnx"  # the exporter's typed interface takes a path
        warnings.simplefilter("ignore")  # the exporters' deprecation notices
        # The dynamo exporter logs a line for every optional operator library it can't find.
        torch_onnx_log = logging.getLogger("torch.onnx")
        level = torch_onnx_log.level
        torch_onnx_log.setLevel(logging.ERROR)
        try:
            torch.onnx.export(
                _Padded(model.eval()),
                (sample,),
                path,
                input_names=["x"],
                output_names=["logits"],
                dynamo=dynamo,
                **kwargs,
            )
        finally:
            torch_onnx_log.setLevel(level)
        return path.read_bytes()


_shared_arena_lock = threading.Lock()
_shared_arena: bool | None = None  # None: not tried yet


def shared_cpu_arena() -> bool:
    """Register one CPU memory arena with ONNX Runtime's environment (once per process), for the
    sessions that ask for it (``session.use_env_allocators``): an ensemble's members run one
    after the other, and with an arena each they kept 5 sets of activation buffers through a
    volume (peak RSS 1479 against 567 MiB for 5 demo networks, runs/s27 in the development tree).
    False when this ONNX Runtime can't: each session keeps its own arena then."""
    global _shared_arena
    with _shared_arena_lock:
        if _shared_arena is None:
            import onnxruntime as ort

            try:
                info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
                ort.create_and_register_allocator(info, ort.OrtArenaCfg({}))  # the session arena's defaults
                _shared_arena = True
            except Exception:  # an older ONNX Runtime without this API: the ensemble just uses more memory
                log.warning("onnxruntime: no shared memory arena; each ensemble member keeps its own", exc_info=True)
                _shared_arena = False
        return _shared_arena


class OrtModel:
    """A callable with the network's signature, ``(B, C, H, W)`` float32 CPU tensor -> logits,
    that runs an ONNX Runtime session.

    Args:
        model: the network in eval mode, BatchNorm already folded.
        threads: intra-op threads; default torch's thread count, so both backends use the
            same cores.
        shared_arena: allocate from the process's one shared arena (:func:`shared_cpu_arena`)
            instead of the session's own: for an ensemble's members, which never run at once.
    """

    def __init__(self, model: UNet, threads: int | None = None, shared_arena: bool = False) -> None:
        if not onnxruntime_available():
            raise ImportError("the onnxruntime backend needs the onnx extra: pip install 'kitseg[onnx]'")
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        # No spin-waiting after a run: the threads would take the cores from the torch and numpy
        # work between batches (resampling the logits back measured 1.2-2x slower with it).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.shared_arena = shared_arena and shared_cpu_arena()
        if self.shared_arena:
            opts.add_session_config_entry("session.use_env_allocators", "1")
        self.session = ort.InferenceSession(export_onnx(model), opts, providers=["CPUExecutionProvider"])
        # Only the config: keeping a bound method of the network would keep its torch weights alive.
        self.config = model.config
        # The session's memory arena keeps activation buffers between batches: without it every
        # batch maps and page-faults them afresh (glibc returns blocks over 32 MB to the kernel),
        # about 1.25x slower here. release() gives the arena back after each volume.
        self._shrink = ort.RunOptions()
        self._shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        m = model.config.multiple
        self._tiny = np.zeros((1, model.config.in_slices, 2 * m, 2 * m), dtype=np.float32)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return padded_call(self.config, x, self._run)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        try:
            out = self.session.run(None, {"x": np.ascontiguousarray(x.numpy(), dtype=np.float32)})[0]
        except Exception as e:  # onnxruntime's exception types derive from Exception only
            if "alloc" in str(e).lower():
                # What the service's out-of-memory retry (smaller batch, then 507) understands.
                raise MemoryError(f"onnxruntime could not allocate memory: {e}") from e
            raise
        return torch.from_numpy(out)

    def release(self) -> None:
        """Return the arena's free buffers to the system: ONNX Runtime shrinks the arena at the
        end of a run that asks for it, so this runs one tiny forward that does."""
        self.session.run(None, {"x": self._tiny}, self._shrink)


#: the ONNX model's metadata key that holds the checkpoint's metadata (:meth:`CheckpointMeta.to_json`)
ONNX_META_KEY = "kitseg.checkpoint"


def export_checkpoint(path: str | Path, out: str | Path, exporter: str = "auto") -> float:
    """Write checkpoint ``path``'s network to ``out`` as a self-describing ONNX model, for other
    runtimes (ONNX Runtime elsewhere, TensorRT, Triton); returns the largest difference of its
    logits from torch's on a test input, checked here with ONNX Runtime.

    The graph is what the engine runs on CPU: the eval-mode network with BatchNorm folded into
    the convolutions, input ``x`` of shape ``(batch, in_slices, H, W)`` float32 (slices on the
    model grid, normalised as the checkpoint's preprocessing says) and output ``logits``
    ``(batch, classes, H, W)``, with H and W multiples of ``2**(depth-1)`` (pad, then crop back,
    as :func:`segcore.unet.padded_call` does). The checkpoint's metadata (model, preprocessing,
    post-processing, labels, metrics, provenance, weights sha256) goes with it as the model's
    ``kitseg.checkpoint`` metadata entry, as JSON.

    Raises:
        CheckpointError: ``path`` is missing, tampered with or does not match this code.
        ImportError: the ``onnx`` extra is not installed.
    """
    if not onnxruntime_available():
        raise ImportError("exporting to ONNX needs the onnx extra: pip install 'kitseg[onnx]'")
    import onnx
    import onnxruntime as ort

    from segcore.checkpoint import load_checkpoint
    from segcore.io import atomic_write
    from segcore.unet import fold_batch_norm

    model, meta = load_checkpoint(path)  # verifies the weights' sha256
    net = fold_batch_norm(model.eval())
    proto = onnx.load_from_string(export_onnx(net, exporter))
    m = net.config.multiple
    doc = {
        ONNX_META_KEY: meta.to_json(),
        "kitseg.input": f"x: (batch, {net.config.in_slices}, H, W) float32 on the model grid, normalised as "
        f"the preprocessing says; H and W multiples of {m}",
        "kitseg.output": f"logits: (batch, {net.config.num_classes}, H, W); argmax gives the labels",
    }
    for key, value in doc.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "kitseg"
    payload = proto.SerializeToString()
    # Checked before anything is written: the file's logits against torch's on a 2-slice input.
    x = torch.randn(2, net.config.in_slices, 3 * m, 2 * m, generator=torch.Generator().manual_seed(0))
    session = ort.InferenceSession(payload, providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x.numpy()})[0]
    with torch.inference_mode():
        want = net.forward_padded(x).numpy()
    diff = float(np.abs(got - want).max())
    if not diff <= 1e-3 * max(1.0, float(np.abs(want).max())):
        raise RuntimeError(f"the exported model's logits differ from torch's by {diff:.3g}; nothing written")
    atomic_write(out, payload, private=False)
    return diff
