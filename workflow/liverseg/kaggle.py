"""Kaggle aio2025liverseg submission: ``id,rle`` with one row per slice.

``id`` is ``cell_{volume}_{slice}``, slice 0-based along the NIfTI's third axis as stored; the mask is liver and
tumour together (label > 0); run-length pairs ``start length`` over the 2D mask flattened in column-major (Fortran)
order, 1-indexed; an empty slice is ``1 0``.
"""

from __future__ import annotations

import csv
import logging

import nibabel as nib
import numpy as np

from liverseg.errors import ConfigError
from liverseg.io import atomic_path

log = logging.getLogger(__name__)


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


def _volume_key(vol: str):
    return (0, int(vol), vol) if vol.isdigit() else (1, 0, vol)


def _parse_id(sample_id: str) -> tuple[str, int] | None:
    head, _, z = sample_id.rpartition("_")
    if not head.startswith("cell_") or not (z.isascii() and z.isdigit()):
        return None
    return head[len("cell_"):], int(z)


def write_submission(predictions: dict[str, str], out_csv, sample=None) -> int:
    """``predictions`` maps volume id -> label NIfTI path.  Returns the number of rows written.

    With ``sample`` (the competition's sample_submission.csv) the rows follow its ids and order exactly, and a
    sample id without a prediction is an error; without it, every slice of every volume, volumes by their number.
    """
    if not predictions:
        raise ConfigError("no predictions to export: the dataset has no predict-only cases (a competition's test "
                          "set); set kaggle.cases: test to export the labelled test cases instead")
    if sample:
        with open(sample, newline="", encoding="utf-8-sig") as fh:  # a spreadsheet may have added a BOM
            reader = csv.DictReader(fh)
            if "id" not in (reader.fieldnames or []):
                raise ConfigError(f"sample submission {sample} has no 'id' column")
            ids = [r["id"] for r in reader]
        if not ids:
            raise ConfigError(f"sample submission {sample} lists no ids")
    else:
        ids = None
    n = 0
    with atomic_path(out_csv) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "rle"])
        if ids is None:
            for vol in sorted(predictions, key=_volume_key):
                data = np.asanyarray(nib.load(predictions[vol]).dataobj)
                for z in range(data.shape[2]):
                    w.writerow([f"cell_{vol}_{z}", rle_encode(data[:, :, z] > 0)])
                    n += 1
            return n
        loaded, data = None, None
        for sample_id in ids:
            parsed = _parse_id(sample_id)
            if parsed is None:
                raise ConfigError(f"sample submission {sample}: id {sample_id!r} is not cell_<volume>_<slice>")
            vol, z = parsed
            if vol not in predictions:
                raise ConfigError(f"sample submission id {sample_id} has no prediction: volume {vol} was not "
                                  f"predicted (predicted: {', '.join(sorted(predictions, key=_volume_key)[:10])})")
            if vol != loaded:
                loaded, data = vol, np.asanyarray(nib.load(predictions[vol]).dataobj)
            if z >= data.shape[2]:
                raise ConfigError(f"sample submission id {sample_id} has no prediction: volume {vol} has "
                                  f"{data.shape[2]} slices")
            w.writerow([sample_id, rle_encode(data[:, :, z] > 0)])
            n += 1
        unused = sorted(set(predictions) - {p[0] for p in map(_parse_id, ids) if p}, key=_volume_key)
        if unused:
            log.warning("predicted volumes not in the sample submission (not exported): %s", ", ".join(unused))
    return n


def read_submission(path) -> dict[str, str]:
    with open(path, newline="") as fh:
        return {r["id"]: r["rle"] for r in csv.DictReader(fh)}


