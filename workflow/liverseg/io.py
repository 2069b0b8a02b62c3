"""NIfTI and HDF5 input/output.  Arrays always travel with the geometry needed to write results back.

Conventions used across the package:
- "canonical" means the closest RAS+ orientation of the stored voxel grid (nibabel's ``io_orientation``); only
  axis flips and permutations are applied, never resampling, so the inverse is exact.
- Slices are taken along the canonical third axis (inferior -> superior).  A slice array is (H, W) =
  (canonical y, canonical x), i.e. ``canonical[:, :, z].T``.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, io_orientation, ornt_transform

from isal import igzip, isal_zlib  # .nii.gz files are read through ISA-L (load_nifti)

from liverseg.errors import CaseError

# Reading a truncated or corrupt file surfaces as any of these, depending on where the damage is.
_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, isal_zlib.error, gzip.BadGzipFile,
                nib.filebasedimages.ImageFileError)


@dataclass(frozen=True)
class Geometry:
    """What is needed to put a canonical-orientation array back onto the original voxel grid."""

    shape: tuple[int, int, int]
    affine: np.ndarray
    ornt: np.ndarray  # nibabel orientation transform original -> canonical

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size (mm) along the original axes."""
        return tuple(float(v) for v in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))

    @property
    def canonical_spacing(self) -> tuple[float, float, float]:
        sp = self.spacing
        return tuple(sp[int(ax)] for ax in np.argsort(self.ornt[:, 0]))

    @property
    def canonical_shape(self) -> tuple[int, int, int]:
        return tuple(int(self.shape[int(ax)]) for ax in np.argsort(self.ornt[:, 0]))

    @property
    def inplane_extent_mm(self) -> float:
        """The scan's larger in-plane side in mm (canonical x or y): what a field of view must hold."""
        return max(n * s for n, s in zip(self.canonical_shape[:2], self.canonical_spacing[:2]))

    @property
    def axcodes(self) -> str:
        return "".join(nib.aff2axcodes(self.affine))

    def to_canonical(self, arr: np.ndarray) -> np.ndarray:
        return apply_orientation(arr, self.ornt)

    def from_canonical(self, arr: np.ndarray) -> np.ndarray:
        back = ornt_transform(_RAS, self.ornt_of_original())
        return apply_orientation(arr, back)

    def ornt_of_original(self) -> np.ndarray:
        return io_orientation(self.affine)


_RAS = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)


def geometry_of(img: nib.Nifti1Image) -> Geometry:
    affine = np.asarray(img.affine, dtype=np.float64)
    ornt = ornt_transform(io_orientation(affine), _RAS)
    return Geometry(tuple(int(s) for s in img.shape[:3]), affine, ornt)


def load_nifti(path: str | os.PathLike, case: str, what: str = "image") -> nib.Nifti1Image:
    """Open a NIfTI file, turning every way it can be unusable into a CaseError naming the case."""
    p = Path(path)
    if not p.exists():
        raise CaseError(case, f"{what} file does not exist: {p}")
    if p.is_dir():
        from liverseg.dicom import is_dicom_folder, read_series

        if not is_dicom_folder(p):
            raise CaseError(case, f"{what} path is a folder without DICOM files: {p}")
        return read_series(p, case)
    if not p.is_file():
        raise CaseError(case, f"{what} path is not a regular file: {p}")
    try:
        # keep_file_open: slab readers (read_labels) then stream a .nii.gz once instead of decompressing it
        # from its start for every slab
        img = nib.load(str(p), keep_file_open=True)
        if p.name.endswith(".gz") and isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            # The same image read through ISA-L's gzip (isal): half the CPU time of the standard library's zlib,
            # which nibabel uses, for the same bytes (BENCHMARKS.md, issue 12); the file stays open for the
            # image's lifetime, as keep_file_open does.
            img = type(img).from_stream(igzip.open(p, "rb"))
    except _READ_ERRORS as exc:
        raise CaseError(case, f"cannot read {what} {p}: {type(exc).__name__}: {_short(exc)}") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise CaseError(case, f"{what} {p} is not NIfTI ({type(img).__name__})")
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        img = img.slicer[..., 0]
        shape = img.shape
    if len(shape) != 3:
        raise CaseError(case, f"{what} {p} has {len(shape)} dimensions {tuple(shape)}; a 3D volume is required")
    if min(shape) == 0:
        raise CaseError(case, f"{what} {p} is empty (shape {tuple(shape)})")
    return img


# Voxels read at once by the slab readers, along the stored last axis (contiguous on disk: NIfTI is Fortran
# order): a slab's float64 temporaries stay at 8 MiB, a few percent of a LiTS-sized volume (8 slices at 512 x 512).
SLAB_VOXELS = 1 << 20


