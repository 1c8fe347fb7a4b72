import csv
import dataclasses
import gzip
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from segcore.checkpoint import KITS23_LABELS, load_checkpoint, read_meta, save_checkpoint
from segcore.inference import Engine
from segcore.io import load_labels, load_volume
from segcore.postprocess import PostprocessConfig
from segcore.preprocessing import preprocess_case
from segcore.unet import UNet, UNetConfig
from tests.conftest import (
    GEOM_PP,
    KIDNEY_HU,
    ORIENTATIONS,
    TUMOR_HU,
    IntensityModel,
    make_tiny_checkpoint,
    make_volume,
    write_nifti,
)
from training.cli import _one_phantom, main
from training.datasets import (
    CaseCache,
    DatasetError,
    SliceDataset,
    find_cases,
    fold_cases,
    kfold_splits,
    labelled,
    read_splits,
    split_cases,
    tumor_components,
)
from training.train import (
    DeepSupervision,
    balanced_shares,
    best_postprocessing,
    choice_score,
    choose_memory_format,
    deep_supervision_loss,
    dice_ce_loss,
    epochs_that_fit,
    evaluate_cases,
    plain_unet,
    resolve_amp,
    sweep_postprocessing,
)

ROOT = Path(__file__).resolve().parents[2]


def test_single_channel_loss_is_refused() -> None:
    with pytest.raises(ValueError, match="identically zero"):
        dice_ce_loss(torch.zeros(1, 1, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long))


def test_batch_and_sample_dice_by_hand() -> None:
    # Two 4x4 patches, 2 classes, confident predictions (softmax of +-50 is one-hot to 1e-40).
    # Patch 0: a 4-pixel object, found exactly. Patch 1: a 1-pixel object, missed.
    target = torch.zeros(2, 4, 4, dtype=torch.long)
    target[0, :2, :2] = 1
    target[1, 3, 3] = 1
    pred = target.clone()
    pred[1, 3, 3] = 0
    logits = torch.stack([(pred == 0).float(), (pred == 1).float()], 1) * 100 - 50
    # Batch Dice pools both: 2*4 / (4 + 5) = 8/9, so the Dice term is 1/9.
    _, batch = dice_ce_loss(logits, target, dice="batch")
    assert float(batch) == pytest.approx(1 / 9, abs=1e-5)
    # Per-patch Dice: 1 and 0, so the term is 0.5 (the missed small object counts fully).
    _, sample = dice_ce_loss(logits, target, dice="sample")
    assert float(sample) == pytest.approx(0.5, abs=1e-5)
    # Both: the mean of the two terms.
    _, both = dice_ce_loss(logits, target, dice="both")
    assert float(both) == pytest.approx((1 / 9 + 0.5) / 2, abs=1e-5)
    with pytest.raises(ValueError, match="batch"):
        dice_ce_loss(logits, target, dice="mean")


def test_loss_learns_a_tiny_problem() -> None:
    # The seed's model never learned; this one must, on a trivially separable problem.
    torch.manual_seed(0)
    model = UNet(UNetConfig(base_width=4, depth=3))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    x = torch.randn(4, 1, 32, 32)
    y = (x[:, 0] > 0.5).long() + (x[:, 0] > 1.5).long()
    first = None
    for _ in range(60):
        loss, _ = dice_ce_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.5 * first
    acc = (model.eval()(x).argmax(1) == y).float().mean()
    assert acc > 0.9


def test_deep_supervision_outputs_and_loss_by_hand() -> None:
    torch.manual_seed(0)
    net = UNet(UNetConfig(in_slices=3, base_width=4, depth=4))
    ds = DeepSupervision(net, 2)
    x = torch.randn(2, 3, 32, 40)
    outs = ds(x)
    assert [tuple(o.shape) for o in outs] == [(2, 3, 32, 40), (2, 3, 16, 20), (2, 3, 8, 10)]
    # The full-resolution output is the plain network's: the heads change nothing at inference.
    torch.testing.assert_close(outs[0], net(x))
    assert plain_unet(ds) is net
    y = torch.randint(0, 3, (2, 32, 40))
    loss, dice_term = deep_supervision_loss(outs, y, dice="sample")
    # Weights 1, 1/2, 1/4 normalised by 7/4; labels at 1/s are the centre of each s x s block.
    parts = [dice_ce_loss(outs[0], y, dice="sample"), dice_ce_loss(outs[1], y[:, 1::2, 1::2], dice="sample")]
    parts.append(dice_ce_loss(outs[2], y[:, 2::4, 2::4], dice="sample"))
    want = sum(w * p[0] for w, p in zip((4 / 7, 2 / 7, 1 / 7), parts, strict=True))
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(dice_term, parts[0][1])
    # One output is plain Dice + CE.
    torch.testing.assert_close(deep_supervision_loss(outs[:1], y)[0], dice_ce_loss(outs[0], y)[0])
    with pytest.raises(ValueError, match="levels"):
        DeepSupervision(net, 3)  # depth 4 has 3 decoder outputs; the coarsest is never supervised
    with pytest.raises(ValueError, match="multiple of 8"):
        ds(torch.randn(1, 3, 30, 32))


def test_split_is_by_patient_and_deterministic(tmp_path: Path) -> None:
    for i in range(5):
        _one_phantom((i, str(tmp_path), 32, False, 0))
    cases = find_cases(tmp_path)
    tr, va = split_cases(cases, 0.4, seed=1)
    assert {c.case_id for c in tr}.isdisjoint({c.case_id for c in va}) and len(tr) + len(va) == 5
    assert split_cases(cases, 0.4, seed=1) == (tr, va)


def test_find_cases_reads_the_kits19_kits21_and_kits23_layouts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def case(name: str, *files: str) -> None:
        (tmp_path / name).mkdir()
        for f in files:
            (tmp_path / name / f).write_bytes(b"")

    case("case_00000", "imaging.nii.gz", "segmentation.nii.gz")  # KiTS19 training case; KiTS23
    case("case_00001", "imaging.nii.gz", "aggregated_MAJ_seg.nii.gz", "aggregated_OR_seg.nii.gz")  # KiTS21
    case("case_00002", "imaging.nii.gz")  # KiTS19's test cases 210-299: imaging only
    case("case_00003", "imaging.nii.gz", "segmentation.nii.gz", "aggregated_MAJ_seg.nii.gz")
    case("case_00004", "segmentation.nii.gz")  # labels only (the synth-ct input)
    case("notes")
    cases = find_cases(tmp_path)
    assert {c.case_id: c.label.name if c.label else None for c in cases} == {
        "case_00000": "segmentation.nii.gz",
        "case_00001": "aggregated_MAJ_seg.nii.gz",
        "case_00002": None,
        "case_00003": "segmentation.nii.gz",
    }
    with caplog.at_level(logging.INFO, logger="training.datasets"):
        kept = labelled(cases, tmp_path)
    assert [c.case_id for c in kept] == ["case_00000", "case_00001", "case_00003"]
    assert "1 case(s) without segmentation.nii.gz or aggregated_MAJ_seg.nii.gz left out: case_00002" in caplog.text
    # A named label file is the only one looked for.
    union = find_cases(tmp_path, label_file="aggregated_OR_seg.nii.gz")
    assert [c.case_id for c in labelled(union, tmp_path, "aggregated_OR_seg.nii.gz")] == ["case_00001"]
    labels_only = find_cases(tmp_path, need_image=False)
    assert [c.case_id for c in labels_only if c.label is not None] == [
        "case_00000",
        "case_00001",
        "case_00003",
        "case_00004",
    ]
    with pytest.raises(DatasetError, match=r"has both imaging\.nii\.gz and segmentation\.nii\.gz or"):
        labelled([c for c in cases if c.label is None], tmp_path)
    # Pointed at a KiTS repository instead of its data folder: the message says where the cases are.
    repo = tmp_path / "kits23"
    (repo / "dataset" / "case_00000").mkdir(parents=True)
    (repo / "dataset" / "case_00000" / "imaging.nii.gz").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"try .*kits23/dataset\)"):
        labelled(find_cases(repo), repo)
    for bad in ("", "../segmentation.nii.gz", "sub/segmentation.nii.gz"):
        with pytest.raises(DatasetError, match="a file name inside each case folder"):
            find_cases(tmp_path, label_file=bad)


def _tiny_train_args(data: Path, run: Path) -> list[str]:
    args = ["train", "--data", str(data), "--out", str(run), "--epochs", "1", "--iters", "2", "--batch-size", "2"]
    args += ["--patch", "32", "--base-width", "4", "--depth", "3", "--val-fraction", "0.34", "--no-progress"]
    return [*args, "--device", "cpu", "--memory-format", "contiguous", "--no-tune-malloc"]


