"""Transport, multipart and lifecycle faults against a real uvicorn server on 127.0.0.1.

Malformed multipart bodies, hostile Content-Types and filenames, clients that stall or vanish
mid-upload or mid-inference, SIGTERM while work is queued, and memory after a run of bad
requests. After each: the service answers, the next valid request succeeds, nothing is left in
the spool.
"""

from __future__ import annotations

import concurrent.futures as cf
import gzip
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.app.conftest import LiveServer, make_settings
from tests.app.test_api import assert_error
from tests.conftest import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]
B = "kitsegboundary"


def _nii(shape: tuple[int, int, int] = (24, 24, 6)) -> bytes:
    data = np.zeros(shape, np.int16)
    data[0] = -1000
    return bytes(nib.Nifti1Image(data, np.diag([0.8, 0.8, 3.0, 1.0]), dtype=np.int16).to_bytes())


def _part(payload: bytes, name: str = "file", filename: str = "ct.nii", extra_headers: str = "") -> bytes:
    head = f'--{B}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n{extra_headers}'
    return head.encode() + b"Content-Type: application/octet-stream\r\n\r\n" + payload + f"\r\n--{B}--\r\n".encode()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, Path]]:
    tmp = tmp_path_factory.mktemp("transport")
    ckpt = make_tiny_checkpoint(tmp)
    app = create_app(
        make_settings(
            tmp, checkpoint=ckpt, max_upload_bytes=4 << 20, max_decompressed_bytes=16 << 20, upload_timeout_s=2.0
        )
    )
    with LiveServer(app) as srv:
        yield srv, tmp


def _after_state(srv: LiveServer, root: Path) -> None:
    deadline = time.time() + 10
    while list((root / "results" / "spool").iterdir()) and time.time() < deadline:
        time.sleep(0.05)  # a disconnect is noticed asynchronously
    assert list((root / "results" / "spool").iterdir()) == []
    assert not [p for p in (root / "results" / "results").iterdir() if p.name.startswith(".")]
    r = httpx.post(f"{srv.url}/segment", files={"file": ("ok.nii", _nii())}, timeout=60)
    assert r.status_code == 200, r.text


MULTIPART = {
    "missing-boundary": ("multipart/form-data", _part(_nii()), 400, "bad_request"),
    "wrong-boundary": ("multipart/form-data; boundary=other", _part(_nii()), 400, "bad_request"),
    "huge-boundary": ("multipart/form-data; boundary=" + "a" * 5000, _part(_nii()), 400, "bad_request"),
    "duplicate-boundary-params": (
        f'multipart/form-data; boundary={B}; charset="../../etc/passwd"; boundary=zzz',
        _part(_nii()),
        400,
        "bad_request",
    ),
    "text-plain": ("text/plain", _part(_nii()), 422, "validation_error"),
    "json": ("application/json", b'{"file": "AAAA"}', 422, "validation_error"),
    "urlencoded": ("application/x-www-form-urlencoded", b"file=" + b"a" * 100_000, 422, "validation_error"),
    "preamble-flood": (f"multipart/form-data; boundary={B}", b"junk\r\n" * 300_000 + _part(_nii()), 400, "bad_request"),
    "part-header-flood": (
        f"multipart/form-data; boundary={B}",
        _part(_nii(), extra_headers="".join(f"X-H{i}: {'v' * 50}\r\n" for i in range(20_000))),
        400,
        "bad_request",
    ),
    "field-flood": (
        f"multipart/form-data; boundary={B}",
        b"".join(f'--{B}\r\nContent-Disposition: form-data; name="f{i}"\r\n\r\nx\r\n'.encode() for i in range(5000))
        + _part(_nii()),
        400,
        "bad_request",
    ),
    "wrong-field-name": (f"multipart/form-data; boundary={B}", _part(_nii(), name="image"), 422, "validation_error"),
    "empty-file": (f"multipart/form-data; boundary={B}", _part(b""), 422, "bad_upload"),
}


@pytest.mark.parametrize("case", list(MULTIPART))
def test_malformed_multipart(live: tuple[LiveServer, Path], case: str) -> None:
    srv, root = live
    ctype, body, status, code = MULTIPART[case]
    t = time.perf_counter()
    r = httpx.post(f"{srv.url}/segment", content=body, headers={"content-type": ctype}, timeout=60)
    assert time.perf_counter() - t < 10  # refused quickly, not after chewing on the flood
    assert_error(r, status, code)
    _after_state(srv, root)


