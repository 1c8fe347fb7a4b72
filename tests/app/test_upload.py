"""Decoding the upload while it arrives (app.upload): what it writes for any chunking of the body,
when it gives up (so that the route falls back to Starlette's copy), and that the service then
answers exactly as without it."""

from __future__ import annotations

import gzip
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest
from fastapi.testclient import TestClient

import app.routes.segment as segment_route
from app.main import create_app
from app.upload import Decoded, UploadDecoder
from tests.app.conftest import LiveServer, make_settings
from tests.app.test_api import assert_error
from tests.conftest import make_volume, write_nifti

B = b"kitsegboundary"


def _body(*parts: tuple[str, str | None, bytes]) -> bytes:
    """A multipart body of (field name, filename or None, payload) parts."""
    out = b""
    for name, filename, payload in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        out += b"--" + B + b"\r\nContent-Disposition: " + disp.encode() + b"\r\n"
        out += b"Content-Type: application/octet-stream\r\n\r\n" + payload + b"\r\n"
    return out + b"--" + B + b"--\r\n"


def _decode(
    tmp_path: Path, body: bytes, chunks: list[int] | None = None, max_upload: int = 1 << 30, max_decoded: int = 1 << 30
) -> tuple[Decoded | None, Path]:
    dst = tmp_path / "spool.upload"
    dec = UploadDecoder(B, dst, max_upload, max_decoded)
    i = 0
    for n in chunks or [len(body)]:
        dec.feed(body[i : i + n])
        i += n
    if i < len(body):
        dec.feed(body[i:])
    dec.end()
    got = dec.result.result(timeout=30)
    if got is not None:
        dec.claim()
    dec.discard()
    return got, dst