def _as_nnunet_dataset(kits: Path, root: Path, ending: str = ".nii.gz") -> None:
    """The KiTS-layout cases under ``kits`` copied as nnU-Net's KiTS conversions lay them out."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "file_ending": ending}))
    for c in find_cases(kits):
        assert c.image is not None and c.label is not None
        for src, dst in ((c.image, root / "imagesTr" / f"{c.case_id}_0000{ending}"), (c.label, root / "labelsTr" / f"{c.case_id}{ending}")):  # fmt: skip
            if ending == ".nii":
                dst.write_bytes(gzip.decompress(src.read_bytes()))
            else:
                shutil.copy(src, dst)


def test_an_nnunet_raw_dataset_trains_and_evaluates_like_its_kits_folder(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    # Users who compare with nnU-Net have KiTS converted to nnUNet_raw/DatasetXXX already.
    kits = tmp_path / "kits"
    for i in range(4):
        _one_phantom((i, str(kits), 48, False, 0))
    ds = tmp_path / "Dataset040_KiTS"
    _as_nnunet_dataset(kits, ds)
    (ds / "imagesTr" / "case_00009_0000.nii.gz").write_bytes(b"")  # an image without its label
    cases = find_cases(ds)
    assert [c.case_id for c in cases] == ["case_00000", "case_00001", "case_00002", "case_00003", "case_00009"]
    assert cases[1].image == ds / "imagesTr" / "case_00001_0000.nii.gz"
    assert cases[1].label == ds / "labelsTr" / "case_00001.nii.gz"
    with caplog.at_level(logging.INFO, logger="training.datasets"):
        kept = labelled(cases, ds)
    assert len(kept) == 4 and "1 case(s) without an image and a label left out: case_00009" in caplog.text
    # The same cases train, and a checkpoint scores them alike from either layout.
    run = tmp_path / "run"
    assert main([*_tiny_train_args(ds, run), "--folds", "2", "--fold", "0"]) == 0
    ckpt = str(run / "best.safetensors")
    tables = []
    for data in (ds, kits):
        out = tmp_path / f"eval-{data.name}"
        assert (
            main(["evaluate", "--checkpoint", ckpt, "--data", str(data), "--out", str(out), "--backend", "torch"]) == 0
        )
        tables.append(json.loads((out / "summary.json").read_text())["cases"])
    assert tables[0] == [{**r, "seconds": tables[0][i]["seconds"]} for i, r in enumerate(tables[1])]
    # Uncompressed files, as dataset.json's file_ending says; one channel only; no label_file.
    plain = tmp_path / "Dataset041_KiTS"
    _as_nnunet_dataset(kits, plain, ".nii")
    assert [c.label.name for c in labelled(find_cases(plain), plain) if c.label] == [
        f"case_0000{i}.nii" for i in range(4)
    ]
    (plain / "imagesTr" / "case_00000_0001.nii").write_bytes(b"")
    with pytest.raises(DatasetError, match="one CT channel"):
        find_cases(plain)
    with pytest.raises(DatasetError, match="no label_file"):
        find_cases(ds, label_file="segmentation.nii.gz")
    # The test split, as nnUNetv2_predict and _evaluate_folder take it: --data imagesTs/ (or
    # labelsTs/) is that split of the dataset; the dataset's root stays its training cases.
    for sub in ("imagesTs", "labelsTs"):
        (ds / sub).mkdir()
    shutil.copy(kits / "case_00002" / "imaging.nii.gz", ds / "imagesTs" / "case_00102_0000.nii.gz")
    shutil.copy(kits / "case_00002" / "segmentation.nii.gz", ds / "labelsTs" / "case_00102.nii.gz")
    shutil.copy(kits / "case_00003" / "imaging.nii.gz", ds / "imagesTs" / "case_00103_0000.nii.gz")  # no labels
    for given in ("imagesTs", "labelsTs"):
        ts = find_cases(ds / given)
        assert [(c.case_id, c.label is not None) for c in ts] == [("case_00102", True), ("case_00103", False)]
        assert ts[0].image == ds / "imagesTs" / "case_00102_0000.nii.gz"
    assert [c.case_id for c in find_cases(ds)][:4] == [f"case_0000{i}" for i in range(4)]
    out = tmp_path / "eval-ts"
    ev = ["evaluate", "--checkpoint", ckpt, "--data", str(ds / "imagesTs"), "--out", str(out), "--backend", "torch"]
    assert main(ev) == 0
    (ts_row,) = json.loads((out / "summary.json").read_text())["cases"]
    assert ts_row == {**tables[1][2], "case": "case_00102", "seconds": ts_row["seconds"]}  # case_00002's scores
    (ds / "dataset.json").write_text(json.dumps({"file_ending": ".mha"}))
    with pytest.raises(DatasetError, match="kitseg reads NIfTI"):
        find_cases(ds)


def test_kfold_splits_are_nnunets_folds() -> None:
    # scikit-learn's KFold(n_splits, shuffle=True, random_state=12345) over the sorted ids, which
    # nnU-Net's splits_final.json holds, gave these validation folds (scikit-learn 1.x, numpy 2).
    ids = [f"case_{i:05d}" for i in (6, 2, 0, 5, 3, 1, 4)]  # the order given doesn't matter
    folds = kfold_splits(ids, 3)
    assert [f["val"] for f in folds] == [
        ["case_00003", "case_00004", "case_00006"],
        ["case_00000", "case_00001"],
        ["case_00002", "case_00005"],
    ]
    kits19 = kfold_splits([f"case_{i:05d}" for i in range(210)])
    assert [f["val"][:6] for f in kits19] == [
        [f"case_{i:05d}" for i in v]
        for v in (
            (14, 16, 17, 19, 20, 27),
            (2, 10, 24, 26, 35, 40),
            (4, 8, 9, 13, 15, 18),
            (0, 3, 5, 6, 12, 21),
            (1, 7, 11, 23, 29, 31),
        )
    ]
    for f in kits19:
        assert len(f["val"]) == 42 and sorted(f["train"] + f["val"]) == sorted(f"case_{i:05d}" for i in range(210))
    assert sorted(x for f in kits19 for x in f["val"]) == [f"case_{i:05d}" for i in range(210)]
    with pytest.raises(DatasetError, match="2-3 folds"):
        kfold_splits(["a", "b", "c"], 5)


def test_read_splits_and_fold_cases_refuse_what_does_not_fit(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for i in range(3):
        _one_phantom((i, str(data), 48, False, 0))
    cases = find_cases(data)
    good = tmp_path / "splits_final.json"
    good.write_text(json.dumps([{"train": ["case_00000", "case_00002"], "val": ["case_00001"]}]))
    train, val = fold_cases(cases, read_splits(good), 0, data)
    assert [c.case_id for c in train] == ["case_00000", "case_00002"] and [c.case_id for c in val] == ["case_00001"]
    for text, match in [
        ("[1, 2]", "not a splits file"),
        ('{"train": [], "val": []}', "not a splits file"),
        ('[{"train": ["case_00000"]}]', "not a splits file"),
        ("[", "cannot read"),
    ]:
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(DatasetError, match=match):
            read_splits(bad)
    with pytest.raises(DatasetError, match="cannot read"):
        read_splits(tmp_path / "missing.json")
    with pytest.raises(DatasetError, match="fold 1 does not exist"):
        fold_cases(cases, read_splits(good), 1, data)
    for fold, match in [
        ({"train": ["case_00000", "case_00009"], "val": ["case_00001"]}, "case_00009"),
        ({"train": ["case_00000", "case_00001"], "val": ["case_00001"]}, "both training and validation"),
        ({"train": ["case_00000"], "val": []}, "needs training and validation"),
    ]:
        with pytest.raises(DatasetError, match=match):
            fold_cases(cases, [fold], 0, data)


def test_train_and_evaluate_on_a_cross_validation_fold(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    for i in range(4):
        _one_phantom((i, str(data), 48, False, 0))
    run = tmp_path / "run"
    args = _tiny_train_args(data, run)
    assert main([*args, "--folds", "2", "--fold", "1"]) == 0
    ids = [f"case_{i:05d}" for i in range(4)]
    want = kfold_splits(ids, 2)
    # The run wrote every fold, in nnU-Net's format, and trained on fold 1.
    assert json.loads((run / "splits_final.json").read_text()) == want
    meta = read_meta(run / "best.safetensors")
    assert meta.provenance["val_cases"] == want[1]["val"] and meta.provenance["train_cases"] == want[1]["train"]
    assert meta.provenance["fold"] == 1 and "2 folds" in meta.provenance["splits"]
    # Evaluated on the same fold, from the run's file: its validation cases only.
    capsys.readouterr()
    out = tmp_path / "eval"
    ckpt = str(run / "best.safetensors")
    assert main(["evaluate", "--checkpoint", ckpt, "--data", str(data), "--out", str(out), "--fold", "1",
                 "--splits", str(run / "splits_final.json"), "--backend", "torch"]) == 0  # fmt: skip
    scored = {r["case"]: r for r in csv.DictReader((out / "cases.csv").open())}
    assert list(scored) == want[1]["val"]
    # Fold 0 too, then both folds' checkpoints at once: every case scored once, by its own fold's
    # model, with the same Dice as each fold's own evaluation.
    run0 = tmp_path / "run0"
    assert main([*[str(run0) if a == str(run) else a for a in args], "--folds", "2", "--fold", "0"]) == 0
    ckpt0 = str(run0 / "best.safetensors")
    assert main(["evaluate", "--checkpoint", ckpt0, "--data", str(data), "--out", str(tmp_path / "eval0"),
                 "--folds", "2", "--fold", "0", "--backend", "torch"]) == 0  # fmt: skip
    scored.update({r["case"]: r for r in csv.DictReader((tmp_path / "eval0" / "cases.csv").open())})
    # The folds normalise alike (intensities from all their cases), so they make an ensemble.
    assert read_meta(ckpt0).preprocessing == read_meta(ckpt).preprocessing
    ens = tmp_path / "ensemble"
    assert (
        main(["evaluate", "--checkpoint", ckpt0, ckpt, "--data", str(data), "--out", str(ens), "--backend", "torch"])
        == 0
    )
    assert json.loads((ens / "summary.json").read_text())["checkpoint"] == [ckpt0, ckpt]
    assert "an ensemble of 2 checkpoints" in capsys.readouterr().out
    cv = tmp_path / "cv"
    assert (
        main(["evaluate", "--held-out", ckpt0, ckpt, "--data", str(data), "--out", str(cv), "--backend", "torch"]) == 0
    )
    rows = list(csv.DictReader((cv / "cases.csv").open()))
    assert [r["case"] for r in rows] == ids
    for r in rows:
        assert float(r["composite"]) == pytest.approx(float(scored[r["case"]]["composite"]), abs=1e-12)
    summary = json.loads((cv / "summary.json").read_text())
    assert summary["held_out"] == {ckpt0: want[0]["val"], ckpt: want[1]["val"]}
    assert summary["summary"]["composite"] == pytest.approx(np.mean([float(r["composite"]) for r in rows]))
    # A case held out twice is refused, and --held-out takes no case selection.
    assert main(["evaluate", "--held-out", ckpt, ckpt, "--data", str(data)]) == 2
    assert "held out by both" in capsys.readouterr().err
    assert main(["evaluate", "--held-out", ckpt, "--data", str(data), "--fold", "1"]) == 2
    # A run without a fold writes its own split as nnU-Net's fold 0.
    plain = tmp_path / "plain"
    assert main([*[str(plain) if a == str(run) else a for a in args]]) == 0
    (only,) = json.loads((plain / "splits_final.json").read_text())
    meta = read_meta(plain / "best.safetensors")
    assert only == {"train": meta.provenance["train_cases"], "val": meta.provenance["val_cases"]}
    assert "fold" not in meta.provenance
    # Conflicting or incomplete choices are refused before anything runs.
    for bad in (["--fold", "0", "--val-cases", "case_00000"], ["--splits", str(run / "splits_final.json")]):
        assert main([*args, *bad]) == 2
    assert main(["evaluate", "--checkpoint", ckpt, "--data", str(data), "--fold", "0", "--cases", "case_00000"]) == 2
    assert "not both" in capsys.readouterr().err


def test_train_and_evaluate_leave_out_cases_without_labels_and_read_kits21_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The KiTS19 download holds the 90 test cases with imaging only, and KiTS21 names its labels
    # aggregated_MAJ_seg.nii.gz: training used to stop on an AssertionError for the first.
    data = tmp_path / "data"
    for i in range(5):
        _one_phantom((i, str(data), 48, False, 0))
    (data / "case_00003" / "segmentation.nii.gz").unlink()
    (data / "case_00004" / "segmentation.nii.gz").rename(data / "case_00004" / "aggregated_MAJ_seg.nii.gz")
    run = tmp_path / "run"
    assert main(_tiny_train_args(data, run)) == 0
    _, meta = load_checkpoint(run / "best.safetensors")
    used = meta.provenance["train_cases"] + meta.provenance["val_cases"]
    assert sorted(used) == ["case_00000", "case_00001", "case_00002", "case_00004"]
    ev = ["evaluate", "--checkpoint", str(run / "best.safetensors"), "--data", str(data), "--device", "cpu"]
    assert main([*ev, "--out", str(tmp_path / "ev")]) == 0
    rows = json.loads((tmp_path / "ev" / "summary.json").read_text())["cases"]
    assert [r["case"] for r in rows] == ["case_00000", "case_00001", "case_00002", "case_00004"]
    capsys.readouterr()
    # Asked-for cases that can't be scored are errors, not silent skips.
    assert main([*ev, "--cases", "case_00003,case_00001"]) == 2
    assert "case(s) not found with imaging and labels" in capsys.readouterr().err
    assert main([*_tiny_train_args(data, tmp_path / "run2"), "--val-cases", "case_00003"]) == 2
    assert "validation case(s) not found with imaging and labels" in capsys.readouterr().err
    # A folder with imaging only: a message and status 2 for both commands.
    for d in ("case_00000", "case_00001", "case_00002"):
        (data / d / "segmentation.nii.gz").unlink()
    (data / "case_00004" / "aggregated_MAJ_seg.nii.gz").unlink()
    assert main(_tiny_train_args(data, tmp_path / "run3")) == 2
    assert main(ev) == 2
    assert capsys.readouterr().err.count("has both imaging.nii.gz and") == 2


def test_evaluate_scores_another_tools_masks_with_the_same_metrics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from segcore.metrics import kits19, tumor_sizes

    data = tmp_path / "data"
    for i in range(3):
        _one_phantom((i, str(data), 48, False, 0))
    refs = {c.case_id: nib.load(str(c.label)) for c in find_cases(data)}
    preds = tmp_path / "preds"
    preds.mkdir()

    def write(path: Path, labels: np.ndarray, affine: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(labels.astype(np.uint8), affine), str(path))

    # nnU-Net's flat names, and kitseg-predict's folders; case 1 with its tumor called kidney.
    ref0, ref1, ref2 = (np.asanyarray(refs[f"case_0000{i}"].dataobj) for i in range(3))
    assert (ref1 == 2).any()
    write(preds / "case_00000.nii.gz", ref0, refs["case_00000"].affine)
    write(preds / "case_00001.nii.gz", np.where(ref1 == 2, 1, ref1), refs["case_00001"].affine)
    write(preds / "case_00002" / "imaging_mask.nii.gz", ref2, refs["case_00002"].affine)
    ev = ["evaluate", "--predictions", str(preds), "--data", str(data)]
    assert main([*ev, "--out", str(tmp_path / "ev")]) == 0
    rows = {r["case"]: r for r in json.loads((tmp_path / "ev" / "summary.json").read_text())["cases"]}
    assert set(rows) == {"case_00000", "case_00001", "case_00002"}
    for case_id, pred in (("case_00000", ref0), ("case_00001", np.where(ref1 == 2, 1, ref1)), ("case_00002", ref2)):
        ref = np.asanyarray(refs[case_id].dataobj)
        want = kits19(pred, ref)
        assert rows[case_id]["kidney_dice"] == pytest.approx(want["kidney_dice"])
        assert rows[case_id]["tumor_dice"] == pytest.approx(want["tumor_dice"])
        zooms = refs[case_id].header.get_zooms()[:3]
        assert rows[case_id]["ref_tumor_ml"] == pytest.approx(tumor_sizes(ref, zooms)["ref_tumor_ml"])
    assert rows["case_00000"]["composite"] == 1.0 and rows["case_00001"]["tumor_dice"] == 0.0
    assert "masks from" in capsys.readouterr().out
    # A missing mask, a mask on another grid, and both sources at once: errors with status 2.
    (preds / "case_00002" / "imaging_mask.nii.gz").unlink()
    assert main(ev) == 2
    err = capsys.readouterr().err
    assert "no prediction" in err and "for: case_00002" in err
    write(preds / "case_00002.nii.gz", ref2, refs["case_00002"].affine @ np.diag([1.0, 1.0, 2.0, 1.0]))
    assert main(ev) == 2
    assert "must be on its image's voxel grid" in capsys.readouterr().err
    assert main([*ev, "--checkpoint", str(tmp_path / "x.safetensors")]) == 2


def test_kits21_cysts_train_a_four_class_model_and_are_refused_by_a_three_class_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    for i in range(3):
        _one_phantom((i, str(data), 48, True, 0))
        case = data / f"case_{i:05d}"
        (case / "segmentation.nii.gz").rename(case / "aggregated_MAJ_seg.nii.gz")
    assert (load_labels(data / "case_00000" / "aggregated_MAJ_seg.nii.gz")[0] == 3).any()
    run = tmp_path / "run"
    # A 3-class model has no class for the cysts: resampling would have trained them as tumor.
    three = [*_tiny_train_args(data, run), "--val-cases", "case_00001"]
    assert main(three) == 2
    err = capsys.readouterr().err
    assert "case_00000: aggregated_MAJ_seg.nii.gz holds label 3, but a 3-class model" in err and "--kits23" in err
    assert main([*three, "--kits23"]) == 0
    _, meta = load_checkpoint(run / "best.safetensors")
    assert meta.model.num_classes == 4 and meta.label_value("cyst") == 3
    # The 4-class run's cache holds cysts; a 3-class run reading it refuses them the same way.
    assert main([*three, "--cache", str(run / "cache")]) == 2
    assert "holds label 3" in capsys.readouterr().err
    ev = ["evaluate", "--checkpoint", str(run / "best.safetensors"), "--data", str(data), "--device", "cpu"]
    assert main([*ev, "--out", str(tmp_path / "ev")]) == 0
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())["summary"]
    assert {"kits23_masses_dice", "kits23_tumor_dice"} <= set(summary)


def test_cache_and_sampler_oversample_foreground(tmp_path: Path) -> None:
    from segcore.preprocessing import PreprocessConfig

    for i in range(2):
        _one_phantom((i, str(tmp_path / "d"), 64, False, 0))
    cases = find_cases(tmp_path / "d")
    cache = CaseCache(tmp_path / "c", PreprocessConfig(target_spacing_mm=None), 3)
    arrays = [cache.get(c) for c in cases]
    assert isinstance(arrays[0][0], np.memmap)
    stamp = next((tmp_path / "c").rglob("*.stamp")).stat().st_mtime_ns
    cache.get(cases[0])  # reused, not rebuilt
    assert next((tmp_path / "c").rglob("*.stamp")).stat().st_mtime_ns == stamp
    ds = SliceDataset(arrays, context=1, patch=32, length=64, fg_fraction=0.8, seed=0)
    fg = sum(bool((ds[i][1] > 0).any()) for i in range(64))
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and y.shape == (32, 32) and y.dtype == torch.int64
    assert fg > 32, "foreground slices must be oversampled"


def test_cache_fill_in_worker_processes_builds_what_the_process_itself_would(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from segcore.preprocessing import PreprocessConfig
    from training import datasets

    for i in range(3):
        _one_phantom((i, str(tmp_path / "d"), 48, False, 0))
    cases = find_cases(tmp_path / "d")
    pp = PreprocessConfig(target_spacing_mm=(2.0, 2.0))
    alone, pool = CaseCache(tmp_path / "a", pp, 3), CaseCache(tmp_path / "p", pp, 3)
    assert alone.fill(cases[:1], workers=0) == 1
    assert alone.fill(cases, workers=0) == 2  # only what isn't cached yet
    assert pool.fill(cases, workers=2) == 3  # two spawned processes
    assert pool.fill(cases, workers=2) == 0 and all(pool.cached(c) for c in cases)
    for c in cases:
        for x, y in zip(alone.get(c), pool.get(c), strict=True):
            assert np.array_equal(x, y)
    # A case that can't be built stops the pool with its own error.
    bad = tmp_path / "bad"
    for i in range(3):
        _one_phantom((i, str(bad), 48, False, 0))
    seg = nib.load(str(bad / "case_00001" / "segmentation.nii.gz"))
    labels = np.asanyarray(seg.dataobj).copy()
    labels[labels == 2] = 3
    nib.save(nib.Nifti1Image(labels, seg.affine), str(bad / "case_00001" / "segmentation.nii.gz"))
    with pytest.raises(DatasetError, match=r"case_00001: segmentation\.nii\.gz holds label 3"):
        CaseCache(tmp_path / "b", pp, 3).fill(find_cases(bad), workers=2)
    # A changed source file is built again.
    os.utime(cases[1].label, (1, 1))
    assert not pool.cached(cases[1]) and pool.fill(cases, workers=0) == 1
    # By default small jobs stay in the process, and large ones get a process per core, at most
    # 8, given 4 cores or more.
    monkeypatch.setattr(datasets, "available_cores", lambda: 16)
    assert datasets.default_cache_workers(cases) == 0
    monkeypatch.setattr(datasets, "CACHE_POOL_MIN_BYTES", 0)
    assert datasets.default_cache_workers(cases) == 8
    monkeypatch.setattr(datasets, "available_cores", lambda: 3)
    assert datasets.default_cache_workers(cases) == 0
    monkeypatch.undo()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * (os.cpu_count() or 1)))
    assert datasets.available_cores() == 1


def test_validation_copies_are_decompressed_once_and_again_when_a_source_changes(tmp_path: Path) -> None:
    from training.datasets import DecodedCopies

    _one_phantom((0, str(tmp_path / "d"), 48, False, 0))
    (case,) = find_cases(tmp_path / "d")
    assert case.image is not None and case.label is not None
    copies = DecodedCopies(tmp_path / "val")
    got = copies.get(case)
    assert got.case_id == case.case_id and got.image is not None and got.label is not None
    assert (got.image.name, got.label.name) == ("imaging.nii", "segmentation.nii")
    np.testing.assert_array_equal(load_volume(got.image, mmap=True).stored, load_volume(case.image).stored)
    np.testing.assert_array_equal(load_labels(got.label)[0], load_labels(case.label)[0])
    made = {p: p.stat().st_mtime_ns for p in (got.image, got.label)}
    assert copies.get(case) == got and {p: p.stat().st_mtime_ns for p in made} == made  # not made again
    os.utime(case.label, ns=(1, 1))
    copies.get(case)
    assert got.label.stat().st_mtime_ns != made[got.label] and got.image.stat().st_mtime_ns == made[got.image]
    # Files that aren't gzip are read where they are.
    plain = tmp_path / "plain" / "case_00001"
    plain.mkdir(parents=True)
    for f in ("imaging.nii.gz", "segmentation.nii.gz"):
        (plain / f).write_bytes(gzip.decompress((case.image.parent / f).read_bytes()))
    (plain_case,) = find_cases(plain.parent)
    assert copies.get(plain_case) == plain_case


def test_dataloader_workers_draw_each_epochs_own_patches(tmp_path: Path) -> None:
    # Persistent DataLoader workers keep their own copy of the dataset across epochs: the epoch
    # must still reach them, or every epoch repeats epoch 0's patches. The labels are compared
    # (the intensity noise comes from each process's own torch RNG).
    from torch.utils.data import DataLoader

    from segcore.preprocessing import PreprocessConfig
    from training.datasets import Augment

    for i in range(2):
        _one_phantom((i, str(tmp_path / "d"), 64, False, 0))
    cache = CaseCache(tmp_path / "c", PreprocessConfig(target_spacing_mm=None), 3)
    arrays = [cache.get(c) for c in find_cases(tmp_path / "d")]
    labels: dict[int, list[torch.Tensor]] = {}
    for workers in (0, 2):
        ds = SliceDataset(arrays, context=1, patch=32, length=8, fg_fraction=0.8, augment=Augment(), seed=0)
        loader = DataLoader(ds, batch_size=4, num_workers=workers, persistent_workers=workers > 0)
        labels[workers] = []
        for epoch in range(3):
            ds.set_epoch(epoch)
            labels[workers].append(torch.cat([y for _, y in loader]))
    for a, b in zip(labels[0], labels[2], strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(labels[2][0], labels[2][1]) and not torch.equal(labels[2][1], labels[2][2])


def test_default_workers_none_on_a_cpu_and_the_spare_cores_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    import training.train as tt

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for cores, ranks, want in ((16, 1, 12), (32, 1, 12), (16, 4, 3), (6, 1, 5), (2, 1, 1), (4, 8, 1)):
        monkeypatch.setattr(tt.os, "sched_getaffinity", lambda pid, n=cores: set(range(n)), raising=False)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))
        assert tt.default_workers(cuda) == want, (cores, ranks)
        assert tt.default_workers(cpu) == 0


def test_component_sampling_trains_on_small_tumors_as_often_as_large() -> None:
    # One case: a 3-voxel tumor in one slice, and a 20-slice one far from it.
    lab = np.zeros((32, 64, 64), dtype=np.uint8)
    lab[2:30, 4:60, 4:60] = 1
    lab[4, 10, 10:13] = 2
    lab[10:30, 30:50, 30:50] = 2
    img = np.zeros(lab.shape, dtype=np.float16)
    assert sorted(len(c) for c in tumor_components(lab)) == [3, 4096]  # at most 4096 kept per tumor

    def small_share(mode: str) -> float:
        ds = SliceDataset([(img, lab)], context=0, patch=16, length=600, fg_fraction=1.0, seed=0, tumor_sampling=mode)
        # A 16 px patch centred within 5 px of a big-tumor pixel shows >= 9 of them; the small one
        # has 3 pixels.
        return float(np.mean([1 <= int((ds[i][1] == 2).sum()) <= 3 for i in range(600)]))

    # Half the patches are tumor patches (fg_fraction 1): "component" puts half of those on the
    # small tumor (0.25), "slice" 1 in 21 of them (0.024).
    assert small_share("component") > 0.18
    assert small_share("slice") < 0.06
    with pytest.raises(ValueError, match="tumor_sampling"):
        SliceDataset([(img, lab)], context=0, patch=16, length=1, tumor_sampling="voxel")


def test_train_writes_checkpoints_log_plot_and_resumes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for i in range(3):
        _one_phantom((i, str(data), 48, False, 0))
    args = [
        "train",
        "--data",
        str(data),
        "--out",
        str(tmp_path / "run"),
        "--epochs",
        "2",
        "--iters",
        "2",
        "--batch-size",
        "2",
        "--patch",
        "32",
        "--base-width",
        "4",
        "--depth",
        "3",
        "--val-fraction",
        "0.34",
        "--no-progress",
        "--device",
        "cpu",
        "--memory-format",
        "contiguous",
        # mallopt is process-wide; this test runs inside pytest (the CLI dry runs cover it).
        "--no-tune-malloc",
        "--min-tumor-ml",
        "0.25",
    ]
    assert main(args) == 0
    run = tmp_path / "run"
    for f in ("best.safetensors", "last.safetensors", "last.state.pt", "metrics.jsonl", "curves.png"):
        assert (run / f).exists(), f
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert {"val_kidney_dice", "val_tumor_dice", "val_composite", "train_loss"} <= set(rows[0])
    _, meta = load_checkpoint(run / "best.safetensors")
    assert meta.provenance["val_cases"] and not set(meta.provenance["val_cases"]) & set(meta.provenance["train_cases"])
    # Validation read uncompressed copies of its cases, made once.
    for case_id in meta.provenance["val_cases"]:
        assert (run / "cache" / "val" / case_id / "imaging.nii").is_file()
    assert meta.provenance["memory_format"] == "contiguous" and meta.provenance["malloc_tuned"] is False
    assert meta.postprocessing.min_tumor_ml == 0.25
    # `postprocess` rewrites only the post-processing; the weights and their hash stay.
    new = tmp_path / "post.safetensors"
    assert (
        main(["postprocess", "--checkpoint", str(run / "best.safetensors"), "--out", str(new), "--min-tumor-ml", "0"])
        == 0
    )
    meta2 = read_meta(new)
    assert meta2.postprocessing.min_tumor_ml == 0.0 and meta2.weights_sha256 == meta.weights_sha256
    assert [c["to"]["min_tumor_ml"] for c in meta2.provenance["postprocessing_changes"]] == [0.0]
    assert main(["postprocess", "--checkpoint", str(run / "best.safetensors"), "--out", str(new)]) == 2
    for bad in ("-1", "nan", "inf", "x"):
        with pytest.raises(SystemExit) as exc:
            main(["postprocess", "--checkpoint", str(new), "--out", str(new), "--min-tumor-ml", bad])
        assert exc.value.code == 2
    # A missing or tampered checkpoint is a clear error with status 2, not a traceback.
    assert (
        main(
            [
                "postprocess",
                "--checkpoint",
                str(tmp_path / "nope.safetensors"),
                "--out",
                str(new),
                "--min-tumor-ml",
                "1",
            ]
        )
        == 2
    )
    raw = bytearray(new.read_bytes())
    raw[-1] ^= 0xFF
    (tmp_path / "tampered.safetensors").write_bytes(bytes(raw))
    assert main(["evaluate", "--checkpoint", str(tmp_path / "tampered.safetensors"), "--data", str(data)]) == 2
    assert read_meta(new).postprocessing.min_tumor_ml == 0.0  # nothing was written over it
    # Resume continues at epoch 3 with the saved history.
    assert main([*args[:6], "3", *args[7:], "--resume", str(run / "last.state.pt")]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]


def test_val_every_validates_every_n_epochs_and_the_last(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    for i in range(3):
        _one_phantom((i, str(data), 48, False, 0))
    run = tmp_path / "run"
    args = [a if a != "1" else "5" for a in _tiny_train_args(data, run)]  # 5 epochs
    assert args[args.index("--epochs") + 1] == "5"
    assert main([*args, "--val-every", "2"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["epoch"] for r in rows if "val_composite" in r] == [2, 4, 5]  # and the last, 5
    _, last = load_checkpoint(run / "last.safetensors")
    assert last.metrics["epoch"] == 5 and (run / "curves.png").stat().st_size > 0
    _, best = load_checkpoint(run / "best.safetensors")
    assert best.metrics["epoch"] in (2, 4, 5)
    assert read_meta(run / "last.safetensors").provenance["train_config"]["val_every"] == 2
    # Resumed to 7 epochs, it goes on from 6 with the same rule.
    more = [a if a != "5" else "7" for a in args]
    assert main([*more, "--val-every", "2", "--resume", str(run / "last.state.pt")]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if "val_composite" in r] == [2, 4, 5, 6, 7]
    # The --max-minutes guard stops only after a validated epoch: here the first, over budget.
    guarded = tmp_path / "guarded"
    assert (
        main([*[str(guarded) if a == str(run) else a for a in args], "--val-every", "3", "--max-minutes", "1e-6"]) == 0
    )
    rows = [json.loads(line) for line in (guarded / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], "val_composite" in r) for r in rows] == [(1, True)]
    with pytest.raises(SystemExit) as exc:  # argparse's own error
        main([*args, "--val-every", "0"])
    assert exc.value.code == 2 and "argument --val-every: must be >= 1, got 0" in capsys.readouterr().err
    assert main([*args, "--val-every", "2", "--max-minutes", "10", "--fit-schedule"]) == 2
    assert "fit_schedule decides the last epoch after it ends" in capsys.readouterr().err


def _tiny_depth4_run(tmp_path: Path, memory_format: str) -> tuple[list[str], Path]:
    """Three 48x48 phantoms and the arguments of a 1-epoch, depth-4 training run on them."""
    data = tmp_path / "data"
    for i in range(3):
        _one_phantom((i, str(data), 48, False, 0))
    run = tmp_path / "run"
    args = ["train", "--data", str(data), "--out", str(run), "--epochs", "1", "--iters", "2", "--batch-size", "2"]
    args += ["--patch", "32", "--base-width", "4", "--depth", "4", "--val-fraction", "0.34", "--no-progress"]
    args += ["--device", "cpu", "--memory-format", memory_format, "--no-tune-malloc"]
    return args, run


def test_training_steps_leave_the_loss_on_the_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Reading a tensor back (float(), item(), tolist(), ...) waits for the device; on a GPU a wait
    # per step leaves it idle while the next step is queued. So the trainer's own reads must not
    # grow with the steps: the losses are read once per epoch (and by a shown progress bar).
    args, run = _tiny_depth4_run(tmp_path, "contiguous")
    train_file = str(ROOT / "training" / "train.py")
    reads: list[int] = []

    def counted(name: str) -> None:
        orig = getattr(torch.Tensor, name)

        def read(self: torch.Tensor, *a: object, **k: object) -> object:
            if sys._getframe(1).f_code.co_filename == train_file:
                reads[-1] += 1
            return orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, read)

    for name in ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__"):
        counted(name)
    for iters in ("2", "8"):
        args[args.index("--iters") + 1] = iters
        reads.append(0)
        assert main(args) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert np.isfinite(rows[0]["train_loss"]) and rows[0]["train_loss"] > rows[0]["train_dice_loss"] > 0
    assert reads[0] > 0 and reads[1] == reads[0]


def test_ddp_on_cuda_binds_each_rank_to_its_gpu_and_keeps_control_tensors_there(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Multi-GPU runs can't be launched here, so the NCCL set-up is checked with the process-group
    # calls stubbed: a CPU tensor in an NCCL broadcast fails ("No backend type associated with
    # device type cpu"), and the memory-format flag is broadcast at the start of every DDP run.
    import training.train as tt

    assert tt.collective_device("nccl", 3) == torch.device("cuda", 3)
    assert tt.collective_device("gloo", 3) == torch.device("cpu")
    calls: list[object] = []
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(tt.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(tt.dist, "init_process_group", lambda **kw: calls.append(("init", kw)))
    monkeypatch.setattr(tt.dist, "get_backend", lambda: "nccl")
    monkeypatch.setattr(tt.torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    wait = timedelta(minutes=30)
    ddp = tt.Distributed(torch.device("cuda"), timeout=wait)
    nccl = {"backend": "nccl", "device_id": torch.device("cuda", 1), "timeout": wait}
    assert calls == [("set_device", 1), ("init", nccl)]
    assert ddp.enabled and ddp.rank == 2 and ddp.control_device == torch.device("cuda", 1)
    calls.clear()
    monkeypatch.setattr(tt.dist, "get_backend", lambda: "gloo")
    ddp = tt.Distributed(torch.device("cpu"), timeout=wait)
    assert calls == [("init", {"backend": "gloo", "timeout": wait})] and ddp.control_device == torch.device("cpu")


def test_balanced_shares() -> None:
    assert balanced_shares([4, 1, 1, 1, 1], 2) == [[0], [1, 2, 3, 4]]
    assert balanced_shares([1, 1, 1, 1, 1], 2) == [[0, 2, 4], [1, 3]]  # ties: round robin
    assert balanced_shares([1, 1], 3) == [[0], [1], []]
    assert balanced_shares([3, 5, 2, 4, 6], 1) == [[0, 1, 2, 3, 4]]
    # Largest first, each to the least loaded: 9 | 8 | 7, then 4 -> 7's, 3 -> 8's, 2 -> 9's.
    assert balanced_shares([2, 9, 3, 8, 4, 7], 3) == [[0, 1], [2, 3], [4, 5]]
    costs = np.random.default_rng(0).integers(29, 1060, size=42).tolist()  # KiTS-like slice counts
    shares = balanced_shares(costs, 8)
    assert sorted(i for s in shares for i in s) == list(range(42))
    loads = [sum(costs[i] for i in s) for s in shares]
    assert max(loads) - min(loads) <= max(costs)


def _validation_collectives(rank: int, init: str, out: str) -> None:
    import training.train as tt

    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank))
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    ddp = tt.Distributed(torch.device("cpu"))
    # Each rank's BatchNorm statistics moved with its own batches, as under DDP.
    torch.manual_seed(0)
    net = UNet(UNetConfig(in_slices=1, num_classes=3, base_width=4, depth=3))
    net.train()
    torch.manual_seed(1 + rank)
    net(torch.randn(2, 1, 16, 16))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    ddp.sync_module(net)
    # Case 0 costs as much as the other four together.
    mine = ddp.share([4.0, 1.0, 1.0, 1.0, 1.0])
    gathered = ddp.gather([(i, f"scored case_{i}") for i in mine])
    torch.save({"before": before, "after": net.state_dict(), "mine": mine, "gathered": gathered}, f"{out}{rank}.pt")
    ddp.close()


def test_validation_shares_cases_across_ranks_and_validates_rank_0s_network(tmp_path: Path) -> None:
    # Two gloo processes: the shares and their gathering, and the network every rank validates.
    torch.multiprocessing.spawn(
        _validation_collectives, args=(f"file://{tmp_path / 'store'}", str(tmp_path / "rank")), nprocs=2
    )
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in (0, 1))
    assert r0["mine"] == [0] and r1["mine"] == [1, 2, 3, 4]
    assert r0["gathered"] == r1["gathered"] == [f"scored case_{i}" for i in range(5)]
    bn = next(k for k in r0["before"] if k.endswith("running_mean"))
    assert not torch.equal(r0["before"][bn], r1["before"][bn])  # the ranks' statistics differed
    for k, v in r0["before"].items():
        torch.testing.assert_close(r0["after"][k], v, rtol=0, atol=0)
        torch.testing.assert_close(r1["after"][k], v, rtol=0, atol=0)


@pytest.mark.gpu
def test_cuda_training_smoke_in_bf16_channels_last_with_cudnn_benchmark(tmp_path: Path) -> None:
    args, run = _tiny_depth4_run(tmp_path, "auto")
    args[args.index("--device") + 1] = "cuda"
    before = torch.backends.cudnn.benchmark
    try:
        assert main(args) == 0
        assert torch.backends.cudnn.benchmark
    finally:
        torch.backends.cudnn.benchmark = before
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert np.isfinite(row["train_loss"]) and row["train_slices_per_s"] > 0
    # The checkpoint written by a CUDA run loads on a CPU.
    model, meta = load_checkpoint(run / "best.safetensors", device="cpu")
    assert next(model.parameters()).device.type == "cpu"
    prov = meta.provenance
    assert prov["device"].startswith("cuda") and prov["amp"] == "bf16"
    assert prov["memory_format"] == "channels_last" and prov["cudnn_benchmark"] is True
    assert prov["workers"] >= 1  # the CUDA default: the GPU must not wait for the patches


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_train_under_autocast_with_deep_supervision(amp: str, tmp_path: Path) -> None:
    # CUDA trains under autocast (bf16 by default); CPU autocast runs the same code path here:
    # the list of outputs, the float32 loss and, for fp16, the gradient scaler.
    args, run = _tiny_depth4_run(tmp_path, "channels_last")
    args += ["--amp", amp]
    assert main([*args, "--deep-supervision", "1"]) == 0
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert np.isfinite(row["train_loss"]) and row["train_loss"] > 0
    _, meta = load_checkpoint(run / "best.safetensors")
    assert meta.provenance["train_config"]["amp"] == amp
    assert meta.provenance["amp"] == amp
    assert meta.provenance["workers"] == 0  # the CPU default


def test_amp_auto_is_bf16_on_cuda_and_fp32_on_any_cpu(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import training.train as tt

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for fast in (True, False):
        # Even with native bf16: on the development sets bf16 training scored lower (session 19).
        monkeypatch.setattr(tt, "cpu_bf16_fast", lambda fast=fast: fast)
        assert resolve_amp("auto", cpu) == "off"
        assert resolve_amp("auto", cuda) == "bf16"
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="training.train"):
            assert resolve_amp("off", cpu) == "off" and resolve_amp("bf16", cpu) == "bf16"
        assert ("without native bf16" in caplog.text) is not fast
    assert resolve_amp("fp16", cuda) == "fp16" and resolve_amp("fp16", cpu) == "fp16"
    with pytest.raises(ValueError, match="amp must be"):
        resolve_amp("fp8", cpu)


def test_train_records_the_amp_that_auto_resolved_to(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import training.train as tt

    monkeypatch.setattr(tt, "cpu_bf16_fast", lambda: True)
    args, run = _tiny_depth4_run(tmp_path, "auto")
    assert main(args) == 0
    _, meta = load_checkpoint(run / "best.safetensors")
    assert meta.provenance["train_config"]["amp"] == "auto"
    assert meta.provenance["amp"] == "off"


def test_train_with_deep_supervision_saves_the_plain_network_and_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args, run = _tiny_depth4_run(tmp_path, "contiguous")
    args += ["--deep-supervision", "2"]
    assert main(args) == 0
    model, meta = load_checkpoint(run / "last.safetensors")
    # Only the U-Net is saved: its keys and nothing else, so inference and the service load it as before.
    assert set(load_file(run / "last.safetensors")) == set(model.state_dict())
    assert meta.provenance["train_config"]["deep_supervision"] == 2
    resumed = torch.load(run / "last.state.pt", weights_only=True)
    assert set(resumed["aux"]) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    assert main([*args[:6], "2", *args[7:], "--resume", str(run / "last.state.pt")]) == 0
    assert [json.loads(r)["epoch"] for r in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert (
        main([*args[:6], "3", *args[7:-2], "--resume", str(run / "last.state.pt")]) == 2
    )  # refused with a message, not a traceback
    assert re.search("with deep supervision", capsys.readouterr().err)
    # Wrong settings fail before any preprocessing.
    assert main([*args[:-1], "3"]) == 2  # refused with a message, not a traceback
    assert re.search(r"levels must be 0 or 1\.\.depth-2 = 2, got 3", capsys.readouterr().err)
    assert main([*args[:12], "36", *args[13:]]) == 2  # refused with a message, not a traceback
    assert re.search("multiple of 8, got 36", capsys.readouterr().err)


def test_train_with_antialias_records_it_and_trains_on_antialiased_slices(tmp_path: Path) -> None:
    args, run = _tiny_depth4_run(tmp_path, "contiguous")
    args[args.index("--iters") + 1] = "1"
    # The tiny phantoms have 8.8 mm pixels (48 of them): 10 mm shrinks them, where antialiasing acts.
    assert main([*args, "--spacing", "10.0", "--antialias"]) == 0
    _, meta = load_checkpoint(run / "best.safetensors")
    assert meta.preprocessing.antialias is True
    case = find_cases(tmp_path / "data")[0]
    vol = load_volume(case.image)
    lab, _ = load_labels(case.label)
    for aa in (True, False):
        pp = dataclasses.replace(meta.preprocessing, antialias=aa)
        (cached,) = (run / "cache").glob(f"pp-*/{case.case_id}_img.npy")  # one cache: the run's
        want = preprocess_case(vol.data, vol.affine, lab, pp, 3).image
        assert want.shape[1:] == (42, 42)
        assert np.array_equal(np.load(cached), want) == aa


def test_train_with_a_residual_encoder_records_it_and_the_engine_runs_it(tmp_path: Path) -> None:
    args, run = _tiny_depth4_run(tmp_path, "contiguous")
    args[args.index("--iters") + 1] = "1"
    assert main([*args, "--block", "residual"]) == 0
    model, meta = load_checkpoint(run / "best.safetensors")
    assert meta.model.block == "residual" and meta.provenance["train_config"]["block"] == "residual"
    assert any(name.startswith("down.1.shortcut.") for name in model.state_dict())
    case = find_cases(tmp_path / "data")[0]
    pred = Engine.from_checkpoint(str(run / "best.safetensors"), device="cpu").predict(load_volume(case.image))
    assert pred.mask.shape == load_volume(case.image).shape


def test_epochs_that_fit_by_hand() -> None:
    # 12-minute budget, 100 s of setup, epochs of 40 s (median of 38, 40, 60): after epoch 3 at
    # 238 s, (720 - 238) / 40 = 12.05 -> 13 more, counting the one that crosses the budget.
    assert epochs_that_fit(3, [38.0, 40.0, 60.0], 238.0, 720.0, 30) == 16
    assert epochs_that_fit(3, [38.0, 40.0, 60.0], 238.0, 720.0, 10) == 10  # never more than planned
    assert epochs_that_fit(5, [40.0] * 5, 700.0, 720.0, 30) == 6  # one more crosses the budget
    assert epochs_that_fit(5, [40.0] * 5, 730.0, 720.0, 30) == 5  # past it: stop now
    assert epochs_that_fit(0, [], 10.0, 720.0, 30) == 30  # nothing measured yet


def test_fit_schedule_ends_the_run_annealed_where_the_budget_ends_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import training.train as train_module

    args, run = _tiny_depth4_run(tmp_path, "contiguous")
    args[args.index("--epochs") + 1] = "4"
    args[args.index("--iters") + 1] = "1"
    assert main([*args, "--fit-schedule"]) == 2  # only with --max-minutes
    calls: list[tuple[int, int]] = []

    def two_fit(done: int, durations: list[float], elapsed_s: float, budget_s: float, planned: int) -> int:
        calls.append((done, planned))
        assert len(durations) == done and budget_s == 600.0
        return 2  # as if the budget held two of the four epochs

    monkeypatch.setattr(train_module, "epochs_that_fit", two_fit)
    assert main([*args, "--max-minutes", "10", "--fit-schedule"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and calls == [(1, 4), (2, 4)]
    assert [r["schedule_epochs"] for r in rows] == [4, 2]
    assert rows[-1]["lr"] == pytest.approx(0.02 * 1e-3)  # annealed to the floor at the end of epoch 2
    _, meta = load_checkpoint(run / "last.safetensors")
    assert meta.provenance["train_config"]["fit_schedule"] is True
    # Without it the same budget keeps the 4-epoch schedule, whose LR at epoch 2 is half way down.
    assert main([*args, "--max-minutes", "10"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4] and rows[1]["lr"] == pytest.approx(0.51e-3)


def test_a_resumed_run_keeps_its_fitted_schedule_and_its_clock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import training.train as train_module

    args, run = _tiny_depth4_run(tmp_path, "contiguous")
    args[args.index("--epochs") + 1] = "4"
    args[args.index("--iters") + 1] = "1"
    args += ["--max-minutes", "10", "--fit-schedule"]
    calls: list[tuple[int, int, float]] = []

    class Killed(Exception):
        pass

    def fit(done: int, durations: list[float], elapsed_s: float, budget_s: float, planned: int) -> int:
        calls.append((done, len(durations), elapsed_s))
        if done == 2 and len(calls) == 2:
            raise Killed  # as if the run stopped after epoch 2's state was saved
        return 3  # as if the budget held three of the four epochs

    monkeypatch.setattr(train_module, "epochs_that_fit", fit)
    with pytest.raises(Killed):
        main(args)
    state = torch.load(run / "last.state.pt", weights_only=True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["schedule_epochs"]) for r in rows] == [(1, 4), (2, 3)]
    assert len(json.loads(state["epoch_seconds"])) == 2 and state["elapsed_s"] >= rows[-1]["elapsed_s"]
    old_state = tmp_path / "old.state.pt"  # a state written before the clock was saved
    torch.save({k: v for k, v in state.items() if k not in ("elapsed_s", "epoch_seconds")}, old_state)

    calls.clear()
    assert main([*args, "--resume", str(run / "last.state.pt")]) == 0
    # Fitted again at the start from the stopped run's epoch times and clock, then after epoch 3.
    assert calls == [(2, 2, state["elapsed_s"]), (3, 3, pytest.approx(calls[1][2]))]
    assert calls[1][2] > state["elapsed_s"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # The 3-epoch schedule goes on (without the saved fit it would restart at 4 epochs): epoch 3
    # is the last and ends annealed to the floor, and the run's clock counts the first part.
    assert [(r["epoch"], r["schedule_epochs"]) for r in rows] == [(1, 4), (2, 3), (3, 3)]
    assert rows[-1]["lr"] == pytest.approx(0.02 * 1e-3) and rows[-1]["elapsed_s"] > state["elapsed_s"]
    # The summary names the best epoch of the whole run, the one best.safetensors holds.
    best_epoch = load_checkpoint(run / "best.safetensors")[1].metrics["epoch"]
    assert capsys.readouterr().out.count(f"(epoch {best_epoch}, ") == 1

    # An older state: the schedule comes from its history, and the clock starts again.
    calls.clear()
    (run / "metrics.jsonl").unlink()
    assert main([*args, "--resume", str(old_state)]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["schedule_epochs"]) for r in rows] == [(3, 3)] and rows[-1]["lr"] == pytest.approx(0.02e-3)
    assert [c[:2] for c in calls] == [(3, 1)]


def test_train_with_ema_saves_the_average_and_resumes_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args, run = _tiny_depth4_run(tmp_path, "contiguous")
    args[8] = "1"  # one step per epoch, so the average can be checked by hand
    args += ["--ema", "0.75"]
    assert main(args) == 0
    first = torch.load(run / "last.state.pt", weights_only=True)
    # One step in: the average is that step's weights.
    assert int(first["ema"]["n_averaged"]) == 1
    for k, v in first["model"].items():
        torch.testing.assert_close(first["ema"][f"module.{k}"], v)
    assert main([*args[:6], "2", *args[7:], "--resume", str(run / "last.state.pt")]) == 0
    second = torch.load(run / "last.state.pt", weights_only=True)
    saved = load_file(run / "last.safetensors")
    assert int(second["ema"]["n_averaged"]) == 2
    floats = [k for k, v in saved.items() if v.is_floating_point()]
    assert any(k.endswith("running_mean") for k in floats)  # BatchNorm statistics are averaged too
    for k in floats:
        # After the resumed step: 0.75 x the first weights + 0.25 x the second, and that is what
        # the checkpoint holds, while the state keeps the raw weights for training on.
        want = 0.75 * first["model"][k] + 0.25 * second["model"][k]
        torch.testing.assert_close(second["ema"][f"module.{k}"], want)
        torch.testing.assert_close(saved[k], want)
    assert any(not torch.equal(saved[k], second["model"][k]) for k in floats)
    _, meta = load_checkpoint(run / "best.safetensors")
    assert meta.provenance["train_config"]["ema"] == 0.75
    assert (
        main([*args[:6], "3", *args[7:-2], "--resume", str(run / "last.state.pt")]) == 2
    )  # refused with a message, not a traceback
    assert re.search("resume it with the same --ema", capsys.readouterr().err)
    plain, plain_run = _tiny_depth4_run(tmp_path / "plain", "contiguous")
    plain[8] = "1"
    assert main(plain) == 0
    assert (
        main([*plain[:6], "2", *plain[7:], "--ema", "0.75", "--resume", str(plain_run / "last.state.pt")]) == 2
    )  # refused with a message, not a traceback
    assert re.search("resume it without --ema", capsys.readouterr().err)
    for bad in ("1", "-0.1", "nan", "x"):
        with pytest.raises(SystemExit) as e:
            main([*args[:-1], bad])
        assert e.value.code == 2


@pytest.mark.parametrize(
    "cmd", ["phantoms", "synth-ct", "train", "evaluate", "postprocess", "postprocess --choose", "export", "check-data"]
)
def test_cli_dry_runs(cmd: str, tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    extra = ["--out", str(tmp_path / "o")] if cmd in ("phantoms", "synth-ct") else []
    r = subprocess.run(
        [sys.executable, "-m", "training", *cmd.split(), "--dry-run", *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    # The dry run's own temporary folders are removed (libraries' caches, such as torch's
    # torchinductor_<user>, may stay); what --out asked for is kept.
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("kitseg-")]
    assert (tmp_path / "o").is_dir() == bool(extra)
    if cmd == "train" and platform.libc_ver()[0] == "glibc":
        assert "glibc malloc tuning on" in r.stderr
    if cmd == "evaluate":
        assert "KiTS19: kidney Dice" in r.stdout and "all-background" in r.stdout
        assert "tumor Dice by the reference's tumors: a tumor < 10 mL" in r.stdout
    if cmd == "postprocess":
        assert "'min_tumor_ml': 0.5" in r.stdout and "unchanged" in r.stdout
    if cmd == "postprocess --choose":
        assert "| 0 (off)" in r.stdout and "(chosen)" in r.stdout and "unchanged" in r.stdout
    if cmd == "check-data":
        assert "2 case(s), 2 labelled" in r.stdout and "orientations: IPL 2" in r.stdout and "no problems" in r.stdout
    if cmd == "export":
        assert "model.onnx: input x (batch, 1, H, W) float32" in r.stdout and "from torch: " in r.stdout


@pytest.mark.parametrize("cmd", ["phantoms", "synth-ct", "train", "evaluate", "postprocess", "export", "check-data"])
def test_cli_help(cmd: str) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "training", cmd, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and "--dry-run" in r.stdout


@pytest.mark.parametrize("deep_supervision", ["0", "1"])
def test_ddp_gloo_two_processes(deep_supervision: str, tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    data = tmp_path / "data"
    for i in range(4):
        _one_phantom((i, str(data), 48, False, 0))
    cmd = [
        torchrun,
        "--nproc-per-node",
        "2",
        "--master-port",
        "29531",
        "-m",
        "training",
        "train",
        "--data",
        str(data),
        "--out",
        str(tmp_path / "run"),
        "--epochs",
        "1",
        "--iters",
        "2",
        "--batch-size",
        "2",
        "--patch",
        "32",
        "--base-width",
        "4",
        "--depth",
        "3",
        "--val-fraction",
        "0.5",
        "--no-progress",
        "--device",
        "cpu",
        "--deep-supervision",
        deep_supervision,
        # The first run validates from the compressed files, the second from their copies, on
        # a cross-validation fold (2 of the 4 cases each way, as --val-fraction 0.5 does).
        *(["--no-val-copies"] if deep_supervision == "0" else ["--folds", "2", "--fold", "1"]),
        # The second run also keeps a weight average, over the DDP-wrapped network.
        *(["--ema", "0.5"] if deep_supervision == "1" else []),
    ]
    run_kw: dict[str, Any] = dict(
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    r = subprocess.run(cmd, **run_kw)
    assert r.returncode == 0, r.stderr[-3000:]
    # Each rank preprocessed its share of the 2 training cases, and validated its share of the 2
    # validation cases.
    assert r.stderr.count("preprocessed 1 of 1 case(s)") == 2, r.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank} validated 1 of 2 case(s)" in r.stderr, r.stderr[-3000:]
    copies = sorted(p.parent.name for p in (tmp_path / "run" / "cache" / "val").glob("*/imaging.nii"))
    model, meta = load_checkpoint(tmp_path / "run" / "last.safetensors")
    assert meta.provenance["world_size"] == 2
    val_ids = meta.provenance["val_cases"]
    assert len(val_ids) == 2 and copies == ([] if deep_supervision == "0" else val_ids)
    if deep_supervision == "1":
        folds = kfold_splits([f"case_{i:05d}" for i in range(4)], 2)
        assert val_ids == folds[1]["val"] and meta.provenance["fold"] == 1
        assert json.loads((tmp_path / "run" / "splits_final.json").read_text()) == folds
    # The ranks' shares add up to what one process scores with the saved network on both cases:
    # every rank validated rank 0's network, BatchNorm statistics (and average) included.
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    engine = Engine(model, meta, torch.device("cpu"), batch_size=16, precision="fp32", backend="torch")
    rows = evaluate_cases(engine, [c for c in find_cases(data) if c.case_id in val_ids])
    for key in ("kidney_dice", "tumor_dice", "composite"):
        assert row[f"val_{key}"] == pytest.approx(np.mean([r[key] for r in rows]), abs=1e-9), key
    assert meta.provenance["train_config"]["deep_supervision"] == int(deep_supervision)
    state = torch.load(tmp_path / "run" / "last.state.pt", weights_only=True)
    assert ("ema" in state) == (deep_supervision == "1")
    if "ema" in state:
        assert int(state["ema"]["n_averaged"]) == 2  # one update per step
        saved = load_file(tmp_path / "run" / "last.safetensors")
        for k, v in saved.items():
            torch.testing.assert_close(v, state["ema"][f"module.{k}"])
    else:
        # Resumed under torchrun to 2 epochs with a fitted schedule: every rank loads the state,
        # and rank 0 alone reports the run's best epoch.
        cmd[cmd.index("--epochs") + 1] = "2"
        r = subprocess.run(
            [*cmd, "--max-minutes", "10", "--fit-schedule", "--resume", str(tmp_path / "run" / "last.state.pt")],
            **run_kw,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        assert "resumed from" in r.stderr and "after epoch 1" in r.stderr, r.stderr[-3000:]
        rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        assert [x["epoch"] for x in rows] == [1, 2] and rows[1]["elapsed_s"] > rows[0]["elapsed_s"]
        best_epoch = load_checkpoint(tmp_path / "run" / "best.safetensors")[1].metrics["epoch"]
        assert r.stdout.count("best: kidney Dice") == 1 and f"(epoch {best_epoch}, " in r.stdout, r.stdout


def test_memory_format_choice() -> None:
    model = UNet(UNetConfig(in_slices=1, num_classes=3, base_width=4, depth=3))
    batch = (torch.randn(2, 1, 32, 32), torch.randint(0, 3, (2, 32, 32)))
    calls = []

    def get() -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(1)
        return batch

    cpu = torch.device("cpu")
    assert choose_memory_format(model, get, cpu, "channels_last") == (torch.channels_last, {})
    assert choose_memory_format(model, get, cpu, "contiguous") == (torch.contiguous_format, {})
    assert choose_memory_format(model, get, torch.device("cuda"), "auto") == (torch.channels_last, {})
    assert not calls  # nothing was timed
    with pytest.raises(ValueError, match="memory_format"):
        choose_memory_format(model, get, cpu, "nhwc")
    rng = torch.get_rng_state()
    w = model.down[0][0].weight.detach().clone()
    # The margin decides: NCHW must beat channels_last by it. -10 always takes NCHW, 0.99 never does.
    fmt, times = choose_memory_format(model, get, cpu, "auto", margin=-10.0)
    assert fmt == torch.contiguous_format and set(times) == {"channels_last", "contiguous"}
    assert all(t > 0 for t in times.values())
    assert choose_memory_format(model, get, cpu, "auto", margin=0.99)[0] == torch.channels_last
    assert len(calls) == 2
    # Timing trains a copy: the model and the RNG stream are untouched.
    assert torch.equal(model.down[0][0].weight, w) and model.down[0][0].weight.grad is None
    assert torch.equal(torch.get_rng_state(), rng)


_AUTOCAST_SEEN: list[torch.dtype | None] = []


class _AutocastSpy(torch.nn.Module):
    """A 1x1 conv that records whether each forward ran under CPU autocast, and in which dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        on = torch.is_autocast_enabled("cpu")
        _AUTOCAST_SEEN.append(torch.get_autocast_dtype("cpu") if on else None)
        return self.conv(x)


