"""Overlap metrics shared by validation and evaluation.

Empty-mask convention (applied everywhere): reference and prediction both empty -> Dice 1, Jaccard 1 (nothing
to find, nothing found); exactly one empty -> Dice 0, Jaccard 0.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from liverseg.geometry import bbox


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    p, r = np.count_nonzero(pred), np.count_nonzero(ref)
    if p == 0 and r == 0:
        return 1.0
    inter = np.count_nonzero(np.logical_and(pred, ref))
    return 2.0 * inter / (p + r)


def liver_tumour_dice(pred_labels: np.ndarray, ref_labels: np.ndarray) -> tuple[float, float]:
    """LiTS classes: liver = label >= 1 (tumour included), tumour = label == 2."""
    return dice(pred_labels >= 1, ref_labels >= 1), dice(pred_labels == 2, ref_labels == 2)


# ---------------------------------------------------------------------------------------------- full metric set
# Surface-distance conventions follow medpy (tested against it): the surface of a mask is the mask minus its
# erosion with a 6-connected (face) structuring element; ASSD is the mean over both directed distance sets
# pooled (as medpy >= 0.5 and the LiTS evaluation compute it); MSSD (Hausdorff) the larger of the two directed maxima; HD95 the 95th percentile of both directed
# distance sets together.  Distances are in mm from the voxel spacing.
# Empty masks: both empty -> distances 0, RVD 0; exactly one empty -> distances and RVD undefined (NaN), and the
# summary counts such cases instead of averaging over them silently.

NAN = float("nan")


def _surface(mask: np.ndarray) -> np.ndarray:
    struct = ndimage.generate_binary_structure(3, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=struct, iterations=1)


def surface_distances(pred: np.ndarray, ref: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Directed distances (mm) pred-surface -> ref-surface and ref-surface -> pred-surface.

    Both distance transforms are computed once, inside the bounding box of the two masks (plus one voxel),
    which gives the same values as on the whole grid because every surface voxel lies inside that box.
    """
    box = bbox(pred | ref, pad=1)
    p, r = pred[box], ref[box]
    sp, sr = _surface(p), _surface(r)
    dt_r = ndimage.distance_transform_edt(~sr, sampling=spacing)
    dt_p = ndimage.distance_transform_edt(~sp, sampling=spacing)
    return dt_r[sp], dt_p[sr]


def binary_metrics(pred: np.ndarray, ref: np.ndarray, spacing) -> dict:
    pred, ref = pred.astype(bool, copy=False), ref.astype(bool, copy=False)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    n_p, n_r = int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
    inter = int(np.count_nonzero(pred & ref)) if n_p and n_r else 0
    union = n_p + n_r - inter
    d = 1.0 if n_p + n_r == 0 else 2.0 * inter / (n_p + n_r)
    j = 1.0 if union == 0 else inter / union
    out = {"dice": d, "jaccard": j, "voe": 1.0 - j,
           "rvd": (0.0 if n_p == 0 else NAN) if n_r == 0 else (n_p - n_r) / n_r,
           "pred_ml": n_p * voxel_ml, "ref_ml": n_r * voxel_ml,
           "pred_voxels": n_p, "ref_voxels": n_r, "overlap_voxels": inter}
    if n_p == 0 and n_r == 0:
        out.update(assd=0.0, mssd=0.0, hd95=0.0)
    elif n_p == 0 or n_r == 0:
        out.update(assd=NAN, mssd=NAN, hd95=NAN)
    else:
        d_pr, d_rp = surface_distances(pred, ref, spacing)
        both = np.hstack((d_pr, d_rp))
        out["assd"] = float(both.mean())
        out["mssd"] = float(max(d_pr.max(), d_rp.max()))
        out["hd95"] = float(np.percentile(both, 95))
    return out


_STRUCTURES = {6: 1, 18: 2, 26: 3}  # connectivity -> rank of scipy's generate_binary_structure(3, rank)


