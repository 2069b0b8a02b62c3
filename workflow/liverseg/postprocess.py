"""Post-processing of a label volume: keep the largest 3D liver component, drop tumour outside it, optional
minimum lesion volume and hole filling.

All connected-component work happens inside the bounding box of the foreground: on a CT volume the liver fills
a few percent of the grid, so cropping first is what makes this fast (the library, cc3d, helps less than the
crop does; see BENCHMARKS.md).
"""

from __future__ import annotations

import logging

import cc3d
import nibabel as nib
import numpy as np
from scipy import ndimage

from liverseg.config import default
from liverseg.errors import CaseError
from liverseg.geometry import bbox
from liverseg.io import atomic_path, load_nifti, read_labels

log = logging.getLogger(__name__)


def largest_component(mask: np.ndarray, connectivity: int = default("postprocess.connectivity")) -> np.ndarray:
    """Boolean mask of the largest connected component of ``mask`` (empty in, empty out)."""
    out = np.zeros(mask.shape, bool)
    box = bbox(mask)
    if box is None:
        return out
    crop = np.ascontiguousarray(mask[box], dtype=np.uint8)
    out[box] = cc3d.largest_k(crop, k=1, connectivity=connectivity) > 0
    return out


def postprocess_labels(labels: np.ndarray, spacing=(1.0, 1.0, 1.0), connectivity: int = default("postprocess.connectivity"),
                       min_lesion_mm3: float = 0.0, fill_holes: bool = False) -> np.ndarray:
    """LiTS labels in (0 bg, 1 liver, 2 tumour), same out; see the module docstring."""
    liver = largest_component(labels >= 1, connectivity)
    out = np.zeros(labels.shape, np.uint8)
    box = bbox(liver)
    if box is None:
        return out
    sub = labels[box]
    keep = liver[box]
    if fill_holes:
        keep = ndimage.binary_fill_holes(keep)
    res = np.where(keep, np.maximum(sub, 1), 0).astype(np.uint8)
    if min_lesion_mm3 > 0:
        voxel_mm3 = float(np.prod(spacing))
        comps, n = cc3d.connected_components(res == 2, connectivity=connectivity, return_N=True)
        if n:
            sizes = np.bincount(comps.ravel())
            small = np.flatnonzero(sizes * voxel_mm3 < min_lesion_mm3)
            small = small[small > 0]
            if small.size:
                res[np.isin(comps, small)] = 1
    out[box] = res
    return out


def postprocess_case(case: str, in_path, out_path, connectivity: int = default("postprocess.connectivity"),
                     min_lesion_mm3: float = default("postprocess.min_lesion_mm3"),
                     fill_holes: bool = default("postprocess.fill_holes")) -> dict:
    img = load_nifti(in_path, case, "prediction")
    labels = read_labels(img)
    if labels.max() > 2:
        raise CaseError(case, f"prediction {in_path} holds label values above 2")
    spacing = img.header.get_zooms()[:3]
    out = postprocess_labels(labels, spacing, connectivity, min_lesion_mm3, fill_holes)
    res = nib.Nifti1Image(out, img.affine, img.header)
    res.set_data_dtype(np.uint8)
    with atomic_path(out_path) as tmp:
        nib.save(res, str(tmp))
    summary = {
        "case": case,
        "liver_voxels_before": int((labels >= 1).sum()), "liver_voxels_after": int((out >= 1).sum()),
        "tumour_voxels_before": int((labels == 2).sum()), "tumour_voxels_after": int((out == 2).sum()),
    }
    log.info("case %s: %s", case, summary)
    return summary