def test_two_files_are_refused(live: tuple[LiveServer, Path]) -> None:
    srv, root = live
    r = httpx.post(f"{srv.url}/segment", files=[("file", ("a.nii", _nii())), ("file", ("b.nii", _nii()))])
    assert_error(r, 422, "bad_upload")
    _after_state(srv, root)


@pytest.mark.parametrize(
    "filename",
    [
        "../../../../tmp/kitseg-evil.nii",
        "/etc/passwd",
        "a\x00b.nii",
        "..\\..\\win.nii",
        "%2e%2e%2fx.nii",
        "x" * 900 + ".nii",
    ],
    ids=["traversal", "absolute", "nul", "backslash", "encoded", "long"],
)
def test_hostile_filenames_are_never_used(live: tuple[LiveServer, Path], filename: str) -> None:
    srv, root = live
    before = set(Path("/tmp").iterdir())
    r = httpx.post(
        f"{srv.url}/segment",
        content=_part(_nii(), filename=filename),
        headers={"content-type": f"multipart/form-data; boundary={B}"},
    )
    assert r.status_code == 200, r.text
    assert filename not in r.text
    assert not Path("/tmp/kitseg-evil.nii").exists()
    assert {p.name for p in set(Path("/tmp").iterdir()) - before if "evil" in p.name or "win" in p.name} == set()
    for p in (root / "results" / "results").iterdir():
        assert len(p.name) == 32 and all(ch in "0123456789abcdef" for ch in p.name), p
    _after_state(srv, root)


