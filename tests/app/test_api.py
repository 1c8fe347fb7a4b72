"""Real requests against the app: the happy path, result resources, each error status, and the
JSON error shape."""

from __future__ import annotations

import dataclasses
import gzip
import json
import re
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from segcore.checkpoint import file_sha256, read_meta, save_checkpoint
from segcore.inference import Engine, cpu_bf16_fast
from segcore.io import load_volume
from segcore.ort import onnxruntime_available
from segcore.unet import UNet
from tests.app.conftest import make_settings
from tests.conftest import ORIENTATIONS, make_volume, write_nifti


def _nifti_bytes(tmp_path: Path, codes=("I", "P", "L"), gz: bool = True) -> bytes:
    hu, aff, _ = make_volume(codes)
    p = write_nifti(tmp_path / ("v.nii.gz" if gz else "v.nii"), hu, aff)
    return p.read_bytes()


def assert_error(r, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"code", "message", "request_id"}, body
    assert body["request_id"] == r.headers["x-request-id"]
    if code:
        assert body["code"] == code, body
    return body


def test_health_ready_model(tiny_client: TestClient) -> None:
    assert tiny_client.get("/health").json() == {"status": "ok"}
    assert tiny_client.get("/ready").json()["status"] == "ready"
    card = tiny_client.get("/model").json()
    assert card["labels"] == {"0": "background", "1": "kidney", "2": "tumor"}
    assert card["demo"] is False and len(card["sha256"]) == 64
    assert card["preprocessing"]["orientation"] == "RAS"
    assert card["postprocessing"] == {
        "keep_largest": True,
        "max_components": 2,
        "min_fraction": 0.1,
        "min_tumor_ml": 0.0,
    }
    assert card["mirror"] is True  # nnU-Net-style test-time mirroring is the default
    assert card["body_crop"] is True
    # auto: bf16 through torch on a CPU with native bf16; elsewhere fp32, through ONNX Runtime
    # when the onnx extra is installed (setup.sh installs it)
    bf16 = cpu_bf16_fast()
    assert card["precision"] == ("bf16" if bf16 else "fp32")
    assert card["backend"] == ("onnxruntime" if onnxruntime_available() and not bf16 else "torch")
    assert card["compiled"] is False  # make_settings turns compile off


