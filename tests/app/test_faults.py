"""Faults that can't be produced for real here are simulated at the boundary where they would
surface: a bug in the statistics, a slow model (deadline), a full disk, and GPU out-of-memory.
After each, the process keeps serving and nothing is left behind."""

from __future__ import annotations

import csv
import errno
import json
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from app import worker as worker_mod
from app.main import create_app
from tests.app.conftest import make_settings
from tests.app.test_api import assert_error
from tests.conftest import ORIENTATIONS, make_volume, write_nifti


@pytest.fixture
def payload(tmp_path: Path) -> bytes:
    hu, aff, _ = make_volume(ORIENTATIONS["IPL"])
    return write_nifti(tmp_path / "v.nii.gz", hu, aff).read_bytes()


def _client(tmp_path: Path, ckpt: Path, **kw: object) -> TestClient:
    return TestClient(create_app(make_settings(tmp_path, checkpoint=ckpt, **kw)), raise_server_exceptions=False)


def _clean(tmp_path: Path) -> None:
    assert list((tmp_path / "results" / "spool").iterdir()) == []
    assert not [p for p in (tmp_path / "results" / "results").iterdir() if p.name.startswith(".")]
    assert [p.name for p in (tmp_path / "results" / "pending").rglob("*") if p.is_file()] in ([], [".owner"])