def _raw_request(port: int, body_len: int, first: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    head = (
        f"POST /segment HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary={B}\r\n"
        f"Content-Length: {body_len}\r\n\r\n"
    ).encode()
    s.sendall(head + first)
    return s


def test_client_disconnecting_mid_upload_leaves_nothing(live: tuple[LiveServer, Path]) -> None:
    srv, root = live
    body = _part(gzip.compress(os.urandom(2 << 20), compresslevel=0))
    for cut in (100, len(body) // 2, len(body) - 10):
        s = _raw_request(srv.port, len(body), body[:cut])
        time.sleep(0.2)
        s.close()
    _after_state(srv, root)


def test_slow_client_gets_408_and_frees_its_connection(live: tuple[LiveServer, Path]) -> None:
    srv, root = live
    body = _part(_nii())
    s = _raw_request(srv.port, len(body), body[:200])  # then stalls; the server allows 2 s
    s.settimeout(15)
    t = time.perf_counter()
    reply = b""
    while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
        chunk = s.recv(65536)
        if not chunk:
            break
        reply += chunk
    s.close()
    assert 1.5 < time.perf_counter() - t < 10
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b'"code":"request_timeout"' in reply
    _after_state(srv, root)


def test_client_leaving_during_inference_frees_the_worker(live: tuple[LiveServer, Path]) -> None:
    srv, root = live
    worker = srv.app.state.worker
    original = worker.engine.predict
    started = []

    def slow_predict(volume, progress=None, batch_size=None):  # type: ignore[no-untyped-def]
        started.append(time.perf_counter())
        for i in range(200):  # 20 s unless cancelled between "batches"
            time.sleep(0.1)
            if progress is not None:
                progress(i, 200)
        return original(volume, progress=progress, batch_size=batch_size)

    worker.engine.predict = slow_predict
    try:
        body = _part(_nii())
        s = _raw_request(srv.port, len(body), body)
        deadline = time.time() + 10
        while not started and time.time() < deadline:
            time.sleep(0.05)
        assert started, "the job never reached the model"
        s.close()  # the client gives up while its volume is being segmented
        worker.engine.predict = original
        t = time.perf_counter()
        r = httpx.post(f"{srv.url}/segment", files={"file": ("ok.nii", _nii())}, timeout=60)
        assert r.status_code == 200, r.text
        assert time.perf_counter() - t < 8, "the worker kept running the abandoned job"
        ids = {p.name for p in (root / "results" / "results").iterdir()}
        assert r.json()["id"] in ids
    finally:
        worker.engine.predict = original
    _after_state(srv, root)


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_memory_returns_to_baseline_after_bad_requests(tmp_path: Path, tiny_checkpoint: Path) -> None:
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((512, 512, 30))  # 15 MiB declared, under the 16 MiB limit: it gets allocated
    hdr.set_data_dtype(np.int16)
    hdr.set_data_offset(352)
    head = bytes(hdr.binaryblock) + bytes(4)
    bad = [
        gzip.compress(head + bytes(14 << 20))[:-50],  # truncated after 14 MiB: fails late
        gzip.compress(head + bytes(15 << 20) + bytes(4 << 20)),  # junk after the data: over the limit
        gzip.compress(head + np.full(512 * 512 * 30, 30000, np.int16).tobytes())[:-4] + b"\0\0\0\0",  # bad size field
    ]
    app = create_app(
        make_settings(tmp_path, checkpoint=tiny_checkpoint, max_upload_bytes=4 << 20, max_decompressed_bytes=16 << 20)
    )
    with TestClient(app, raise_server_exceptions=False) as c:
        for payload in bad:  # warm up allocator pools and lazy imports
            assert c.post("/segment", files={"file": ("a.nii.gz", payload)}).status_code >= 400
        base = _rss_mb()
        for _ in range(10):
            for payload in bad:
                r = c.post("/segment", files={"file": ("a.nii.gz", payload)})
                assert r.status_code in (413, 422), r.text
        grown = _rss_mb() - base
        assert grown < 40, f"RSS grew {grown:.0f} MB over 30 bad requests that each allocated 15 MiB"
        assert c.post("/segment", files={"file": ("ok.nii", _nii())}).status_code == 200
    assert list((tmp_path / "results" / "spool").iterdir()) == []


SERVE = r"""
import sys, time
from segcore.inference import Engine
orig = Engine.predict
def slow(self, volume, progress=None, batch_size=None):
    time.sleep(float(sys.argv[2]))
    return orig(self, volume, progress=progress, batch_size=batch_size)
Engine.predict = slow
from app.serve import main
main(["--port", sys.argv[1]])
"""


def _server_env(tmp_path: Path, checkpoint: Path, **extra: str) -> tuple[int, dict[str, str]]:
    """A free port, and the environment of a kitseg-serve process on it (results under tmp_path)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "KITSEG_CHECKPOINT": str(checkpoint),
        "KITSEG_RESULT_DIR": str(tmp_path / "results"),
        "KITSEG_DEVICE": "cpu",
        "KITSEG_WARMUP": "false",
        # As make_settings: auto compiles the network where the CPU has native bf16, and a cold
        # compile in a process's first job (10-40 s) broke these tests' timing there.
        "KITSEG_COMPILE": "off",
        "KITSEG_LOG_LEVEL": "WARNING",
        **extra,
    }
    return port, env


def _start_server(port: int, env: dict[str, str], delay_s: float) -> subprocess.Popen[bytes]:
    """kitseg-serve (SERVE: each prediction delayed by ``delay_s``), once it is ready."""
    proc = subprocess.Popen([sys.executable, "-c", SERVE, str(port), str(delay_s)], cwd=ROOT, env=env)
    deadline = time.time() + 60
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if time.time() > deadline or proc.poll() is not None:
            proc.kill()
            raise AssertionError("server did not become ready")
        time.sleep(0.2)


def _kill(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _nothing_left(results: Path) -> None:
    """No accepted job's files and no spooled upload: only the live server's lock."""
    assert [p.name for p in (results / "pending").rglob("*") if p.is_file()] == [".owner"]
    assert list((results / "spool").iterdir()) == []


def test_accepted_jobs_survive_a_killed_server(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """SIGKILL (an OOM kill, a crash, a host reset) while wait=false jobs run and wait: the next
    server on the same result folder finishes them; a job deleted before the kill stays gone."""
    port, env = _server_env(tmp_path, tiny_checkpoint)
    url = f"http://127.0.0.1:{port}"
    procs = [_start_server(port, env, 30.0)]  # every job outlives this server
    try:
        ids = []
        for name in ("a.nii", "b.nii", "c.nii"):
            r = httpx.post(f"{url}/segment?wait=false", files={"file": (name, _nii())}, timeout=30)
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        assert httpx.get(f"{url}/segmentations/{ids[0]}", timeout=5).json()["status"] == "running"
        assert httpx.delete(f"{url}/segmentations/{ids[2]}", timeout=5).status_code == 204
        procs[0].kill()
        procs[0].wait(timeout=30)
        procs.append(_start_server(port, env, 0.0))
        for rid in ids[:2]:
            deadline = time.time() + 60
            while (r := httpx.get(f"{url}/segmentations/{rid}", timeout=5)).status_code == 202:
                assert time.time() < deadline
                time.sleep(0.2)
            assert r.status_code == 200 and r.json()["id"] == rid, r.text
            mask = httpx.get(f"{url}/segmentations/{rid}/mask", timeout=5)
            assert mask.status_code == 200 and nib.Nifti1Image.from_bytes(gzip.decompress(mask.content)).shape == (
                24,
                24,
                6,
            )
        assert httpx.get(f"{url}/segmentations/{ids[2]}", timeout=5).status_code == 404
        _nothing_left(tmp_path / "results")
    finally:
        _kill(procs)


def test_replicas_sharing_a_result_folder(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """Two kitseg-serve processes on one result folder, as behind a load balancer without sticky
    sessions. One Idempotency-Key sent to both at once starts one job. Either one answers the
    status, mask and DELETE of a job the other accepted. Then one is SIGKILLed and not started
    again: the other's sweep (every 5 s with a 20 s time-to-live) runs the jobs it had accepted,
    at the same ids, and the key still finds its job."""
    env_extra = {"KITSEG_RESULT_TTL_S": "20"}
    (port_a, env_a), (port_b, env_b) = (_server_env(tmp_path, tiny_checkpoint, **env_extra) for _ in range(2))
    url_a, url_b = f"http://127.0.0.1:{port_a}", f"http://127.0.0.1:{port_b}"
    procs = [_start_server(port_a, env_a, 60.0), _start_server(port_b, env_b, 0.0)]  # A's jobs outlive it
    try:
        body = _nii()

        def post(url: str, key: str | None = None) -> httpx.Response:
            headers = {"Idempotency-Key": key} if key else {}
            return httpx.post(f"{url}/segment?wait=false", files={"file": ("v.nii", body)}, headers=headers, timeout=30)

        with cf.ThreadPoolExecutor(4) as ex:
            answers = list(ex.map(lambda u: post(u, "k"), [url_a, url_b, url_a, url_b]))
        assert all(r.status_code in (202, 409) for r in answers), [r.text for r in answers]
        ids = {r.json()["id"] for r in answers if r.status_code == 202}
        assert len(ids) == 1, ids  # one job, whichever replica took it
        (key_job,) = ids
        replay = post(url_b, "k")  # B answers for it wherever it runs
        assert replay.headers["idempotent-replayed"] == "true" and replay.json()["id"] == key_job
        deadline = time.time() + 10  # B runs a job in about a second, A in a minute
        while httpx.get(f"{url_b}/segmentations/{key_job}", timeout=5).status_code == 202 and time.time() < deadline:
            time.sleep(0.2)
        on_a = key_job if time.time() >= deadline else None
        running = on_a or post(url_a).json()["id"]  # A runs one job for 60 s
        queued, dropped = post(url_a).json()["id"], post(url_a).json()["id"]
        deadline = time.time() + 10  # once A's worker has taken it up and said so
        while (status := httpx.get(f"{url_b}/segmentations/{running}", timeout=5)).json()["status"] != "running":
            assert status.status_code == 202 and time.time() < deadline, status.text
            time.sleep(0.1)
        assert status.status_code == 202 and status.json()["progress"] == 0.0  # A's model holds it for 60 s
        assert httpx.get(f"{url_b}/segmentations/{queued}", timeout=5).json()["status"] == "queued"
        assert httpx.get(f"{url_b}/segmentations/{queued}/mask", timeout=5).status_code == 409
        assert httpx.delete(f"{url_b}/segmentations/{dropped}", timeout=5).status_code == 204
        assert httpx.get(f"{url_a}/segmentations/{dropped}", timeout=5).status_code == 404  # gone at A at once
        procs[0].kill()
        procs[0].wait(timeout=30)
        for rid in (running, queued):
            deadline = time.time() + 60
            while (r := httpx.get(f"{url_b}/segmentations/{rid}", timeout=5)).status_code == 202:
                assert time.time() < deadline, r.text
                time.sleep(0.2)
            assert r.status_code == 200 and r.json()["id"] == rid, r.text
        assert httpx.get(f"{url_b}/segmentations/{dropped}", timeout=5).status_code == 404
        assert "kitseg_jobs_resumed_total 2.0" in httpx.get(f"{url_b}/metrics", timeout=5).text
        again = post(url_b, "k")
        assert again.status_code == 202 and again.headers["idempotent-replayed"] == "true"
        assert again.json()["id"] == key_job
        _nothing_left(tmp_path / "results")  # B holds its lock
    finally:
        _kill(procs)


def test_predict_cli_rides_out_a_server_restart(
    tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """kitseg-predict --server keeps polling an accepted job while the service is killed and
    started again, and gets the mask the next server made."""
    from app.predict_cli import main as predict
    from tests.conftest import ORIENTATIONS, make_volume, write_nifti

    (tmp_path / "in").mkdir()
    hu, aff, _ = make_volume(ORIENTATIONS["IPL"])
    write_nifti(tmp_path / "in" / "a.nii.gz", hu, aff)
    port, env = _server_env(tmp_path, tiny_checkpoint)
    procs = [_start_server(port, env, 30.0)]
    try:
        with cf.ThreadPoolExecutor(1) as pool:
            args = [str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--server", f"http://127.0.0.1:{port}"]
            run = pool.submit(predict, [*args, "--timeout", "120"])
            deadline = time.time() + 30
            while not list((tmp_path / "results" / "pending").glob("*/*.json")):  # accepted
                assert time.time() < deadline and not run.done()
                time.sleep(0.1)
            procs[0].kill()
            procs[0].wait(timeout=30)
            time.sleep(3)  # the client meets a closed port for a while
            procs.append(_start_server(port, env, 0.0))
            assert run.result(timeout=120) == 0
        assert "not answering; waiting for it (the job stays accepted)" in capsys.readouterr().err
        mask = nib.load(tmp_path / "out" / "a_mask.nii.gz")
        assert mask.shape == hu.shape and np.allclose(mask.affine, aff)
        # Down before a volume is sent: the upload waits for the service to come back.
        from app.predict_cli import Remote

        remote = Remote(f"http://127.0.0.1:{port}", None, 120)
        procs[1].kill()
        procs[1].wait(timeout=30)
        with cf.ThreadPoolExecutor(1) as pool:
            later = pool.submit(lambda: (time.sleep(3), procs.append(_start_server(port, env, 0.0))))
            classes, _ = remote.segment(tmp_path / "in" / "a.nii.gz", tmp_path / "out2" / "a_mask.nii.gz")
            later.result(timeout=60)
        assert "sending a.nii.gz again" in capsys.readouterr().err
        assert [c["label"] for c in classes] == [1, 2] and (tmp_path / "out2" / "a_mask.nii.gz").exists()
    finally:
        _kill(procs)


def test_sigterm_drains_accepted_work_then_exits(tmp_path: Path, tiny_checkpoint: Path) -> None:
    port, env = _server_env(tmp_path, tiny_checkpoint, KITSEG_DRAIN_TIMEOUT_S="30")
    proc = _start_server(port, env, 1.5)
    url = f"http://127.0.0.1:{port}"
    try:
        with cf.ThreadPoolExecutor(3) as pool:
            # One request on the model, one queued behind it.
            futs = [pool.submit(httpx.post, f"{url}/segment", files={"file": ("a.nii", _nii())}, timeout=60)]
            time.sleep(0.4)
            futs.append(pool.submit(httpx.post, f"{url}/segment", files={"file": ("b.nii", _nii())}, timeout=60))
            time.sleep(0.4)
            # And one whose client doesn't wait: accepted is accepted.
            unwaited = httpx.post(f"{url}/segment?wait=false", files={"file": ("c.nii", _nii())}, timeout=60)
            assert unwaited.status_code == 202, unwaited.text
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            # Draining: no longer ready, whether the socket is already closed or still answers.
            try:
                r = httpx.get(f"{url}/ready", timeout=2)
                assert r.status_code == 503, r.text
            except httpx.TransportError:
                pass
            results = [f.result() for f in futs]
        assert [r.status_code for r in results] == [200, 200], [r.text for r in results]
        # uvicorn re-raises the signal once shut down, so the exit status is "terminated by
        # SIGTERM" (143 in a shell, what Docker and systemd expect), after the work is done.
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        # What was written before the stop is still there for a restarted server.
        for rid in [r.json()["id"] for r in results] + [unwaited.json()["id"]]:
            assert (tmp_path / "results" / "results" / rid / "mask.nii.gz").exists()
        assert list((tmp_path / "results" / "spool").iterdir()) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
