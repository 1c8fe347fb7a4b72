"""``kitseg-predict``: the service's engine offline, over one NIfTI file or a folder of them.

Writes ``<name>_mask.nii.gz`` for each input plus ``statistics.json`` and ``statistics.csv``; an
nnU-Net ``imagesTs/`` folder's ``<case>_0000.nii.gz`` get ``<case>.nii.gz``, as nnU-Net names them. A
folder is searched recursively and its structure kept under ``--out``, so that a KiTS folder's
``case_XXXXX/imaging.nii.gz`` files each get their own ``case_XXXXX/imaging_mask.nii.gz``; its
label maps and earlier masks are skipped (:data:`NOT_CT`) unless ``--glob`` says which files to
take.

With ``--server URL`` the volumes go to a running kitseg service instead (``POST /segment?wait=false``,
then its status URL, then the mask): a folder on a workstation segmented by the GPU server, into
the same files.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import csv
import io
import json
import logging
import os
import re
import sys
import threading
import time
import uuid
from collections.abc import Callable
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from tqdm import tqdm

from app.settings import DEMO_CHECKPOINT
from segcore.errors import KitsegError
from segcore.inference import Engine
from segcore.io import atomic_write, load_volume, save_mask
from segcore.options import ENGINE_FLAGS, add_engine_arguments, engine_options, int_from
from segcore.stats import compute_statistics

#: file names in a folder that are not CT: the KiTS layouts' label maps (KiTS19/23's, KiTS21's
#: aggregates, KiTS21/23's per-annotator instance masks, the flat
#: ``case_XXXXX_segmentation.nii.gz``) and this tool's own masks
NOT_CT = (
    "segmentation.nii.gz",
    "*_segmentation.nii.gz",
    "aggregated_*_seg.nii.gz",
    "*_instance-*_annotation-*.nii.gz",
    "*_mask.nii.gz",
)

#: folders that hold label maps: an nnU-Net raw dataset's (``nnUNet_raw/DatasetXXX/labelsTr``)
NOT_CT_FOLDERS = ("labelsTr", "labelsTs")


def _inputs(path: Path, pattern: str | None = None) -> tuple[list[Path], int]:
    """The NIfTI files to segment (``path`` itself, or those under it matching ``pattern``, else
    all but :data:`NOT_CT` and those in :data:`NOT_CT_FOLDERS`), and how many were left out as
    not CT."""
    if not path.is_dir():
        return [path], 0
    files = sorted(p for p in path.rglob(pattern or "*") if p.is_file() and p.name.endswith((".nii", ".nii.gz")))
    if pattern:
        return files, 0
    keep = [p for p in files if not any(fnmatch(p.name, n) for n in NOT_CT) and p.parent.name not in NOT_CT_FOLDERS]
    return keep, len(files) - len(keep)


#: nnU-Net's image names: the case id, then the channel as 4 digits (``case_00000_0000.nii.gz``)
NNUNET_IMAGE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def _names(files: list[Path], names: str) -> str:
    """``kitseg`` or ``nnunet`` for ``--names``: auto is nnU-Net's when every file is named as an
    nnU-Net image (``imagesTs/``), whose predictions nnU-Net names by case. A model of one input
    channel takes channel 0000 only."""
    matches = [NNUNET_IMAGE.match(_stem(f)) for f in files]
    if names == "auto":
        names = "nnunet" if all(matches) and any(m and m["channel"] == "0000" for m in matches) else "kitseg"
    bad = [f.name for f, m in zip(files, matches, strict=True) if not m or m["channel"] != "0000"]
    if names == "nnunet" and bad:
        raise ValueError(
            f"--names nnunet takes nnU-Net's one-channel images, <case>_0000.nii.gz, not: {', '.join(bad[:5])} "
            "(a kitseg model has one input channel; --glob '*_0000.nii.gz' picks channel 0000)"
        )
    return names


def _mask_paths(files: list[Path], root: Path, out: Path, names: str = "kitseg") -> dict[Path, Path]:
    """``out/<the file's folder under root>/<name>_mask.nii.gz`` for each file, or with ``names``
    "nnunet", ``<case>.nii.gz`` for ``<case>_0000.nii.gz`` as ``nnUNetv2_predict`` names them;
    where two names differ only in their extension (``a.nii``, ``a.nii.gz``), the later keeps its
    extension in the mask's name, so that no mask is written over another."""
    paths: dict[Path, Path] = {}
    for f in files:
        folder = out / (f.parent.relative_to(root) if root.is_dir() else Path())
        if names == "nnunet" and (m_case := NNUNET_IMAGE.match(_stem(f))):
            m = folder / f"{m_case['case']}.nii.gz"
        else:
            m = folder / f"{_stem(f)}_mask.nii.gz"
        if m in paths.values():
            m = folder / f"{f.name.replace('.', '_')}_mask.nii.gz"
        paths[f] = m
    return paths