def _chunkings(n: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [[n], [1] * 300 + [n], list(rng.integers(1, 70_000, n // 1000 + 10))]


def _nifti(n_slices: int = 40, rng_seed: int = 1) -> bytes:
    """An uncompressed NIfTI-1 of about 5 MB of compressible voxels."""
    data = np.random.default_rng(rng_seed).integers(-1000, 400, (256, 256, n_slices)).astype(np.int16)
    return bytes(nib.Nifti1Image(data, np.diag([0.8, 0.8, 2.5, 1.0]), dtype=np.int16).to_bytes())


@pytest.mark.parametrize("chunking", [0, 1, 2], ids=["one-chunk", "bytewise-start", "random"])
def test_gzip_members_and_raw_files_are_written_decoded_for_any_chunking(tmp_path: Path, chunking: int) -> None:
    raw = _nifti()
    cases = {
        "gzip": gzip.compress(raw, 6),
        "two-members": gzip.compress(raw[:1_000_000], 1) + gzip.compress(raw[1_000_000:], 6),
        "raw": raw,
    }
    for name, payload in cases.items():
        body = _body(("note", None, b"a text field first"), ("file", "ct.nii.gz", payload))
        got, dst = _decode(tmp_path, body, _chunkings(len(body))[chunking])
        assert got is not None, name
        assert got.upload_bytes == len(payload) and got.decoded_bytes == len(raw), name
        assert dst.read_bytes() == raw, name
        dst.unlink()


@pytest.mark.parametrize("payload", [b"", b"\x1f"], ids=["empty", "one-byte"])
def test_empty_and_tiny_files_are_passed_through(tmp_path: Path, payload: bytes) -> None:
    got, dst = _decode(tmp_path, _body(("file", "a.nii", payload)), [1] * 400)
    assert got is not None and got.upload_bytes == len(payload) and dst.read_bytes() == payload


def _gz(n: int = 2_000_000) -> bytes:
    """A gzipped NIfTI of about ``n`` bytes (header, then zero voxels)."""
    data = np.zeros((100, 100, max(1, n // 20_000)), np.int16)
    return gzip.compress(bytes(nib.Nifti1Image(data, np.eye(4), dtype=np.int16).to_bytes()))


def _noisy_gz() -> bytes:
    return gzip.compress(np.random.default_rng(2).integers(0, 16, 200_000, dtype=np.uint8).tobytes())


GIVE_UP = {
    "truncated-gzip": (_body(("file", "a.nii.gz", _gz()[:-100])), {}),
    "corrupt-deflate": (_body(("file", "a.nii.gz", _noisy_gz()[:3000] + bytes(500) + _noisy_gz()[3500:])), {}),
    "bad-crc": (_body(("file", "a.nii.gz", _gz()[:-8] + bytes(4) + _gz()[-4:])), {}),
    "trailing-junk": (_body(("file", "a.nii.gz", _gz() + b"junk")), {}),
    "over-decoded-limit": (_body(("file", "a.nii.gz", _gz())), {"max_decoded": 1_999_999}),
    "bomb-after-the-header": (_body(("file", "a.nii.gz", gzip.compress(_nifti(4)[:-100] + bytes(50 << 20)))), {}),
    "not-nifti": (_body(("file", "a.nii.gz", gzip.compress(bytes(10_000)))), {}),
    "over-upload-limit": (_body(("file", "a.nii", bytes(5000))), {"max_upload": 4999}),
    "two-files": (_body(("file", "a.nii", bytes(100)), ("file", "b.nii", bytes(100))), {}),
    "no-filename": (_body(("file", None, bytes(100))), {}),
    "other-name": (_body(("image", "a.nii", bytes(100))), {}),
    "unterminated-body": (_body(("file", "a.nii", bytes(100)))[:-10], {}),
    "not-multipart": (b"just bytes " * 1000, {}),
}


@pytest.mark.parametrize("case", list(GIVE_UP))
def test_gives_up_and_leaves_nothing_on_anything_unusual(tmp_path: Path, case: str) -> None:
    body, limits = GIVE_UP[case]
    dst = tmp_path / "spool.upload"
    dec = UploadDecoder(B, dst, limits.get("max_upload", 1 << 30), limits.get("max_decoded", 1 << 30))
    written = []
    real_write = dec._out.write

    def spy(b: bytes | memoryview) -> int:
        written.append(len(b))
        return real_write(b)

    dec._out.write = spy  # type: ignore[method-assign]
    for i in range(0, len(body), 65536):
        dec.feed(body[i : i + 65536])
    dec.end()
    assert dec.result.result(timeout=30) is None
    dec.discard()
    assert not dst.exists()
    # Never more on disk than the header declares, plus the slack (here about 0.5 MB of image).
    assert sum(written) <= 2 << 20


def test_abort_mid_upload_gives_up_and_discard_removes_the_file(tmp_path: Path) -> None:
    body = _body(("file", "a.nii.gz", _gz(8_000_000)))
    dst = tmp_path / "spool.upload"
    dec = UploadDecoder(B, dst, 1 << 30, 1 << 30)
    dec.feed(body[: len(body) // 2])
    dec.abort()
    assert dec.result.result(timeout=30) is None
    dec.discard()
    assert not dst.exists()
    dec.feed(body[len(body) // 2 :])  # a late chunk after giving up is dropped, not queued
    assert dec.backlog == 0


def _client(tmp_path: Path, tiny_checkpoint: Path, decode: bool) -> TestClient:
    s = make_settings(
        tmp_path / ("on" if decode else "off"),
        checkpoint=tiny_checkpoint,
        max_upload_bytes=4 << 20,
        max_decompressed_bytes=16 << 20,
        decode_during_upload=decode,
    )
    return TestClient(create_app(s), raise_server_exceptions=False)


def test_the_service_uses_the_decoded_upload_and_answers_as_without_it(
    tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hu, aff, _ = make_volume(("I", "P", "L"))
    data = write_nifti(tmp_path / "v.nii.gz", hu, aff).read_bytes()
    with _client(tmp_path, tiny_checkpoint, decode=False) as c:
        want = c.post("/segment?download=true", files={"file": ("v.nii.gz", data)})
        assert want.status_code == 200, want.text
        bad_want = c.post("/segment", files={"file": ("v.nii.gz", data[:-100])})
    plain_spool = segment_route._spool

    def no_plain_path(*a: object, **k: object) -> int:
        raise AssertionError("the route copied Starlette's file instead of using the decoded one")

    monkeypatch.setattr(segment_route, "_spool", no_plain_path)
    with _client(tmp_path, tiny_checkpoint, decode=True) as c:
        got = c.post("/segment?download=true", files={"file": ("v.nii.gz", data)})
        assert got.status_code == 200, got.text
        assert gzip.decompress(got.content) == gzip.decompress(want.content)
        # A truncated upload: the decoder gives up, the plain path answers as before.
        monkeypatch.setattr(segment_route, "_spool", plain_spool)
        bad = c.post("/segment", files={"file": ("v.nii.gz", data[:-100])})
        assert_error(bad, bad_want.status_code, bad_want.json()["code"])
        assert list((tmp_path / "on" / "results" / "spool").iterdir()) == []


@pytest.fixture
def plain_path_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the route's copies of Starlette's file (the plain path), which still happen."""
    calls: list[int] = []
    plain = segment_route._spool

    def counted(*a: object, **k: object) -> int:
        calls.append(1)
        return plain(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(segment_route, "_spool", counted)
    return calls


def test_a_decoder_that_lags_is_not_waited_for(
    tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, plain_path_calls: list[int]
) -> None:
    hu, aff, _ = make_volume(("R", "A", "S"))
    data = write_nifti(tmp_path / "v.nii.gz", hu, aff).read_bytes()
    slow_end = UploadDecoder._part_end

    def lagging(self: UploadDecoder) -> None:
        time.sleep(1.0)
        slow_end(self)

    monkeypatch.setattr(UploadDecoder, "_part_end", lagging)
    monkeypatch.setattr(segment_route, "DECODE_TAIL_TIMEOUT_S", 0.05)
    with _client(tmp_path, tiny_checkpoint, decode=True) as c:
        r = c.post("/segment", files={"file": ("v.nii.gz", data)})
        assert r.status_code == 200, r.text
        assert plain_path_calls == [1]  # the plain path answered
        time.sleep(1.5)  # the decoder finishes later and its file is removed
        assert list((tmp_path / "on" / "results" / "spool").iterdir()) == []


def test_reading_gives_up_on_a_decoder_that_cannot_catch_up(
    tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, plain_path_calls: list[int]
) -> None:
    import app.upload as upload_module

    data = _nifti(n_slices=140)  # 18 MB, uncompressed: more than the decoder may fall behind by
    assert len(data) > 2 * upload_module.BACKLOG_BYTES
    real = UploadDecoder._part_data

    def crawling(self: UploadDecoder, *a: object) -> None:
        time.sleep(0.5)  # 4 MiB a call at most: about 8 MB/s
        real(self, *a)  # type: ignore[arg-type]

    monkeypatch.setattr(UploadDecoder, "_part_data", crawling)
    monkeypatch.setattr(upload_module, "CATCH_UP_S", 0.2)
    s = make_settings(tmp_path, checkpoint=tiny_checkpoint, max_upload_bytes=32 << 20, max_decompressed_bytes=64 << 20)
    body = _body(("file", "v.nii", data))

    def pieces() -> Iterator[bytes]:  # as a socket delivers it: many chunks, not one
        for i in range(0, len(body), 1 << 16):
            yield body[i : i + (1 << 16)]

    with LiveServer(create_app(s)) as srv:
        t = time.perf_counter()
        r = httpx.post(
            f"{srv.url}/segment",
            content=pieces(),
            headers={"content-type": f"multipart/form-data; boundary={B.decode()}"},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        assert plain_path_calls == [1]  # the decoder was given up and the plain path answered
        assert time.perf_counter() - t < 30
        time.sleep(0.5)
        assert list((tmp_path / "results" / "spool").iterdir()) == []
