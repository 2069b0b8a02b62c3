"""Memory and time a job asks for, from the size of the volumes it reads (workflow/rules/common.smk).

A job's size is the memory its input volumes take as arrays: voxels × bytes per voxel as stored, read from the
NIfTI header (nibabel does not load the data to give shape and dtype) or from the shapes of an HDF5 file's
datasets, never from the compressed file size.  Each rule's figures come from the config (`resources:` in
workflow/schemas/config.schema.yaml):

    mem_mb  = (mem_mb + mem_per_mb × input MB) × attempt
    runtime = (runtime + runtime_per_gb × input GB) × attempt       (minutes)

``attempt`` is Snakemake's try number, so a job retried after an out-of-memory kill or a time-out asks for more.
Importable without torch (the Snakefile imports it)."""

from __future__ import annotations

import math
import os
from pathlib import Path

MB = 2**20


class MissingInput(FileNotFoundError):
    """An input that does not exist yet (made by an earlier job): Snakemake then leaves the resource to be
    determined, and evaluates it again once the file is there (before the job starts)."""

    def __init__(self, path):
        super().__init__(2, "input not made yet", str(path))


def nifti_mb(path) -> float:
    """MB of a NIfTI volume as stored (shape × dtype itemsize), from its header; a DICOM folder by the size of
    its files (pixel data is most of them).  0 for a file that cannot be read: that case's own job reports it."""
    p = Path(path)
    if not os.path.lexists(p):
        raise MissingInput(path)
    try:
        if p.is_dir():
            return sum(f.stat().st_size for f in p.iterdir() if f.is_file()) / MB
        import nibabel as nib

        img = nib.load(str(p))
        return math.prod(img.shape) * img.header.get_data_dtype().itemsize / MB
    except Exception:  # noqa: BLE001 - sizing must never stop the DAG; the case's check says what is wrong
        return 0.0


def h5_mb(path) -> float:
    """MB of an HDF5 case file's `image` and `label` arrays (liverseg.preprocess), from their shapes; the file
    size when h5py is missing or the file unreadable."""
    p = Path(path)
    if not p.exists():
        raise MissingInput(path)
    try:
        import h5py

        with h5py.File(p, "r") as f:
            return sum(math.prod(f[k].shape) * f[k].dtype.itemsize for k in ("image", "label") if k in f) / MB
    except Exception:  # noqa: BLE001 - as in nifti_mb
        return p.stat().st_size / MB


def h5_slice_mpx(path) -> float:
    """Megapixels of one stored slice of an HDF5 case file (the grid every model's batch is cut from)."""
    p = Path(path)
    if not p.exists():
        raise MissingInput(path)
    try:
        import h5py

        with h5py.File(p, "r") as f:
            return math.prod(f["image"].shape[1:]) / 1e6
    except Exception:  # noqa: BLE001 - as in nifti_mb
        return 0.0


def h5_source_mb(path) -> float:
    """MB of one uint8 volume on the scan's own grid (the HDF5 file's ``canonical_shape``), the unit of the
    optional probability (3 of them) and uncertainty (1) maps prediction fills."""
    p = Path(path)
    if not p.exists():
        raise MissingInput(path)
    try:
        import h5py

        with h5py.File(p, "r") as f:
            return math.prod(int(v) for v in f.attrs["canonical_shape"]) / MB
    except Exception:  # noqa: BLE001 - as in nifti_mb
        return 0.0


def predict_base_mb(spec: dict, batch: int, slice_mpx: float) -> float:
    """Prediction's fixed memory: the process and models (``mem_mb``) plus one batch's activations, which grow
    with the batch and the slice area, not with the number of slices (``batch_mb_per_mpx`` MB per megapixel of
    a batch)."""
    return spec["mem_mb"] + spec["batch_mb_per_mpx"] * batch * slice_mpx


def volume_mb(paths, kind: str = "nifti") -> float:
    """Summed MB of ``paths`` (one path or a list)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    size = nifti_mb if kind == "nifti" else h5_mb
    return sum(size(p) for p in paths)


def mem_mb(spec: dict, input_mb: float, attempt: int = 1, base: int | None = None) -> int:
    """``spec``: one rule's entry of the config's `resources` (``base`` replaces its mem_mb, e.g. a role's)."""
    start = spec["mem_mb"] if base is None else base
    return int(math.ceil((start + spec["mem_per_mb"] * input_mb) * max(attempt, 1)))


def runtime(spec: dict, input_mb: float, attempt: int = 1, base: int | None = None) -> int:
    start = spec["runtime"] if base is None else base
    return int(math.ceil((start + spec["runtime_per_gb"] * input_mb / 1024) * max(attempt, 1)))
