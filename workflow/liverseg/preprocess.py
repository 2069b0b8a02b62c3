"""HU windowing, in-plane resampling to the plan's mm per pixel and slice extraction of one case into one HDF5.

Each slice is resampled to ``spacing_mm`` (bilinear with antialiasing; labels nearest with every lesion kept)
and placed on a ``size`` x ``size`` grid with the body's centre in the middle (nnU-Net's resampling, in-plane
only: slices keep their z positions, and models that look across slices pick neighbours by distance in mm,
geometry.z_stride).  Prediction undoes the placement and the resampling on class probabilities
(inference.to_source_grid) before the argmax on the scan's own grid.

HDF5 layout (one file per case; documented in the README):
  image           (Z, H, W) float16 in [0, 1], one slice per chunk (compression optional: none | lzf | gzip)
  label           (Z, H, W) uint8 {0,1,2}, same chunks (only for labelled cases)
  liver_present   (Z,) bool;   tumour_present (Z,) bool
  attrs: case_id, source_image, source_label, original_shape, spacing (original axes), canonical_spacing,
         affine, ornt, axcodes, window_mode, window_lower, window_upper, size, spacing_mm (target mm per pixel),
         stored_spacing (exact, rows/cols), resampled_shape, offset (where the resampled slice sits on the grid),
         fov_mm, slice_spacing (mm, z), liver_bbox_3d
         [z0, z1, r0, r1, c0, c1] or -1s, labelled, pipeline_version, source_image_sha256,
         source_label_sha256 (what training's resume key hashes)
Z runs inferior -> superior in the canonical RAS grid; slice z is ``canonical[:, :, z].T``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import h5py
import numpy as np
from scipy import ndimage

from liverseg import __version__
from liverseg.errors import CaseError
from liverseg.geometry import bbox, centring_offset, placement, resampled_shape
from liverseg.config import default
from liverseg.ingest import load_validated
from liverseg.io import atomic_path, content_sha256

log = logging.getLogger(__name__)

WINDOW_MODES = ("fixed", "study_v2")
SLAB = 32  # slices processed at once: bounds the float32 working memory independently of the volume size


# ---------------------------------------------------------------------------------------------- array level
def window_fixed(hu: np.ndarray, lower: float, upper: float) -> np.ndarray:
    """Clip HU to [lower, upper] and scale linearly to [0, 1] (float32)."""
    out = np.clip(hu, lower, upper).astype(np.float32, copy=False)
    out -= lower
    out *= 1.0 / (upper - lower)
    return out


def window_study_v2(hu_slice: np.ndarray) -> np.ndarray:
    """The original study's V2 recipe on one slice: z-score, clip to +-3, 3x3 median, CLAHE (clip 0.03), [0, 1]."""
    from skimage.exposure import equalize_adapthist

    s = hu_slice.astype(np.float32)
    sd = float(s.std())
    s = (s - float(s.mean())) / (sd if sd > 0 else 1.0)
    s = np.clip(s, -3.0, 3.0)
    s = ndimage.median_filter(s, size=3)
    s = (s + 3.0) / 6.0
    s = equalize_adapthist(s, clip_limit=0.03).astype(np.float32)
    lo, hi = float(s.min()), float(s.max())
    return (s - lo) / (hi - lo) if hi > lo else np.zeros_like(s)