def test_memory_format_choice_times_under_the_runs_autocast() -> None:
    # The format that is faster in fp32 need not be the faster one in bf16 (oneDNN's bf16 kernels
    # want channels_last), so the timing runs under the autocast the run will train with.
    batch = (torch.randn(2, 1, 8, 8), torch.randint(0, 3, (2, 8, 8)))
    for amp_dtype in (None, torch.bfloat16):
        _AUTOCAST_SEEN.clear()
        choose_memory_format(_AutocastSpy(), lambda: batch, torch.device("cpu"), "auto", amp_dtype=amp_dtype)
        assert _AUTOCAST_SEEN[:] == [amp_dtype] * 6  # a warm-up and 2 reps, in each format


def test_a_device_that_is_not_there_is_an_error_message_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_checkpoint: Path
) -> None:
    data = tmp_path / "data"
    _one_phantom((0, str(data), 48, False, 0))
    devices = ["tpu", *([] if torch.cuda.is_available() else ["cuda"])]
    for device in devices:
        assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--device", device]) == 2
        ev = ["evaluate", "--checkpoint", str(tiny_checkpoint), "--data", str(data), "--device", device]
        assert main(ev) == 2
        err = capsys.readouterr().err
        assert err.count(f"error: device '{device}'") == 2, err
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize(
    "argv, message",
    [
        (["phantoms", "--out", "x", "--n", "-1"], "argument --n: must be >= 1, got -1"),
        (["phantoms", "--out", "x", "--size", "8"], "argument --size: must be >= 32, got 8"),
        (["synth-ct", "--labels", "x", "--out", "y", "--cases", "case_00001"], "argument --cases: must be lo:hi"),
        (["synth-ct", "--labels", "x", "--out", "y", "--cases", "50:40"], "0 <= lo < hi, got 50:40"),
        (["train", "--epochs", "0"], "argument --epochs: must be >= 1, got 0"),
        (["train", "--batch-size", "two"], "argument --batch-size: not a whole number: 'two'"),
        (["train", "--lr", "nan"], "argument --lr: must be a finite number > 0, got nan"),
        (["train", "--in-slices", "2"], "argument --in-slices: must be odd"),
        (["train", "--val-fraction", "1"], "argument --val-fraction: must be between 0 and 1"),
        (["train", "--fg-fraction", "1.5"], "argument --fg-fraction: must be in [0, 1], got 1.5"),
        (["train", "--spacing", "-1"], "argument --spacing: must be a spacing >= 0 mm"),
        (["train", "--max-minutes", "0"], "argument --max-minutes: must be a finite number > 0, got 0"),
        (["train", "--fold", "-1"], "argument --fold: must be >= 0, got -1"),
        (["train", "--folds", "1", "--fold", "0"], "argument --folds: must be >= 2, got 1"),
        (["evaluate", "--limit", "0"], "argument --limit: must be >= 1, got 0"),
    ],
)
def test_cli_refuses_numbers_out_of_range_as_argparse_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before, a batch size of 0 or --phantoms --n -1 ended in a traceback from deep inside.
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_check_data_reports_labels_off_the_image_grid_and_values_without_a_class(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_checkpoint: Path
) -> None:
    data = tmp_path / "data"
    for i in range(4):
        _one_phantom((i, str(data), 48, False, 0))
    # case_00001's labels in another orientation (x flipped in the affine, the voxels unchanged):
    # the same shape, so only the affine tells; case_00002 with a cyst; case_00003 imaging only.
    seg = nib.load(data / "case_00001" / "segmentation.nii.gz")
    flipped = seg.affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, seg.shape[2] - 1], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(np.asanyarray(seg.dataobj), flipped), str(data / "case_00001" / "segmentation.nii.gz"))
    seg2 = nib.load(data / "case_00002" / "segmentation.nii.gz")
    lab = np.asanyarray(seg2.dataobj).copy()
    lab[lab == 2] = 3
    nib.save(nib.Nifti1Image(lab, seg2.affine), str(data / "case_00002" / "segmentation.nii.gz"))
    (data / "case_00003" / "segmentation.nii.gz").unlink()
    assert main(["check-data", "--data", str(data), "--out", str(tmp_path / "ck")]) == 1
    out, err = capsys.readouterr()
    assert "4 case(s), 3 labelled, 1 imaging only" in out
    assert "problem: case_00001: segmentation.nii.gz is not on imaging.nii.gz's voxel grid" in err
    assert "(orientation IPR against IPL)" in err
    assert "problem: case_00002: segmentation.nii.gz holds label 3" in err and "--kits23" in err
    assert "2 case(s) with problems" in err
    report = json.loads((tmp_path / "ck" / "dataset_check.json").read_text())
    assert [("problem" in r) for r in report["cases"]] == [False, True, True, False]
    assert report["summary"]["imaging_only"] == 1 and report["summary"]["with_problems"] == 2
    assert report["cases"][0]["labels"]["1"] > 0 and report["cases"][0]["orientation"] == "IPL"
    # With 4 classes the cyst is allowed; the flipped labels are still refused.
    assert main(["check-data", "--data", str(data), "--kits23"]) == 1
    err = capsys.readouterr().err
    assert "case_00001" in err and "case_00002" not in err
    # Training and evaluation refuse the flipped labels too (before, they trained and scored on them).
    (data / "case_00002").rename(tmp_path / "case_00002")
    train_args = _tiny_train_args(data, tmp_path / "run")
    assert main(train_args) == 2
    assert "case_00001: segmentation.nii.gz is not on imaging.nii.gz's voxel grid" in capsys.readouterr().err
    ev = ["evaluate", "--checkpoint", str(tiny_checkpoint), "--data", str(data), "--cases", "case_00001"]
    assert main(ev) == 2
    assert "is not on imaging.nii.gz's voxel grid" in capsys.readouterr().err


