"""The experiment plan: one stored grid in millimetres for every case, read from the headers of the training cases.

As nnU-Net plans before it preprocesses, the plan fixes what the models see:

- ``spacing_mm``: in-plane mm per stored pixel; ``slices.spacing_mm: auto`` takes the median in-plane spacing of
  the training and validation cases (their headers only: no image or label is read, and no test case counts);
- ``fov_mm`` and ``size``: the stored field of view, large enough for the widest scan of those cases
  (``auto``: its largest in-plane extent), and the matrix that holds it at ``spacing_mm``, rounded up to a
  multiple of 32 (so a network fed whole slices needs no resize to a valid input);
- ``context_mm``: what ``slices.context_mm: auto`` gives, the distance between the neighbour slices a 2.5D,
  sequence (V3) or 3D-patch (V1) model sees together: the 90th percentile of the cases' slice spacings
  (context_distance), so that neighbours lie that far apart on nine scans in ten (a scan with thicker slices
  gives its direct neighbours).  Training computes the same figure from the same cases (train.stored_grid), so
  ``slices.context_mm`` is not a setting of the plan and changing it re-preprocesses nothing.

Slices are resampled in-plane only; a scan keeps its own slices along z (prediction writes every one of them).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from liverseg.config import default
from liverseg.errors import ConfigError
from liverseg.io import atomic_path

MULTIPLE = 32  # encoders downsample 5 times
CONTEXT_PERCENTILE = 90


def context_distance(slice_spacings) -> float:
    """``slices.context_mm: auto``: the 90th percentile of the slice spacings (mm).  Neighbours are picked
    round(context_mm / spacing) slices apart (geometry.z_stride): with the median, every scan thicker than the
    median would feed its direct neighbours, further apart than on the others."""
    return round(float(np.percentile(np.asarray(slice_spacings, float), CONTEXT_PERCENTILE)), 4)


def make_plan(verdicts: list[dict], cases: list[str], spacing_mm="auto", size="auto", fov_mm="auto") -> dict:
    """The plan from the check verdicts (liverseg.ingest.check_case: ``canonical_shape``/``canonical_spacing``)
    of ``cases``; explicit settings win over the ``auto`` rules in the module docstring."""
    geo = [v for v in verdicts if v.get("case") in set(cases) and v.get("ok") and v.get("canonical_spacing")]
    if not geo:
        raise ConfigError("cannot plan the stored grid: no training or validation case with a readable header")
    sp = np.array([v["canonical_spacing"] for v in geo], float)
    shp = np.array([v["canonical_shape"] for v in geo], float)
    inplane = sp[:, :2].mean(axis=1)
    extent = (sp[:, :2] * shp[:, :2]).max(axis=1)
    target = float(np.median(inplane)) if spacing_mm in (None, "auto") else float(spacing_mm)
    if not target > 0:
        raise ConfigError(f"invalid config value at 'slices.spacing_mm': {spacing_mm}")
    fov = float(extent.max()) if fov_mm in (None, "auto") else float(fov_mm)
    if size in (None, "auto"):
        n = int(math.ceil(fov / target - 1e-6))
        n = MULTIPLE * int(math.ceil(n / MULTIPLE))
    else:
        n = int(size)
    z_med = float(np.median(sp[:, 2]))
    return {
        "spacing_mm": round(target, 4),
        "size": n,
        "fov_mm": round(n * target, 1),
        "slice_spacing_mm": round(z_med, 4),
        "context_mm_auto": context_distance(sp[:, 2]),
        "cases": len(geo),
        "inplane_spacing_mm": {"median": round(float(np.median(inplane)), 4), "min": round(float(inplane.min()), 4),
                               "max": round(float(inplane.max()), 4)},
        "slice_spacing_range_mm": [round(float(sp[:, 2].min()), 4), round(float(sp[:, 2].max()), 4)],
        "largest_extent_mm": round(float(extent.max()), 1),
        "settings": {"spacing_mm": spacing_mm, "size": size, "fov_mm": fov_mm},
    }


def _with_geometry(verdict: dict, images: dict) -> dict:
    """A verdict written before verdicts recorded header geometry gets it from the image's header."""
    if not verdict.get("ok") or verdict.get("canonical_spacing") or verdict.get("case") not in images:
        return verdict
    from liverseg.io import load_nifti, geometry_of

    g = geometry_of(load_nifti(images[verdict["case"]], verdict["case"], "image"))
    return {**verdict, "canonical_shape": list(g.canonical_shape),
            "canonical_spacing": [float(v) for v in g.canonical_spacing]}


def write_plan(split_json, check_jsons, out_json, spacing_mm=default("slices.spacing_mm"),
               size=default("slices.size"), fov_mm=default("slices.fov_mm"), cases_tsv=None) -> dict:
    """`liverseg plan`: the plan of the split's training and validation cases, written atomically.  With the case
    table (`liverseg cases`), verdicts without header geometry (older files) are completed from the headers."""
    import csv

    split = json.loads(Path(split_json).read_text())
    images = {}
    if cases_tsv:
        with open(cases_tsv, newline="") as fh:
            images = {r["case_id"]: r["image"] for r in csv.DictReader(fh, delimiter="\t")}
    verdicts = [_with_geometry(json.loads(Path(p).read_text()), images) for p in check_jsons]
    cases = list(split["train"]) + list(split["val"])
    if not cases:
        # Nothing trains here (predict-only cases, models from elsewhere): plan from the cases to be segmented.
        cases = list(split.get("predict", [])) + list(split.get("test", []))
    plan = make_plan(verdicts, cases, spacing_mm, size, fov_mm)
    with atomic_path(out_json) as tmp:
        Path(tmp).write_text(json.dumps(plan, indent=2) + "\n")
    return plan


def read_plan(path) -> dict:
    try:
        plan = json.loads(Path(path).read_text())
        return {"spacing_mm": float(plan["spacing_mm"]), "size": int(plan["size"])}
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"cannot read the plan {path}: {exc}") from None


def spacing_to_fit(image_paths, size: int) -> float:
    """The mm per pixel at which the widest of these scans (headers only) fills ``size`` pixels: one shared grid
    for a set of cases without a plan file (tests, benches)."""
    import nibabel as nib

    from liverseg.io import geometry_of

    return max(geometry_of(nib.load(str(p))).inplane_extent_mm for p in image_paths) / float(size)
