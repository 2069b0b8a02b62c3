"""Kaggle aio2025liverseg submission: ``id,rle`` with one row per slice.

``id`` is ``cell_{volume}_{slice}``, slice 0-based along the NIfTI's third axis as stored; the mask is liver and
tumour together (label > 0); run-length pairs ``start length`` over the 2D mask flattened in column-major (Fortran)
order, 1-indexed; an empty slice is ``1 0``.
"""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np

from liverseg.errors import ConfigError
from liverseg.io import atomic_path


def rle_encode(mask: np.ndarray) -> str:
    flat = np.asarray(mask, bool).ravel(order="F")
    if not flat.any():
        return "1 0"
    padded = np.concatenate([[False], flat, [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])  # 0-based starts and ends (exclusive) alternate
    starts, ends = edges[0::2], edges[1::2]
    return " ".join(f"{s + 1} {e - s}" for s, e in zip(starts, ends))


def rle_decode(rle: str, shape: tuple[int, int]) -> np.ndarray:
    nums = [int(v) for v in rle.split()]
    flat = np.zeros(int(np.prod(shape)), bool)
    for start, length in zip(nums[0::2], nums[1::2]):
        flat[start - 1 : start - 1 + length] = True
    return flat.reshape(shape, order="F")


def write_submission(predictions: dict[str, str], out_csv) -> int:
    """``predictions`` maps volume id -> label NIfTI path.  Returns the number of rows written."""
    if not predictions:
        raise ConfigError("no predictions to export: the dataset has no predict-only cases (a competition's test "
                          "set); set kaggle.cases: test to export the labelled test cases instead")
    n = 0
    with atomic_path(out_csv) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "rle"])
        for vol in sorted(predictions, key=lambda s: (len(s), s)):
            data = np.asanyarray(nib.load(predictions[vol]).dataobj)
            for z in range(data.shape[2]):
                w.writerow([f"cell_{vol}_{z}", rle_encode(data[:, :, z] > 0)])
                n += 1
    return n


def read_submission(path) -> dict[str, str]:
    with open(path, newline="") as fh:
        return {r["id"]: r["rle"] for r in csv.DictReader(fh)}


