"""Read a CT DICOM series folder into a NIfTI image (RAS affine), as clinical data arrives.

pydicom reads the headers; JPEG 2000 and other compressed transfer syntaxes are decoded by the pylibjpeg plugins.
Slices are sorted by their position along the slice normal, not by file name or InstanceNumber.  A folder holding
several series gives its largest axial series that is not a localizer, unless a series UID is named.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from liverseg.errors import CaseError

log = logging.getLogger(__name__)
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def is_dicom_folder(path: str | Path) -> bool:
    p = Path(path)
    if not p.is_dir():
        return False
    for f in sorted(p.iterdir())[:20]:
        if f.is_file():
            try:
                with open(f, "rb") as fh:
                    fh.seek(128)
                    if fh.read(4) == b"DICM":
                        return True
            except OSError:
                continue
    return False


def _is_localizer(ds) -> bool:
    return any("LOCALIZER" in str(v).upper() for v in (getattr(ds, "ImageType", None) or []))


def _is_axial(ds) -> bool:
    """The slice normal is closest to the patient's head-foot axis."""
    iop = np.array(ds.ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    return int(np.argmax(np.abs(normal))) == 2


@dataclass
class Series:
    """One series' slices sorted along their normal (the third voxel axis of read_series), with the affine
    (RAS) that read_series gives its volume."""

    uid: str
    items: list  # [(file, header dataset)] in slice order
    affine: np.ndarray
    rows: int
    cols: int


def _describe(series: dict) -> str:
    return "; ".join(f"{uid or '(no uid)'}: {len(v)} slices" for uid, v in series.items())


def select_series(folder: str | Path, case: str, series_uid: str | None = None) -> Series:
    """The slices of one series in ``folder``, sorted, with its geometry.

    Without ``series_uid``: the largest axial series that is not a localizer (scout), else the largest series
    with positions.  A series without ImagePositionPatient / ImageOrientationPatient / PixelSpacing cannot be
    placed in space and is refused with one line."""
    import pydicom

    folder = Path(folder)
    series: dict[str, list] = {}
    unplaced: dict[str, int] = {}
    for f in sorted(folder.iterdir()):
        if not f.is_file() or f.name.startswith("."):
            continue
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - non-DICOM files in the folder are ignored
            continue
        uid = str(getattr(ds, "SeriesInstanceUID", ""))
        if "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds and "PixelSpacing" in ds:
            series.setdefault(uid, []).append((f, ds))
        else:
            unplaced[uid] = unplaced.get(uid, 0) + 1
    if series_uid is not None:
        if series_uid not in series:
            if series_uid in unplaced:
                raise CaseError(case, f"DICOM series {series_uid} in {folder} has no ImagePositionPatient/"
                                      "ImageOrientationPatient/PixelSpacing: it cannot be placed in space")
            raise CaseError(case, f"no DICOM series {series_uid} in {folder} (series with positions: "
                                  f"{_describe(series) or 'none'})")
        uid = series_uid
    else:
        if not series:
            raise CaseError(case, f"no DICOM image slices with position and orientation in {folder}")
        usable = {u: v for u, v in series.items() if not any(_is_localizer(ds) for _, ds in v)} or series
        axial = {u: v for u, v in usable.items() if _is_axial(v[0][1])} or usable
        uid = max(axial, key=lambda u: len(axial[u]))
        if len(series) > 1:
            log.warning("case %s: %d series in %s (%s); using the largest axial non-localizer one, %s "
                        "(choose another with --series-uid)", case, len(series), folder, _describe(series), uid)
    items = series[uid]
    iop = np.array(items[0][1].ImageOrientationPatient, float)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    pos = np.array([np.array(ds.ImagePositionPatient, float) for _, ds in items])
    order = np.argsort(pos @ normal)
    items = [items[i] for i in order]
    pos = pos[order]
    if len(items) > 1:
        gaps = np.diff(pos @ normal)
        if np.any(gaps <= 1e-4):
            raise CaseError(case, f"DICOM series in {folder} has slices at duplicate positions")
        if np.ptp(gaps) > 0.01 * np.median(gaps) + 1e-3:
            raise CaseError(case, f"DICOM series in {folder} has non-uniform slice spacing ({gaps.min():.3f}..{gaps.max():.3f} mm)")
        step = (pos[-1] - pos[0]) / (len(items) - 1)
    else:
        step = normal * float(getattr(items[0][1], "SliceThickness", 1.0) or 1.0)
    dr, dc = (float(v) for v in items[0][1].PixelSpacing)  # between rows, between columns
    # voxel (i, j, k) = (column, row, slice): the row direction advances with the column index.
    aff = np.eye(4)
    aff[:3, 0] = row_dir * dc
    aff[:3, 1] = col_dir * dr
    aff[:3, 2] = step
    aff[:3, 3] = pos[0]
    return Series(uid, items, _LPS_TO_RAS @ aff, int(items[0][1].Rows), int(items[0][1].Columns))


def read_series(folder: str | Path, case: str, series_uid: str | None = None) -> nib.Nifti1Image:
    import pydicom

    s = select_series(folder, case, series_uid)
    rows, cols = s.rows, s.cols
    slices = []
    integer = True
    for f, _ in s.items:
        ds = pydicom.dcmread(f)
        try:
            px = ds.pixel_array
        except Exception as exc:  # noqa: BLE001 - decoder missing or broken pixel data
            raise CaseError(case, f"cannot decode pixel data of {f}: {str(exc).splitlines()[0][:160]}") from None
        if px.shape != (rows, cols):
            raise CaseError(case, f"DICOM slice {f} has shape {px.shape}, expected {(rows, cols)}")
        slope = float(getattr(ds, "RescaleSlope", 1) or 1)
        inter = float(getattr(ds, "RescaleIntercept", 0) or 0)
        integer &= slope.is_integer() and inter.is_integer()
        slices.append(px.astype(np.float32) * slope + inter)
    vol = np.stack([sl.T for sl in slices], axis=-1)
    vol = vol.astype(np.int16) if integer and vol.min() >= -32768 and vol.max() <= 32767 else vol.astype(np.float32)
    img = nib.Nifti1Image(vol, s.affine)
    img.set_qform(s.affine, code=1)
    img.set_sform(s.affine, code=1)
    return img