def _stem(p: Path) -> str:
    name = p.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return p.stem


#: statistics.csv's columns: one row per input and class
CSV_FIELDS = (
    "input",
    "label",
    "name",
    "present",
    "voxels",
    "volume_ml",
    "components",
    "mean_confidence",
    "max_axial_diameter_mm",
    # The kidney row's split into the patient's left and right (the statistics' "sides"): the
    # kidney region (labels > 0) and the tumor inside it, per side.
    "left_total_ml",
    "left_tumor_ml",
    "right_total_ml",
    "right_tumor_ml",
)


def _write_statistics(out: Path, model: dict[str, Any], results: list[dict[str, Any]]) -> None:
    """``statistics.json`` (every result, failures included) and ``statistics.csv`` (a row per
    input and class), each replaced whole (never a partial file)."""
    atomic_write(out / "statistics.json", json.dumps({**model, "results": results}, indent=2).encode(), private=False)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in results:
        for c in r.get("classes", []):
            row = {k: c.get(k) for k in CSV_FIELDS[1:]}
            row["volume_ml"] = round(c["volume_ml"], 3)
            if sides := c.get("sides"):
                for side in ("left", "right"):
                    row[f"{side}_total_ml"] = round(sides[side]["total_ml"], 3)
                    row[f"{side}_tumor_ml"] = round(sides[side]["tumor_ml"], 3)
            row["mean_confidence"] = None if c["mean_confidence"] is None else round(c["mean_confidence"], 4)
            w.writerow({"input": r["input"], **row})
    atomic_write(out / "statistics.csv", buf.getvalue().encode(), private=False)


