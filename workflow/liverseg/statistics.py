"""Liver and tumour figures of one predicted case, for people who read them: volumes, tumour count and burden, HU.

Definitions (also in the README's "Using the results"):
- ``liver_ml``: the whole liver, labels 1 and 2 (tumour is inside the liver), voxel count x voxel volume.
- ``tumour_count``: 3D connected components of label 2 with 26-connectivity (faces, edges and corners touch);
  ``tumour_volumes_ml`` lists them largest first, ``tumour_ml`` is their sum.
- ``tumour_burden_pct``: 100 x tumour_ml / liver_ml (null without liver).
- ``parenchyma_hu_*``: mean and population sd (ddof 0) of the source image in HU over label 1 (liver without
  tumour); ``tumour_hu_*`` over label 2; null when the label is absent.
- ``spacing_mm``: voxel size along the scan's stored axes; ``models``: the model files, their sha256 prefix and
  the config_hash of their model.json (what training read).

Layers: array (label_statistics) -> case (case_statistics, files in) -> folder (write_table, collect).  No PyTorch:
runs in the imaging environment.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import cc3d
import numpy as np

from liverseg import __version__
from liverseg.errors import CaseError
from liverseg.io import atomic_path, content_sha256, geometry_of, load_nifti, read_labels, read_raw

log = logging.getLogger(__name__)
CONNECTIVITY = 26
COLUMNS = ["case", "liver_ml", "tumour_count", "tumour_ml", "tumour_burden_pct", "tumour_volumes_ml",
           "parenchyma_hu_mean", "parenchyma_hu_sd", "tumour_hu_mean", "tumour_hu_sd", "spacing_mm", "models"]


def _mean_sd(values: np.ndarray, slope: float, inter: float) -> tuple[float | None, float | None]:
    if values.size == 0:
        return None, None
    v = values.astype(np.float64) * slope + inter
    return float(v.mean()), float(v.std())


def label_statistics(labels: np.ndarray, hu: np.ndarray, spacing, slope: float = 1.0, inter: float = 0.0) -> dict:
    """Figures of one label volume (0 background, 1 liver, 2 tumour) on the grid of ``hu`` with voxel ``spacing``
    (mm); see the module docstring for each key.  ``hu`` may be the stored values with their NIfTI scaling
    (``slope``, ``inter``), applied only to the voxels inside the labels, not to a copy of the volume."""
    if labels.shape != hu.shape:
        raise ValueError(f"labels {labels.shape} and image {hu.shape} are not on one grid")
    voxel_ml = float(np.prod([float(s) for s in spacing])) / 1000.0
    liver = labels >= 1
    tumour = labels == 2
    liver_ml = int(liver.sum()) * voxel_ml
    comps, n = cc3d.connected_components(tumour.astype(np.uint8), connectivity=CONNECTIVITY, return_N=True)
    sizes = np.bincount(comps.ravel(), minlength=n + 1)[1:] if n else np.zeros(0, np.int64)
    volumes = sorted((int(c) * voxel_ml for c in sizes), reverse=True)
    tumour_ml = int(tumour.sum()) * voxel_ml
    p_mean, p_sd = _mean_sd(hu[labels == 1], slope, inter)
    t_mean, t_sd = _mean_sd(hu[tumour], slope, inter)
    return {
        "liver_ml": liver_ml, "tumour_count": int(n), "tumour_ml": tumour_ml,
        "tumour_burden_pct": 100.0 * tumour_ml / liver_ml if liver_ml > 0 else None,
        "tumour_volumes_ml": volumes, "parenchyma_hu_mean": p_mean, "parenchyma_hu_sd": p_sd,
        "tumour_hu_mean": t_mean, "tumour_hu_sd": t_sd, "spacing_mm": [float(s) for s in spacing],
        "voxel_ml": voxel_ml, "connectivity": CONNECTIVITY,
    }


def model_versions(models: dict | None) -> list[dict]:
    """``{role: [model.pt, ...]}`` -> what identifies each file: its path, the first 16 hex digits of its sha256
    and the config_hash (and role) recorded in the model.json beside it."""
    out = []
    for role, paths in (models or {}).items():
        for p in paths if isinstance(paths, (list, tuple)) else [paths]:
            p = Path(p)
            spec_path = p.with_suffix(".json")
            try:
                spec = json.loads(spec_path.read_text())
            except (OSError, ValueError):
                spec = {}
            out.append({"role": role, "file": str(p), "sha256": content_sha256(p)[:16],
                        "config_hash": spec.get("config_hash", "")})
    return out


def case_statistics(case: str, image_path, pred_path, models: dict | None = None) -> dict:
    """Figures of one prediction (a label NIfTI on the scan's grid) against its source image (NIfTI file or
    DICOM series folder) in HU."""
    img = load_nifti(image_path, case, "image")
    pred = load_nifti(pred_path, case, "prediction")
    if img.shape[:3] != pred.shape[:3] or not np.allclose(img.affine, pred.affine, atol=1e-3):
        raise CaseError(case, f"prediction {pred_path} is not on the grid of image {image_path} "
                              f"(shapes {pred.shape[:3]} and {img.shape[:3]})")
    raw, slope, inter = read_raw(img, case, image_path)
    labels = read_labels(pred)
    if labels.max(initial=0) > 2:
        raise CaseError(case, f"prediction {pred_path} holds label values above 2")
    stats = {"case": case, **label_statistics(labels, raw, geometry_of(img).spacing, slope, inter),
             "models": model_versions(models), "liverseg_version": __version__}
    log.info("case %s: liver %.1f mL, %d tumour(s), %.1f mL", case, stats["liver_ml"], stats["tumour_count"],
             stats["tumour_ml"])
    return stats


def write_json(stats: dict, path) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(stats, indent=2) + "\n")


def _cell(key: str, value) -> str:
    if value is None:
        return ""
    if key == "tumour_volumes_ml":
        return ";".join(f"{v:.3f}" for v in value)
    if key == "spacing_mm":
        return "x".join(f"{v:.4g}" for v in value)
    if key == "models":
        return ";".join(f"{m['role']}:{m['sha256']}:{m['config_hash']}" for m in value)
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def write_table(rows: list[dict], path, extra: tuple[str, ...] = ()) -> None:
    """One TSV row per case (COLUMNS, with ``extra`` columns such as experiment first)."""
    cols = [*extra, *COLUMNS]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh, delimiter="\t", lineterminator="\n")
        w.writerow(cols)
        for r in rows:
            w.writerow([_cell(c, r.get(c)) for c in cols])


def collect(json_paths: list, out_tsv) -> int:
    """Per-case statistics JSON files -> one TSV (the workflow's results/report/statistics.tsv), in the order
    given; a file's ``experiment`` key becomes the first column."""
    rows = [json.loads(Path(p).read_text()) for p in json_paths]
    write_table(rows, out_tsv, extra=("experiment",))
    return len(rows)