def test_check_data_with_images_decodes_them_and_finds_a_truncated_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    for i in range(2):
        _one_phantom((i, str(data), 48, False, 0))
    image = data / "case_00001" / "imaging.nii.gz"
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])  # a download cut short
    assert main(["check-data", "--data", str(data)]) == 0  # its header is whole
    assert "no problems found" in capsys.readouterr().out
    assert main(["check-data", "--data", str(data), "--images", "--out", str(tmp_path / "ck")]) == 1
    out, err = capsys.readouterr()
    assert "problem: case_00001: CorruptData: corrupt or truncated gzip stream" in err
    assert "kidney region HU, each case's median: " in out
    rows = json.loads((tmp_path / "ck" / "dataset_check.json").read_text())["cases"]
    hu = rows[0]["kidney_hu"]
    assert 0 < hu["p5"] < hu["median"] < hu["p95"] < 400  # contrast-enhanced kidney, as the phantoms render it


def _speck_cases(root: Path) -> tuple[list[tuple[int, int, int]], float]:
    """Two KiTS19-layout cases on make_volume's IPL grid whose images hold 1-voxel tumor specks
    that their label maps don't: case_00000 with the reference's 2.1 mL tumor, case_00001
    tumor-free (the tumor is kidney in image and labels). Returns the specks and one voxel's mL."""
    hu, aff, truth = make_volume(ORIENTATIONS["IPL"])
    inner = [
        (int(i), int(j), int(k))
        for i, j, k in np.argwhere(truth == 1)
        if min(i, j, k) >= 2 and (truth[i - 2 : i + 3, j - 2 : j + 3, k - 2 : k + 3] == 1).all()
    ]
    specks = [inner[0], next(v for v in inner if max(abs(p - q) for p, q in zip(v, inner[0], strict=True)) >= 4)]
    for case, tumor_free in (("case_00000", False), ("case_00001", True)):
        image, labels = hu.copy(), truth.copy()
        if tumor_free:
            image[labels == 2], labels[labels == 2] = KIDNEY_HU, 1
        for v in specks:
            image[v] = TUMOR_HU
        (root / case).mkdir(parents=True)
        write_nifti(root / case / "imaging.nii.gz", image, aff)
        write_nifti(root / case / "segmentation.nii.gz", labels, aff, dtype=np.uint8)
    return specks, float(abs(np.linalg.det(aff[:3, :3]))) / 1000.0