def test_compile_setting_reaches_the_engine(
    tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert Settings(result_dir=tmp_path).compile == "auto"
    monkeypatch.setenv("KITSEG_COMPILE", "on")
    settings = Settings(result_dir=tmp_path / "results", checkpoint=tiny_checkpoint, device="cpu", warmup=False)
    with TestClient(create_app(settings)) as c:  # no forward pass, so nothing is compiled yet
        card = c.get("/model").json()
        assert card["compiled"] is True and card["backend"] == "torch"


def test_compile_auto_is_off_without_a_warm_up(
    tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The warm-up pays for compiling before the service is ready. Without it, auto stays eager
    (the first request would pay 10-50 s), and an explicit on compiles there, with a warning."""
    import app.main as main_mod

    asked: list[str] = []

    def from_checkpoint(*a: object, compile: str, **kw: object) -> object:
        asked.append(compile)
        raise RuntimeError("stop here")

    monkeypatch.setattr(main_mod.Engine, "from_checkpoint", from_checkpoint)
    for warmup, setting in ((False, "auto"), (True, "auto"), (False, "on"), (False, "off")):
        with pytest.raises(RuntimeError, match="stop here"):
            main_mod._load(make_settings(tmp_path, checkpoint=tiny_checkpoint, warmup=warmup, compile=setting))
    assert asked == ["off", "auto", "on", "off"]
    assert [r.getMessage() for r in caplog.records if "first request compiles" in r.getMessage()] == [
        "KITSEG_COMPILE=on with KITSEG_WARMUP=false: the first request compiles the network"
    ]


def test_compiled_service_compiles_at_startup_and_not_per_request(tmp_path: Path) -> None:
    from torch._dynamo.utils import counters

    from segcore.checkpoint import KITS19_LABELS, CheckpointMeta, save_checkpoint
    from segcore.preprocessing import PreprocessConfig
    from segcore.unet import UNetConfig
    from tests.segcore.test_ort import _random_net

    # Large random weights, so that the masks compared below hold every class.
    cfg = UNetConfig(in_slices=3, num_classes=3, base_width=4, depth=3)
    tiny_checkpoint = tmp_path / "random.safetensors"
    save_checkpoint(tiny_checkpoint, _random_net(cfg), CheckpointMeta(cfg, PreprocessConfig(), dict(KITS19_LABELS)))
    torch._dynamo.reset()
    counters.clear()
    # fp32: compiling in bf16 takes 2-3x as long (about 50 s here), and the warm-up's job is the
    # same in both; the benchmark covers bf16 (docs/benchmarks.md, "torch.compile").
    app = create_app(make_settings(tmp_path, checkpoint=tiny_checkpoint, warmup=True, compile="on", precision="fp32"))
    with TestClient(app) as c:
        compiled = counters["frames"]["ok"]
        assert compiled >= 1  # the warm-up compiled the network
        data = _nifti_bytes(tmp_path)
        r = c.post("/segment", files={"file": ("a.nii.gz", data)})
        assert r.status_code == 200, r.text
        assert c.get("/model").json()["compiled"] is True  # no fallback to eager
        assert counters["frames"]["ok"] == compiled, "a request compiled again"
        compiled_mask = _mask_of(c, r.json())
    eager = make_settings(tmp_path / "eager", checkpoint=tiny_checkpoint, precision="fp32", backend="torch")
    with TestClient(create_app(eager)) as c:
        r2 = c.post("/segment", files={"file": ("a.nii.gz", data)})
        assert r2.status_code == 200, r2.text
        eager_mask = _mask_of(c, r2.json())
    assert len(np.unique(eager_mask)) == 3  # every class present: the comparison means something
    assert (compiled_mask != eager_mask).mean() < 1e-3  # the same mask, up to rounding at argmax ties


def _mask_of(c: TestClient, result: dict) -> np.ndarray:
    r = c.get(result["mask_url"])
    assert r.status_code == 200
    return np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(r.content)).dataobj)


def test_warmup_runs_a_whole_job_before_ready(
    tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import app.worker as worker_module

    seen: list[str] = []
    threads: set[threading.Thread] = set()
    for name in ("compute_statistics", "encode_mask"):
        real = getattr(worker_module, name)

        def spy(*a: object, _real=real, _name=name, **k: object) -> object:
            seen.append(_name)
            threads.add(threading.current_thread())
            return _real(*a, **k)

        monkeypatch.setattr(worker_module, name, spy)
    app = create_app(make_settings(tmp_path, checkpoint=tiny_checkpoint, warmup=True))
    with TestClient(app) as c:
        assert c.get("/ready").json()["status"] == "ready"
        assert seen == ["compute_statistics", "encode_mask"]  # before any request
        # On the thread that will run the jobs, whose malloc arena the warm-up is meant to grow.
        assert threads == {app.state.worker.thread}
        assert list((tmp_path / "results" / "results").iterdir()) == []  # nothing stored
        assert c.post("/segment", files={"file": ("v.nii.gz", _nifti_bytes(tmp_path))}).status_code == 200


def test_empty_environment_variables_are_unset_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    # docker-compose.yml passes KITSEG_CHECKPOINT (and others) as `${KITSEG_X:-}`, an empty string
    # where the host sets none: that was the path ".", and `docker compose up` could not start.
    compose = (Path(__file__).resolve().parents[2] / "docker-compose.yml").read_text()
    assert "KITSEG_CHECKPOINT" in re.findall(r"(KITSEG_\w+): \$\{\1:-\}", compose)
    for name in Settings.model_fields:
        monkeypatch.delenv(f"KITSEG_{name.upper()}", raising=False)
    defaults = Settings().model_dump()
    for name in Settings.model_fields:
        monkeypatch.setenv(f"KITSEG_{name.upper()}", "")
    empty = Settings()
    assert empty.model_dump() == defaults and empty.is_demo


def test_the_command_lines_engine_flags_take_the_services_values_and_defaults() -> None:
    # kitseg-predict and kitseg-train evaluate declare their engine flags in segcore.options; the
    # settings are pydantic Literals, so the two lists could drift apart without this.
    import argparse
    import typing

    from segcore.options import BACKENDS, COMPILE_MODES, PRECISIONS, add_engine_arguments, engine_options

    fields = Settings.model_fields
    for name, values in (("precision", PRECISIONS), ("backend", BACKENDS), ("compile", COMPILE_MODES)):
        assert typing.get_args(fields[name].annotation) == values, name
    ap = argparse.ArgumentParser()
    add_engine_arguments(ap, batch_size=fields["batch_size"].default)
    cli = engine_options(ap.parse_args([]))
    for name in ("device", "precision", "backend", "batch_size", "mirror", "body_crop"):
        assert cli[name] == fields[name].default, name
    assert cli["compile"] == "off"  # a command line segments once: compiling is opt-in there


def test_mirror_backend_and_body_crop_settings_reach_the_engine(
    tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KITSEG_MIRROR", "false")
    monkeypatch.setenv("KITSEG_BACKEND", "torch")
    monkeypatch.setenv("KITSEG_BODY_CROP", "false")
    settings = make_settings(tmp_path, checkpoint=tiny_checkpoint)
    assert settings.mirror is False and settings.body_crop is False
    with TestClient(create_app(settings)) as c:
        card = c.get("/model").json()
        assert card["mirror"] is False and card["backend"] == "torch" and card["body_crop"] is False
        assert c.post("/segment", files={"file": ("a.nii.gz", _nifti_bytes(tmp_path))}).status_code == 200


def test_an_ensemble_is_served_as_one_model(
    tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two folds: the same configuration, other weights (large random ones: every class wins somewhere).
    meta = read_meta(tiny_checkpoint)
    for seed, path in enumerate((tiny_checkpoint, other := tmp_path / "fold1.safetensors")):
        torch.manual_seed(seed)
        net = UNet(meta.model)
        with torch.no_grad():
            for prm in net.parameters():
                prm.normal_(0.0, 0.5)
        save_checkpoint(path, net, meta)
    monkeypatch.setenv("KITSEG_ENSEMBLE", f" {other} ,")
    settings = make_settings(tmp_path, checkpoint=tiny_checkpoint)
    assert settings.ensemble == [other]
    data = _nifti_bytes(tmp_path)
    with TestClient(create_app(settings)) as c:
        card = c.get("/model").json()
        assert card["ensemble"] == [file_sha256(tiny_checkpoint), file_sha256(other)]
        assert card["sha256"] == file_sha256(tiny_checkpoint)
        r = c.post("/segment", files={"file": ("a.nii.gz", data)})
        assert r.status_code == 200, r.text
        assert r.json()["model"]["ensemble"] == card["ensemble"]
        mask = nib.Nifti1Image.from_bytes(gzip.decompress(c.get(r.json()["mask_url"]).content)).get_fdata()
        backend = c.app.state.worker.engine.backend  # type: ignore[attr-defined]
    # The mask is what the offline ensemble makes of the same file, and not what either member makes.
    vol = load_volume(write_nifti(tmp_path / "same.nii.gz", *make_volume(("I", "P", "L"))[:2]))
    kw = {"device": "cpu", "batch_size": settings.batch_size, "mirror": settings.mirror, "backend": backend}
    offline = Engine.from_checkpoint([str(tiny_checkpoint), str(other)], **kw).predict(vol).mask  # type: ignore[arg-type]
    np.testing.assert_array_equal(mask, offline)
    for one in (tiny_checkpoint, other):
        assert (Engine.from_checkpoint(str(one), **kw).predict(vol).mask != offline).any()  # type: ignore[arg-type]
    # A member trained another way stops startup, and an ensemble needs its first member named.
    save_checkpoint(other, UNet(dataclasses.replace(meta.model, base_width=8)), meta)
    with pytest.raises(RuntimeError, match="cannot start"), TestClient(create_app(settings)):
        pass
    monkeypatch.delenv("KITSEG_ENSEMBLE")
    with pytest.raises(ValueError, match="KITSEG_ENSEMBLE adds to KITSEG_CHECKPOINT"):
        make_settings(tmp_path, ensemble=[other])


def test_segment_fetch_again_download_and_delete(tiny_client: TestClient, tmp_path: Path) -> None:
    data = _nifti_bytes(tmp_path)
    r = tiny_client.post("/segment", files={"file": ("whatever-name.nii.gz", data, "application/octet-stream")})
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["input"]["shape"] == [20, 60, 72] and res["input"]["orientation"] == ["I", "P", "L"]
    assert [c["name"] for c in res["classes"]] == ["kidney", "tumor"]
    for c in res["classes"]:
        assert {"voxels", "volume_ml", "present", "components", "mean_confidence", "touches_border"} <= set(c)
    for stage in ("receive", "decompress_parse", "preprocess", "model", "postprocess", "statistics", "encode", "write"):
        assert stage in res["timings_ms"]
    assert tiny_client.get(f"/segmentations/{res['id']}").json()["classes"] == res["classes"]
    m = tiny_client.get(res["mask_url"])
    assert m.status_code == 200 and m.headers["content-type"] == "application/gzip"
    img = nib.Nifti1Image.from_bytes(gzip.decompress(m.content))
    assert img.shape == (20, 60, 72) and img.get_data_dtype() == np.uint8
    ref = nib.Nifti1Image.from_bytes(gzip.decompress(data))
    np.testing.assert_allclose(img.affine, ref.affine, atol=1e-5)
    # The mask itself as the response, statistics in a header.
    d = tiny_client.post("/segment?download=true", files={"file": ("x", data)})
    assert d.headers["content-type"] == "application/gzip"
    stats = json.loads(d.headers["x-kitseg-statistics"])
    assert [c["name"] for c in stats["classes"]] == ["kidney", "tumor"]
    d2 = tiny_client.post("/segment", files={"file": ("x", data)}, headers={"Accept": "application/gzip"})
    assert d2.content[:2] == b"\x1f\x8b"
    assert tiny_client.delete(f"/segmentations/{res['id']}").status_code == 204
    assert_error(tiny_client.get(f"/segmentations/{res['id']}"), 404, "not_found")
    assert_error(tiny_client.get(res["mask_url"]), 404, "not_found")
    assert_error(tiny_client.delete(f"/segmentations/{res['id']}"), 404)


def test_uncompressed_nii_with_gz_name_is_accepted(tiny_client: TestClient, tmp_path: Path) -> None:
    r = tiny_client.post("/segment", files={"file": ("scan.nii.gz", _nifti_bytes(tmp_path, gz=False))})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "payload, status, code",
    [
        (b"\x89PNG\r\n\x1a\n" + bytes(1000), 415, "unsupported_media_type"),
        (b"DICM" + bytes(2000), 415, "unsupported_media_type"),
        (gzip.compress(b"PK\x03\x04" + bytes(5000)), 415, "unsupported_media_type"),
        (np.random.default_rng(0).bytes(4000), 415, "unsupported_media_type"),
    ],
    ids=["png", "dicom", "gz-zip", "random"],
)
def test_not_nifti_is_415(tiny_client: TestClient, payload: bytes, status: int, code: str) -> None:
    assert_error(tiny_client.post("/segment", files={"file": ("a.nii.gz", payload)}), status, code)


def _nii(tmp_path: Path, data: np.ndarray, affine=np.eye(4), dtype=np.int16) -> bytes:
    return write_nifti(tmp_path / "x.nii", data, affine, dtype=dtype).read_bytes()


def test_unsegmentable_volumes_are_422(tiny_client: TestClient, tmp_path: Path) -> None:
    cases = {
        "2d": _nii(tmp_path, np.zeros((64, 64))),
        "4d": _nii(tmp_path, np.zeros((32, 32, 4, 3))),
        "tiny": _nii(tmp_path, np.zeros((8, 8, 8))),
        "nan": _nii(tmp_path, np.full((32, 32, 4), np.nan), dtype=np.float32),
        "singular": _nii(tmp_path, np.zeros((32, 32, 4)), affine=np.diag([1.0, 0.0, 1.0, 1.0])),
    }
    for name, payload in cases.items():
        body = assert_error(tiny_client.post("/segment", files={"file": ("a.nii", payload)}), 422)
        assert body["message"], name
    hu, aff, _ = make_volume(ORIENTATIONS["RAS"])
    raw = gzip.compress(_nii(tmp_path, hu, aff))
    assert_error(tiny_client.post("/segment", files={"file": ("a.nii.gz", raw[: len(raw) // 2])}), 422, "corrupt_data")
    bad_crc = raw[:-8] + bytes([raw[-8] ^ 0xFF]) + raw[-7:]
    assert_error(tiny_client.post("/segment", files={"file": ("a.nii.gz", bad_crc)}), 422, "corrupt_data")


def test_missing_and_empty_file_field(tiny_client: TestClient) -> None:
    assert_error(tiny_client.post("/segment", files={"other": ("a", b"123")}), 422, "validation_error")
    assert_error(tiny_client.post("/segment", files={"file": ("a.nii", b"")}), 422, "bad_upload")
    assert_error(tiny_client.post("/segment"), 422)


def test_too_large_is_413_with_and_without_content_length(tiny_client: TestClient) -> None:
    big = bytes(5 << 20)
    assert_error(tiny_client.post("/segment", files={"file": ("a.nii", big)}), 413, "payload_too_large")

    def chunks():
        for _ in range(6):
            yield bytes(1 << 20)

    r = tiny_client.post("/segment", content=chunks(), headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert_error(r, 413)


def _nifti_header(shape: tuple[int, ...]) -> bytes:
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.int16)
    hdr.set_data_offset(352)
    return bytes(hdr.binaryblock) + bytes(4)


def test_gzip_bombs_are_413(tiny_client: TestClient) -> None:
    # Zeros: not NIfTI at all, found out from the first bytes.
    zeros = gzip.compress(bytes(40 << 20), compresslevel=9)
    assert_error(tiny_client.post("/segment", files={"file": ("a.nii.gz", zeros)}), 415, "unsupported_media_type")
    # An honest header that declares 40 MiB (over the 16 MiB limit): refused before allocation.
    honest = gzip.compress(_nifti_header((512, 512, 80)) + bytes(40 << 20), compresslevel=9)
    assert len(honest) < (1 << 20)
    assert_error(tiny_client.post("/segment", files={"file": ("a.nii.gz", honest)}), 413, "payload_too_large")
    # A small honest header followed by 40 MiB of junk: stopped while the rest is drained.
    junk = gzip.compress(_nifti_header((32, 32, 16)) + bytes(40 << 20), compresslevel=9)
    assert_error(tiny_client.post("/segment", files={"file": ("a.nii.gz", junk)}), 413, "payload_too_large")


def test_unknown_ids_and_traversal_are_404(tiny_client: TestClient) -> None:
    for rid in ("0" * 32, "..%2F..%2Fetc%2Fpasswd", "abc", "../../results"):
        r = tiny_client.get(f"/segmentations/{rid}")
        assert r.status_code == 404


def test_not_ready_and_bad_checkpoint_stop_startup(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    app = create_app(make_settings(tmp_path, checkpoint=bad))
    with pytest.raises(RuntimeError, match="cannot start"), TestClient(app):
        pass


def test_a_failing_warm_up_stops_startup(
    tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import app.worker as worker_module

    def broken(*a: object, **k: object) -> None:
        raise ValueError("the warm-up's encoder is broken")

    monkeypatch.setattr(worker_module, "encode_mask", broken)
    app = create_app(make_settings(tmp_path, checkpoint=tiny_checkpoint, warmup=True))
    with pytest.raises(RuntimeError, match="cannot start: the warm-up's encoder is broken"), TestClient(app):
        pass


def test_api_keys(tmp_path: Path, tiny_checkpoint: Path) -> None:
    key = "k" * 24
    app = create_app(make_settings(tmp_path, checkpoint=tiny_checkpoint, api_keys=[key]))
    with TestClient(app) as c:
        assert c.get("/health").status_code == 200
        assert_error(c.get("/model"), 401, "unauthorized")
        assert_error(c.get("/ready"), 401)
        assert c.get("/model", headers={"X-API-Key": key}).status_code == 200
        assert c.get("/ready", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert_error(c.post("/segment", files={"file": ("a", b"x")}), 401)


def test_no_temp_files_left_after_errors(tiny_client: TestClient, tmp_path: Path) -> None:
    tiny_client.post("/segment", files={"file": ("a.nii", b"\x89PNG" + bytes(500))})
    tiny_client.post("/segment", files={"file": ("a.nii", bytes(5 << 20))})
    spool = tmp_path / "results" / "spool"
    assert list(spool.iterdir()) == []
    assert not list((tmp_path / "results" / "results").glob(".*"))


def test_openapi_has_file_upload(tiny_client: TestClient) -> None:
    spec = tiny_client.get("/openapi.json").json()
    body = spec["paths"]["/segment"]["post"]["requestBody"]["content"]["multipart/form-data"]
    ref = body["schema"]["$ref"].split("/")[-1]
    prop = spec["components"]["schemas"][ref]["properties"]["file"]
    assert prop.get("format") == "binary" or prop.get("contentMediaType") == "application/octet-stream"
    docs = tiny_client.get("/docs")
    assert docs.status_code == 200 and "/static-docs/swagger-ui-bundle.js" in docs.text
    assert "cdn." not in docs.text, "the docs page must not depend on a CDN"
    js = tiny_client.get("/static-docs/swagger-ui-bundle.js")
    assert js.status_code == 200 and len(js.content) > 100_000
    assert tiny_client.get("/redoc").status_code == 200


def test_cors_lets_the_configured_origins_pages_call_the_api_and_read_its_answers_and_errors(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    viewer, other = "https://viewer.example.org", "https://elsewhere.example.org"
    key = "k" * 20
    hu, aff, _ = make_volume(ORIENTATIONS["IPL"])
    data = write_nifti(tmp_path / "v.nii.gz", hu, aff).read_bytes()
    # Off by default: no CORS headers, so a browser lets only the service's own pages read answers.
    with TestClient(create_app(make_settings(tmp_path / "a", checkpoint=tiny_checkpoint))) as c:
        r = c.get("/health", headers={"Origin": viewer})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    settings = make_settings(
        tmp_path / "b",
        checkpoint=tiny_checkpoint,
        api_keys=key,
        cors_origins=f" {viewer}/ ,http://127.0.0.1:3000",
        max_upload_bytes=4 << 20,
    )
    assert settings.cors_origins == [viewer, "http://127.0.0.1:3000"]
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        # The preflight a browser sends before a POST with an API key; it never carries the key.
        pre = {"Origin": viewer, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x-api-key"}
        r = c.options("/segment", headers=pre)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == viewer
        assert "x-api-key" in r.headers["access-control-allow-headers"].lower()
        # The request itself: the page may read the answer and the headers it needs.
        r = c.post("/segment", files={"file": ("v.nii.gz", data)}, headers={"Origin": viewer, "X-API-Key": key})
        assert r.status_code == 200, r.text
        assert r.headers["access-control-allow-origin"] == viewer
        exposed = r.headers["access-control-expose-headers"].lower()
        assert {"x-kitseg-statistics", "x-kitseg-result", "x-request-id", "location", "retry-after"} <= {
            h.strip() for h in exposed.split(",")
        }
        # Errors carry them too, so the page can show the message: 401 from the route, 413 from the
        # outer body-size check, 404 for an unknown result.
        for r, status in (
            (c.post("/segment", files={"file": ("v.nii.gz", data)}, headers={"Origin": viewer}), 401),
            (c.post("/segment", content=b"x" * (5 << 20), headers={"Origin": viewer, "X-API-Key": key}), 413),
            (c.get(f"/segmentations/{'0' * 32}", headers={"Origin": viewer, "X-API-Key": key}), 404),
        ):
            assert_error(r, status)
            assert r.headers["access-control-allow-origin"] == viewer, status
        # Another origin gets no CORS headers, and its preflight is refused in the API's error shape.
        r = c.get("/health", headers={"Origin": other})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        body = assert_error(c.options("/segment", headers={**pre, "Origin": other}), 400, "bad_request")
        assert "origin" in body["message"] and "KITSEG_CORS_ORIGINS" in body["message"]
        assert assert_error(c.options("/segment", headers={**pre, "Access-Control-Request-Headers": "x-evil"}), 400)
        # Chrome's Private Network Access preflight (a public page, a private address): off by default.
        pna = {**pre, "Access-Control-Request-Private-Network": "true"}
        r = c.options("/segment", headers=pna)
        assert "access-control-allow-private-network" not in r.headers
    settings = settings.model_copy(update={"cors_private_network": True, "result_dir": tmp_path / "c"})
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        r = c.options("/segment", headers=pna)
        assert r.status_code == 200 and r.headers["access-control-allow-private-network"] == "true"
        assert "access-control-allow-private-network" not in c.options("/segment", headers=pre).headers
    for bad in ("viewer.example.org", "https://viewer.example.org/app", "ftp://x", "https://a b"):
        with pytest.raises(ValueError, match="CORS origin"):
            make_settings(tmp_path, cors_origins=bad)
    assert make_settings(tmp_path, cors_origins="*").cors_origins == ["*"]


def _samples(text: str) -> dict[str, float]:
    """Prometheus text format: 'name{labels} value' lines, comments left out."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_metrics_count_requests_by_route_and_jobs_by_outcome_without_ids_or_names(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    key = "m" * 20
    hu, aff, _ = make_volume(ORIENTATIONS["IPL"])
    data = write_nifti(tmp_path / "v.nii.gz", hu, aff).read_bytes()
    flat = nib.Nifti1Image(np.zeros((32, 32, 1, 2), np.int16), np.eye(4)).to_bytes()  # 4D, t = 2
    settings = make_settings(tmp_path, checkpoint=tiny_checkpoint, api_keys=key)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        h = {"X-API-Key": key}
        assert_error(c.get("/metrics"), 401)  # behind the key, as the rest
        ok = c.post("/segment", files={"file": ("patient-name.nii.gz", data)}, headers=h).json()["id"]
        assert_error(c.post("/segment", files={"file": ("x.nii", flat)}, headers=h), 422, "invalid_volume")
        assert c.get(f"/segmentations/{ok}", headers=h).status_code == 200
        assert_error(c.get(f"/segmentations/{'0' * 32}", headers=h), 404)
        assert c.get("/no/such/path").status_code == 404
        r = c.get("/metrics", headers=h)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        m = _samples(r.text)
        assert m['kitseg_http_requests_total{method="POST",route="/segment",status="200"}'] == 1
        assert m['kitseg_http_requests_total{method="POST",route="/segment",status="422"}'] == 1
        assert m['kitseg_http_requests_total{method="GET",route="/segmentations/{rid}",status="200"}'] == 1
        assert m['kitseg_http_requests_total{method="GET",route="/segmentations/{rid}",status="404"}'] == 1
        assert m['kitseg_http_requests_total{method="GET",route="unmatched",status="404"}'] == 1
        assert m['kitseg_http_requests_total{method="GET",route="/metrics",status="401"}'] == 1
        assert m['kitseg_http_request_duration_seconds_count{method="POST",route="/segment"}'] == 2
        assert m['kitseg_jobs_total{outcome="ok"}'] == 1 and m['kitseg_jobs_total{outcome="invalid_volume"}'] == 1
        for stage in ("decompress_parse", "preprocess", "model", "postprocess", "statistics", "encode", "write"):
            assert m[f'kitseg_job_stage_seconds_count{{stage="{stage}"}}'] == 1, stage
        assert m["kitseg_ready"] == 1 and m["kitseg_queue_jobs"] == 0 and m["kitseg_worker_busy"] == 0
        assert m["process_resident_memory_bytes"] > 0
        assert m["kitseg_jobs_resumed_total"] == 0 and "kitseg_gpu_memory" not in r.text  # a CPU worker
        assert ok not in r.text and "patient-name" not in r.text  # no result ids, no file names
    with TestClient(create_app(make_settings(tmp_path / "off", checkpoint=tiny_checkpoint, metrics=False))) as c:
        assert_error(c.get("/metrics"), 404, "not_found")


def test_gpu_memory_gauges_read_their_sources_at_each_scrape() -> None:
    from app.metrics import Metrics

    used = {"allocated": 1.0, "reserved": 4.0, "peak": 2.0}
    m = Metrics()
    m.watch_gpu(*(lambda k=k: used[k] for k in ("allocated", "reserved", "peak")))
    first = _samples(m.render().decode())
    used.update(allocated=3.0, peak=5.0)
    second = _samples(m.render().decode())
    assert [first[f"kitseg_gpu_memory_{k}_bytes"] for k in ("allocated", "reserved", "peak")] == [1, 4, 2]
    assert [second[f"kitseg_gpu_memory_{k}_bytes"] for k in ("allocated", "reserved", "peak")] == [3, 4, 5]