def resize_slab(slab: np.ndarray, shape_hw, is_label: bool = False) -> np.ndarray:
    """Resample (n, H, W) slices to (n, *shape_hw): bilinear with antialiasing for images, nearest for labels
    (every lesion kept: keep_lesions).  An int ``shape_hw`` means square.

    Images with Pillow, slice by slice, labels by index: the same pixel-centre convention as torch's ``interpolate(align_corners=False,
    antialias=True)`` / ``nearest-exact`` (tests/test_preprocess.py compares them; prediction maps back with
    torch), without importing torch in this stage (its import roughly doubled the stage's peak memory:
    BENCHMARKS.md, issue 12)."""
    from PIL import Image

    if isinstance(shape_hw, (int, np.integer)):
        shape_hw = (int(shape_hw), int(shape_hw))
    n, h, w = slab.shape
    h2, w2 = (int(v) for v in shape_hw)
    if (h, w) == (h2, w2):
        return slab
    if is_label:  # nearest-exact: output pixel centre -> the source pixel that holds it (float32 scale, as torch)
        rows = np.minimum(((np.arange(h2, dtype=np.float32) + 0.5) * np.float32(h / h2)).astype(np.int64), h - 1)
        cols = np.minimum(((np.arange(w2, dtype=np.float32) + 0.5) * np.float32(w / w2)).astype(np.int64), w - 1)
        # two single-axis takes: 4x faster than one (rows x cols) fancy index
        return keep_lesions(slab, np.take(np.take(slab, rows, axis=1), cols, axis=2).astype(np.uint8, copy=False))
    out = np.empty((n, h2, w2), np.float32)
    for i in range(n):
        out[i] = np.asarray(Image.fromarray(np.ascontiguousarray(slab[i], dtype=np.float32)).resize((w2, h2), Image.BILINEAR))
    return out


