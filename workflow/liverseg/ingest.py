"""Find the cases of a dataset (LiTS / Kaggle folders, Medical Segmentation Decathlon folders, a sample sheet)
and check each one before anything else reads it.

Discovery never reads image data; it only pairs files.  Problems that belong to one case (a path that does not
exist, an unreadable file) are left for that case's preprocessing job, so one bad case cannot stop the others.
Problems that make a case id unusable (invalid characters, duplicates) reject the case here with a reason.
``check_case`` then reads each case once and records a verdict (ok, or a one-line error), which the split reads.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from liverseg.config import default, sample_row_errors
from liverseg.errors import CaseError, ConfigError
from liverseg.io import slabs, atomic_path, geometry_of, load_nifti, read_labels, read_raw

log = logging.getLogger(__name__)

CASE_ID_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_NII_RE = re.compile(r"^(?P<stem>.+?)(_0000)?\.nii(\.gz)?$")


@dataclass
class Case:
    case_id: str
    image: str
    label: str | None = None

    @property
    def labelled(self) -> bool:
        return self.label is not None


@dataclass
class Discovery:
    cases: list[Case]
    rejected: list[tuple[str, str]]  # (case id or file, reason)


def _finish(found: dict[str, list[Case]], rejected: list[tuple[str, str]]) -> Discovery:
    cases = []
    for cid in sorted(found, key=_natural_key):
        entries = found[cid]
        if not CASE_ID_RE.match(cid):
            rejected.append((cid, "case id may hold only letters, digits, '-' and '_'"))
        elif len(entries) > 1:
            rejected.append((cid, f"duplicate case id ({len(entries)} entries: {', '.join(e.image for e in entries)})"))
        else:
            cases.append(entries[0])
    return Discovery(cases, rejected)


def _natural_key(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _visible_files(folder: Path) -> list[Path]:
    # macOS leaves "._" twins next to every file of the Decathlon archives.
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and (p.is_file() or p.is_symlink()))


# LiTS-named files: the image and label of case N.  "test-volume-N" is a test volume: used only inside a test
# folder (LiTS itself numbers its test set 0-69, overlapping the training numbers, so elsewhere it is ignored).
_LITS_RE = re.compile(r"^(test-)?(volume|segmentation)-(\d+)\.nii(\.gz)?$")
_SUBFOLDERS = ("volume", "volumes", "segmentation", "segmentations")


def _lits_folders(base: Path) -> list[Path]:
    return [base] + [base / d for d in _SUBFOLDERS if (base / d).is_dir()]


def discover_directory(root: str | Path) -> Discovery:
    """LiTS/Kaggle naming or the Decathlon layout (imagesTr, labelsTr, imagesTs).

    LiTS/Kaggle: labelled cases from ``root`` itself, ``volume/`` + ``segmentation/``, or the competition's
    ``train/`` (flat, or ``train/volume`` + ``train/segmentation``); predict-only cases (the volumes a submission
    needs) from ``test/`` (flat or ``test/volume``); a Decathlon tree's ``imagesTs/`` likewise.  A volume without a label anywhere is
    predict-only too.  The case id is the integer in the file name (``volume-070`` is case 70)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset directory does not exist: {root}")
    if (root / "imagesTr").is_dir() or (root / "imagesTs").is_dir():
        return _discover_msd(root)
    labelled = _lits_folders(root) + (_lits_folders(root / "train") if (root / "train").is_dir() else [])
    unlabelled = _lits_folders(root / "test") if (root / "test").is_dir() else []
    images: dict[str, list[Path]] = {}
    labels: dict[str, list[Path]] = {}
    tests: dict[str, list[Path]] = {}
    for folder in labelled + unlabelled:
        in_test = folder in unlabelled
        for p in _visible_files(folder):
            m = _LITS_RE.match(p.name)
            if not m or (m.group(1) and not in_test) or (in_test and m.group(2) == "segmentation"):
                continue  # test volumes outside a test folder, labels inside one: not training data
            cid = str(int(m.group(3)))  # "volume-070" and "volume-70" are the same LiTS case
            (tests if in_test else images if m.group(2) == "volume" else labels).setdefault(cid, []).append(p)
    found: dict[str, list[Case]] = {}
    rejected: list[tuple[str, str]] = []
    for cid, paths in tests.items():
        if cid in images:  # the labelled case keeps its number; the test volume is left out
            rejected.append((f"test-{cid}", f"test volume {paths[0]} reuses the number of labelled case {cid}"))
        else:
            for p in paths:  # never paired with a label: a test volume is predict-only
                found.setdefault(cid, []).append(Case(cid, str(p), None))
    for cid, paths in images.items():
        lab = labels.get(cid, [])
        if len(lab) > 1:
            rejected.append((cid, f"several label files: {', '.join(map(str, lab))}"))
            continue
        for p in paths:
            found.setdefault(cid, []).append(Case(cid, str(p), str(lab[0]) if lab else None))
    for cid in sorted(set(labels) - set(images)):
        rejected.append((cid, f"label without a volume: {labels[cid][0]}"))
    return _finish(found, rejected)