def test_bug_is_500_without_traceback_and_service_survives(
    tmp_path: Path, tiny_checkpoint: Path, payload: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    with _client(tmp_path, tiny_checkpoint) as c:
        monkeypatch.setattr(worker_mod, "compute_statistics", lambda *a, **k: 1 / 0)
        body = assert_error(c.post("/segment", files={"file": ("v", payload)}), 500, "internal_error")
        assert "Traceback" not in body["message"] and "ZeroDivision" not in body["message"]
        monkeypatch.undo()
        assert c.post("/segment", files={"file": ("v", payload)}).status_code == 200
        _clean(tmp_path)


def test_deadline_is_504_and_the_worker_moves_on(tmp_path: Path, tiny_checkpoint: Path, payload: bytes) -> None:
    with _client(tmp_path, tiny_checkpoint, request_timeout_s=0.5) as c:
        w = c.app.state.worker  # type: ignore[attr-defined]
        real = w.engine.predict

        def slow(*a, **k):
            time.sleep(1.5)
            return real(*a, **k)

        w.engine.predict = slow
        assert_error(c.post("/segment", files={"file": ("v", payload)}), 504, "deadline_exceeded")
        w.engine.predict = real
        time.sleep(1.5)  # the abandoned job finishes; its result is dropped
        r = c.post("/segment", files={"file": ("v", payload)})
        assert r.status_code == 200
        kept = [p.name for p in (tmp_path / "results" / "results").iterdir()]
        assert kept == [r.json()["id"]], "the timed-out job's result must not be kept"
        _clean(tmp_path)


def test_disk_full_is_507_and_leaves_no_partial_result(
    tmp_path: Path, tiny_checkpoint: Path, payload: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    import segcore.io as sio

    with _client(tmp_path, tiny_checkpoint) as c:
        real = sio.atomic_write

        def full(path, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr("app.store.atomic_write", full)
        assert_error(c.post("/segment", files={"file": ("v", payload)}), 507, "insufficient_storage")
        monkeypatch.setattr("app.store.atomic_write", real)
        assert list((tmp_path / "results" / "results").iterdir()) == []
        assert c.post("/segment", files={"file": ("v", payload)}).status_code == 200
        _clean(tmp_path)


def test_out_of_memory_retries_smaller_batches_then_507(tmp_path: Path, tiny_checkpoint: Path, payload: bytes) -> None:
    with _client(tmp_path, tiny_checkpoint, batch_size=8) as c:
        w = c.app.state.worker  # type: ignore[attr-defined]
        real = w.engine.predict
        seen: list[int] = []

        def oom_above_2(vol, batch_size=None, **k):
            seen.append(batch_size)
            if batch_size > 2:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return real(vol, batch_size=batch_size, **k)

        w.engine.predict = oom_above_2
        assert c.post("/segment", files={"file": ("v", payload)}).status_code == 200
        assert seen == [8, 4, 2]

        def always_oom(vol, batch_size=None, **k):
            raise torch.OutOfMemoryError("CUDA out of memory")

        w.engine.predict = always_oom
        assert_error(c.post("/segment", files={"file": ("v", payload)}), 507, "out_of_memory")
        w.engine.predict = real
        assert c.post("/segment", files={"file": ("v", payload)}).status_code == 200
        _clean(tmp_path)


def test_not_ready_before_startup_is_503(tmp_path: Path, tiny_checkpoint: Path) -> None:
    app = create_app(make_settings(tmp_path, checkpoint=tiny_checkpoint))
    c = TestClient(app, raise_server_exceptions=False)  # lifespan not entered: nothing loaded
    r = c.get("/ready")
    assert_error(r, 503, "not_ready")
    assert r.headers["retry-after"]


def test_cuda_requested_without_cuda_stops_startup(tmp_path: Path, tiny_checkpoint: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with (
        pytest.raises(RuntimeError, match="cuda"),
        TestClient(create_app(make_settings(tmp_path, checkpoint=tiny_checkpoint, device="cuda"))),
    ):
        pass


def test_logs_have_request_ids_but_no_filenames_or_voxels(
    tmp_path: Path, tiny_checkpoint: Path, payload: bytes
) -> None:
    import io

    from app.middleware import JsonFormatter

    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("kitseg")
    logger.addHandler(handler)
    try:
        with _client(tmp_path, tiny_checkpoint, log_level="INFO") as c:
            r = c.post(
                "/segment",
                files={"file": ("PATIENT_DOE_JOHN_1970.nii.gz", payload)},
                headers={"X-Request-ID": "trace-123"},
            )
            assert r.headers["x-request-id"] == "trace-123"
            c.post("/segment", files={"file": ("PATIENT_DOE_JOHN_1970.nii.gz", b"junk" * 200)})
    finally:
        logger.removeHandler(handler)
    text = buf.getvalue()
    records = [json.loads(line) for line in text.splitlines()]
    assert any(rec.get("request_id") == "trace-123" and rec.get("status") == 200 for rec in records)
    assert any(rec.get("status") == 415 for rec in records)
    assert "PATIENT_DOE" not in text


def test_results_expire_after_ttl(tmp_path: Path, tiny_checkpoint: Path, payload: bytes) -> None:
    with _client(tmp_path, tiny_checkpoint, result_ttl_s=10) as c:
        rid = c.post("/segment", files={"file": ("v", payload)}).json()["id"]
        store = c.app.state.store  # type: ignore[attr-defined]
        d = tmp_path / "results" / "results" / rid
        old = time.time() - 60
        import os

        os.utime(d, (old, old))
        assert store.sweep() == 1
        assert_error(c.get(f"/segmentations/{rid}"), 404)


def test_results_survive_a_restart(tmp_path: Path, tiny_checkpoint: Path, payload: bytes) -> None:
    with _client(tmp_path, tiny_checkpoint) as c:
        rid = c.post("/segment", files={"file": ("v", payload)}).json()["id"]
    with _client(tmp_path, tiny_checkpoint) as c:
        assert c.get(f"/segmentations/{rid}").status_code == 200
        assert c.get(f"/segmentations/{rid}/mask").status_code == 200


def test_purge_on_shutdown_leaves_no_result_behind(tmp_path: Path, tiny_checkpoint: Path, payload: bytes) -> None:
    with _client(tmp_path, tiny_checkpoint, purge_results_on_shutdown=True) as c:
        rid = c.post("/segment", files={"file": ("v", payload)}).json()["id"]
        store = c.app.state.store  # type: ignore[attr-defined]
        assert store.mask_path(rid) is not None  # served while the service runs
        (store.results / f".{'0' * 32}.partial").mkdir()  # a write the drain cut short
    root = tmp_path / "results"
    assert list((root / "results").iterdir()) == [] and list((root / "spool").iterdir()) == []
    with _client(tmp_path, tiny_checkpoint) as c:
        assert_error(c.get(f"/segmentations/{rid}"), 404)


def test_a_write_the_purge_overtakes_leaves_nothing(tmp_path: Path) -> None:
    from app.store import ResultStore, StoreClosed

    store = ResultStore(tmp_path / "r", ttl_s=60)
    kept = store.new_id()
    store.write(kept, {"id": kept}, b"mask")
    assert store.get(kept) == {"id": kept}
    # A job the shutdown's drain left running: the purge runs between its mask and its rename.
    rid = store.new_id()
    with pytest.raises(StoreClosed):
        store.write(rid, {"id": rid}, b"mask", finalize=lambda r: store.purge())
    with pytest.raises(StoreClosed):  # and any write after it
        store.write(store.new_id(), {}, b"mask")
    assert list(store.results.iterdir()) == [] and list(store.spool.iterdir()) == []
    store.close()
    assert list((tmp_path / "r" / "pending").iterdir()) == []


def test_a_job_finishing_after_the_purge_is_refused_with_the_error_shape(
    tmp_path: Path, tiny_checkpoint: Path, payload: bytes
) -> None:
    with _client(tmp_path, tiny_checkpoint, purge_results_on_shutdown=True) as c:
        c.app.state.store.purge()  # type: ignore[attr-defined]
        assert_error(c.post("/segment", files={"file": ("v", payload)}), 503, "not_ready")
        assert c.get("/health").status_code == 200
    assert list((tmp_path / "results" / "results").iterdir()) == []
    _clean(tmp_path)


def test_predict_cli_writes_masks_and_statistics(tmp_path: Path, tiny_checkpoint: Path) -> None:
    from app.predict_cli import main

    src = tmp_path / "in"
    src.mkdir()
    for name, codes in (("a.nii.gz", ORIENTATIONS["IPL"]), ("b.nii", ORIENTATIONS["LPS"])):
        hu, aff, _ = make_volume(codes)
        write_nifti(src / name, hu, aff)
    (src / "notes.txt").write_text("ignored")
    assert (
        main([str(src), "--out", str(tmp_path / "out"), "--checkpoint", str(tiny_checkpoint), "--device", "cpu"]) == 0
    )
    out = tmp_path / "out"
    assert (out / "a_mask.nii.gz").exists() and (out / "b_mask.nii.gz").exists()
    stats = json.loads((out / "statistics.json").read_text())
    assert len(stats["results"]) == 2
    rows = (out / "statistics.csv").read_text().splitlines()
    assert rows[0].startswith("input,label,name") and len(rows) == 1 + 2 * 2
    # The kidney rows carry each side's volumes, as the JSON's "sides" has them; other rows none.
    for r, res in zip((r for r in csv.DictReader(rows) if r["name"] == "kidney"), stats["results"], strict=True):
        sides = res["classes"][0].get("sides")
        for side in ("left", "right"):
            for what in ("total", "tumor"):
                cell = r[f"{side}_{what}_ml"]
                assert (
                    cell == "" if sides is None else float(cell) == pytest.approx(sides[side][f"{what}_ml"], abs=1e-3)
                )
    assert all(r["left_total_ml"] == "" for r in csv.DictReader(rows) if r["name"] != "kidney")
    assert np.isfinite([r["classes"][0]["volume_ml"] for r in stats["results"]]).all()
    # Two checkpoints of one configuration: an ensemble, named in the statistics.
    other = tmp_path / "fold1.safetensors"
    shutil.copy(tiny_checkpoint, other)
    args = [str(src), "--out", str(tmp_path / "out2"), "--checkpoint", str(tiny_checkpoint), str(other)]
    assert main([*args, "--device", "cpu"]) == 0
    stats = json.loads((tmp_path / "out2" / "statistics.json").read_text())
    assert stats["checkpoint"] == [str(tiny_checkpoint), str(other)] and len(stats["results"]) == 2


def test_predict_cli_keeps_a_kits_folders_cases_apart_and_skips_its_label_maps(
    tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Every KiTS case is case_XXXXX/imaging.nii.gz: their masks went to one imaging_mask.nii.gz,
    # each over the last, and the label maps next to them were segmented as if they were CT.
    from app.predict_cli import main

    src = tmp_path / "kits"
    truths = {}
    for case, codes, shape in (("case_00000", "IPL", (72, 60, 20)), ("case_00001", "LPS", (64, 56, 24))):
        hu, aff, truth = make_volume(ORIENTATIONS[codes], shape_ras=shape)
        (src / case).mkdir(parents=True)
        write_nifti(src / case / "imaging.nii.gz", hu, aff)
        write_nifti(
            src / case / ("segmentation.nii.gz" if case.endswith("0") else "aggregated_MAJ_seg.nii.gz"), truth, aff
        )
        truths[case] = truth
    write_nifti(src / "case_00002_segmentation.nii.gz", truths["case_00000"], np.eye(4))
    (src / "case_00000" / "instances").mkdir()  # KiTS23's per-annotator masks (KiTS21: segmentations/)
    write_nifti(
        src / "case_00000" / "instances" / "kidney_instance-1_annotation-1.nii.gz", truths["case_00000"], np.eye(4)
    )
    out = tmp_path / "out"
    args = ["--checkpoint", str(tiny_checkpoint), "--device", "cpu", "--no-mirror"]
    assert main([str(src), "--out", str(out), *args]) == 0
    assert "skipped 4 label map(s)" in capsys.readouterr().err
    stats = json.loads((out / "statistics.json").read_text())["results"]
    assert [Path(r["input"]).relative_to(src).as_posix() for r in stats] == [
        "case_00000/imaging.nii.gz",
        "case_00001/imaging.nii.gz",
    ]
    for case, truth in truths.items():
        mask = nib.load(out / case / "imaging_mask.nii.gz")
        assert mask.shape == truth.shape
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.nii.gz")) == [
        "case_00000/imaging_mask.nii.gz",
        "case_00001/imaging_mask.nii.gz",
    ]
    # Run again with the masks inside the input folder: they are not taken for CT either.
    assert main([str(src), "--out", str(src / "preds"), *args]) == 0
    assert main([str(src), "--out", str(tmp_path / "again"), *args]) == 0
    assert "skipped 6 label map(s) or earlier mask(s)" in capsys.readouterr().err
    # --glob picks the files; names that differ only in their extension get masks of their own.
    assert main([str(src), "--glob", "segmentation.nii.gz", "--out", str(tmp_path / "seg"), *args]) == 0
    assert (tmp_path / "seg" / "case_00000" / "segmentation_mask.nii.gz").exists()
    # ... and a label map taken for CT is segmented with the service's warning.
    (seg,) = json.loads((tmp_path / "seg" / "statistics.json").read_text())["results"]
    assert any("span [0, 2], which does not look like CT" in w for w in seg["warnings"]), seg["warnings"]
    flat = tmp_path / "flat"
    flat.mkdir()
    hu, aff, _ = make_volume(ORIENTATIONS["RAS"])
    write_nifti(flat / "a.nii.gz", hu, aff)
    write_nifti(flat / "a.nii", hu, aff)
    assert main([str(flat), "--out", str(tmp_path / "flat-out"), *args]) == 0
    assert sorted(p.name for p in (tmp_path / "flat-out").glob("*.nii.gz")) == ["a_mask.nii.gz", "a_nii_gz_mask.nii.gz"]


def test_predict_cli_names_an_nnunet_images_folders_masks_as_nnunet_does(
    tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # nnU-Net's imagesTs/ holds <case>_0000.nii.gz; nnUNetv2_predict writes <case>.nii.gz, which is
    # what nnU-Net's evaluation and `kitseg-train evaluate --predictions` look for.
    from app.predict_cli import main

    src = tmp_path / "imagesTs"
    src.mkdir()
    for case, codes in (("case_00000", "IPL"), ("case_00001", "LPS")):
        hu, aff, _ = make_volume(ORIENTATIONS[codes])
        write_nifti(src / f"{case}_0000.nii.gz", hu, aff)
    args = ["--checkpoint", str(tiny_checkpoint), "--device", "cpu", "--no-mirror"]
    assert main([str(src), "--out", str(tmp_path / "auto"), *args]) == 0
    assert sorted(p.name for p in (tmp_path / "auto").glob("*.nii.gz")) == ["case_00000.nii.gz", "case_00001.nii.gz"]
    for case in ("case_00000", "case_00001"):
        mask, image = nib.load(tmp_path / "auto" / f"{case}.nii.gz"), nib.load(src / f"{case}_0000.nii.gz")
        assert mask.shape == image.shape and np.allclose(mask.affine, image.affine)
    assert main([str(src), "--out", str(tmp_path / "kitseg"), "--names", "kitseg", *args]) == 0
    assert sorted(p.name for p in (tmp_path / "kitseg").glob("*.nii.gz")) == [
        "case_00000_0000_mask.nii.gz",
        "case_00001_0000_mask.nii.gz",
    ]
    # A second channel is not CT for a one-channel model: refused, unless --glob leaves it out.
    hu, aff, _ = make_volume(ORIENTATIONS["RAS"])
    write_nifti(src / "case_00000_0001.nii.gz", hu, aff)
    assert main([str(src), "--out", str(tmp_path / "two"), *args]) == 2
    assert "not: case_00000_0001.nii.gz" in capsys.readouterr().err and not (tmp_path / "two").exists()
    assert main([str(src), "--glob", "*_0000.nii.gz", "--out", str(tmp_path / "glob"), *args]) == 0
    assert sorted(p.name for p in (tmp_path / "glob").glob("*.nii.gz")) == ["case_00000.nii.gz", "case_00001.nii.gz"]
    # Other names keep kitseg's naming under auto, and are refused by --names nnunet.
    write_nifti(tmp_path / "scan.nii.gz", hu, aff)
    assert main([str(tmp_path / "scan.nii.gz"), "--out", str(tmp_path / "one"), *args]) == 0
    assert (tmp_path / "one" / "scan_mask.nii.gz").exists()
    assert main([str(tmp_path / "scan.nii.gz"), "--out", str(tmp_path / "one"), "--names", "nnunet", *args]) == 2
    assert "<case>_0000.nii.gz, not: scan.nii.gz" in capsys.readouterr().err
    # A dataset's root: its labelsTr/ holds label maps (named as cases), which are skipped.
    root = tmp_path / "Dataset001_KiTS"
    (root / "labelsTr").mkdir(parents=True)
    write_nifti(root / "labelsTr" / "case_00002.nii.gz", make_volume(ORIENTATIONS["IPL"])[2], np.eye(4))
    shutil.copytree(src, root / "imagesTs", ignore=shutil.ignore_patterns("*_0001.nii.gz"))
    assert main([str(root), "--out", str(tmp_path / "r"), *args]) == 0
    assert "skipped 1 label map(s)" in capsys.readouterr().err
    assert sorted(p.relative_to(tmp_path / "r").as_posix() for p in (tmp_path / "r").rglob("*.nii.gz")) == [
        "imagesTs/case_00000.nii.gz",
        "imagesTs/case_00001.nii.gz",
    ]


def test_predict_cli_continues_an_interrupted_run_and_keeps_what_it_wrote(
    tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import segcore.inference
    from app.predict_cli import main
    from segcore.checkpoint import load_checkpoint, save_checkpoint

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for name, codes in (("a", "IPL"), ("b", "LPS"), ("c", "RAS")):
        hu, aff, _ = make_volume(ORIENTATIONS[codes])
        write_nifti(src / f"{name}.nii.gz", hu, aff)
    real_predict = segcore.inference.Engine.predict
    seen: list[object] = []

    def predict_then_stop(self: segcore.inference.Engine, vol: object, *a: object, **kw: object) -> object:
        if len(seen) == 1:
            raise KeyboardInterrupt  # the run is stopped during the second volume
        seen.append(vol)
        return real_predict(self, vol, *a, **kw)  # type: ignore[arg-type]

    args = [str(src), "--out", str(out), "--checkpoint", str(tiny_checkpoint), "--device", "cpu", "--no-mirror"]
    with monkeypatch.context() as m:
        m.setattr(segcore.inference.Engine, "predict", predict_then_stop)
        with pytest.raises(KeyboardInterrupt):
            main(args)
    # What it finished is on disk, statistics included (written after every volume).
    (first,) = json.loads((out / "statistics.json").read_text())["results"]
    assert first["input"] == str(src / "a.nii.gz") and Path(first["mask"]).is_file()
    assert len((out / "statistics.csv").read_text().splitlines()) == 1 + 2
    assert sorted(p.name for p in out.iterdir()) == ["a_mask.nii.gz", "statistics.csv", "statistics.json"]

    calls: list[str] = []

    def counting(self: segcore.inference.Engine, vol: object, *a: object, **kw: object) -> object:
        calls.append("x")
        return real_predict(self, vol, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(segcore.inference.Engine, "predict", counting)
    assert main([*args, "--continue"]) == 0
    assert len(calls) == 2  # b and c; a is kept
    results = json.loads((out / "statistics.json").read_text())["results"]
    assert [Path(r["input"]).name for r in results] == ["a.nii.gz", "b.nii.gz", "c.nii.gz"]
    assert results[0] == first and all(Path(r["mask"]).is_file() for r in results)
    assert len((out / "statistics.csv").read_text().splitlines()) == 1 + 3 * 2
    assert "(1 kept from the earlier run)" in capsys.readouterr().out
    # Everything done: nothing runs again, also with the folders given relative to the cwd.
    assert main([*args, "--continue"]) == 0 and len(calls) == 2
    monkeypatch.chdir(tmp_path)
    relative = ["in", "--out", "out", *args[3:]]
    assert main([*relative, "--continue"]) == 0 and len(calls) == 2
    # Without --continue, everything does.
    assert main(args) == 0 and len(calls) == 5
    # Other weights would mix two models' masks in one folder: refused, nothing written.
    model, meta = load_checkpoint(tiny_checkpoint)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    other = tmp_path / "other.safetensors"
    save_checkpoint(other, model, meta)
    before = (out / "statistics.json").read_bytes()
    other_args = [*args[:3], "--checkpoint", str(other), *args[5:]]
    assert main([*other_args, "--continue"]) == 2
    assert "was written with other weights" in capsys.readouterr().err and len(calls) == 5
    assert (out / "statistics.json").read_bytes() == before
    # A folder from before the weights were recorded: refused, saying so.
    old_style = json.loads(before)
    del old_style["weights_sha256"]
    (out / "statistics.json").write_text(json.dumps(old_style))
    assert main([*args, "--continue"]) == 2
    assert "did not record its weights" in capsys.readouterr().err and len(calls) == 5
    # A missing checkpoint and a device that isn't there: a message and status 2, no traceback.
    assert main([*args[:3], "--checkpoint", str(tmp_path / "nope.safetensors")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert main([*args[:5], "--device", "tpu"]) == 2
    assert "device 'tpu'" in capsys.readouterr().err


def test_predict_cli_compile_option_reaches_the_engine(
    tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import segcore.inference
    from app.predict_cli import main

    hu, aff, _ = make_volume(ORIENTATIONS["IPL"])
    write_nifti(tmp_path / "a.nii.gz", hu, aff)
    compiled: list[object] = []
    warmed: list[bool] = []
    real_warmup = segcore.inference.Engine.warmup

    def identity_compile(fn: object, **kw: object) -> object:  # the wrapper's logic, without inductor's cost
        compiled.append(fn)
        return fn

    def spy_warmup(self: segcore.inference.Engine, *a: object) -> None:
        warmed.append(self.compiled)
        real_warmup(self, *a)

    monkeypatch.setattr(segcore.inference.torch, "compile", identity_compile)
    monkeypatch.setattr(segcore.inference.Engine, "warmup", spy_warmup)
    args = [str(tmp_path / "a.nii.gz"), "--checkpoint", str(tiny_checkpoint), "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "eager")]) == 0
    assert compiled == [] and warmed == []  # off by default: no compile, no warm-up
    assert main([*args, "--out", str(tmp_path / "on"), "--compile", "on"]) == 0
    assert len(compiled) == 1 and warmed == [True]  # compiled, and warmed before the first volume
    masks = [nib.load(tmp_path / d / "a_mask.nii.gz").get_fdata() for d in ("eager", "on")]
    np.testing.assert_array_equal(*masks)


def test_predict_cli_statistics_csv_has_a_row_per_class_and_each_kidneys_side(tmp_path: Path) -> None:
    from app.predict_cli import _write_statistics

    kidney = {
        "label": 1,
        "name": "kidney",
        "present": True,
        "voxels": 1000,
        "volume_ml": 12.34567,
        "components": 2,
        "mean_confidence": 0.912345,
        "sides": {
            "left": {"total_ml": 5.0, "kidney_ml": 3.5, "tumor_ml": 1.5, "present": True},
            "right": {"total_ml": 7.34567, "kidney_ml": 7.34567, "tumor_ml": 0.0, "present": True},
            "midline_x_mm": 0.5,
        },
    }
    tumor = {"label": 2, "name": "tumor", "present": True, "voxels": 120, "volume_ml": 1.5, "components": 1}
    tumor |= {"mean_confidence": None, "max_axial_diameter_mm": 14.2}
    results = [{"input": "a.nii.gz", "classes": [kidney, tumor]}, {"input": "bad.nii.gz", "error": "not NIfTI"}]
    _write_statistics(tmp_path, {"checkpoint": "m.safetensors", "weights_sha256": ["ab"]}, results)
    rows = list(csv.DictReader((tmp_path / "statistics.csv").read_text().splitlines()))
    assert [(r["input"], r["name"]) for r in rows] == [("a.nii.gz", "kidney"), ("a.nii.gz", "tumor")]
    k, t = rows
    assert (k["volume_ml"], k["mean_confidence"]) == ("12.346", "0.9123")
    assert (k["left_total_ml"], k["left_tumor_ml"], k["right_total_ml"], k["right_tumor_ml"]) == (
        "5.0",
        "1.5",
        "7.346",
        "0.0",
    )
    assert (t["left_total_ml"], t["mean_confidence"], t["max_axial_diameter_mm"]) == ("", "", "14.2")
    saved = json.loads((tmp_path / "statistics.json").read_text())
    assert saved == {"checkpoint": "m.safetensors", "weights_sha256": ["ab"], "results": results}


def _poll(c: TestClient, rid: str, timeout_s: float = 60.0, headers: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    """GET the result until it is no longer 202."""
    deadline = time.monotonic() + timeout_s
    while True:
        r = c.get(f"/segmentations/{rid}", headers=headers)
        if r.status_code != 202 or time.monotonic() > deadline:
            return r
        assert r.headers["retry-after"] == "1" and set(r.json()) == {"id", "status", "progress", "status_url"}
        time.sleep(0.05)


def test_wait_false_answers_202_at_once_and_the_status_url_follows_the_job(
    tmp_path: Path, tiny_checkpoint: Path, payload: bytes
) -> None:
    with _client(tmp_path, tiny_checkpoint) as c:
        w = c.app.state.worker  # type: ignore[attr-defined]
        real = w.engine.predict
        go, started = threading.Event(), threading.Event()

        def gated(*a, **k):
            started.set()
            assert go.wait(60)
            return real(*a, **k)

        w.engine.predict = gated
        r = c.post("/segment?wait=false", files={"file": ("v", payload)})
        assert r.status_code == 202, r.text
        rid = r.json()["id"]
        assert r.headers["location"] == r.json()["status_url"] == f"/segmentations/{rid}"
        assert started.wait(60)
        now = c.get(f"/segmentations/{rid}")
        assert now.status_code == 202 and now.json()["status"] == "running"
        queued = c.post("/segment?wait=false", files={"file": ("v", payload)}).json()["id"]
        assert c.get(f"/segmentations/{queued}").json()["status"] == "queued"
        assert_error(c.get(f"/segmentations/{rid}/mask"), 409, "not_finished")
        # Deleting a queued job cancels it: it is never segmented and leaves nothing.
        assert c.delete(f"/segmentations/{queued}").status_code == 204
        assert_error(c.get(f"/segmentations/{queued}"), 404)
        go.set()
        done = _poll(c, rid)
        assert done.status_code == 200, done.text
        res = done.json()
        assert res["id"] == rid and res["mask_url"] == f"/segmentations/{rid}/mask"
        assert c.get(res["mask_url"]).status_code == 200
        # The same upload, waited for, gives the same result.
        waited = c.post("/segment", files={"file": ("v", payload)}).json()
        assert [k["voxels"] for k in waited["classes"]] == [k["voxels"] for k in res["classes"]]
        assert w.processed == 2 and w.pending(queued) is None  # the deleted job never ran
        assert_error(c.post("/segment?wait=false&download=true", files={"file": ("v", payload)}), 422, "bad_upload")
        _clean(tmp_path)


def test_wait_false_failures_answer_the_status_url_with_their_own_error(
    tmp_path: Path, tiny_checkpoint: Path, payload: bytes
) -> None:
    flat = tmp_path / "flat.nii"
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 1, 2), np.int16), np.eye(4)), str(flat))  # 4D, t = 2
    with _client(tmp_path, tiny_checkpoint, request_timeout_s=1.0) as c:
        w = c.app.state.worker  # type: ignore[attr-defined]
        r = c.post("/segment?wait=false", files={"file": ("v", flat.read_bytes())})
        assert r.status_code == 202, r.text
        bad = r.json()["id"]
        body = assert_error(_poll(c, bad), 422, "invalid_volume")
        assert r.headers["x-request-id"] in body["message"]  # the upload's request, for the server log
        assert_error(_poll(c, bad), 422, "invalid_volume")  # asked again: the same answer
        # A deadline passes while it runs: 504, and no result is kept.
        real = w.engine.predict

        def slow(*a, **k):
            time.sleep(1.5)
            return real(*a, **k)

        w.engine.predict = slow
        late = c.post("/segment?wait=false", files={"file": ("v", payload)}).json()["id"]
        assert_error(_poll(c, late), 504, "deadline_exceeded")
        w.engine.predict = real
        assert sorted(f.name for f in (tmp_path / "results" / "results" / late).iterdir()) == ["error.json"]  # no mask
        # A failure is forgotten when deleted, and after the results' time-to-live.
        assert c.delete(f"/segmentations/{bad}").status_code == 204
        assert_error(c.get(f"/segmentations/{bad}"), 404)
        assert_error(c.delete(f"/segmentations/{bad}"), 404)
        kept = c.post("/segment?wait=false", files={"file": ("v", flat.read_bytes())}).json()["id"]
        assert_error(_poll(c, kept), 422, "invalid_volume")
        ttl = c.app.state.store.ttl_s  # type: ignore[attr-defined]
        c.app.state.store.ttl_s = 0  # type: ignore[attr-defined]
        ok = c.post("/segment?wait=false", files={"file": ("v", flat.read_bytes())}).json()["id"]
        assert_error(_poll(c, ok), 404)  # failed, and already expired
        assert not (tmp_path / "results" / "results" / ok).exists()
        c.app.state.store.ttl_s = ttl  # type: ignore[attr-defined]
        _clean(tmp_path)
    # A failure is kept like a result: a restarted service still answers it.
    with _client(tmp_path, tiny_checkpoint) as c:
        assert_error(c.get(f"/segmentations/{kept}"), 422, "invalid_volume")
        assert c.get(f"/segmentations/{kept}/mask").status_code == 404
        assert c.delete(f"/segmentations/{kept}").status_code == 204
        assert_error(c.get(f"/segmentations/{kept}"), 404)


def _left_by(folder: Path, payload: bytes, deadline_in_s: float, owner: bool = False) -> str:
    """A wait=false job that a process which has ended (or, with ``owner`` and a lock held by
    the caller, one still running) accepted and didn't finish, as app.store keeps it."""
    from app.store import ResultStore

    folder.mkdir(parents=True, exist_ok=True)
    if owner:
        (folder / ".owner").touch()
    rid = ResultStore.new_id()
    (folder / f"{rid}.upload").write_bytes(payload)
    record = {
        "id": rid,
        "request_id": "r1",
        "received_ms": 1.0,
        "accepted_at": time.time(),
        "deadline_at": time.time() + deadline_in_s,
    }
    (folder / f"{rid}.json").write_text(json.dumps(record))
    return rid


def test_jobs_an_ended_process_accepted_are_run_by_the_next_one(
    tmp_path: Path, tiny_checkpoint: Path, payload: bytes
) -> None:
    import fcntl

    pending = tmp_path / "results" / "pending"
    dead, live = pending / ("a" * 32), pending / ("b" * 32)
    ok, late = _left_by(dead, payload, 600), _left_by(dead, payload, -1)
    theirs = _left_by(live, payload, 600, owner=True)
    (dead / f"{'c' * 32}.upload").write_bytes(payload)  # an upload whose record was never written
    with open(live / ".owner", "ab") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a replica that is still running
        with _client(tmp_path, tiny_checkpoint) as c:
            deadline = time.time() + 60
            while (r := c.get(f"/segmentations/{ok}")).status_code == 202:
                assert time.time() < deadline
                time.sleep(0.1)
            assert r.status_code == 200 and r.json()["id"] == ok, r.text
            assert c.get(f"/segmentations/{ok}/mask").status_code == 200
            direct = c.post("/segment", files={"file": ("v", payload)}).json()
            assert r.json()["classes"] == direct["classes"]
            # Its deadline passed while no process ran: its own error, as for any late job.
            body = assert_error(c.get(f"/segmentations/{late}"), 504, "deadline_exceeded")
            assert "stopped before running it" in body["message"]
            # Not ours to run; the replica that accepted it answers it, and so does this one.
            assert c.get(f"/segmentations/{theirs}").json()["status"] == "queued"
            assert (tmp_path / "results" / "results" / late / "error.json").is_file()
            assert not dead.exists() and (live / f"{theirs}.json").exists()
            assert "kitseg_jobs_resumed_total 1.0" in c.get("/metrics").text  # the late one was not resumed
            assert list((tmp_path / "results" / "spool").iterdir()) == []
    assert sorted(p.name for p in pending.iterdir()) == [live.name]  # ours went at shutdown


def test_a_live_replica_takes_over_the_jobs_of_one_that_ended(
    tmp_path: Path, tiny_checkpoint: Path, payload: bytes
) -> None:
    """Replicas share a result folder and one of them dies (and is not started again: scaled
    down, say). The next sweep of a live one runs its accepted jobs and removes its spooled
    uploads; a replica that still runs keeps both."""
    import fcntl

    from app.main import sweep_once

    with _client(tmp_path, tiny_checkpoint) as c:
        store = c.app.state.store  # type: ignore[attr-defined]
        dead, live = store.pending_root / ("a" * 32), store.pending_root / ("b" * 32)
        ok, theirs = _left_by(dead, payload, 600), _left_by(live, payload, 600, owner=True)
        dead_spool, live_spool = store.spool / f"{'a' * 32}-x.upload", store.spool / f"{'b' * 32}-y.upload"
        dead_spool.write_bytes(payload)
        live_spool.write_bytes(payload)
        starting = store.pending_root / f".{'d' * 32}"  # a replica between its mkdir and its lock
        starting.mkdir()
        with open(live / ".owner", "ab") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the replica that still runs
            assert c.get(f"/segmentations/{ok}").json()["status"] == "queued"  # until the sweep runs it
            c.portal.call(sweep_once, c.app)  # type: ignore[union-attr]
            assert _poll(c, ok).status_code == 200
            assert c.get(f"/segmentations/{theirs}").json()["status"] == "queued"  # the replica's, not run here
            assert not dead.exists() and not dead_spool.exists()
            assert (live / f"{theirs}.json").exists() and live_spool.exists() and starting.exists()
            assert "kitseg_jobs_resumed_total 1.0" in c.get("/metrics").text
            # The sweep's two steps apart: a job moved into this process's folder is answered
            # before its worker has it (a 404 in that window failed scripts/replicas-smoke.sh).
            midway = _left_by(store.pending_root / ("c" * 32), payload, 600)
            adopted = store.adopt_pending()
            assert (store.pending / f"{midway}.json").exists()
            assert c.get(f"/segmentations/{midway}").json()["status"] == "queued"
            assert c.get(f"/segmentations/{midway}/mask").status_code == 409
            assert c.app.state.worker.restore(adopted) == 1  # type: ignore[attr-defined]
            assert _poll(c, midway).status_code == 200
        shutil.rmtree(live)
        live_spool.unlink()
        starting.rmdir()
        _clean(tmp_path)


def test_a_wait_false_job_is_on_disk_until_it_ends_and_cancelling_it_removes_it(
    tmp_path: Path, tiny_checkpoint: Path, payload: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = threading.Event()
    orig = worker_mod.Engine.predict

    def gated(self: object, *a: object, **k: object) -> object:
        assert gate.wait(30)
        return orig(self, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(worker_mod.Engine, "predict", gated)
    with _client(tmp_path, tiny_checkpoint) as c:
        pending = c.app.state.store.pending  # type: ignore[attr-defined]
        a, b = (c.post("/segment?wait=false", files={"file": ("v", payload)}).json()["id"] for _ in range(2))
        deadline = time.time() + 30
        while not (pending / f"{a}.progress").exists():  # a runs (gated), and says so for replicas
            assert time.time() < deadline
            time.sleep(0.05)
        assert sorted(p.name for p in pending.iterdir()) == sorted(
            [".owner", f"{a}.json", f"{a}.upload", f"{a}.progress", f"{b}.json", f"{b}.upload"]
        )
        record = json.loads((pending / f"{a}.json").read_text())
        assert record["id"] == a and set(record) == {"id", "request_id", "received_ms", "accepted_at", "deadline_at"}
        assert c.delete(f"/segmentations/{b}").status_code == 204
        assert not (pending / f"{b}.json").exists()  # a restart would not run it
        gate.set()
        deadline = time.time() + 60
        while c.get(f"/segmentations/{a}").status_code == 202:
            assert time.time() < deadline
            time.sleep(0.1)
        assert c.get(f"/segmentations/{a}").status_code == 200
        deadline = time.time() + 10
        while sorted(p.name for p in pending.iterdir()) != [".owner"]:
            assert time.time() < deadline, list(pending.iterdir())
            time.sleep(0.05)
        _clean(tmp_path)


def test_a_job_withdrawn_by_a_replica_is_dropped_while_it_runs(
    tmp_path: Path, tiny_checkpoint: Path, payload: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A DELETE at a replica sharing the result folder removes the job's record
    (ResultStore.withdraw); the worker running it stops at its next batch and keeps nothing.
    Meanwhile the running job's progress is on disk for the replicas."""
    gate, started = threading.Event(), threading.Event()
    orig = worker_mod.Engine.predict

    def gated(self: object, *a: object, **k: object) -> object:
        started.set()
        assert gate.wait(30)
        return orig(self, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(worker_mod.Engine, "predict", gated)
    with _client(tmp_path, tiny_checkpoint) as c:
        store = c.app.state.store  # type: ignore[attr-defined]
        rid = c.post("/segment?wait=false", files={"file": ("v", payload)}).json()["id"]
        assert started.wait(30)
        assert (store.pending / f"{rid}.progress").read_text() == "0.000"  # "running", for replicas
        (store.pending / f"{rid}.json").unlink()  # what a replica's DELETE does
        assert_error(c.get(f"/segmentations/{rid}"), 404)  # gone here at once
        gate.set()
        deadline = time.time() + 30
        while 'kitseg_jobs_total{outcome="cancelled"} 1.0' not in c.get("/metrics").text:
            assert time.time() < deadline
            time.sleep(0.05)
        assert not (tmp_path / "results" / "results" / rid).exists()
        assert_error(c.get(f"/segmentations/{rid}/mask"), 404)
        _clean(tmp_path)


def test_a_failure_that_cannot_be_written_is_answered_from_memory(
    tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flat = tmp_path / "flat.nii"
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 1, 2), np.int16), np.eye(4)), str(flat))  # 4D, t = 2
    with _client(tmp_path, tiny_checkpoint) as c:

        def full(*a: object, **k: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(c.app.state.store, "write_failure", full)  # type: ignore[attr-defined]
        rid = c.post("/segment?wait=false", files={"file": ("v", flat.read_bytes())}).json()["id"]
        assert_error(_poll(c, rid), 422, "invalid_volume")
        assert not (tmp_path / "results" / "results" / rid).exists()
        assert c.delete(f"/segmentations/{rid}").status_code == 204
        assert_error(c.get(f"/segmentations/{rid}"), 404)
        _clean(tmp_path)


def test_a_start_removes_the_spool_of_ended_processes_only(
    tmp_path: Path, tiny_checkpoint: Path, payload: bytes
) -> None:
    import fcntl

    root = tmp_path / "results"
    live = "b" * 32  # a replica sharing the result folder, receiving an upload right now
    (root / "pending" / live).mkdir(parents=True)
    (root / "pending" / live / ".owner").touch()
    (root / "spool").mkdir()
    theirs = root / "spool" / f"{live}-{'1' * 32}.upload"
    ended = root / "spool" / f"{'a' * 32}-{'2' * 32}.upload"
    unnamed = root / "spool" / f"{'3' * 32}.upload"  # as versions before the instance ids named them
    for f in (theirs, ended, unnamed):
        f.write_bytes(payload)
    with open(root / "pending" / live / ".owner", "ab") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with _client(tmp_path, tiny_checkpoint) as c:
            assert theirs.exists() and not ended.exists() and not unnamed.exists()
            store = c.app.state.store  # type: ignore[attr-defined]
            assert store.spool_path().name.startswith(f"{store.instance}-")
            assert c.post("/segment", files={"file": ("v", payload)}).status_code == 200
            assert list((root / "spool").iterdir()) == [theirs]


def test_a_result_folder_without_file_locks_still_serves_and_takes_over_jobs(
    tmp_path: Path,
    tiny_checkpoint: Path,
    payload: bytes,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import app.store

    def no_locks(*a: object) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(app.store.fcntl, "flock", no_locks)  # as on some network file systems
    left = _left_by(tmp_path / "results" / "pending" / ("a" * 32), payload, 600, owner=True)
    store_log = logging.getLogger("kitseg.store")  # "kitseg" logs through its own handler, not the root's
    store_log.addHandler(caplog.handler)
    try:
        with _client(tmp_path, tiny_checkpoint) as c:
            assert c.get(f"/segmentations/{left}").status_code in (200, 202)
            assert _poll(c, left).status_code == 200
            assert c.post("/segment?wait=false", files={"file": ("v", payload)}).status_code == 202
    finally:
        store_log.removeHandler(caplog.handler)
    assert any("does not support file locks" in r.getMessage() for r in caplog.records)


def test_a_keep_that_its_cancelled_request_leaves_behind_is_undone(tmp_path: Path) -> None:
    """The server stopping cancels a request between its upload and its 202: the move of the
    upload, on its thread, still finishes, and is then undone, so no restart runs a job that
    nobody was told about."""
    import asyncio

    from app.routes.segment import _persist
    from app.store import ResultStore

    store = ResultStore(tmp_path / "r", ttl_s=60)
    gate, real = threading.Event(), store.persist

    def slow(*a: Any) -> Path:
        assert gate.wait(10)
        return real(*a)

    store.persist = slow  # type: ignore[method-assign]
    upload, rid = store.spool_path(), store.new_id()
    upload.write_bytes(b"volume")

    async def cancelled_request() -> None:
        task = asyncio.create_task(_persist(store, rid, upload, {"id": rid}))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        gate.set()  # the move goes on, on its thread
        for _ in range(200):
            await asyncio.sleep(0.01)
            if not upload.exists() and not list(store.pending.glob(f"{rid}*")):
                return

    asyncio.run(cancelled_request())
    assert not upload.exists() and sorted(p.name for p in store.pending.iterdir()) == [".owner"]
    store.close()


def test_an_unreadable_record_of_an_ended_process_never_stops_a_start(
    tmp_path: Path, tiny_checkpoint: Path, payload: bytes
) -> None:
    dead = tmp_path / "results" / "pending" / ("a" * 32)
    rid = _left_by(dead, payload, 600)
    (dead / f"{rid}.json").write_text(json.dumps({"id": rid, "deadline_at": "soon", "accepted_at": "today"}))
    other = _left_by(dead, payload, 600)
    (dead / f"{other}.json").write_text(json.dumps([other]))  # not even an object
    with _client(tmp_path, tiny_checkpoint) as c:
        assert c.get("/ready").status_code == 200
        assert_error(c.get(f"/segmentations/{rid}"), 404)
        assert_error(c.get(f"/segmentations/{other}"), 404)
        _clean(tmp_path)


def test_a_post_repeated_with_its_idempotency_key_finds_the_first_job(
    tmp_path: Path, tiny_checkpoint: Path, payload: bytes
) -> None:
    keys = ("a" * 20, "b" * 20)

    def post(c: TestClient, idem: str, api_key: str = keys[0], wait: str = "false") -> Any:
        headers = {"Idempotency-Key": idem, "X-API-Key": api_key}
        return c.post(f"/segment?wait={wait}", files={"file": ("v", payload)}, headers=headers)

    with _client(tmp_path, tiny_checkpoint, api_keys=",".join(keys)) as c:
        w = c.app.state.worker  # type: ignore[attr-defined]
        first = post(c, "retry-me")
        assert first.status_code == 202 and "idempotent-replayed" not in first.headers
        rid = first.json()["id"]
        again = post(c, "retry-me")  # the client retries: the same job, nothing new runs
        assert again.status_code == 202 and again.headers["idempotent-replayed"] == "true"
        assert again.json()["id"] == rid and again.headers["location"] == f"/segmentations/{rid}"
        assert _poll(c, rid, headers={"X-API-Key": keys[0]}).status_code == 200
        done = post(c, "retry-me")
        assert done.json() == {"id": rid, "status": "done", "progress": 1.0, "status_url": f"/segmentations/{rid}"}
        other = post(c, "retry-me", api_key=keys[1])  # another client's key never meets this one
        assert other.status_code == 202 and other.json()["id"] != rid
        assert post(c, "another").json()["id"] not in (rid, other.json()["id"])
        deadline = time.monotonic() + 60
        while w.processed < 3:  # rid, other's and "another": three jobs for five POSTs
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.3)
        assert w.processed == 3
        # Mistakes: a key on a waiting request, and a key no header can carry.
        assert_error(post(c, "k", wait="true"), 422, "bad_upload")
        assert_error(post(c, "x" * 256), 422, "bad_upload")
        assert_error(post(c, "with space"), 422, "bad_upload")
        # A deleted job's key starts a new one.
        assert c.delete(f"/segmentations/{rid}", headers={"X-API-Key": keys[0]}).status_code == 204
        fresh = post(c, "retry-me")
        assert "idempotent-replayed" not in fresh.headers and fresh.json()["id"] != rid
        _poll(c, fresh.json()["id"], headers={"X-API-Key": keys[0]})
        _clean(tmp_path)
    # The keys outlive a restart, as the results do, and expire with them.
    with _client(tmp_path, tiny_checkpoint, api_keys=",".join(keys)) as c:
        replay = post(c, "retry-me")
        assert replay.headers["idempotent-replayed"] == "true" and replay.json()["id"] == fresh.json()["id"]
        store = c.app.state.store  # type: ignore[attr-defined]
        store.ttl_s = 0
        late = post(c, "retry-me")
        assert "idempotent-replayed" not in late.headers
        # The new job's key lasts while the job runs (test_an_idempotency_key_lasts_while_its_job_is_kept).
        _poll(c, late.json()["id"], headers={"X-API-Key": keys[0]})
        store.sweep()
        assert list(store.keys.iterdir()) == []


def _keyed(c: TestClient, idem: str, body: bytes) -> Any:
    return c.post("/segment?wait=false", files={"file": ("v", body)}, headers={"Idempotency-Key": idem})


def test_an_idempotency_key_sent_with_another_file_is_refused(
    tmp_path: Path, tiny_checkpoint: Path, payload: bytes
) -> None:
    """A client that reuses a key for another volume would otherwise get the first volume's
    mask back for the second: 422 (the IETF draft's answer), and the first job is untouched. A
    POST that is not accepted frees its key."""
    hu, aff, _ = make_volume(ORIENTATIONS["RAS"])
    other = write_nifti(tmp_path / "other.nii.gz", hu, aff).read_bytes()
    with _client(tmp_path, tiny_checkpoint) as c:
        first = _keyed(c, "volume-1", payload)
        assert first.status_code == 202
        body = assert_error(_keyed(c, "volume-1", other), 422, "idempotency_key_reused")
        assert "another file" in body["message"]
        assert _keyed(c, "volume-1", payload).headers["idempotent-replayed"] == "true"  # the same file still replays
        assert _poll(c, first.json()["id"]).status_code == 200
        assert c.app.state.worker.processed == 1  # type: ignore[attr-defined]
        # Not accepted (an empty file): the key is free again, for any file.
        assert_error(_keyed(c, "volume-2", b""), 422, "bad_upload")
        store = c.app.state.store  # type: ignore[attr-defined]
        assert len(list(store.keys.iterdir())) == 1
        # A key that can't be kept (a full disk) is 507, as an upload that can't be, and nothing runs.
        real = store.claim_key
        store.claim_key = lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device"))
        assert_error(_keyed(c, "volume-3", payload), 507, "insufficient_storage")
        store.claim_key = real
        second = _keyed(c, "volume-2", other)
        assert second.status_code == 202 and "idempotent-replayed" not in second.headers
        _poll(c, second.json()["id"])
        _clean(tmp_path)


def test_a_post_repeated_while_the_first_is_still_being_accepted_is_409(
    tmp_path: Path, tiny_checkpoint: Path, payload: bytes
) -> None:
    """Two POSTs with one key at once (a client that timed out and sent again while the first
    was still being kept): the second is told to retry (409, Retry-After), and one job runs."""
    with _client(tmp_path, tiny_checkpoint) as c:
        store = c.app.state.store  # type: ignore[attr-defined]
        real, during, nested = store.persist, [], threading.Event()

        def slow_persist(*a: Any) -> Any:  # the first request is between its claim and its 202
            if not nested.is_set():  # once: a second POST that went on to be accepted comes here too
                nested.set()
                during.append(_keyed(c, "same", payload))
            return real(*a)

        store.persist = slow_persist
        first = _keyed(c, "same", payload)
        store.persist = real
        assert first.status_code == 202
        busy = assert_error(during[0], 409, "idempotency_key_in_use")
        assert during[0].headers["retry-after"] == "1" and "still being accepted" in busy["message"]
        again = _keyed(c, "same", payload)  # the retry, once the first is accepted
        assert again.headers["idempotent-replayed"] == "true" and again.json()["id"] == first.json()["id"]
        _poll(c, first.json()["id"])
        time.sleep(0.3)
        assert c.app.state.worker.processed == 1  # type: ignore[attr-defined]
        _clean(tmp_path)


def test_an_idempotency_key_claimed_by_another_process(tmp_path: Path, tiny_checkpoint: Path, payload: bytes) -> None:
    """A replica sharing the result folder is accepting a POST with the key: 409. The process
    that claimed it ended before accepting the job: the key goes to the next POST."""
    import fcntl
    import hashlib

    with _client(tmp_path, tiny_checkpoint) as c:
        store = c.app.state.store  # type: ignore[attr-defined]
        fp = hashlib.sha256(payload).hexdigest()
        digest = hashlib.sha256(b"\0replica").hexdigest()  # no API key configured
        replica, gone = "b" * 32, "c" * 32
        (store.pending_root / replica).mkdir()
        with open(store.pending_root / replica / ".owner", "wb") as owner:
            fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the replica runs
            (store.keys / digest).write_text(f"{'d' * 32} {fp} {replica}")
            assert_error(_keyed(c, "replica", payload), 409, "idempotency_key_in_use")
        # The replica ended without accepting it: no job of that id exists anywhere.
        (store.keys / digest).write_text(f"{'d' * 32} {fp} {gone}")
        taken = _keyed(c, "replica", payload)
        assert taken.status_code == 202 and "idempotent-replayed" not in taken.headers
        assert (store.keys / digest).read_text() == f"{taken.json()['id']} {fp}"  # bound once accepted
        _poll(c, taken.json()["id"])
        shutil.rmtree(store.pending_root / replica)
        _clean(tmp_path)


def test_an_idempotency_key_lasts_while_its_job_is_kept(tmp_path: Path, tiny_checkpoint: Path, payload: bytes) -> None:
    """A key lasts the results' time-to-live from when it was written, and longer while its job
    is kept: unfinished (here a live replica's, still running past the time-to-live) or ended
    with a result not yet expired. A retry then finds the job instead of starting it again. Once
    the job is gone and the key is old, the key starts a new one and the sweep removes it."""
    import fcntl
    import hashlib
    import os

    def age(p: Path) -> None:
        old = time.time() - 120
        os.utime(p, (old, old))

    with _client(tmp_path, tiny_checkpoint, result_ttl_s=60) as c:
        store = c.app.state.store  # type: ignore[attr-defined]
        key = store.keys / hashlib.sha256(b"\0old").hexdigest()  # no API key configured
        replica = store.pending_root / ("b" * 32)
        rid = _left_by(replica, payload, 600, owner=True)
        with open(replica / ".owner", "wb") as owner:
            fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the replica runs it, for over the time-to-live
            key.write_text(f"{rid} {hashlib.sha256(payload).hexdigest()}")
            age(key)
            again = _keyed(c, "old", payload)
            assert again.status_code == 202 and again.headers["idempotent-replayed"] == "true"
            assert again.json()["id"] == rid
            store.sweep()
            assert key.exists()
        shutil.rmtree(replica)  # the job is gone (withdrawn with its replica's folder): a new one starts
        fresh = _keyed(c, "old", payload)
        assert fresh.status_code == 202 and "idempotent-replayed" not in fresh.headers
        new = fresh.json()["id"]
        assert new != rid and _poll(c, new).status_code == 200
        age(key)  # ended, its result kept: still answered
        done = _keyed(c, "old", payload)
        assert done.headers["idempotent-replayed"] == "true" and done.json()["status"] == "done"
        store.sweep()
        assert key.exists()
        age(store.results / new)  # the result has expired too: the key goes with it
        store.sweep()
        assert not key.exists()
        _clean(tmp_path)