def _earlier_results(out: Path, weights_sha256: list[str]) -> dict[str, dict[str, Any]]:
    """For ``--continue``: the results an earlier run wrote into ``out/statistics.json`` with the
    same checkpoint(s), by the input's absolute path; failed inputs are run again. A run with another model is an
    error, since its masks would be mixed with this one's."""
    path = out / "statistics.json"
    if not path.is_file():
        return {}
    try:
        earlier = json.loads(path.read_text())
        results = earlier["results"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--continue: {path} is not a kitseg-predict statistics file ({e})") from e
    if "weights_sha256" not in earlier:
        raise ValueError(
            f"--continue: {path} was written by an earlier kitseg-predict, which did not record its weights; "
            "use another --out"
        )
    if earlier["weights_sha256"] != weights_sha256:
        raise ValueError(
            f"--continue: {path} was written with other weights ({earlier.get('checkpoint')}); "
            "use another --out, or the same --checkpoint"
        )
    # By absolute path: the same folder given another way (relative, absolute) is the same run.
    return {
        str(Path(r["input"]).resolve()): r
        for r in results
        if isinstance(r, dict) and isinstance(r.get("input"), str) and isinstance(r.get("mask"), str)
    }


class Local:
    """The engine in this process."""

    def __init__(self, engine: Engine, checkpoints: list[Path]) -> None:
        self.engine = engine
        self.weights_sha256 = [m.weights_sha256 for m in engine.metas]
        self.source: dict[str, Any] = {
            "checkpoint": [str(c) for c in checkpoints] if len(checkpoints) > 1 else str(checkpoints[0])
        }

    def segment(self, f: Path, mask_path: Path) -> tuple[list[dict[str, Any]], list[str]]:
        """Write ``f``'s mask to ``mask_path``; its statistics and warnings. Raises KitsegError for a
        volume that can't be segmented."""
        vol = load_volume(f)
        pred = self.engine.predict(vol)
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        save_mask(pred.mask, vol, mask_path, private=False)  # the user's outputs, not the service's
        return compute_statistics(pred.mask, vol, self.engine.meta.labels, pred.confidence, pred.box), vol.ct_warnings()


class ServiceError(Exception):
    """The service refused one volume (its error's code and message): the volume is skipped."""


class ServiceUnavailable(Exception):
    """The service can't be used at all (unreachable, a wrong API key, not a kitseg service)."""


class Remote:
    """A kitseg service: each volume is uploaded with ``wait=false``, its status URL polled and
    its mask fetched, so no request stays open for the whole job (proxies cut long ones). A full
    queue (503), a restart and a proxy's 502/504 are waited out; an upload is retried with its
    Idempotency-Key, so it never runs twice. The upload's file name is not sent: a patient's name in a file
    name stays on this machine."""

    def __init__(self, url: str, api_key: str | None, timeout_s: float) -> None:
        import httpx

        self.httpx = httpx
        self.base = httpx.URL(url.rstrip("/") + "/")
        self.timeout_s = timeout_s
        self.client = httpx.Client(headers={"X-API-Key": api_key} if api_key else {}, timeout=60.0)
        self._stopped = threading.Event()
        card = self._json(self._call("GET", "model"), "GET /model")
        try:
            # The weights' hash, as a local run records it; an ensemble's files' hashes (its card's).
            self.weights_sha256 = list(card["ensemble"]) if card.get("ensemble") else [card["weights_sha256"]]
        except (KeyError, TypeError):
            raise ServiceUnavailable(f"{url} does not answer GET /model as a kitseg service") from None
        self.source = {"server": url, "model": card.get("name"), "demo": card.get("demo")}

    def stop(self) -> None:
        """Make the volumes in flight on other threads give up at their next wait."""
        self._stopped.set()

    def _sleep(self, seconds: float) -> None:
        if self._stopped.wait(seconds):
            raise ServiceUnavailable("stopped")

    def _url(self, path: str) -> Any:
        # Links from the service are absolute paths (under its root path, behind a proxy), so they
        # replace the base URL's path; a relative one is under it.
        return self.base.join(path)

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        try:
            r = self.client.request(method, self._url(path), **kw)
        except self.httpx.HTTPError as e:
            raise ServiceUnavailable(f"{self.base}: {e}") from e
        if r.status_code == 401:
            raise ServiceUnavailable(f"{self.base}: missing or wrong API key (--api-key, or KITSEG_API_KEY)")
        return r

    def _accepted_call(self, method: str, path: str, deadline: float) -> Any:
        """:meth:`_call` for an accepted job's URLs, which outlive the service's process (the next
        start runs an accepted job, README "Reliability"): a restart's refused connections and
        its 503s are waited out until ``deadline``."""
        waiting = f"{self.base}: not answering; waiting for it (the job stays accepted)"
        return self._retrying(lambda: self._call(method, path), deadline, lost=waiting, busy=waiting, busy_wait="2")

    def _retrying(self, send: Callable[[], Any], deadline: float, lost: str, busy: str | None, busy_wait: str) -> Any:
        """``send()`` again until it answers other than busy (:meth:`_busy`), or ``deadline``
        passes: refused or dropped connections (a restart) wait 2 s, a busy answer its Retry-After
        (``busy_wait`` without one), at most 30 s. ``lost`` (for a connection) or ``busy`` (for a
        busy answer) is said once on stderr."""
        said = False
        while True:
            try:
                r = send()
            except ServiceUnavailable as e:
                if not isinstance(e.__cause__, self.httpx.TransportError) or time.monotonic() > deadline:
                    raise
                r = None
            if r is not None and (not self._busy(r) or time.monotonic() > deadline):
                return r
            message = lost if r is None else busy
            if message and not said:
                print(message, file=sys.stderr)
                said = True
            self._sleep(2.0 if r is None else min(30.0, float(r.headers.get("retry-after", busy_wait))))

    @staticmethod
    def _busy(r: Any) -> bool:
        """Sent again after Retry-After: a 503 (a full queue, a start); a 409 for an upload whose
        earlier try the service is still accepting (its Idempotency-Key is in use); and a 502 or
        504 that a proxy in front answered (the service behind it restarting, or a replica gone),
        which, unlike the service's own 504 ``deadline_exceeded``, has no kitseg error body."""
        try:
            code = r.json().get("code")
        except (ValueError, AttributeError):
            code = None
        if r.status_code == 409:
            return bool(code == "idempotency_key_in_use")
        if r.status_code in (502, 504):
            return code is None
        return bool(r.status_code == 503)

    @staticmethod
    def _json(r: Any, what: str) -> Any:
        try:
            return r.json()
        except ValueError:
            raise ServiceUnavailable(f"{what} answered {r.status_code} without JSON: not a kitseg service?") from None

    @staticmethod
    def _refused(r: Any) -> ServiceError:
        try:
            body = r.json()
            return ServiceError(f"{r.status_code} {body['code']}: {body['message']}")
        except (ValueError, KeyError, TypeError):
            return ServiceError(f"HTTP {r.status_code}")

    def segment(self, f: Path, mask_path: Path) -> tuple[list[dict[str, Any]], list[str]]:
        deadline = time.monotonic() + self.timeout_s
        # One key for every try of this volume: a POST the service accepted but whose answer was
        # lost (the connection dropped, the service restarted) is found again, not run twice.
        key = {"Idempotency-Key": uuid.uuid4().hex}

        def post() -> Any:
            with open(f, "rb") as fh:
                return self._call(
                    "POST", "segment", params={"wait": "false"}, files={"file": ("volume", fh)}, headers=key
                )

        lost = f"{self.base}: no answer; sending {f.name} again (with its Idempotency-Key)"
        r = self._retrying(post, deadline, lost=lost, busy=None, busy_wait="5")  # busy: the queue is full
        if r.status_code != 202:
            raise self._refused(r)
        status_url = self._json(r, "POST /segment")["status_url"]
        while True:
            r = self._accepted_call("GET", status_url, deadline)
            if r.status_code != 202:
                break
            if time.monotonic() > deadline:
                self._call("DELETE", status_url)
                raise ServiceError(f"not finished within {self.timeout_s:.0f} s (--timeout); cancelled")
            self._sleep(min(1.0, float(r.headers.get("retry-after", "1"))))
        if r.status_code != 200:
            raise self._refused(r)
        result = self._json(r, "GET " + status_url)
        m = self._accepted_call("GET", result["mask_url"], deadline)
        if m.status_code != 200:
            raise self._refused(m)
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(mask_path, m.content, private=False)
        return result["classes"], result.get("warnings", [])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kitseg-predict", description=__doc__)
    ap.add_argument(
        "input",
        type=Path,
        help="a .nii/.nii.gz file, or a folder searched recursively (its sub-folders are kept under --out)",
    )
    ap.add_argument(
        "--glob",
        help="in a folder, only the files whose name matches this pattern, e.g. 'imaging.nii.gz' (default: every "
        "NIfTI file but label maps named as in KiTS19/21/23 and earlier *_mask.nii.gz outputs)",
    )
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    ap.add_argument(
        "--names",
        choices=["auto", "kitseg", "nnunet"],
        default="auto",
        help="mask file names. kitseg: <name>_mask.nii.gz next to the statistics; nnunet: <case>.nii.gz for "
        "<case>_0000.nii.gz, as nnUNetv2_predict names them (what nnU-Net's evaluation and "
        "'kitseg-train evaluate --predictions' read); auto: nnunet when every input is named that way (imagesTs/)",
    )
    ap.add_argument(
        "--checkpoint",
        type=Path,
        nargs="+",
        default=None,
        help="checkpoint; several are an ensemble whose softmax probabilities are averaged, as nnU-Net averages "
        "its cross-validation folds (one training configuration; each adds its model time); default: the "
        "bundled demo model",
    )
    ap.add_argument(
        "--continue",
        dest="resume",
        action="store_true",
        help="go on after an interrupted run into the same --out: inputs whose mask and statistics it wrote "
        "(with the same checkpoint) are kept, not segmented again (nnU-Net's --continue_prediction)",
    )
    add_engine_arguments(ap, batch_size=8)
    ap.add_argument(
        "--server",
        metavar="URL",
        help="send the volumes to a running kitseg service (e.g. https://gpu-host/kitseg) instead of running the "
        "engine here; its checkpoint and settings apply, so --checkpoint and the engine options are refused",
    )
    ap.add_argument(
        "--api-key", help="the service's API key, with --server (default: the KITSEG_API_KEY environment variable)"
    )
    ap.add_argument(
        "--timeout",
        type=float,
        default=3600.0,
        help="with --server: seconds one volume may take, queue and upload included (default 3600)",
    )
    ap.add_argument(
        "--jobs",
        type=int_from(1),
        default=None,
        metavar="N",
        help="with --server: volumes in flight at once (default 2), so that the next one uploads while the "
        "service segments one; the outputs are the same, in the same order",
    )
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    segmenter: Local | Remote
    if a.jobs is not None and not a.server:
        print("kitseg-predict: --jobs is for --server (locally one engine runs one volume at a time)", file=sys.stderr)
        return 2
    if a.server:
        changed = [f"--{k.replace('_', '-')}" for k in ENGINE_FLAGS if getattr(a, k) != ap.get_default(k)]
        if a.checkpoint or changed:
            print(
                f"kitseg-predict: with --server the service's checkpoint and settings apply: drop "
                f"{', '.join((['--checkpoint'] if a.checkpoint else []) + changed)}",
                file=sys.stderr,
            )
            return 2
        try:
            segmenter = Remote(a.server, a.api_key or os.environ.get("KITSEG_API_KEY"), a.timeout)
        except ServiceUnavailable as e:
            print(f"kitseg-predict: {e}", file=sys.stderr)
            return 2
        if segmenter.source["demo"]:
            print(f"{a.server} serves its demo model (synthetic phantoms; not for clinical use)", file=sys.stderr)
    else:
        ckpts = a.checkpoint or [DEMO_CHECKPOINT]
        if a.checkpoint is None:
            print("using the bundled demo model (synthetic phantoms; not for clinical use)", file=sys.stderr)
        try:
            engine = Engine.from_checkpoint([str(c) for c in ckpts], **engine_options(a))
        # A missing, tampered or mismatched checkpoint; no such device; options it can't run.
        except (KitsegError, ValueError) as e:
            print(f"kitseg-predict: {e}", file=sys.stderr)
            return 2
        if a.compile != "off":
            engine.warmup()
        segmenter = Local(engine, ckpts)
    files, skipped = _inputs(a.input, a.glob)
    if skipped:
        print(
            f"skipped {skipped} label map(s) or earlier mask(s) under {a.input} (--glob picks files)", file=sys.stderr
        )
    if not files:
        print(f"no .nii or .nii.gz files to segment under {a.input}", file=sys.stderr)
        return 2
    try:
        names = _names(files, a.names)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    a.out.mkdir(parents=True, exist_ok=True)
    mask_paths = _mask_paths(files, a.input, a.out, names)
    hashes = segmenter.weights_sha256
    model = {**segmenter.source, "weights_sha256": hashes}
    try:
        done = _earlier_results(a.out, hashes) if a.resume else {}
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    rows: dict[Path, dict[str, Any]] = {}  # the statistics' rows, written in the inputs' order

    def write() -> None:
        _write_statistics(a.out, model, [rows[f] for f in files if f in rows])

    failures = kept = 0
    todo = []
    for f in files:
        earlier = done.get(str(f.resolve()))
        if earlier and Path(earlier["mask"]).resolve() == mask_paths[f].resolve() and mask_paths[f].is_file():
            rows[f] = earlier
            kept += 1
        else:
            todo.append(f)

    def timed(f: Path) -> tuple[list[dict[str, Any]], list[str], float]:
        t0 = time.perf_counter()
        classes, warnings = segmenter.segment(f, mask_paths[f])
        return classes, warnings, time.perf_counter() - t0

    # With --server, up to --jobs volumes are in flight (uploaded, queued or segmented) while the
    # results are taken in the inputs' order; locally one at a time, on this thread.
    jobs = (a.jobs or 2) if a.server else 1
    pool = cf.ThreadPoolExecutor(jobs) if jobs > 1 else None
    ahead: dict[Path, cf.Future[tuple[list[dict[str, Any]], list[str], float]]] = {}

    def start(i: int) -> None:
        if pool is not None and i < len(todo):
            ahead[todo[i]] = pool.submit(timed, todo[i])

    try:
        for i in range(jobs):
            start(i)
        for i, f in enumerate(tqdm(todo, desc="segment", unit="vol", initial=kept, total=len(files))):
            try:
                classes, warnings, seconds = ahead.pop(f).result() if pool is not None else timed(f)
            except (KitsegError, ServiceError) as e:
                failures += 1
                tqdm.write(f"skip {f}: {e}")
                rows[f] = {"input": str(f), "error": str(e)}
                write()
                start(i + jobs)
                continue
            except ServiceUnavailable as e:  # every later volume would fail the same way
                print(f"kitseg-predict: {e}", file=sys.stderr)
                return 2
            start(i + jobs)
            for message in warnings:
                tqdm.write(f"warning: {f}: {message}")
            rows[f] = {
                "input": str(f),
                "mask": str(mask_paths[f]),
                "seconds": seconds,
                "warnings": warnings,
                "classes": classes,
            }
            write()  # after every volume, so that an interrupted run keeps what it did (--continue)
    finally:
        if pool is not None:
            if isinstance(segmenter, Remote):
                segmenter.stop()  # the volumes still in flight give up at once
            pool.shutdown(wait=True, cancel_futures=True)
    if kept:
        # Every volume this run segmented was followed by a write; kept ones were not, and the file
        # must hold this run's inputs only (an earlier run's extra inputs drop out).
        write()
    print(
        f"segmented {len(files) - failures}/{len(files)} volumes into {a.out}"
        + (f" ({kept} kept from the earlier run)" if kept else "")
    )
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