def slabs(shape):
    """Slices of the last axis of a volume of ``shape``, SLAB_VOXELS voxels (at least one slice) at a time."""
    step = max(1, SLAB_VOXELS // max(1, int(np.prod(shape[:-1]))))
    for z0 in range(0, shape[-1], step):
        yield slice(z0, min(shape[-1], z0 + step))


def read_raw(img: nib.Nifti1Image, case: str, path, what: str = "image") -> tuple[np.ndarray, float, float]:
    """Voxel data plus the NIfTI scaling, so no float64 copy of the volume is made: types of up to 4 bytes
    (int16, uint16, float32, ...) come back in their stored dtype, unscaled; 8-byte types (float64, int64) are
    read slab by slab into float32 with the scaling applied (slope 1, intercept 0 returned), since a float64
    volume is 4x its int16 size (issue 13)."""
    if isinstance(img.dataobj, np.ndarray):  # an in-memory image (e.g. read from DICOM): already scaled
        return img.dataobj, 1.0, 0.0
    try:
        stored = img.get_data_dtype()
        if stored.itemsize <= 4 or stored.kind not in "iuf":
            raw = np.asanyarray(img.dataobj.get_unscaled())
        else:
            raw = np.empty(img.shape, np.float32, order="F")
            for sl in slabs(img.shape):
                raw[..., sl] = np.asanyarray(img.dataobj[..., sl])  # scaled per slab (float64 only here)
            return raw, 1.0, 0.0
    except _READ_ERRORS as exc:
        raise CaseError(case, f"cannot read {what} {path} (truncated or corrupt?): {_short(exc)}") from None
    slope = img.dataobj.slope
    inter = img.dataobj.inter
    slope = 1.0 if slope is None or not np.isfinite(slope) or slope == 0 else float(slope)
    inter = 0.0 if inter is None or not np.isfinite(inter) else float(inter)
    return raw, slope, inter


LABEL_CLASSES = "0 (bg), 1 (liver), 2 (tumour)"


def read_labels(img: nib.Nifti1Image, case: str | None = None, path=None, what: str = "label") -> np.ndarray:
    """A label volume as uint8, read slab by slab along the stored last axis: integer data is cast per slab and
    never goes through float, float (or scaled) data is rounded per slab, so no whole-volume float copy exists
    whatever the stored dtype (int16, uint16, float32 or float64 labels are common in LiTS; issue 13).

    With ``case``, the values are checked (integers in {0, 1, 2}; CaseError, one line, otherwise: a non-integer
    value anywhere wins over values out of range) and read errors become a CaseError naming the case.  Without
    it (predictions, references already checked) floats are rounded and cast as they are."""
    out = np.empty(img.shape[:3], np.uint8, order="F")
    bad: set[int] = set()
    try:
        for sl in slabs(out.shape):
            v = np.asanyarray(img.dataobj[..., sl])  # scaled by nibabel when the header says so
            if v.dtype.kind == "f":
                # float32, as the check always ran: a float64 label's rounding noise below float32 resolution passes
                v = v.astype(np.float32, copy=False)
                if case is not None and (not np.isfinite(v).all() or not np.array_equal(v, np.round(v))):
                    raise CaseError(case, f"label holds non-integer values; expected integers {LABEL_CLASSES}")
                v = np.rint(v)
            elif v.dtype.kind not in "iub" and case is not None:
                raise CaseError(case, f"{what} {path} has unsupported data type {v.dtype}")
            if case is not None and v.dtype.kind != "b" and v.size and (v.min() < 0 or v.max() > 2):
                bad.update(np.unique(v[(v < 0) | (v > 2)]).astype(np.int64).tolist())
            out[..., sl] = v
    except _READ_ERRORS as exc:
        if case is None:
            raise
        raise CaseError(case, f"cannot read {what} {path} (truncated or corrupt?): {_short(exc)}") from None
    if bad:
        raise CaseError(case, f"label values {sorted(bad)[:5]} outside {{0, 1, 2}} (0 bg, 1 liver, 2 tumour)")
    return out


def _short(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary sibling path; rename it onto ``path`` only if the block succeeds.

    A job that dies half-way leaves at most a ``.tmp`` file, never an output that looks finished.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_nifti_like(arr: np.ndarray, geometry: Geometry, path, dtype=np.uint8) -> None:
    """Write a canonical-orientation array onto the original grid and affine of ``geometry``."""
    back = np.ascontiguousarray(geometry.from_canonical(arr)).astype(dtype, copy=False)
    if back.shape != geometry.shape:
        raise ValueError(f"array shape {back.shape} does not match the original grid {geometry.shape}")
    img = nib.Nifti1Image(back, geometry.affine)
    img.set_qform(geometry.affine, code=1)
    img.set_sform(geometry.affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


# Probability-like maps (class probabilities, uncertainty in [0, 1]) are stored as uint8 k meaning k / 255:
# a quarter of float32's size, resolution 0.004, read back as floats by any NIfTI reader (scl_slope).
UNIT_SLOPE = 1.0 / 255.0


def quantise_unit(x) -> np.ndarray:
    """Values in [0, 1] -> uint8 k with k / 255 the nearest step (what save_unit_nifti stores)."""
    return np.clip(np.rint(np.asarray(x, np.float32) * 255.0), 0, 255).astype(np.uint8)


def save_unit_nifti(arr: np.ndarray, geometry: Geometry, path) -> None:
    """A canonical-orientation uint8 map (3D, or 4D with a trailing axis such as the class) from quantise_unit ->
    the original grid and affine, with scl_slope 1/255 so readers see values in [0, 1]."""
    if arr.dtype != np.uint8:
        raise ValueError(f"expected quantised uint8 values, got {arr.dtype}")
    back = np.ascontiguousarray(geometry.from_canonical(arr))
    if back.shape[:3] != tuple(geometry.shape):
        raise ValueError(f"array shape {back.shape} does not match the original grid {geometry.shape}")
    img = nib.Nifti1Image(back, geometry.affine)
    img.set_qform(geometry.affine, code=1)
    img.set_sform(geometry.affine, code=1)
    img.header.set_slope_inter(UNIT_SLOPE, 0.0)  # kept on save: nibabel rescales only when no slope is set
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def content_sha256(path) -> str:
    """sha256 of a file's bytes, or of a folder's files (sorted by relative path, names included); "" if absent.

    Recorded at preprocessing so that training can tell a corrected label under the same case id from the old
    one without re-reading whole arrays."""
    import hashlib

    p = Path(path) if path is not None else None
    if p is None or not p.exists():
        return ""
    h = hashlib.sha256()
    files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
    for q in files:
        if p.is_dir():
            h.update(str(q.relative_to(p)).encode() + b"\0")
        with open(q, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
