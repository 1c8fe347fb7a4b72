"""Against a real uvicorn server on 127.0.0.1: world-space alignment of returned masks, overload
behaviour (503 + Retry-After while the rest succeed), health during inference, and curl."""

from __future__ import annotations

import concurrent.futures as cf
import gzip
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import nibabel as nib
import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from segcore.metrics import dice
from tests.app.conftest import LiveServer, make_settings


def _reorient(img: nib.Nifti1Image, codes: tuple[str, str, str]) -> nib.Nifti1Image:
    """The same voxels stored with other axes (exact: permutations and flips only)."""
    cur = nib.orientations.io_orientation(img.affine)
    tr = nib.orientations.ornt_transform(cur, nib.orientations.axcodes2ornt(codes))
    data = nib.orientations.apply_orientation(np.asanyarray(img.dataobj), tr)
    aff = img.affine @ nib.orientations.inv_ornt_aff(tr, img.shape)
    return nib.Nifti1Image(np.ascontiguousarray(data), aff)


def _rotated(img: nib.Nifti1Image, deg: float) -> nib.Nifti1Image:
    a = np.deg2rad(deg)
    rot = np.eye(4)
    rot[:3, :3] = [[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]
    return nib.Nifti1Image(np.asanyarray(img.dataobj), rot @ img.affine)


def _truth_in_mask_grid(truth: nib.Nifti1Image, mask_affine: np.ndarray, mask_shape: tuple[int, ...]) -> np.ndarray:
    """Sample the ground truth at the world position of every mask voxel (nearest neighbour)."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in mask_shape], indexing="ij"), -1).reshape(-1, 3)
    world = ijk @ mask_affine[:3, :3].T + mask_affine[:3, 3]
    t_ijk = np.rint((world - truth.affine[:3, 3]) @ np.linalg.inv(truth.affine[:3, :3]).T).astype(int)
    tdata = np.asanyarray(truth.dataobj)
    ok = np.all((t_ijk >= 0) & (t_ijk < np.array(tdata.shape)), axis=1)
    out = np.zeros(len(ijk), np.uint8)
    out[ok] = tdata[tuple(t_ijk[ok].T)]
    return out.reshape(mask_shape)


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("demo")
    with LiveServer(create_app(make_settings(tmp, precision="fp32"))) as srv:
        yield srv


@pytest.mark.parametrize("variant", ["IPL", "RAS", "LPS", "oblique"])
def test_mask_aligns_with_ground_truth_in_world_space(
    demo_server: LiveServer, phantom_case: Path, tmp_path: Path, variant: str
) -> None:
    img = nib.load(str(phantom_case / "imaging.nii.gz"))
    seg = nib.load(str(phantom_case / "segmentation.nii.gz"))
    assert nib.orientations.aff2axcodes(img.affine) == ("I", "P", "L")
    if variant in ("RAS", "LPS"):
        img, seg = _reorient(img, tuple(variant)), _reorient(seg, tuple(variant))  # type: ignore[arg-type]
    elif variant == "oblique":
        img, seg = _rotated(img, 20.0), _rotated(seg, 20.0)
    up = tmp_path / "in.nii.gz"
    nib.save(img, str(up))
    with httpx.Client(base_url=demo_server.url, timeout=300) as c:
        r = c.post("/segment", files={"file": ("scan", up.read_bytes())})
        assert r.status_code == 200, r.text
        res = r.json()
        assert res["model"]["demo"] is True and "not for clinical use" in res["notice"]
        m = c.get(res["mask_url"])
    mask = nib.Nifti1Image.from_bytes(gzip.decompress(m.content))
    np.testing.assert_allclose(mask.affine, img.affine, atol=1e-4)
    pred = np.asanyarray(mask.dataobj)
    # Compare in world space against the truth as originally stored in the KiTS IPL file.
    orig_truth = nib.load(str(phantom_case / "segmentation.nii.gz"))
    if variant == "oblique":
        orig_truth = _rotated(orig_truth, 20.0)
    truth = _truth_in_mask_grid(orig_truth, mask.affine, pred.shape)
    kd = dice(pred > 0, truth > 0)
    assert kd > 0.85, f"{variant}: kidney Dice {kd:.3f}"
    # The statistics describe the same mask.
    kidney = res["classes"][0]
    assert kidney["voxels"] == int((pred == 1).sum())
    assert {"left", "right"} <= set(kidney["sides"])


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["IPL", "LPS"])
def test_cuda_service_mask_aligns_and_matches_the_cpu_service(phantom_case: Path, tmp_path: Path, variant: str) -> None:
    # The service as `docker compose up` runs it on a GPU host (KITSEG_DEVICE=cuda, precision
    # auto = bf16, the warm-up job on the worker's thread), against the same upload on a CPU in fp32.
    img = nib.load(str(phantom_case / "imaging.nii.gz"))
    if variant == "LPS":
        img = _reorient(img, ("L", "P", "S"))
    up = tmp_path / "in.nii.gz"
    nib.save(img, str(up))
    masks = {}
    for device, precision in (("cuda", "auto"), ("cpu", "fp32")):
        app = create_app(make_settings(tmp_path / device, device=device, precision=precision, warmup=True))
        with TestClient(app, raise_server_exceptions=False) as c:
            card = c.get("/model").json()
            assert card["device"].startswith(device)
            if device == "cuda":
                assert card["precision"] == "bf16" and card["backend"] == "torch"
            r = c.post("/segment", files={"file": ("scan", up.read_bytes())})
            assert r.status_code == 200, r.text
            m = c.get(r.json()["mask_url"])
            assert m.status_code == 200
            if device == "cuda":  # what the job used, at the next scrape
                peak = [ln for ln in c.get("/metrics").text.splitlines() if ln.startswith("kitseg_gpu_memory_peak")]
                assert peak and float(peak[0].split()[-1]) > 0, peak
        mask = nib.Nifti1Image.from_bytes(gzip.decompress(m.content))
        np.testing.assert_allclose(mask.affine, img.affine, atol=1e-4)
        masks[device] = np.asanyarray(mask.dataobj)
    truth = _truth_in_mask_grid(nib.load(str(phantom_case / "segmentation.nii.gz")), img.affine, masks["cuda"].shape)
    kd = dice(masks["cuda"] > 0, truth > 0)
    assert kd > 0.85, f"{variant}: kidney Dice {kd:.3f} on CUDA"
    # bf16 against fp32 may flip voxels on class boundaries, and no more.
    assert float((masks["cuda"] != masks["cpu"]).mean()) < 0.01


def test_overload_gives_503_with_retry_after_and_the_rest_succeed(tmp_path: Path, tiny_checkpoint: Path) -> None:
    from tests.conftest import ORIENTATIONS, make_volume, write_nifti

    hu, aff, _ = make_volume(ORIENTATIONS["IPL"])
    payload = write_nifti(tmp_path / "v.nii.gz", hu, aff).read_bytes()
    app = create_app(make_settings(tmp_path, checkpoint=tiny_checkpoint, queue_size=2))
    with LiveServer(app) as srv:
        worker = app.state.worker
        real = worker.engine.predict

        def slow_predict(*a, **kw):
            time.sleep(1.0)
            return real(*a, **kw)

        worker.engine.predict = slow_predict
        n = 10

        def post(_: int) -> httpx.Response:
            with httpx.Client(base_url=srv.url, timeout=120) as c:
                return c.post("/segment", files={"file": ("v", payload)})

        with cf.ThreadPoolExecutor(n) as ex:
            futures = [ex.submit(post, i) for i in range(n)]
            # Liveness stays responsive while the worker is busy.
            time.sleep(0.5)
            t = time.perf_counter()
            assert httpx.get(f"{srv.url}/health", timeout=5).status_code == 200
            assert httpx.get(f"{srv.url}/docs", timeout=5).status_code == 200
            assert time.perf_counter() - t < 1.0
            assert worker.busy.is_set(), "the checks above must overlap a running segmentation"
            responses = [f.result() for f in futures]
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 503}, codes
        assert codes.count(503) >= 1 and codes.count(200) >= 2, codes
        for r in responses:
            if r.status_code == 503:
                assert int(r.headers["retry-after"]) >= 1
                assert r.json()["code"] == "overloaded"
            else:
                rid = r.json()["id"]
                assert httpx.get(f"{srv.url}/segmentations/{rid}").status_code == 200
        # Nothing left spooled, and the next request still works.
        worker.engine.predict = real
        assert post(0).status_code == 200
        assert list((tmp_path / "results" / "spool").iterdir()) == []


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_upload_and_download(demo_server: LiveServer, phantom_case: Path, tmp_path: Path) -> None:
    out = tmp_path / "mask.nii.gz"
    r = subprocess.run(
        [
            "curl",
            "-sS",
            "-f",
            "-F",
            f"file=@{phantom_case / 'imaging.nii.gz'}",
            "-H",
            "Accept: application/gzip",
            "-o",
            str(out),
            "-D",
            "-",
            f"{demo_server.url}/segment",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in r.stdout.splitlines() if ":" in line)}
    stats = json.loads(headers["x-kitseg-statistics"])
    assert stats["demo"] is True
    mask = nib.load(str(out))
    assert mask.shape == nib.load(str(phantom_case / "imaging.nii.gz")).shape
    assert np.asanyarray(mask.dataobj).max() >= 1


def test_behind_a_proxy_path_prefix_the_links_and_the_docs_carry_it(
    tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reverse proxy serves the API under /kitseg and strips it (nginx ``location /kitseg/ {
    proxy_pass http://127.0.0.1:8000/; }``); uvicorn runs with ``--root-path /kitseg``, which
    kitseg-serve sets from KITSEG_ROOT_PATH. The requests below are what reaches uvicorn."""
    import app.main
    import app.routes.segment as segment_route
    from app.serve import DrainingServer
    from app.serve import main as serve_main

    settings = make_settings(tmp_path, checkpoint=tiny_checkpoint, root_path="/kitseg/")
    assert settings.root_path == "/kitseg"
    # kitseg-serve hands the setting to uvicorn.
    seen: list[str] = []
    monkeypatch.setattr(app.main.app.state, "settings", settings)
    monkeypatch.setattr(DrainingServer, "run", lambda self, *a, **k: seen.append(self.config.root_path))
    assert serve_main(["--port", "1"]) == 0 and seen == ["/kitseg"]

    def no_plain_path(*a: object, **k: object) -> int:  # the upload is decoded while it arrives
        raise AssertionError("the route copied Starlette's file instead of using the decoded one")

    monkeypatch.setattr(segment_route, "_spool", no_plain_path)
    hu = np.full((8, 32, 32), -1000, np.int16)
    hu[2:6, 8:24, 8:24] = 150
    data = gzip.compress(nib.Nifti1Image(hu, np.diag([2.0, 1.0, 1.0, 1.0])).to_bytes())
    with LiveServer(create_app(settings), root_path=settings.root_path) as srv:
        r = httpx.post(f"{srv.url}/segment", files={"file": ("v.nii.gz", data)}, timeout=60)
        assert r.status_code == 200, r.text
        rid = r.json()["id"]
        assert r.json()["mask_url"] == f"/kitseg/segmentations/{rid}/mask"
        assert r.headers["location"] == f"/kitseg/segmentations/{rid}"
        again = httpx.get(f"{srv.url}/segmentations/{rid}", timeout=10)
        assert again.json()["mask_url"] == f"/kitseg/segmentations/{rid}/mask"
        # The proxy strips the prefix from the link before forwarding it.
        link = r.json()["mask_url"].removeprefix("/kitseg")
        assert httpx.get(f"{srv.url}{link}", timeout=10).status_code == 200
        got = httpx.post(f"{srv.url}/segment?download=true", files={"file": ("v.nii.gz", data)}, timeout=60)
        assert got.headers["x-kitseg-result"].startswith("/kitseg/segmentations/")
        # The Swagger UI and ReDoc load their files and the schema through the prefix.
        for page, files in (("docs", ("swagger-ui-bundle.js", "swagger-ui.css")), ("redoc", ("redoc.standalone.js",))):
            html = httpx.get(f"{srv.url}/{page}", timeout=10).text
            assert "'/kitseg/openapi.json'" in html or '"/kitseg/openapi.json"' in html, page
            for f in files:
                assert f"/kitseg/static-docs/{f}" in html
                assert httpx.get(f"{srv.url}/static-docs/{f}", timeout=10).status_code == 200
        schema = httpx.get(f"{srv.url}/openapi.json", timeout=10).json()
        assert schema["servers"] == [{"url": "/kitseg"}]  # Swagger's "Try it out" posts through the proxy
        assert httpx.get(f"{srv.url}/health", timeout=10).status_code == 200
    for bad in ("kitseg", "/a b", "/a//b", "/a?b", "/ä"):
        with pytest.raises(ValueError, match="root_path"):
            make_settings(tmp_path, root_path=bad)
    assert make_settings(tmp_path, root_path="/").root_path == ""


def test_predict_cli_with_server_writes_what_the_local_engine_writes(
    tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """kitseg-predict --server: the same masks and statistics as the engine in-process, from a
    service with API keys; a volume the service refuses is skipped."""
    from app.predict_cli import main as predict
    from tests.conftest import ORIENTATIONS, make_volume, write_nifti

    scans = tmp_path / "scans"
    for name, codes in (("a", "IPL"), ("sub/b", "LPS")):
        (scans / name).parent.mkdir(parents=True, exist_ok=True)
        hu, aff, _ = make_volume(ORIENTATIONS[codes])
        write_nifti(scans / f"{name}.nii.gz", hu, aff)
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 1, 2), np.int16), np.eye(4)), str(scans / "flat.nii"))  # 4D
    key = "p" * 20
    settings = make_settings(tmp_path / "srv", checkpoint=tiny_checkpoint, api_keys=key)
    local = ["--checkpoint", str(tiny_checkpoint), "--device", "cpu", "--precision", "fp32", "--backend", "torch"]
    assert predict([str(scans), "--out", str(tmp_path / "local"), *local]) == 1  # flat.nii is refused
    with LiveServer(create_app(settings)) as srv:
        url = srv.url
        monkeypatch.setenv("KITSEG_API_KEY", key)
        assert predict([str(scans), "--out", str(tmp_path / "remote"), "--server", url]) == 1
        # --continue asks the service again only for what failed.
        assert predict([str(scans), "--out", str(tmp_path / "remote"), "--server", url, "--continue"]) == 1
        assert "2 kept from the earlier run" in capsys.readouterr().out
        # Mistakes are status 2 before anything is sent.
        assert predict([str(scans), "--out", str(tmp_path / "x"), "--server", url, "--checkpoint", "c"]) == 2
        assert predict([str(scans), "--out", str(tmp_path / "x"), "--server", url, "--batch-size", "2"]) == 2
        monkeypatch.setenv("KITSEG_API_KEY", "w" * 20)
        assert predict([str(scans), "--out", str(tmp_path / "x"), "--server", url]) == 2
        assert "API key" in capsys.readouterr().err
    assert predict([str(scans), "--out", str(tmp_path / "x"), "--server", url, "--api-key", key]) == 2  # gone
    for name in ("a", "sub/b"):
        want = nib.load(tmp_path / "local" / f"{name}_mask.nii.gz")
        got = nib.load(tmp_path / "remote" / f"{name}_mask.nii.gz")
        np.testing.assert_array_equal(np.asanyarray(got.dataobj), np.asanyarray(want.dataobj))
        np.testing.assert_allclose(got.affine, want.affine)
    stats = {d: json.loads((tmp_path / d / "statistics.json").read_text()) for d in ("local", "remote")}
    assert stats["remote"]["server"] == url and stats["remote"]["weights_sha256"] == stats["local"]["weights_sha256"]
    for r, w in zip(stats["remote"]["results"], stats["local"]["results"], strict=True):
        assert r["input"] == w["input"]
        if "error" in w:
            assert "invalid_volume" in r["error"]
            continue
        assert [c["voxels"] for c in r["classes"]] == [c["voxels"] for c in w["classes"]]
    csvs = [(tmp_path / d / "statistics.csv").read_text().splitlines() for d in ("local", "remote")]
    assert csvs[0][0] == csvs[1][0] and len(csvs[0]) == len(csvs[1])
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


