"""Gated inference for one case: the classifier scores slices, model A segments the volume, model B refines the
classifier-positive slices inside the liver region.  The label volume is written on the input's original grid.

Liver region for model B: the bounding box of model A's largest 3D liver component (26-connectivity), mapped to
the slice grid and grown by the same margin model B was trained with (training used the reference liver box;
at inference model A's liver stands in for it).  Fallback: when model A finds no liver there is no region to crop,
so the case keeps model A's output everywhere and the log says so.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import h5py
import numpy as np

from liverseg.errors import CaseError
from liverseg.inference import classify, resize_probs_to_slices, segment, segment_sequences, sliding_window_3d
from liverseg.io import Geometry, atomic_path, save_nifti_like
from liverseg.models import ModelFileError, load, resolve_device
from liverseg.postprocess import largest_component

log = logging.getLogger(__name__)
MODES = ("cascade", "model_a", "v3_convlstm", "v1_3dcnn")


def read_case(h5_path, case: str):
    """Image slices (Z, S, S) float16, geometry and attributes of a preprocessed case."""
    try:
        with h5py.File(h5_path, "r") as f:
            image = f["image"][:]
            attrs = dict(f.attrs)
            label = f["label"][:] if "label" in f else None
    except (OSError, KeyError) as exc:
        raise CaseError(case, f"cannot read preprocessed file {h5_path}: {exc}") from None
    geom = Geometry(tuple(int(v) for v in attrs["original_shape"]), np.asarray(attrs["affine"]), np.asarray(attrs["ornt"]))
    return image, geom, attrs, label


def check_compatible(spec: dict, attrs: dict, model_path) -> None:
    """A model only applies to slices made with the same window and slice size it was trained on."""
    w = spec["window"]
    got = (attrs["window_mode"], float(attrs["window_lower"]), float(attrs["window_upper"]), int(attrs["size"]))
    want = (w["mode"], float(w["lower"]), float(w["upper"]), int(spec["slice_size"]))
    if got != want:
        raise ModelFileError(
            f"model {model_path} was trained on slices (window mode, lower, upper, size) = {want} but case "
            f"{attrs['case_id']} was preprocessed with {got}; preprocess again or use matching models"
        )


def liver_box(vol_canonical: np.ndarray, size: int, margin: int) -> tuple[int, int, int, int] | None:
    """Box (r0, r1, c0, c1) on the S x S slice grid around the largest 3D liver component, grown by margin."""
    comp = largest_component(vol_canonical >= 1, connectivity=26)
    if not comp.any():
        return None
    nx, ny, _ = comp.shape
    xs = np.flatnonzero(comp.any(axis=(1, 2)))
    ys = np.flatnonzero(comp.any(axis=(0, 2)))
    r0, r1 = int(np.floor(ys[0] * size / ny)), int(np.ceil((ys[-1] + 1) * size / ny))
    c0, c1 = int(np.floor(xs[0] * size / nx)), int(np.ceil((xs[-1] + 1) * size / nx))
    return max(0, r0 - margin), min(size, r1 + margin), max(0, c0 - margin), min(size, c1 + margin)


def predict_case(case: str, h5_path, model_dir, out_path, scores_path=None, mode: str = "cascade",
                 device: str = "auto", tta: bool = False, batch: int = 16, amp: bool = True) -> dict:
    if mode not in MODES:
        raise ValueError(f"unknown prediction mode {mode!r}; choose one of {MODES}")
    dev = resolve_device(device)
    image, geom, attrs, _ = read_case(h5_path, case)
    model_dir = Path(model_dir)
    first = mode if mode in ("v3_convlstm", "v1_3dcnn") else "model_a"
    model_a, spec_a = load(model_dir / first / "model.pt", device=dev)
    check_compatible(spec_a, attrs, model_dir / first / "model.pt")
    nx, ny, nz = (int(v) for v in attrs["canonical_shape"])
    size = int(attrs["size"])

    vol = np.zeros((nx, ny, nz), np.uint8)
    if mode == "v1_3dcnn":
        probs = sliding_window_3d(model_a, spec_a, image, dev, amp=amp)
        for z0 in range(0, nz, batch):
            zs = list(range(z0, min(nz, z0 + batch)))
            vol[:, :, zs] = np.transpose(resize_probs_to_slices(probs, zs, (ny, nx)), (2, 1, 0))
        del probs
    else:
        batches = (segment_sequences(model_a, spec_a, image, dev, out_shape=(ny, nx), amp=amp) if mode == "v3_convlstm"
                   else segment(model_a, spec_a, image, list(range(nz)), dev, out_shape=(ny, nx), batch=batch,
                                amp=amp, tta=tta))
        for zs, lab in batches:
            vol[:, :, zs] = np.transpose(lab, (2, 1, 0))
    a_liver = (vol >= 1).sum(axis=(0, 1))
    scores = np.full(nz, np.nan, np.float32)
    gated = np.zeros(nz, bool)
    box = None
    if mode == "cascade":
        clf, spec_c = load(model_dir / "classifier" / "model.pt", device=dev)
        check_compatible(spec_c, attrs, model_dir / "classifier" / "model.pt")
        model_b, spec_b = load(model_dir / "model_b" / "model.pt", device=dev)
        check_compatible(spec_b, attrs, model_dir / "model_b" / "model.pt")
        scores = classify(clf, spec_c, image, dev, amp=amp)
        positive = scores >= spec_c["threshold"]
        box = liver_box(vol, size, int(spec_b["crop_margin"]))
        if box is None:
            log.warning("case %s: model A found no liver; keeping model A's output (no region for model B)", case)
        elif positive.any():
            gated = positive
            # The box on the S grid, in canonical voxel units, to replace model A's result only inside it.
            x0, x1 = int(np.floor(box[2] * nx / size)), int(np.ceil(box[3] * nx / size))
            y0, y1 = int(np.floor(box[0] * ny / size)), int(np.ceil(box[1] * ny / size))
            for zs, lab in segment(model_b, spec_b, image, [int(z) for z in np.flatnonzero(positive)], dev, box=box,
                                   out_shape=(ny, nx), batch=batch, amp=amp, tta=tta):
                lab_c = np.transpose(lab, (2, 1, 0))
                vol[x0:x1, y0:y1, zs] = lab_c[x0:x1, y0:y1]
    save_nifti_like(vol, geom, out_path)
    if scores_path:
        with atomic_path(scores_path) as tmp, open(tmp, "w", newline="") as fh:
            w = csv.writer(fh, delimiter="\t")
            w.writerow(["slice", "classifier_score", "model", "model_a_liver_voxels", "final_liver_voxels"])
            final = (vol >= 1).sum(axis=(0, 1))
            for z in range(nz):
                w.writerow([z, "" if np.isnan(scores[z]) else f"{scores[z]:.5f}", "B" if gated[z] else "A",
                            int(a_liver[z]), int(final[z])])
    summary = {"case": case, "mode": mode, "slices": nz, "slices_to_b": int(gated.sum()), "box": box,
               "liver_voxels": int((vol >= 1).sum()), "tumour_voxels": int((vol == 2).sum())}
    log.info("case %s: %s", case, summary)
    return summary



# ---------------------------------------------------------------------------------------------- new scans
def _scan_id(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def predict_scan(in_path, out_path, model_dir, mode: str = "cascade", device: str = "auto", tta: bool = False,
                 batch: int = 16, postprocess: bool = True, connectivity: int = 26) -> dict:
    """Segment one scan (NIfTI file or DICOM series folder) with trained models; write a label NIfTI.

    The scan is preprocessed with the window and slice size the models were trained with (read from
    model_a/model.json), segmented, and post-processed (largest 3D liver component) unless told otherwise.
    """
    import json
    import tempfile

    from liverseg.postprocess import postprocess_case
    from liverseg.preprocess import preprocess_case

    in_path, model_dir = Path(in_path), Path(model_dir)
    case = _scan_id(in_path)
    spec_path = model_dir / "model_a" / "model.json"
    if not spec_path.is_file():
        raise ModelFileError(f"model file missing: {spec_path}")
    spec = json.loads(spec_path.read_text())
    w = spec["window"]
    with tempfile.TemporaryDirectory(prefix="liverseg-") as tmp:
        h5 = Path(tmp) / "case.h5"
        preprocess_case(case, in_path, h5, lower=w["lower"], upper=w["upper"], mode=w["mode"],
                        size=int(spec["slice_size"]))
        raw = Path(tmp) / "raw.nii.gz"
        s = predict_case(case, h5, model_dir, raw if postprocess else out_path, mode=mode, device=device, tta=tta,
                         batch=batch)
        if postprocess:
            postprocess_case(case, raw, out_path, connectivity=connectivity)
    return s


def predict_many(in_dir, out_dir, model_dir, **kw) -> list[dict]:
    """Every NIfTI file (and every DICOM series sub-folder) in ``in_dir`` -> ``out_dir/<name>.nii.gz``.

    A scan that fails is reported and skipped; the others go on.  Raises CaseError at the end if any failed.
    """
    from liverseg.dicom import is_dicom_folder

    in_dir, out_dir = Path(in_dir), Path(out_dir)
    scans = sorted(p for p in in_dir.iterdir() if not p.name.startswith(".") and (
        p.name.endswith((".nii", ".nii.gz")) or is_dicom_folder(p)))
    if not scans:
        raise CaseError(in_dir.name, f"no NIfTI files or DICOM series folders in {in_dir}")
    out, failed = [], []
    for p in scans:
        try:
            out.append(predict_scan(p, out_dir / f"{_scan_id(p)}.nii.gz", model_dir, **kw))
        except CaseError as exc:
            log.error("%s", exc)
            failed.append(exc.case)
    if failed:
        raise CaseError(",".join(failed), f"{len(failed)} of {len(scans)} scans failed (see messages above)")
    return out
