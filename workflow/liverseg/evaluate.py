"""Per-case evaluation against the reference label on the original voxel grid, and aggregation over cases.

Metrics are computed on the input's own grid and spacing (never on the resized HDF5 slices), so they are the
numbers a LiTS submission would get for the same masks.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from liverseg.config import default
from liverseg.errors import CaseError
from liverseg.io import atomic_path, load_nifti, read_labels
from liverseg.metrics import case_metrics

COLUMNS = [
    "case", "class", "dice", "jaccard", "voe", "rvd", "assd", "mssd", "hd95", "pred_ml", "ref_ml",
    "pred_voxels", "ref_voxels", "overlap_voxels", "ref_lesions", "pred_lesions", "detected", "lesion_precision", "lesion_recall", "lesion_f1", "tumour_burden_error",
    "spacing_mm", "fov_mm",
]
TEXT = ("case", "class", "spacing_mm", "fov_mm")  # columns that are not numbers


def evaluate_case(case: str, pred_path, ref_path, out_tsv,
                  affine_tolerance: float = default("ingest.affine_tolerance")) -> list[dict]:
    pred_img = load_nifti(pred_path, case, "prediction")
    ref_img = load_nifti(ref_path, case, "reference label")
    if pred_img.shape != ref_img.shape:
        raise CaseError(case, f"prediction shape {pred_img.shape} differs from reference shape {ref_img.shape}")
    if not np.allclose(pred_img.affine, ref_img.affine, atol=affine_tolerance, rtol=0):
        raise CaseError(case, "prediction affine differs from the reference affine; was it written on another grid?")
    pred, ref = read_labels(pred_img), read_labels(ref_img)
    spacing = tuple(float(v) for v in ref_img.header.get_zooms()[:3])
    # The scan's voxel size and extent (stored axis order), reported beside every metric of the case.
    geo = {"spacing_mm": "x".join(f"{v:.3g}" for v in spacing),
           "fov_mm": "x".join(f"{n * v:.0f}" for n, v in zip(ref_img.shape[:3], spacing))}
    rows = [{"case": case, **r, **geo} for r in case_metrics(pred, ref, spacing)]
    write_rows(rows, out_tsv)
    return rows


def _fmt(v):
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def write_rows(rows: list[dict], path) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh, delimiter="\t")
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow([_fmt(r.get(c, "")) for c in COLUMNS])


def read_rows(path) -> list[dict]:
    out = []
    with open(path, newline="") as fh:
        for r in csv.DictReader(fh, delimiter="\t"):
            out.append({k: (v if k in TEXT else (float(v) if v not in ("",) else None)) for k, v in r.items()})
    return out


def _stats(vals: list[float]) -> dict:
    arr = np.array([v for v in vals if v is not None and not math.isnan(v)], float)
    undefined = len(vals) - arr.size
    if arr.size == 0:
        return {"mean": None, "sd": None, "median": None, "n": 0, "undefined": undefined}
    return {"mean": float(arr.mean()), "sd": float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
            "median": float(np.median(arr)), "n": int(arr.size), "undefined": undefined}


COUNTS = ("ref_lesions", "pred_lesions", "detected", "pred_voxels", "ref_voxels", "overlap_voxels")


def aggregate(rows: list[dict]) -> dict:
    """Per-case statistics of every metric per class, plus Dice global: 2 * sum(overlap voxels) / sum(predicted +
    reference voxels) over all cases, as LiTS pools it (voxel counts, not mL: a case with small voxels would
    otherwise weigh less than its voxels do), and the per-case Dice for plots."""
    out = {}
    for cls in ("liver", "tumour"):
        cr = [r for r in rows if r["class"] == cls]
        block = {m: _stats([r[m] for r in cr]) for m in COLUMNS[2:] if m not in COUNTS and m not in TEXT}
        total = sum(r["pred_voxels"] + r["ref_voxels"] for r in cr)
        block["dice_global"] = (2 * sum(r["overlap_voxels"] for r in cr) / total) if total else None
        block["cases"] = len(cr)
        block["dice_per_case"] = {r["case"]: r["dice"] for r in cr}
        if cls == "tumour":
            nref = sum(r["ref_lesions"] or 0 for r in cr)
            block["lesions_ref"] = int(nref)
            block["lesions_detected"] = int(sum(r["detected"] or 0 for r in cr))
            block["lesion_recall_pooled"] = (block["lesions_detected"] / nref) if nref else None
        out[cls] = block
    return out


def aggregate_files(case_tsvs: list[str], out_tsv, out_json, extra: dict | None = None) -> dict:
    rows = []
    for p in case_tsvs:
        rows.extend(read_rows(p))
    rows.sort(key=lambda r: (r["case"], r["class"]))
    write_rows(rows, out_tsv)
    geometry = {r["case"]: {k: r.get(k) or "" for k in ("spacing_mm", "fov_mm")} for r in rows}
    summary = {"aggregate": aggregate(rows), "cases": sorted({r["case"] for r in rows}), "geometry": geometry,
               **(extra or {})}
    with atomic_path(out_json) as tmp:
        Path(tmp).write_text(json.dumps(summary, indent=2) + "\n")
    return summary
