import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from segcore.checkpoint import KITS19_LABELS, CheckpointMeta, load_checkpoint, read_meta, save_checkpoint
from segcore.errors import CheckpointError
from segcore.postprocess import PostprocessConfig
from segcore.preprocessing import PreprocessConfig
from segcore.unet import UNet, UNetConfig


def _meta(cfg: UNetConfig) -> CheckpointMeta:
    return CheckpointMeta(
        cfg,
        PreprocessConfig(target_spacing_mm=(1.5, 1.5)),
        dict(KITS19_LABELS),
        metrics={"val_composite": 0.5},
        provenance={"git": "abc", "data": "phantoms"},
    )


@pytest.mark.parametrize("block", ["plain", "residual"])
def test_roundtrip_rebuilds_the_same_model(block: str, tmp_path: Path) -> None:
    cfg = UNetConfig(in_slices=3, base_width=4, depth=3, block=block)
    torch.manual_seed(0)
    model = UNet(cfg).eval()
    p = tmp_path / "m.safetensors"
    save_checkpoint(p, model, _meta(cfg))
    loaded, meta = load_checkpoint(p)
    assert meta.model == cfg and meta.preprocessing.target_spacing_mm == (1.5, 1.5)
    assert meta.labels == KITS19_LABELS and meta.metrics["val_composite"] == 0.5
    x = torch.randn(1, 3, 20, 20)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_ddp_and_compile_wrappers_are_unwrapped(tmp_path: Path) -> None:
    cfg = UNetConfig(base_width=4, depth=3)
    model = UNet(cfg)

    class Wrapper(torch.nn.Module):
        def __init__(self, m: torch.nn.Module) -> None:
            super().__init__()
            self._orig_mod = m

    p = tmp_path / "w.safetensors"
    save_checkpoint(p, Wrapper(model), _meta(cfg))
    assert not any(k.startswith("_orig_mod") for k in load_file(str(p)))
    load_checkpoint(p)


def test_tampered_weights_are_rejected(tmp_path: Path) -> None:
    cfg = UNetConfig(base_width=4, depth=3)
    p = tmp_path / "m.safetensors"
    save_checkpoint(p, UNet(cfg), _meta(cfg))
    tensors = load_file(str(p))
    md = {"kitseg": read_meta(p).to_json()}
    k = next(k for k in tensors if k.endswith("weight"))
    tensors[k] = tensors[k] + 0.01
    save_file(tensors, str(p), metadata=md)
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(p)


def test_truncated_file_is_rejected(tmp_path: Path) -> None:
    cfg = UNetConfig(base_width=4, depth=3)
    p = tmp_path / "m.safetensors"
    save_checkpoint(p, UNet(cfg), _meta(cfg))
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(CheckpointError):
        load_checkpoint(p)


def test_config_mismatch_says_what_differs(tmp_path: Path) -> None:
    cfg = UNetConfig(base_width=4, depth=3)
    p = tmp_path / "m.safetensors"
    save_checkpoint(p, UNet(cfg), _meta(cfg))
    tensors = load_file(str(p))
    d = json.loads(read_meta(p).to_json())
    d["model"]["base_width"] = 8
    d["weights_sha256"] = ""
    save_file(tensors, str(p), metadata={"kitseg": json.dumps(d)})
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_checkpoint(p)


def test_version_mismatch_and_foreign_files(tmp_path: Path) -> None:
    cfg = UNetConfig(base_width=4, depth=3)
    p = tmp_path / "m.safetensors"
    save_checkpoint(p, UNet(cfg), _meta(cfg))
    d = json.loads(read_meta(p).to_json())
    d["format_version"] = 99
    save_file(load_file(str(p)), str(p), metadata={"kitseg": json.dumps(d)})
    with pytest.raises(CheckpointError, match="version 99"):
        load_checkpoint(p)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="no kitseg metadata"):
        load_checkpoint(foreign)
    pickle = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, pickle)
    with pytest.raises(CheckpointError):
        load_checkpoint(pickle)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_labels_must_match_classes() -> None:
    with pytest.raises(ValueError, match="labels"):
        CheckpointMeta(UNetConfig(num_classes=4), PreprocessConfig(), dict(KITS19_LABELS))


def test_postprocessing_roundtrip_and_older_checkpoints(tmp_path: Path) -> None:
    import dataclasses

    cfg = UNetConfig(base_width=4, depth=3)
    meta = dataclasses.replace(_meta(cfg), postprocessing=PostprocessConfig(min_tumor_ml=0.5))
    assert CheckpointMeta.from_json(meta.to_json()).postprocessing.min_tumor_ml == 0.5
    assert meta.label_value("tumor") == 2 and meta.label_value("kidney") == 1
    # A checkpoint written before the field existed reads as "off".
    d = json.loads(meta.to_json())
    del d["postprocessing"]["min_tumor_ml"]
    assert CheckpointMeta.from_json(json.dumps(d)).postprocessing.min_tumor_ml == 0.0
    # Code that doesn't know a field says so instead of ignoring it.
    d["postprocessing"]["min_cyst_ml"] = 1.0
    with pytest.raises(CheckpointError, match="min_cyst_ml"):
        CheckpointMeta.from_json(json.dumps(d))
    with pytest.raises(ValueError, match="needs labels named"):
        CheckpointMeta(
            UNetConfig(num_classes=2),
            PreprocessConfig(),
            {0: "background", 1: "organ"},
            postprocessing=PostprocessConfig(min_tumor_ml=0.5),
        )


@pytest.mark.gpu
def test_cuda_checkpoint_loads_on_cpu_and_back(tmp_path: Path) -> None:
    cfg = UNetConfig(base_width=4, depth=3)
    model = UNet(cfg).cuda().eval()
    p = tmp_path / "cuda.safetensors"
    save_checkpoint(p, model, _meta(cfg))
    cpu_model, _ = load_checkpoint(p, device="cpu")
    gpu_model, _ = load_checkpoint(p, device="cuda")
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(cpu_model(x), gpu_model(x.cuda()).cpu(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_checkpoint_files_get_the_umasks_permissions(umask: int, tmp_path: Path) -> None:
    # safetensors writes 0600: a checkpoint trained as one user (the compose train service runs as
    # the host's user) must still be readable by the service's user when the umask allows it.
    cfg = UNetConfig(in_slices=1, base_width=4, depth=3)
    old = os.umask(umask)
    try:
        save_checkpoint(tmp_path / "m.safetensors", UNet(cfg), _meta(cfg))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.safetensors").stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