def body_box(can: np.ndarray, slope: float, inter: float, threshold_hu: float = -500.0) -> tuple[float, ...]:
    """(r0, r1, c0, c1) pixel bounds of the body on a slice (H = canonical y, W = canonical x): the bounding box
    of the largest connected region above ``threshold_hu`` in the slices' projection (the table and the arms are
    smaller or detached; air is not body).  The whole slice when nothing is above the threshold."""
    nx, ny, nz = can.shape
    # raw * slope + inter > threshold  <=>  raw > (threshold - inter) / slope: compare in the stored dtype.
    cut = (threshold_hu - inter) / slope if slope else -np.inf
    count = np.zeros((nx, ny), np.int32)
    for z0 in range(0, nz, SLAB):
        blk = can[:, :, z0 : z0 + SLAB]
        count += (blk > cut).sum(axis=2, dtype=np.int32) if slope > 0 else (blk < cut).sum(axis=2, dtype=np.int32)
    mask = count.T >= max(1, nz // 4)  # (H, W): body on at least a quarter of the slices
    lab, k = ndimage.label(mask)
    if k == 0:
        return 0, ny, 0, nx
    big = 1 + int(np.argmax(ndimage.sum_labels(mask, lab, index=np.arange(1, k + 1))))
    r, c = bbox(lab == big)
    return r.start, r.stop, c.start, c.stop


def keep_lesions(src: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Nearest-neighbour downsampling can drop a small tumour entirely; put back every 2D tumour component of
    ``src`` (n, H, W) that left no tumour pixel in ``out`` (n, h, w), at the output pixel of its most central
    voxel, so a lesion is never lost by resizing the label (it may shrink to one pixel)."""
    n, h, w = src.shape
    oh, ow = out.shape[1:]
    for i in range(n):
        tum = src[i] == 2
        if not tum.any():
            continue
        lab, k = ndimage.label(tum, structure=np.ones((3, 3)))
        for j, sl in enumerate(ndimage.find_objects(lab), start=1):
            rr, cc = np.nonzero(lab[sl] == j)
            rr, cc = rr + sl[0].start, cc + sl[1].start
            orr = np.minimum((rr * oh) // h, oh - 1)
            occ = np.minimum((cc * ow) // w, ow - 1)
            if (out[i, orr, occ] == 2).any():
                continue
            m = int(np.argmin((rr - rr.mean()) ** 2 + (cc - cc.mean()) ** 2))
            out[i, orr[m], occ[m]] = 2
    return out


# ---------------------------------------------------------------------------------------------- one case
def preprocess_case(
    case: str,
    image_path,
    out_path,
    label_path=None,
    lower: float = default("window.lower"),
    upper: float = default("window.upper"),
    mode: str = default("window.mode"),
    *,
    size: int,
    spacing_mm: float | None = None,
    affine_tolerance: float = default("ingest.affine_tolerance"),
    compression: str = default("slices.compression"),
) -> dict:
    """Validate one case, window it, resample its slices to ``spacing_mm`` mm per pixel (the plan's target; None:
    fit the field of view into ``size``), place the body's centre at the centre of the ``size`` x ``size`` stored
    grid and write the HDF5 atomically.  Slices are never resampled along z.  Returns a short summary."""
    if mode not in WINDOW_MODES:
        raise ValueError(f"unknown window mode {mode!r}; choose one of {WINDOW_MODES}")
    if not upper > lower:
        raise ValueError(f"window upper ({upper}) must be above lower ({lower})")
    geom, raw, slope, inter, lab_raw = load_validated(case, image_path, label_path, affine_tolerance)

    can = geom.to_canonical(raw)  # a view: flips and transposes only
    can_lab = geom.to_canonical(lab_raw) if lab_raw is not None else None
    nx, ny, nz = can.shape
    cs = geom.canonical_spacing
    # The plan's mm per pixel, or (None) what fits the scan undistorted: its wider in-plane side fills the grid.
    target = float(spacing_mm) if spacing_mm else geom.inplane_extent_mm / float(size)
    rshape = resampled_shape((ny, nx), (cs[1], cs[0]), target)  # (rows = y, cols = x)
    # The body's box in resampled pixels (edges scale with the pixel count); its centre goes to the grid's centre.
    r0, r1, c0, c1 = (e * rshape[i // 2] / (ny, nx)[i // 2] for i, e in enumerate(body_box(can, slope, inter)))
    offset = centring_offset(size, ((r0 + r1) / 2 - 0.5, (c0 + c1) / 2 - 0.5))
    dst, src = placement(size, offset, rshape)
    cut = [max(0.0, -(a0 + o)) + max(0.0, a1 + o - size) for a0, a1, o in ((r0, r1, offset[0]), (c0, c1, offset[1]))]
    if max(cut) >= 1:
        log.warning("case %s: the body is wider than the stored field of view (%d pixels at %.3g mm = %.0f mm): "
                    "%.0f rows and %.0f columns of it are cut", case, size, target, size * target, *cut)

    with atomic_path(out_path) as tmp, h5py.File(tmp, "w") as h5:
        # Image compression is optional: lzf saves ~3x disk on CT (air windows to exactly 0) but costs about a
        # quarter more of the stage's time at 512 (BENCHMARKS.md); labels are mostly zeros and compress for free.
        d_img = h5.create_dataset("image", (nz, size, size), dtype=np.float16, chunks=(1, size, size),
                                  compression=None if compression == "none" else compression)
        d_lab = None
        if can_lab is not None:
            d_lab = h5.create_dataset("label", (nz, size, size), dtype=np.uint8, chunks=(1, size, size), compression="lzf")
        liver_present = np.zeros(nz, bool)
        tumour_present = np.zeros(nz, bool)
        # window_fixed on raw * slope + inter, as one multiply-add: (hu - lower) / (upper - lower), clipped to [0, 1]
        scale, shift = slope / (upper - lower), (inter - lower) / (upper - lower)
        # One slab buffer each, zeroed once: every slab overwrites the same placed region (dst), so the rest stays 0
        out_buf = np.zeros((min(SLAB, nz), size, size), np.float16)
        lab_buf = np.zeros((min(SLAB, nz), size, size), np.uint8) if d_lab is not None else None
        rows_any = np.zeros(size, bool)  # in-plane projections of the liver over all slices: its 3D box
        cols_any = np.zeros(size, bool)
        for z0 in range(0, nz, SLAB):
            z1 = min(nz, z0 + SLAB)
            out = out_buf[: z1 - z0]  # outside the placed slice stays 0 (at or below the window: air)
            if mode == "fixed":
                # slice by slice, each step on one slice while it is in cache (a third faster than whole-slab
                # passes at LiTS size); the same window as window_fixed, with the scaling folded in
                for i in range(z1 - z0):
                    s = can[:, :, z0 + i].T.astype(np.float32)  # (H=y, W=x)
                    s *= scale
                    s += shift
                    np.clip(s, 0.0, 1.0, out=s)
                    out[(i, *dst)] = resize_slab(s[None], rshape)[(0, *src)]
            else:
                slab = np.transpose(can[:, :, z0:z1], (2, 1, 0)).astype(np.float32)  # (n, H=y, W=x)
                if (slope, inter) != (1.0, 0.0):
                    slab *= slope
                    slab += inter
                win = np.stack([window_study_v2(s) for s in slab])
                out[(slice(None), *dst)] = resize_slab(win, rshape)[(slice(None), *src)]
            d_img[z0:z1] = out
            if d_lab is not None:
                ls = lab_buf[: z1 - z0]
                ls[(slice(None), *dst)] = resize_slab(np.transpose(can_lab[:, :, z0:z1], (2, 1, 0)), rshape,
                                                      is_label=True)[(slice(None), *src)]
                d_lab[z0:z1] = ls
                fg = ls >= 1
                liver_present[z0:z1] = fg.any(axis=(1, 2))
                tumour_present[z0:z1] = (ls == 2).any(axis=(1, 2))
                rows_any |= fg.any(axis=(0, 2))
                cols_any |= fg.any(axis=(0, 1))
        h5.create_dataset("liver_present", data=liver_present)
        h5.create_dataset("tumour_present", data=tumour_present)
        box = [bbox(m) for m in (liver_present, rows_any, cols_any)]
        bbox3d = [-1] * 6 if box[0] is None else [v for b in box for v in (b[0].start, b[0].stop)]
        a = h5.attrs
        a["case_id"] = case
        a["source_image"] = str(Path(image_path).resolve())
        a["source_label"] = str(Path(label_path).resolve()) if label_path is not None else ""
        a["labelled"] = label_path is not None
        a["original_shape"] = np.array(geom.shape, np.int64)
        a["spacing"] = np.array(geom.spacing)
        a["canonical_spacing"] = np.array(cs)
        a["canonical_shape"] = np.array([nx, ny, nz], np.int64)
        a["affine"] = geom.affine
        a["ornt"] = geom.ornt
        a["axcodes"] = geom.axcodes
        a["window_mode"] = mode
        a["window_lower"] = float(lower)
        a["window_upper"] = float(upper)
        a["size"] = int(size)
        # The stored grid in mm: ``spacing_mm`` nominal (what models are matched on), the exact mm per pixel of
        # the resampled slice (rounding its pixel count), and where it sits on the grid (what prediction undoes).
        a["spacing_mm"] = float(target)
        a["stored_spacing"] = np.array([ny * cs[1] / rshape[0], nx * cs[0] / rshape[1]])
        a["resampled_shape"] = np.array(rshape, np.int64)
        a["offset"] = np.array(offset, np.int64)
        a["fov_mm"] = float(size * target)
        a["slice_spacing"] = float(cs[2])
        a["liver_bbox_3d"] = np.array(bbox3d, np.int64)
        a["pipeline_version"] = __version__
        a["source_image_sha256"] = content_sha256(image_path)
        a["source_label_sha256"] = content_sha256(label_path) if label_path is not None else ""
    summary = {
        "case": case,
        "slices": int(nz),
        "liver_slices": int(liver_present.sum()),
        "tumour_slices": int(tumour_present.sum()),
        "labelled": label_path is not None,
        "axcodes": geom.axcodes,
        "spacing_mm": [round(float(v), 4) for v in cs],
        "stored_mm_per_pixel": round(float(target), 4),
        "stored_fov_mm": round(float(size * target), 1),
    }
    if label_path is not None and not liver_present.any():
        log.warning("case %s: the label holds no liver", case)
    log.info("case %s: %d slices (%d with liver) -> %s", case, nz, summary["liver_slices"], out_path)
    return summary