class _IntensityWithCyst(IntensityModel):
    """IntensityModel for a 4-class (KiTS23) checkpoint: it never says cyst."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return torch.cat([out, torch.full_like(out[:, :1], -100.0)], dim=1)


def _intensity_engine(paths: list[str], **kw: Any) -> Engine:
    """What Engine.from_checkpoint gives, with a network that labels by intensity (exact masks)."""
    meta = dataclasses.replace(read_meta(paths[0]), preprocessing=GEOM_PP)
    kind = _IntensityWithCyst if meta.model.num_classes == 4 else IntensityModel
    model = kind(meta.model, GEOM_PP)
    return Engine(model, meta, torch.device("cpu"), batch_size=4, precision="fp32", backend="torch")  # type: ignore[arg-type]


def _add_blob(case: Path, in_labels: bool) -> None:
    """A 3x3x3 kidney-intensity blob in a corner of ``case``'s image, far from its kidney: a false
    positive organ (``in_labels`` False) or a transplant kidney, a third one (True)."""
    img, seg = nib.load(case / "imaging.nii.gz"), nib.load(case / "segmentation.nii.gz")
    image, labels = np.asarray(img.dataobj), np.asarray(seg.dataobj)
    blob = (slice(1, 4),) * 3
    assert not labels[(slice(0, 8),) * 3].any()  # nothing it could touch
    image[blob] = KIDNEY_HU
    if in_labels:
        labels[blob] = 1
    write_nifti(case / "imaging.nii.gz", image, img.affine)
    write_nifti(case / "segmentation.nii.gz", labels, seg.affine, dtype=np.uint8)


def test_postprocessing_sweep_scores_each_candidate_as_the_engine_gives_it(tmp_path: Path) -> None:
    _, voxel_ml = _speck_cases(tmp_path / "data")
    _add_blob(tmp_path / "data" / "case_00000", in_labels=False)
    cases = find_cases(tmp_path / "data")
    engine = _intensity_engine([str(make_tiny_checkpoint(tmp_path))])
    post = engine.meta.postprocessing
    # In voxels: under 1 (nothing changes), 1.7 and 3.3 (the specks go), and over the 2.1 mL tumor.
    candidates = [0.0, 0.6 * voxel_ml, 1.7 * voxel_ml, 3.3 * voxel_ml, 5.0]
    swept = sweep_postprocessing(engine, cases, candidates)
    assert engine.meta.postprocessing == post  # restored
    assert set(swept) == {(f, v) for f in (False, True) for v in candidates}
    for f, v in swept:
        engine.meta = dataclasses.replace(engine.meta, postprocessing=PostprocessConfig(keep_largest=f, min_tumor_ml=v))
        direct = evaluate_cases(engine, cases)
        for a, b in zip(swept[f, v], direct, strict=True):
            assert {k: x for k, x in a.items() if k != "seconds"} == {k: x for k, x in b.items() if k != "seconds"}
    tumor = {k: [round(r["tumor_dice"], 6) for r in rows] for k, rows in swept.items()}
    kidney = {k: [round(r["kidney_dice"], 6) for r in rows] for k, rows in swept.items()}
    for f in (False, True):
        # The specks cost the tumor-free case its whole score, and some of the other's; the largest
        # value removes the real tumor too. Relabelling never changes kidney Dice.
        t = {v: tumor[f, v] for v in candidates}
        assert t[0.0] == t[candidates[1]] and t[0.0][1] == 0.0 and t[0.0][0] < 1.0
        assert t[candidates[2]] == t[candidates[3]] and t[candidates[2]][1] == 1.0
        assert t[candidates[2]][0] > t[0.0][0] and t[5.0] == [0.0, 1.0]
        assert len({tuple(kidney[f, v]) for v in candidates}) == 1
    # The filter removes the false-positive blob from case_00000's kidney region, and nothing else.
    assert kidney[True, 0.0][0] > kidney[False, 0.0][0] and kidney[True, 0.0][1] == kidney[False, 0.0][1]
    assert tumor[True, 0.0] == tumor[False, 0.0]
    assert best_postprocessing(swept) == (True, candidates[2])  # of the two best, the smaller
    only_off = {k: rows for k, rows in swept.items() if not k[0]}
    assert best_postprocessing(only_off) == (False, candidates[2])
    flat = {k: swept[False, 0.0] for k in swept}  # nothing helps: no step is kept
    assert best_postprocessing(flat) == (False, 0.0)

    def mean(k: tuple[bool, float]) -> float:
        return float(np.mean([r["composite"] for r in swept[k]]))

    relabel_gain = mean((True, candidates[2])) - mean((True, 0.0))
    filter_gain = mean((True, 0.0)) - mean((False, 0.0))
    assert relabel_gain > 0 and filter_gain > 0 and abs(relabel_gain - filter_gain) > 1e-6
    assert best_postprocessing(swept, min_gain=min(relabel_gain, filter_gain) * 0.99) == (True, candidates[2])
    between = (relabel_gain + filter_gain) / 2  # each step is kept on its own gain
    assert best_postprocessing(swept, min_gain=between) == (
        (True, 0.0) if filter_gain > relabel_gain else (False, candidates[2])
    )
    assert best_postprocessing(swept, min_gain=max(relabel_gain, filter_gain) * 1.01) == (False, 0.0)


def test_choice_score_is_kits23s_for_rows_with_its_regions() -> None:
    assert choice_score({"composite": 0.8}) == 0.8
    row = {"composite": 0.8, "kits23_mean_dice": 0.7, "kits23_mean_sd": 0.5}
    assert choice_score(row) == pytest.approx(0.6)


def test_postprocess_choose_writes_the_value_chosen_on_held_out_cases(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import segcore.inference

    _, voxel_ml = _speck_cases(tmp_path / "data")
    monkeypatch.setattr(segcore.inference.Engine, "from_checkpoint", staticmethod(_intensity_engine))
    tiny = make_tiny_checkpoint(tmp_path)
    model, meta = load_checkpoint(tiny)
    folds = []
    for k, case in enumerate(("case_00000", "case_00001")):  # two folds, each holding one case out
        (tmp_path / f"fold{k}").mkdir()
        folds.append(tmp_path / f"fold{k}" / "best.safetensors")
        save_checkpoint(folds[-1], model, dataclasses.replace(meta, provenance={"val_cases": [case]}))
    small, big = 1.7 * voxel_ml, 5.0
    base = ["postprocess", "--data", str(tmp_path / "data"), "--candidates", f"{small},{big}", "--choose"]
    # One checkpoint: chosen on the case it held out, a tumor-bearing one with specks.
    assert main([*base, "--checkpoint", str(folds[0]), "--out", str(tmp_path / "one.safetensors")]) == 0
    change = read_meta(tmp_path / "one.safetensors").provenance["postprocessing_changes"][-1]
    assert change["to"]["min_tumor_ml"] == small and change["chosen_on"]["cases"] == ["case_00000"]
    assert not change["to"]["keep_largest"]  # no component to drop on these cases: a tie, so no filter
    assert set(change["chosen_on"]["score_by_candidate"]) == {
        f"{f} {v}" for f in ("on", "off") for v in ("0", f"{small:g}", "5")
    }
    assert change["chosen_on"]["score"] == "composite"
    assert "(chosen)" in capsys.readouterr().out
    # The folds: each scored on its own case, one value for all, each written with it.
    assert main([*base, "--checkpoint", *map(str, folds), "--out", str(tmp_path / "folds")]) == 0
    for k in range(2):
        written = read_meta(tmp_path / "folds" / f"fold{k}-best.safetensors")
        assert written.postprocessing.min_tumor_ml == small and written.weights_sha256 == meta.weights_sha256
        assert written.provenance["postprocessing_changes"][-1]["chosen_on"]["cases"] == ["case_00000", "case_00001"]
    # --cases names the cases instead; a tumor-free case alone is best without its specks, too.
    assert (
        main([*base, "--checkpoint", str(tiny), "--out", str(tmp_path / "c.safetensors"), "--cases", "case_00001"]) == 0
    )
    assert read_meta(tmp_path / "c.safetensors").postprocessing.min_tumor_ml == small
    # The filter is kept where it removes a false-positive organ and dropped where it would remove a
    # transplant kidney; --kidney-filter fixes it, and alone writes it without choosing anything.
    for case, truth, filtered in (("case_00002", False, True), ("case_00003", True, False)):
        shutil.copytree(tmp_path / "data" / "case_00001", tmp_path / "data" / case)
        _add_blob(tmp_path / "data" / case, in_labels=truth)
        out_f = tmp_path / f"{case}.safetensors"
        assert main([*base, "--checkpoint", str(tiny), "--out", str(out_f), "--cases", case]) == 0
        assert read_meta(out_f).postprocessing == PostprocessConfig(keep_largest=filtered, min_tumor_ml=small)
        fixed = ["--kidney-filter", "off" if filtered else "on"]
        assert main([*base, "--checkpoint", str(tiny), "--out", str(out_f), "--cases", case, *fixed]) == 0
        assert read_meta(out_f).postprocessing == PostprocessConfig(keep_largest=not filtered, min_tumor_ml=small)
    assert main(["postprocess", "--checkpoint", str(out_f), "--out", str(out_f), "--kidney-filter", "off"]) == 0
    assert read_meta(out_f).postprocessing == PostprocessConfig(keep_largest=False, min_tumor_ml=small)
    # A 4-class (KiTS23) checkpoint is chosen on the KiTS23 regions' Dice and Surface Dice.
    cfg23 = dataclasses.replace(meta.model, num_classes=4)
    meta23 = dataclasses.replace(meta, model=cfg23, labels=dict(KITS23_LABELS))
    save_checkpoint(tmp_path / "k23.safetensors", UNet(cfg23), meta23)
    out23 = tmp_path / "k23-chosen.safetensors"
    assert (
        main([*base, "--checkpoint", str(tmp_path / "k23.safetensors"), "--out", str(out23), "--cases", "case_00000"])
        == 0
    )
    chosen23 = read_meta(out23).provenance["postprocessing_changes"][-1]["chosen_on"]
    assert chosen23["score"].startswith("KiTS23") and read_meta(out23).postprocessing.min_tumor_ml == small
    assert chosen23["score_by_candidate"]["off 0"] < chosen23["score_by_candidate"][f"off {small:g}"] == 1.0
    # A failed choice for several folds leaves no --out folder behind (their cases aren't in --data).
    (tmp_path / "other" / "case_00009").mkdir(parents=True)
    for f in ("imaging.nii.gz", "segmentation.nii.gz"):
        shutil.copy(tmp_path / "data" / "case_00000" / f, tmp_path / "other" / "case_00009" / f)
    other = [*base[:1], "--data", str(tmp_path / "other"), *base[3:]]
    assert main([*other, "--checkpoint", *map(str, folds), "--out", str(tmp_path / "f4")]) == 2
    assert not (tmp_path / "f4").exists()
    # Mistakes are status 2 with a reason, and write nothing.
    out = ["--out", str(tmp_path / "bad.safetensors")]
    for bad in (
        ["postprocess", "--checkpoint", str(tiny), *out, "--choose"],  # no --data
        [*base, "--checkpoint", str(tiny), *out, "--min-tumor-ml", "1"],  # both
        ["postprocess", "--checkpoint", str(tiny), *out, "--min-tumor-ml", "1", "--cases", "case_00000"],
        ["postprocess", "--checkpoint", str(tiny), *out],  # nothing to choose or write
        [*base, "--checkpoint", *map(str, folds), "--out", str(tmp_path / "f2"), "--cases", "case_00000"],
        [*base, "--checkpoint", str(tiny), *out],  # it records no validation cases
        [*base, "--checkpoint", str(folds[0]), str(folds[0]), "--out", str(tmp_path / "f3")],  # one file twice
    ):
        assert main(bad) == 2, bad
    with pytest.raises(SystemExit) as exit_:
        main(["postprocess", "--checkpoint", str(tiny), *out, "--kidney-filter", "maybe"])
    assert exit_.value.code == 2
    assert not (tmp_path / "bad.safetensors").exists()
