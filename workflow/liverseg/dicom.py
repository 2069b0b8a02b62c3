"""Read a CT DICOM series folder into a NIfTI image (RAS affine), as clinical data arrives.

pydicom reads the headers; JPEG 2000 and other compressed transfer syntaxes are decoded by the pylibjpeg plugins.
Slices are sorted by their position along the slice normal, not by file name or InstanceNumber.
"""

from __future__ import annotations

import logging
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


def read_series(folder: str | Path, case: str) -> nib.Nifti1Image:
    import pydicom

    folder = Path(folder)
    headers = []
    for f in sorted(folder.iterdir()):
        if not f.is_file() or f.name.startswith("."):
            continue
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - non-DICOM files in the folder are ignored
            continue
        if "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds and "PixelSpacing" in ds:
            headers.append((f, ds))
    if not headers:
        raise CaseError(case, f"no DICOM image slices with position and orientation in {folder}")
    series = {}
    for f, ds in headers:
        series.setdefault(str(getattr(ds, "SeriesInstanceUID", "")), []).append((f, ds))
    uid, items = max(series.items(), key=lambda kv: len(kv[1]))
    if len(series) > 1:
        log.warning("case %s: %d series in %s; using the largest (%d slices)", case, len(series), folder, len(items))
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
    rows, cols = int(items[0][1].Rows), int(items[0][1].Columns)
    slices = []
    integer = True
    for f, _ in items:
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
    # voxel (i, j, k) = (column, row, slice): the row direction advances with the column index.
    vol = np.stack([s.T for s in slices], axis=-1)
    vol = vol.astype(np.int16) if integer and vol.min() >= -32768 and vol.max() <= 32767 else vol.astype(np.float32)
    aff = np.eye(4)
    aff[:3, 0] = row_dir * dc
    aff[:3, 1] = col_dir * dr
    aff[:3, 2] = step
    aff[:3, 3] = pos[0]
    aff = _LPS_TO_RAS @ aff
    img = nib.Nifti1Image(vol, aff)
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=1)
    return img