def _discover_msd(root: Path) -> Discovery:
    found: dict[str, list[Case]] = {}
    rejected: list[tuple[str, str]] = []
    labels = {}
    if (root / "labelsTr").is_dir():
        for p in _visible_files(root / "labelsTr"):
            m = _NII_RE.match(p.name)
            if m:
                labels[m.group("stem")] = p
    for sub in ("imagesTr", "imagesTs"):
        if not (root / sub).is_dir():
            continue
        for p in _visible_files(root / sub):
            m = _NII_RE.match(p.name)
            if not m:
                continue
            cid = m.group("stem")
            lab = labels.pop(cid, None) if sub == "imagesTr" else None
            found.setdefault(cid, []).append(Case(cid, str(p), str(lab) if lab else None))
    for cid, p in labels.items():
        rejected.append((cid, f"label without an image: {p}"))
    return _finish(found, rejected)


def read_samplesheet(path: str | Path) -> Discovery:
    """TSV with columns case_id, image and optional label; relative paths are relative to the sheet."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sample sheet does not exist: {path}")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t")
        cols = reader.fieldnames or []
        # The columns, checked once against the schema (workflow/schemas/samples.schema.yaml).
        errors = sample_row_errors({c: "" for c in cols})
        if errors:
            raise ConfigError(f"sample sheet {path}: {'; '.join(errors)} (columns: {cols})")
        rows = list(reader)
    found: dict[str, list[Case]] = {}
    rejected: list[tuple[str, str]] = []
    for i, row in enumerate(rows, start=2):
        cid = (row.get("case_id") or "").strip()
        img = (row.get("image") or "").strip()
        lab = (row.get("label") or "").strip() or None
        if not cid or not img:
            rejected.append((cid or f"line {i}", "empty case_id or image"))
            continue
        found.setdefault(cid, []).append(Case(cid, _resolve(path.parent, img), _resolve(path.parent, lab) if lab else None))
    return _finish(found, rejected)


def _resolve(base: Path, p: str) -> str:
    q = Path(p).expanduser()
    return str(q if q.is_absolute() else (base / q))


def phantom_cases(n_cases: int, folder: str = "results/ingest/phantom") -> Discovery:
    """Phantom cases are named like LiTS (volume-N / segmentation-N) and then flow through the real-data rules."""
    return Discovery(
        [Case(str(i), f"{folder}/volume-{i}.nii.gz", f"{folder}/segmentation-{i}.nii.gz") for i in range(n_cases)], []
    )


def write_case_table(discovery: Discovery, path: str | Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        fh.write("case_id\timage\tlabel\tstatus\treason\n")
        for c in discovery.cases:
            fh.write(f"{c.case_id}\t{c.image}\t{c.label or ''}\t{'labelled' if c.labelled else 'predict-only'}\t\n")
        for cid, reason in discovery.rejected:
            fh.write(f"{cid}\t\t\trejected\t{reason}\n")


def write_dataset_table(cfg: dict, path: str | Path) -> Discovery:
    """The workflow's case table: discover the configured dataset and write what was found and rejected."""
    found = discover(cfg)
    write_case_table(found, path)
    return found