@contextmanager
def _remote(tmp_path: Path, checkpoint: Path) -> Iterator[tuple[Any, Path, Any]]:
    """A live service on ``checkpoint``, ``kitseg-predict``'s client of it (``Remote``), and a KiTS
    IPL scan to send it: ``(remote, scan, app)``."""
    from app.predict_cli import Remote
    from tests.conftest import ORIENTATIONS, make_volume, write_nifti

    hu, aff, _ = make_volume(ORIENTATIONS["IPL"])
    scan = write_nifti(tmp_path / "a.nii.gz", hu, aff)
    app = create_app(make_settings(tmp_path / "srv", checkpoint=checkpoint))
    with LiveServer(app) as srv:
        yield Remote(srv.url, None, 120), scan, app


def test_predict_cli_with_server_sends_again_an_upload_whose_answer_was_lost(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """The connection drops after the service accepted an upload: the CLI sends it again with the
    same Idempotency-Key, and the service answers the first job instead of running a second."""
    import httpx

    with _remote(tmp_path, tiny_checkpoint) as (remote, scan, app):
        real, sent = remote.client.request, []

        def lossy(method: str, url: Any, **kw: Any) -> Any:
            r = real(method, url, **kw)
            if method == "POST":
                sent.append(kw["headers"]["Idempotency-Key"])
                if len(sent) == 1:
                    raise httpx.ReadError("connection reset after the upload")  # accepted, answer lost
            return r

        remote.client.request = lossy  # type: ignore[method-assign]
        classes, _ = remote.segment(scan, tmp_path / "out" / "a_mask.nii.gz")
        assert len(sent) == 2 and sent[0] == sent[1]  # the same key both times
        assert [c["label"] for c in classes] == [1, 2]
        time.sleep(0.5)
        assert app.state.worker.processed == 1  # one job for two POSTs
    assert nib.load(tmp_path / "out" / "a_mask.nii.gz").shape == nib.load(scan).shape


def test_predict_cli_with_server_waits_while_its_earlier_try_is_being_accepted(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """A 409 idempotency_key_in_use (the service is still keeping an earlier try of this upload)
    is sent again after its Retry-After; other refusals are not."""
    import httpx

    from app.predict_cli import Remote, ServiceError

    with _remote(tmp_path, tiny_checkpoint) as (remote, scan, _):
        real, sent = remote.client.request, []

        def busy_once(method: str, url: Any, **kw: Any) -> Any:
            if method == "POST":
                sent.append(kw["headers"]["Idempotency-Key"])
                if len(sent) == 1:
                    body = {"code": "idempotency_key_in_use", "message": "m", "request_id": "r"}
                    return httpx.Response(409, json=body, headers={"Retry-After": "1"})
            return real(method, url, **kw)

        remote.client.request = busy_once  # type: ignore[method-assign]
        t0 = time.monotonic()
        classes, _ = remote.segment(scan, tmp_path / "out" / "a_mask.nii.gz")
        assert len(sent) == 2 and sent[0] == sent[1] and time.monotonic() - t0 >= 1.0
        assert [c["label"] for c in classes] == [1, 2]

        def reused(method: str, url: Any, **kw: Any) -> Any:
            body = {"code": "idempotency_key_reused", "message": "another file", "request_id": "r"}
            return httpx.Response(422, json=body) if method == "POST" else real(method, url, **kw)

        remote.client.request = reused  # type: ignore[method-assign]
        with pytest.raises(ServiceError, match="idempotency_key_reused"):
            remote.segment(scan, tmp_path / "out" / "b_mask.nii.gz")
        conflict = httpx.Response(409, json={"code": "not_finished", "message": "m", "request_id": "r"})
        assert not Remote._busy(conflict) and Remote._busy(httpx.Response(503))
        # A proxy's 502 or 504 (HTML, or nothing) is waited out; the service's own 504 is the job's error.
        assert Remote._busy(httpx.Response(502, text="<html>502 Bad Gateway</html>"))
        assert Remote._busy(httpx.Response(504))
        late = {"code": "deadline_exceeded", "message": "m", "request_id": "r"}
        assert not Remote._busy(httpx.Response(504, json=late))


def test_predict_cli_server_links_resolve_under_a_proxy_prefix() -> None:
    """The service's links are absolute paths that carry its root path (/kitseg/segmentations/...):
    they replace the base URL's path, which a proxy then strips; "segment" is under the base."""
    import httpx

    from app.predict_cli import Remote

    r = Remote.__new__(Remote)
    for base in ("https://host/kitseg", "https://host/kitseg/"):
        r.base = httpx.URL(base.rstrip("/") + "/")
        assert str(r._url("segment")) == "https://host/kitseg/segment"
        assert str(r._url("/kitseg/segmentations/ab")) == "https://host/kitseg/segmentations/ab"
    r.base = httpx.URL("http://127.0.0.1:8000/")
    assert str(r._url("model")) == "http://127.0.0.1:8000/model"


def test_predict_cli_with_server_waits_out_a_full_queue(tmp_path: Path, tiny_checkpoint: Path) -> None:
    import threading

    from app.predict_cli import main as predict
    from tests.conftest import ORIENTATIONS, make_volume, write_nifti

    hu, aff, _ = make_volume(ORIENTATIONS["IPL"])
    scan = write_nifti(tmp_path / "a.nii.gz", hu, aff)
    settings = make_settings(tmp_path / "srv", checkpoint=tiny_checkpoint, queue_size=1, retry_after_s=1)
    app = create_app(settings)
    with LiveServer(app) as srv:
        worker = app.state.worker
        real, go, started = worker.engine.predict, threading.Event(), threading.Event()

        def gated(*a, **k):  # type: ignore[no-untyped-def]
            started.set()
            assert go.wait(60)
            return real(*a, **k)

        worker.engine.predict = gated
        files = {"file": ("v", scan.read_bytes())}
        assert httpx.post(f"{srv.url}/segment?wait=false", files=files, timeout=30).status_code == 202  # runs
        assert started.wait(60)
        assert httpx.post(f"{srv.url}/segment?wait=false", files=files, timeout=30).status_code == 202  # queued
        assert httpx.post(f"{srv.url}/segment?wait=false", files=files, timeout=30).status_code == 503  # full
        threading.Timer(2.0, go.set).start()  # the queue frees up while kitseg-predict waits
        t0 = time.monotonic()
        assert predict([str(scan), "--out", str(tmp_path / "out"), "--server", srv.url]) == 0
        assert time.monotonic() - t0 >= 1.0 and (tmp_path / "out" / "a_mask.nii.gz").is_file()
        worker.engine.predict = real


def test_predict_cli_with_server_keeps_jobs_volumes_in_flight_and_writes_them_in_order(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """--jobs 2: the next volume is uploaded and queued while the service segments one; the
    outputs are those of one volume at a time, in the inputs' order."""
    import threading

    from app.predict_cli import main as predict
    from tests.conftest import ORIENTATIONS, make_volume, write_nifti

    scans = tmp_path / "scans"
    scans.mkdir()
    for name, codes in (("a", "IPL"), ("b", "LPS"), ("c", "RAS")):
        hu, aff, _ = make_volume(ORIENTATIONS[codes])
        write_nifti(scans / f"{name}.nii.gz", hu, aff)
    app = create_app(make_settings(tmp_path / "srv", checkpoint=tiny_checkpoint))
    with LiveServer(app) as srv:
        worker = app.state.worker
        real, go = worker.engine.predict, threading.Event()

        def gated(*a, **k):  # type: ignore[no-untyped-def]
            assert go.wait(60)
            return real(*a, **k)

        worker.engine.predict = gated
        out = tmp_path / "two"
        with cf.ThreadPoolExecutor(1) as pool:
            run = pool.submit(predict, [str(scans), "--out", str(out), "--server", srv.url, "--jobs", "2"])
            deadline = time.monotonic() + 60
            while not (worker.busy.is_set() and worker.queue.qsize() == 1):  # two volumes in flight at once
                assert time.monotonic() < deadline and not run.done()
                time.sleep(0.05)
            time.sleep(0.5)
            assert worker.queue.qsize() == 1  # and no third before one of them is done
            go.set()
            assert run.result(timeout=120) == 0
        worker.engine.predict = real
        assert predict([str(scans), "--out", str(tmp_path / "one"), "--server", srv.url, "--jobs", "1"]) == 0
    stats = {d: json.loads((tmp_path / d / "statistics.json").read_text())["results"] for d in ("one", "two")}
    assert [r["input"] for r in stats["two"]] == [str(scans / f"{n}.nii.gz") for n in "abc"]
    for r1, r2 in zip(stats["one"], stats["two"], strict=True):
        assert r1["classes"] == r2["classes"]
    for n in "abc":
        np.testing.assert_array_equal(
            np.asanyarray(nib.load(tmp_path / "one" / f"{n}_mask.nii.gz").dataobj),
            np.asanyarray(nib.load(tmp_path / "two" / f"{n}_mask.nii.gz").dataobj),
        )
    assert predict([str(scans), "--out", str(tmp_path / "x"), "--jobs", "2"]) == 2  # not without --server
