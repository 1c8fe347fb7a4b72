"""The self-describing checkpoint: safetensors weights plus JSON metadata in the same file.

No pickle is involved, so loading a checkpoint cannot execute code. The metadata holds the format
version, the model config, the preprocessing config, the label names, training metrics,
provenance and a sha256 over the weights, which is verified on every load.

Training's resumable state (optimizer, RNG) lives in a separate ``*.state.pt`` written by the
trainer and loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from segcore.errors import CheckpointError
from segcore.io import new_file_mode
from segcore.postprocess import PostprocessConfig
from segcore.preprocessing import PreprocessConfig
from segcore.unet import UNet, UNetConfig

FORMAT = "kitseg-checkpoint"
FORMAT_VERSION = 1

KITS19_LABELS = {0: "background", 1: "kidney", 2: "tumor"}
KITS23_LABELS = {0: "background", 1: "kidney", 2: "tumor", 3: "cyst"}


@dataclass
class CheckpointMeta:
    """Everything but the weights.

    Attributes:
        model: the U-Net config the weights belong to.
        preprocessing: the exact preprocessing the model was trained with.
        labels: label value -> name, background included.
        metrics: validation metrics at save time (KiTS Dice, epoch...).
        provenance: code version, data description, date, command.
        name: a short model name shown by the service.
        postprocessing: the whole-volume clean-up the engine applies after the argmax.
    """

    model: UNetConfig
    preprocessing: PreprocessConfig
    labels: dict[int, str]
    metrics: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    name: str = "kitseg-unet"
    postprocessing: PostprocessConfig = field(default_factory=PostprocessConfig)
    format_version: int = FORMAT_VERSION
    weights_sha256: str = ""

    def __post_init__(self) -> None:
        if sorted(self.labels) != list(range(self.model.num_classes)):
            raise ValueError(
                f"labels {sorted(self.labels)} must be exactly 0..{self.model.num_classes - 1} "
                f"for a model with {self.model.num_classes} classes"
            )
        if self.postprocessing.min_tumor_ml > 0:
            missing = {"kidney", "tumor"} - set(self.labels.values())
            if missing:
                raise ValueError(
                    f"postprocessing min_tumor_ml={self.postprocessing.min_tumor_ml} needs labels named 'kidney' "
                    f"and 'tumor'; {sorted(missing)} not in {self.labels}"
                )

    def label_value(self, name: str) -> int:
        """The label value called ``name`` (KeyError if none is)."""
        for value, n in self.labels.items():
            if n == name:
                return value
        raise KeyError(f"no label named {name!r} in {self.labels}")

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": FORMAT,
                "format_version": self.format_version,
                "name": self.name,
                "model": self.model.to_dict(),
                "preprocessing": self.preprocessing.to_dict(),
                "postprocessing": self.postprocessing.to_dict(),
                "labels": {str(k): v for k, v in self.labels.items()},
                "metrics": self.metrics,
                "provenance": self.provenance,
                "weights_sha256": self.weights_sha256,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> CheckpointMeta:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"checkpoint metadata is not valid JSON: {e}") from e
        if d.get("format") != FORMAT:
            raise CheckpointError(f"not a kitseg checkpoint (format={d.get('format')!r})")
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint format version {version} does not match this code's version {FORMAT_VERSION}"
            )
        try:
            return cls(
                model=UNetConfig.from_dict(d["model"]),
                preprocessing=PreprocessConfig.from_dict(d["preprocessing"]),
                labels={int(k): str(v) for k, v in d["labels"].items()},
                metrics=d.get("metrics", {}),
                provenance=d.get("provenance", {}),
                name=d.get("name", "kitseg-unet"),
                postprocessing=PostprocessConfig.from_dict(d.get("postprocessing", {})),
                format_version=version,
                weights_sha256=d.get("weights_sha256", ""),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint metadata does not match this code: {e}") from e


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def weights_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes, in sorted key order."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().to("cpu").contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_checkpoint(path: str | os.PathLike[str], model: nn.Module, meta: CheckpointMeta) -> str:
    """Write weights + metadata atomically; returns the weights' sha256."""
    plain = unwrap(model)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in plain.state_dict().items()}
    meta.weights_sha256 = weights_digest(tensors)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"kitseg": meta.to_json()})
    # safetensors creates its files 0600: then a checkpoint trained by one user (or container)
    # could not be served by another. It gets what any new file gets instead: 0666 less the umask.
    os.chmod(tmp, new_file_mode())
    os.replace(tmp, path)
    return meta.weights_sha256


def check_ensemble(metas: list[CheckpointMeta]) -> None:
    """Refuse an ensemble whose checkpoints would not see the same input or mean the same output:
    they must share the network's configuration, the preprocessing, the labels and the
    post-processing, as the cross-validation folds of one training configuration do. Their
    softmax probabilities are averaged slice by slice, so only their weights may differ."""
    first = metas[0]
    for i, m in enumerate(metas[1:], start=1):
        differ = [
            what
            for what, a, b in (
                ("network", first.model.to_dict(), m.model.to_dict()),
                ("preprocessing", first.preprocessing.to_dict(), m.preprocessing.to_dict()),
                ("labels", first.labels, m.labels),
                ("post-processing", first.postprocessing.to_dict(), m.postprocessing.to_dict()),
            )
            if a != b
        ]
        if differ:
            raise CheckpointError(
                f"ensemble member {i} ({m.name}) differs from member 0 ({first.name}) in its {', '.join(differ)}: "
                "an ensemble's checkpoints must be trained with one configuration (the folds of one "
                "cross-validation), so that only their weights differ"
            )


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_meta(path: str | os.PathLike[str]) -> CheckpointMeta:
    """Only the metadata (cheap: reads the safetensors header)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            md = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    if "kitseg" not in md:
        raise CheckpointError(f"{path} has no kitseg metadata; was it written by save_checkpoint?")
    return CheckpointMeta.from_json(md["kitseg"])


def load_checkpoint(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[UNet, CheckpointMeta]:
    """Rebuild the model from the file alone, verify the weights' sha256, and move it to ``device``.

    Raises:
        CheckpointError: missing, unreadable, tampered (hash mismatch) or incompatible checkpoint,
            with a message that says what differs.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    meta = read_meta(path)
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupted or truncated: {e}") from e
    digest = weights_digest(tensors)
    if meta.weights_sha256 and digest != meta.weights_sha256:
        raise CheckpointError(
            f"checkpoint {path} weights sha256 {digest[:12]}... does not match the recorded "
            f"{meta.weights_sha256[:12]}...: the file was modified after it was written"
        )
    model = UNet(meta.model)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = [
        f"{k}: file {tuple(tensors[k].shape)} vs code {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(tensors))
        if tensors[k].shape != expected[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        if shapes:
            parts.append(f"shape mismatch {shapes[:5]}")
        raise CheckpointError(f"checkpoint {path} does not match the U-Net built from its config: " + "; ".join(parts))
    model.load_state_dict(tensors, strict=True)
    model.eval()
    return model.to(device), meta