def read_case_table(path: str | Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def discover(cfg: dict) -> Discovery:
    """The cases of the configured dataset (config already validated, defaults filled)."""
    ds = cfg["dataset"]
    if ds["source"] == "phantom":
        return phantom_cases(ds["phantom"]["n_cases"], f"{cfg['results']}/ingest/phantom")
    if ds["source"] == "directory":
        if not ds["directory"]:
            raise ConfigError("dataset.source is 'directory' but dataset.directory is empty")
        return discover_directory(ds["directory"])
    if not ds["samplesheet"]:
        raise ConfigError("dataset.source is 'samplesheet' but dataset.samplesheet is empty")
    return read_samplesheet(ds["samplesheet"])


# ---------------------------------------------------------------------------------------------- checks
def load_validated(case: str, image_path, label_path=None, affine_tolerance: float = default("ingest.affine_tolerance")):
    """Read a case and check everything that can be wrong with it; raise CaseError (one line) otherwise.

    Returns (geometry, raw image (io.read_raw: its stored dtype, float32 for 8-byte types), slope, intercept,
    uint8 label or None)."""
    img = load_nifti(image_path, case, "image")
    geom = geometry_of(img)
    raw, slope, inter = read_raw(img, case, image_path, "image")
    if raw.dtype.kind not in "iuf":
        raise CaseError(case, f"image {image_path} has unsupported data type {raw.dtype}")
    if raw.dtype.kind == "f" and not all(np.isfinite(raw[..., sl]).all() for sl in slabs(raw.shape)):
        raise CaseError(case, f"image {image_path} holds NaN or infinite voxels")  # (checked per slab: no bool volume)
    rmin, rmax = raw.min(), raw.max()
    if rmin == rmax:
        raise CaseError(case, f"image {image_path} is constant (every voxel {float(rmin) * slope + inter:g})")

    lab_raw = None
    if label_path is not None:
        lab_img = load_nifti(label_path, case, "label")
        if lab_img.shape[:3] != img.shape[:3]:
            raise CaseError(case, f"label shape {lab_img.shape[:3]} differs from image shape {img.shape[:3]}")
        if not np.allclose(lab_img.affine, img.affine, atol=affine_tolerance, rtol=0):
            diff = float(np.abs(lab_img.affine - img.affine).max())
            raise CaseError(case, f"label affine differs from image affine by {diff:.4g} (tolerance {affine_tolerance})")
        # Integers in {0, 1, 2}, read and checked slab by slab into uint8: never a float copy of the volume.
        lab_raw = read_labels(lab_img, case, label_path)
    return geom, raw, slope, inter, lab_raw


def check_case(case: str, image_path, out_json, label_path=None, affine_tolerance: float = default("ingest.affine_tolerance")) -> dict:
    """Validate a case and record the verdict as JSON; a bad case is a verdict, not a crash of the workflow.

    The workflow's split reads these verdicts, so one bad case drops out instead of blocking every case after it.
    """
    try:
        geom, _, _, _, lab = load_validated(case, image_path, label_path, affine_tolerance)
        # The header facts the plan reads (liverseg.plan): no later stage opens the image to plan the grid.
        status = {"case": case, "ok": True, "error": "", "canonical_shape": list(geom.canonical_shape),
                  "canonical_spacing": [round(float(v), 6) for v in geom.canonical_spacing]}
        if lab is not None and not (lab >= 1).any():
            log.warning("case %s: the label holds no liver", case)
            status["warning"] = "label holds no liver"
    except CaseError as exc:
        status = {"case": case, "ok": False, "error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - any failure reading one case is that case's verdict, not a crash
        log.exception("case %s: unexpected error while checking", case)  # the traceback stays in the job's log
        status = {"case": case, "ok": False,
                  "error": f"case {case}: unexpected error while reading it ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:200] if str(exc) else 'no message'})"}
    with atomic_path(out_json) as tmp:
        Path(tmp).write_text(json.dumps(status) + "\n")
    return status


def _check_child(case, image_path, out_json, label_path, affine_tolerance, max_memory_mb) -> None:
    """Body of the child process of ``check_case_isolated``: cap its address space, then check."""
    if max_memory_mb:
        import resource

        limit = int(max_memory_mb) * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    check_case(case, image_path, out_json, label_path, affine_tolerance)


def _rss_mb() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024 + 1
    except OSError:
        pass
    return 0


# How running out of the address-space cap shows in a reader's error: numpy/Python (MemoryError), zlib while
# decompressing a .nii.gz ("insufficient memory"), an OSError from a failed mmap/allocation (ENOMEM).
OUT_OF_MEMORY = ("MemoryError", "insufficient memory", "Cannot allocate memory", "out of memory")


def check_case_isolated(case: str, image_path, out_json, label_path=None,
                        affine_tolerance: float = default("ingest.affine_tolerance"), max_memory_mb: int = 0) -> dict:
    """``check_case`` in a child process, so that a check that dies (killed by a signal such as the out-of-memory
    killer's SIGKILL, a crash in a C library, a memory limit hit while starting) still leaves a verdict: the split
    waits for every case's verdict and must never wait on a dead job.

    ``max_memory_mb`` (0 = none) caps the child's address space (RLIMIT_AS) at that figure less this process's
    own memory, so a case too big for the job's ``mem_mb`` fails cleanly as a verdict instead of swapping or
    being killed by the scheduler."""
    import multiprocessing
    import os
    import signal

    out = Path(out_json)
    out.unlink(missing_ok=True)  # a verdict from an earlier run must not pass for this one's
    limit = max(int(max_memory_mb) - _rss_mb(), 1) if max_memory_mb else 0
    # One BLAS thread: the check does no linear algebra, and each extra thread reserves address space that a
    # memory limit would count.
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    # spawn, not fork: a fresh interpreter, nothing of this process's state (threads, locks) copied into it
    child = multiprocessing.get_context("spawn").Process(
        target=_check_child, args=(case, str(image_path), str(out), label_path and str(label_path),
                                   affine_tolerance, limit), name=f"check-{case}")
    child.start()
    child.join()
    code = child.exitcode
    if out.exists():  # the child recorded its verdict (ok, or a one-line error) before it ended
        status = json.loads(out.read_text())
        if not status["ok"] and max_memory_mb and any(m in status["error"] for m in OUT_OF_MEMORY):
            # A verdict is a finished job: Snakemake neither retries it nor reruns it when resources change.
            status["error"] = (f"case {case}: out of memory while reading it (limit {max_memory_mb} MB, the job's "
                               f"mem_mb): raise resources.check_case.mem_per_mb in the config and rerun with "
                               f"--forcerun check_case (or delete {out})")
        else:
            return status
    elif code is not None and code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else f"signal {-code}"
        why = " (the out-of-memory killer sends this)" if -code == signal.SIGKILL else ""
        limit_txt = f"; memory limit {max_memory_mb} MB" if max_memory_mb else ""
        status = {"case": case, "ok": False,
                  "error": f"case {case}: the check was killed by {name}{why} while reading it{limit_txt}"}
    else:
        limit_txt = (f" (memory limit {max_memory_mb} MB: too little to start?)" if max_memory_mb else "")
        status = {"case": case, "ok": False,
                  "error": f"case {case}: the check exited with status {code} without a verdict{limit_txt}"}
    log.error("%s", status["error"])
    with atomic_path(out) as tmp:
        Path(tmp).write_text(json.dumps(status) + "\n")
    return status
