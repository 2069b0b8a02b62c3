"""Slice geometry shared by training, inference, post-processing and metrics: boxes, tiles, paste-back, context.

Boxes are tuples of ``slice`` objects (one per axis, half-open), so ``array[box]`` crops and ``out[box] = x``
pastes back.  ``region`` is the 2D form (r0, r1, c0, c1) that model B's tiling uses on the stored S x S grid.
Numpy only: no torch, no h5py, so every stage can import it.
"""

from __future__ import annotations

import numpy as np


def bbox(mask: np.ndarray, pad: int = 0) -> tuple[slice, ...] | None:
    """Tight bounding box of a mask of any rank, grown by ``pad`` voxels and clipped to the array; None when the
    mask is empty.  Computed from axis projections (no argwhere over the volume)."""
    out = []
    for ax in range(mask.ndim):
        other = tuple(i for i in range(mask.ndim) if i != ax)
        idx = np.flatnonzero(mask.any(axis=other)) if other else np.flatnonzero(mask)
        if idx.size == 0:
            return None
        out.append(slice(max(0, int(idx[0]) - pad), min(mask.shape[ax], int(idx[-1]) + 1 + pad)))
    return tuple(out)


def region_of(box: tuple[slice, ...]) -> tuple[int, int, int, int]:
    """The in-plane (last two axes) bounds (r0, r1, c0, c1) of a box."""
    r, c = box[-2], box[-1]
    return r.start, r.stop, c.start, c.stop


def grow(region, margin: int) -> tuple[int, int, int, int]:
    """(r0, r1, c0, c1) grown by ``margin`` on each side (not clipped: tile_region clips)."""
    r0, r1, c0, c1 = region
    return r0 - margin, r1 + margin, c0 - margin, c1 + margin


def tile_region(box, size: int, patch: int) -> tuple[int, int, int, int]:
    """Clip a region (r0, r1, c0, c1) to the S x S grid and grow it to at least ``patch`` per side (about its
    centre, kept inside the slice when the slice is large enough): the region a fixed-scale crop model predicts."""
    out = []
    for a0, a1 in ((box[0], box[1]), (box[2], box[3])):
        a0, a1 = max(0, int(a0)), min(size, int(a1))
        if a1 - a0 < patch:
            c = (a0 + a1) // 2
            a0 = c - patch // 2
            a0 = min(max(0, a0), max(0, size - patch))
            a1 = min(size, a0 + patch)
        out += [a0, a1]
    return tuple(out)


def patch_grid(n: int, patch: int) -> list[int]:
    """Patch origins along one axis: stride patch/2, last patch flush with the end (or 0 if the axis is short)."""
    if n <= patch:
        return [0]
    starts = list(range(0, n - patch + 1, max(1, patch // 2)))
    if starts[-1] != n - patch:
        starts.append(n - patch)
    return starts


def crop_padded(array: np.ndarray, r0: int, c0: int, patch: int, fill=0) -> np.ndarray:
    """``array[..., r0:r0+patch, c0:c0+patch]`` padded with ``fill`` where the patch runs past the array's end."""
    src = array[..., r0 : r0 + patch, c0 : c0 + patch]
    out = np.full(array.shape[:-2] + (patch, patch), fill, dtype=array.dtype)
    out[..., : src.shape[-2], : src.shape[-1]] = src
    return out


def paste(dst, src, region) -> None:
    """Write ``src`` (..., h, w) into ``dst`` at ``region`` (r0, r1, c0, c1); works for numpy and torch."""
    r0, r1, c0, c1 = region
    dst[..., r0:r1, c0:c1] = src


def context_indices(z: int, n_slices: int, context: int, stride: int = 1) -> list[int]:
    """Neighbour slice indices z - context*stride .. z + context*stride in steps of ``stride`` (z_stride: the
    neighbours lie a fixed distance in mm apart), repeating the edge slice beyond the volume."""
    return [min(max(z + d * stride, 0), n_slices - 1) for d in range(-context, context + 1)]


def z_range(present: np.ndarray, margin: int) -> tuple[int, int] | None:
    """(z0, z1) half-open span of the True entries of ``present`` grown by ``margin`` and clipped; None if none."""
    zs = np.flatnonzero(present)
    if zs.size == 0:
        return None
    return max(0, int(zs[0]) - margin), min(len(present), int(zs[-1]) + 1 + margin)


# ---------------------------------------------------------------------------------------------- millimetres
def mm_to_slices(mm: float, z_mm: float | None) -> int:
    """Whole slices that cover ``mm`` along z at slice spacing ``z_mm`` (rounded up: a margin in mm is never
    cut short): 10 mm is 2 slices of 5 mm and 10 of 1 mm; 0 mm is none.  Without a spacing, 1 slice per mm."""
    if mm <= 0:
        return 0
    if not z_mm or z_mm <= 0:
        return int(np.ceil(mm))
    return int(np.ceil(float(mm) / float(z_mm) - 1e-6))


def resampled_shape(shape_hw, spacing_hw, target: float) -> tuple[int, int]:
    """(rows, cols) of a slice of ``shape_hw`` pixels at ``spacing_hw`` mm once resampled to ``target`` mm."""
    return tuple(max(1, int(round(n * float(s) / float(target)))) for n, s in zip(shape_hw, spacing_hw))


def placement(size: int, offset, shape_hw) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """Where a resampled slice of ``shape_hw`` lands on the S x S stored grid when its pixel (0, 0) sits at stored
    pixel ``offset`` (may be negative): (stored rows/cols, resampled rows/cols) of the overlap.  The same slices
    place the image forward and pick the probabilities back, so the two directions cannot disagree."""
    dst, src = [], []
    for off, n in zip(offset, shape_hw):
        lo, hi = max(0, int(off)), min(size, int(off) + int(n))
        hi = max(hi, lo)
        dst.append(slice(lo, hi))
        src.append(slice(lo - int(off), hi - int(off)))
    return tuple(dst), tuple(src)


def centring_offset(size: int, centre_rc) -> tuple[int, int]:
    """Offset that puts the resampled pixel ``centre_rc`` (the body's centre) at the stored grid's centre, so
    every case shows the body in the same place; what falls outside the grid is beyond the planned field of view."""
    return tuple(int(round(size / 2 - 0.5 - float(c))) for c in centre_rc)


def z_stride(context_mm: float | None, z_mm: float | None) -> int:
    """Slices between 2.5D neighbours (and between the slices of a V3 sequence or a V1 patch) so that they lie
    about ``context_mm`` apart whatever the scan's slice spacing: 1 mm slices with 5 mm context -> 5, 5 mm -> 1."""
    if not context_mm or not z_mm:
        return 1
    return max(1, int(round(float(context_mm) / float(z_mm))))