def lesion_detection(pred: np.ndarray, ref: np.ndarray, iou_threshold: float = 0.5, connectivity: int = 6) -> dict:
    """Lesion detection as the LiTS challenge scorer defines it (PatrickChrist/lits-challenge-scoring,
    ``program/helpers/calc_metric.py::detect_lesions`` called from ``program/evaluate.py``).

    In plain words:

    * Lesions are the connected components of each tumour mask, 6-connected (face neighbours only) by default,
      as ``scipy.ndimage.label`` with its default structure gives them in the scorer.  ``connectivity`` may be
      6, 18 or 26.  Component numbers follow scipy's order (first voxel in C order); the tie rules use it.
    * Merging.  Every reference lesion is assigned to the predicted lesion that overlaps it most (ties: the lowest
      predicted label); reference lesions assigned to the same predicted lesion are merged into one reference
      group, so a prediction spanning several lesions is matched to all of them together.  Then every predicted
      lesion that touches any reference lesion is assigned to the reference group it overlaps most (ties: the
      group whose lowest reference label is lowest); predicted lesions assigned to the same group are merged, so a
      lesion split into several predicted pieces is matched to all the pieces together.  Each group that received
      at least one prediction is thereby paired one-to-one with a merged prediction.
    * Detection.  A pair counts as one detection when IoU(merged prediction, merged reference group) >
      ``iou_threshold`` (strictly; LiTS uses 0.5).  ``detected`` is the number of such pairs.
    * Counts and ratios.  ``ref_lesions`` and ``pred_lesions`` are the numbers of components *before* merging
      (every predicted component, including those touching no reference lesion), as the scorer counts them.  As in
      the scorer (TP = detected, FP = pred_lesions - detected, FN = ref_lesions - detected):
      ``lesion_recall = detected / ref_lesions`` and ``lesion_precision = detected / pred_lesions``.  So a
      prediction merging two lesions, and detecting them, gives one true positive and one miss; a lesion split
      into two detecting pieces gives one true positive and one false positive.  ``lesion_f1`` is their harmonic
      mean (not computed by the scorer).  The scorer reports only dataset-pooled ratios (0 when a denominator is
      0); per case here an empty denominator follows this module's convention: 1 when both masks have no
      lesion, 0 when exactly one has none.

    Two defects of the scorer's code are deliberately not reproduced (its docstring states the intent followed
    here): its IoU union is taken over ``detected_mask == p_id`` although that mask holds reference labels, so the
    union is wrong whenever the two labels differ; and an undetected merged group subtracts its number of merged
    reference lesions from the count of detected pairs (commit 2259517), which can make ``detected`` negative.
    Without merges that fail detection the count equals the scorer's.  The scorer crashes when the reference has
    no lesion; here ``detected`` is then 0.

    Cost: one labelling per mask and a few passes over the voxels; the merge rules run on the overlap matrix
    of only the lesions that overlap.
    """
    if connectivity not in _STRUCTURES:
        raise ValueError(f"connectivity must be 6, 18 or 26, got {connectivity}")
    structure = ndimage.generate_binary_structure(3, _STRUCTURES[connectivity])
    ref, pred = np.asarray(ref, dtype=bool), np.asarray(pred, dtype=bool)
    # Inside the box of both masks: the same components, numbered in the same (C) order, but int32 label maps
    # (and bincount's int64 copies) of the tumours' box, not of the scan (4x + 8x its int16 size at 512 x 512 x 900)
    box = bbox(ref | pred)
    if box is not None:
        ref, pred = ref[box], pred[box]
    lr, nr = ndimage.label(ref, structure=structure)
    lp, np_ = ndimage.label(pred, structure=structure)
    detected = 0
    if nr and np_:
        both = (lr > 0) & (lp > 0)
        r_ov, p_ov = lr[both], lp[both]
        if r_ov.size:
            # Keep only labels that overlap something; the renumbering keeps their order (tie rules).
            r_keep = np.flatnonzero(np.bincount(r_ov, minlength=nr + 1))
            p_keep = np.flatnonzero(np.bincount(p_ov, minlength=np_ + 1))
            r_idx = np.searchsorted(r_keep, r_ov)
            p_idx = np.searchsorted(p_keep, p_ov)
            kr, kp = r_keep.size, p_keep.size
            inter = np.bincount(r_idx * kp + p_idx, minlength=kr * kp).reshape(kr, kp)
            r_size = np.bincount(lr.ravel(), minlength=nr + 1)[r_keep]
            p_size = np.bincount(lp.ravel(), minlength=np_ + 1)[p_keep]

            # Rule 1: each reference lesion goes to the prediction overlapping it most (argmax: lowest label on
            # ties); lesions sharing that prediction form one group, groups numbered by their lowest lesion label.
            owner = inter.argmax(axis=1)
            _, first, inv = np.unique(owner, return_index=True, return_inverse=True)
            rank = np.empty_like(first)
            rank[np.argsort(first)] = np.arange(first.size)
            group = rank[inv.ravel()]
            n_groups = first.size
            g_inter = np.zeros((n_groups, kp), dtype=np.int64)
            np.add.at(g_inter, group, inter)
            g_size = np.bincount(group, weights=r_size, minlength=n_groups)

            # Rule 2: each prediction goes to the group it overlaps most (lowest group on ties); predictions
            # sharing a group are merged with each other and paired with that group.
            match = g_inter.argmax(axis=0)
            pair_inter = np.bincount(match, weights=g_inter[match, np.arange(kp)], minlength=n_groups)
            pair_pred = np.bincount(match, weights=p_size, minlength=n_groups)
            paired = pair_pred > 0
            iou = pair_inter[paired] / (pair_pred[paired] + g_size[paired] - pair_inter[paired])
            detected = int(np.count_nonzero(iou > iou_threshold))

    recall = detected / nr if nr else (1.0 if np_ == 0 else 0.0)
    precision = detected / np_ if np_ else (1.0 if nr == 0 else 0.0)
    f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return {"ref_lesions": int(nr), "pred_lesions": int(np_), "detected": detected,
            "lesion_precision": precision, "lesion_recall": recall, "lesion_f1": f1}


def case_metrics(pred_labels: np.ndarray, ref_labels: np.ndarray, spacing) -> list[dict]:
    """One row per class (liver = label >= 1, tumour = label == 2) with every metric."""
    rows = []
    for cls in ("liver", "tumour"):
        # One class's masks at a time (bool, half the int16 volume each): memory at 512 x 512 x 900 (issue 13).
        pm, rm = (pred_labels >= 1, ref_labels >= 1) if cls == "liver" else (pred_labels == 2, ref_labels == 2)
        row = {"class": cls, **binary_metrics(pm, rm, spacing)}
        if cls == "tumour":
            row.update(lesion_detection(pm, rm))
            liver_p, liver_r = rows[0]["pred_voxels"], rows[0]["ref_voxels"]
            burden_p = np.count_nonzero(pm) / liver_p if liver_p else 0.0
            burden_r = np.count_nonzero(rm) / liver_r if liver_r else 0.0
            row["tumour_burden_error"] = abs(burden_p - burden_r)
        del pm, rm
        rows.append(row)
    return rows
