"""Applying trained models to the slices of one case (used by validation during training and by prediction).

Every function works on the stored slice grid of the HDF5 file, image (Z, S, S).  Probabilities are returned,
not labels, so callers combine models and resample before the argmax.

Test-time augmentation uses only transforms training also applied (read from the model's spec, ``augment``):
the left-right flip when training flipped, and zooms at the edges of training's scale range when training
scaled.  Each augmented pass is mapped back and averaged over the pixels it actually saw.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from liverseg.config import default
from liverseg.geometry import context_indices, patch_grid, placement, z_stride
from liverseg.models import autocast


def _stack(image: np.ndarray, zs: list[int], context: int, stride: int = 1) -> torch.Tensor:
    n = image.shape[0]
    return torch.from_numpy(
        np.stack([image[context_indices(z, n, context, stride)] for z in zs]).astype(np.float32, copy=False)
    )


def case_stride(spec: dict, z_mm: float | None) -> int:
    """Slices between the neighbours a model sees together on a case with slice spacing ``z_mm``: the model's
    ``context_mm`` (chosen at training) in slices of this case (geometry.z_stride)."""
    return z_stride(spec.get("context_mm"), z_mm)


@torch.inference_mode()
def classify(model, spec: dict, image: np.ndarray, device: torch.device, batch: int = 64,
             amp: bool = True, stride: int = 1) -> np.ndarray:
    """Probability of "liver present" for every slice of ``image`` (Z, S, S)."""
    size = spec["input_size"]
    out = np.zeros(image.shape[0], np.float32)
    for s in range(0, image.shape[0], batch):
        zs = list(range(s, min(s + batch, image.shape[0])))
        x = _stack(image, zs, spec["context"], stride)
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        with autocast(device, amp):
            logit = model(x.to(device))
        out[s : s + len(zs)] = torch.sigmoid(logit.float()).cpu().numpy()
    return out


def tta_transforms(spec: dict) -> list[tuple[bool, float]]:
    """(flip, zoom) pairs for test-time augmentation, identity first; only what training applied."""
    aug = spec.get("augment") or {}
    out = [(False, 1.0)]
    if float(aug.get("flip_prob", 0)) > 0:
        out.append((True, 1.0))
    s = float(aug.get("scale", 0))
    if s > 0:
        out += [(False, 1.0 - s), (False, 1.0 + s)]
    return out


def _warp(x: torch.Tensor, flip: bool, zoom: float, inverse: bool, padding: str = "zeros") -> torch.Tensor:
    """Zoom about the centre by ``zoom`` (>1 magnifies) and optionally mirror columns; inverse undoes it.
    Images are padded like training's augmentation ("border"); maps going back are padded with zeros."""
    f = 1.0 / zoom if not inverse else zoom
    sx = -f if flip else f
    theta = torch.tensor([[sx, 0.0, 0.0], [0.0, f, 0.0]], dtype=x.dtype).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)


def _probs(model, x: torch.Tensor, device, amp: bool, transforms=((False, 1.0),)) -> torch.Tensor:
    """Softmax class probabilities of (B, C, H, W) input, averaged over the TTA transforms."""
    acc, weight = None, None
    for flip, zoom in transforms:
        if not flip and zoom == 1.0:
            with autocast(device, amp):
                p = torch.softmax(model(x.to(device)).float(), dim=1).cpu()
            w = torch.ones_like(p[:, :1])
        elif zoom == 1.0:
            with autocast(device, amp):
                p = torch.softmax(model(x.flip(-1).to(device)).float(), dim=1).cpu().flip(-1)
            w = torch.ones_like(p[:, :1])
        else:
            xa = _warp(x, flip, zoom, inverse=False, padding="border")
            with autocast(device, amp):
                pa = torch.softmax(model(xa.to(device)).float(), dim=1).cpu()
            # Mapped back with zero padding, p is already weighted by how much of each pixel this pass saw (w):
            # adding p (not p * w) and dividing by the summed w keeps the class probabilities summing to 1.
            p = _warp(pa, flip, zoom, inverse=True)
            w = _warp(torch.ones_like(pa[:, :1]), flip, zoom, inverse=True)
        acc = p if acc is None else acc + p
        weight = w if weight is None else weight + w
    return acc / weight.clamp_min(1e-6)


@torch.inference_mode()
def slice_probs(model, spec: dict, image: np.ndarray, zs: list[int], device: torch.device, batch: int = default("predict.batch_size"),
                amp: bool = True, tta: bool = False, out_size: int | None = None, stride: int = 1
                ) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Whole-slice model (A): yield (slice indices, probabilities (n, K, s, s)) with s = ``out_size`` (default:
    the model's input size).  Slices are resized to the model's input, as in training."""
    size_in = spec["input_size"]
    transforms = tta_transforms(spec) if tta else [(False, 1.0)]
    for i in range(0, len(zs), batch):
        bz = zs[i : i + batch]
        x = _stack(image, bz, spec["context"], stride)
        if x.shape[-1] != size_in:
            x = F.interpolate(x, size=(size_in, size_in), mode="bilinear", align_corners=False)
        p = _probs(model, x, device, amp, transforms)
        if out_size and out_size != size_in:
            p = F.interpolate(p, size=(out_size, out_size), mode="bilinear", align_corners=False)
        yield bz, p


def _gaussian(patch: int) -> torch.Tensor:
    """nnU-Net-style tile weight: centre pixels count more than edge pixels (sigma = patch / 8)."""
    c = (patch - 1) / 2
    g = torch.exp(-((torch.arange(patch) - c) ** 2) / (2 * (patch / 8) ** 2))
    w = g[:, None] * g[None, :]
    return (w / w.max()).clamp_min(1e-3)


@torch.inference_mode()
def tile_probs(model, spec: dict, image: np.ndarray, zs: list[int], region, device: torch.device,
               batch: int = default("predict.batch_size"), amp: bool = True, tta: bool = False, stride: int = 1
               ) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Fixed-scale crop model (B): yield (slice indices, probabilities (n, K, h, w)) over ``region`` (r0, r1, c0, c1)
    of the stored grid, from ``patch`` x ``patch`` tiles at stride patch / 2 with Gaussian weights.  The stored
    grid is never rescaled, so B sees every case at the same pixel scale whatever the liver's size."""
    p = int(spec["patch_size"])
    r0, r1, c0, c1 = region
    h, w = r1 - r0, c1 - c0
    origins = [(r0 + a, c0 + b) for a in patch_grid(h, p) for b in patch_grid(w, p)]
    gw = _gaussian(p)
    transforms = tta_transforms(spec) if tta else [(False, 1.0)]
    for i in range(0, len(zs), batch):
        bz = zs[i : i + batch]
        x = _stack(image, bz, spec["context"], stride)
        acc = torch.zeros((len(bz), spec["classes"], h, w))
        cnt = torch.zeros((h, w))
        for rr, cc in origins:
            tile = torch.zeros((len(bz), x.shape[1], p, p))
            src = x[:, :, rr : rr + p, cc : cc + p]  # may be short when the slice is smaller than the patch
            tile[:, :, : src.shape[2], : src.shape[3]] = src
            prob = _probs(model, tile, device, amp, transforms)
            hh, ww = min(p, r1 - rr), min(p, c1 - cc)
            acc[:, :, rr - r0 : rr - r0 + hh, cc - c0 : cc - c0 + ww] += prob[:, :, :hh, :ww] * gw[:hh, :ww]
            cnt[rr - r0 : rr - r0 + hh, cc - c0 : cc - c0 + ww] += gw[:hh, :ww]
        yield bz, acc / cnt


def sequence_windows(n: int, t: int, stride: int = 1) -> list[list[int]]:
    """V3's windows over ``n`` slices: sequences of ``t`` slices ``stride`` apart (a fixed distance in mm), one
    set per residue class z mod stride so every slice is in a window; within a class consecutive windows, the
    last flush with the class's end (its last slice repeated when the class is shorter than ``t``)."""
    out = []
    for r in range(min(stride, n)):
        zs = list(range(r, n, stride))
        m = len(zs)
        starts = list(range(0, max(m - t, 0) + 1, t))
        if starts[-1] + t < m:
            starts.append(m - t)
        out += [[zs[min(j, m - 1)] for j in range(s0, s0 + t)] for s0 in starts]
    return out


@torch.inference_mode()
def segment_sequences(model, spec: dict, image: np.ndarray, device: torch.device, batch: int = 2,
                      amp: bool = True, stride: int = 1) -> Iterator[tuple[list[int], torch.Tensor]]:
    """V3: yield (slice indices, probabilities (n, K, S, S) on the stored grid) over sequence_windows; every
    slice exactly once (the first window that holds it)."""
    n, s = image.shape[0], image.shape[-1]
    t, size_in = spec["seq_len"], spec["input_size"]
    windows_all = sequence_windows(n, t, stride)
    done = set()
    for i in range(0, len(windows_all), batch):
        windows = windows_all[i : i + batch]
        x = torch.stack([_stack(image, w, spec["context"], stride) for w in windows])  # (B, T, C, S, S)
        b = x.shape[0]
        if size_in != s:
            x = F.interpolate(x.flatten(0, 1), size=(size_in, size_in), mode="bilinear", align_corners=False)
            x = x.view(b, t, -1, size_in, size_in)
        with autocast(device, amp):
            p = torch.softmax(model(x.to(device)).float(), dim=2).cpu().flatten(0, 1)
        if p.shape[-1] != s:
            p = F.interpolate(p, size=(s, s), mode="bilinear", align_corners=False)
        zs = [z for w in windows for z in w]
        keep = [j for j, z in enumerate(zs) if z not in done and not done.add(z)]
        if keep:
            yield [zs[j] for j in keep], p[keep]


@torch.inference_mode()
def sliding_window_3d(model, spec: dict, image: np.ndarray, device: torch.device, amp: bool = True,
                      stride: int = 1) -> Iterator[tuple[list[int], torch.Tensor]]:
    """V1: yield (slice indices, class probabilities (n, K, S, S) float32) from overlapping patches (stride half a
    patch), averaged; every slice exactly once.  A patch's slices are ``stride`` apart (its depth is fixed in mm);
    each residue class z mod stride is its own sub-volume, so every slice is predicted.

    Patches run row by row along z (patch_grid: origins ascending), and a slice is final once the next row
    starts above it: only the ``depth`` slices the current row covers are accumulated, (K, depth, S, S) float32,
    instead of the whole volume's (K, Z, S, S) (about 8 GB at 512 x 512 x 900; issue 13).  Every voxel sums
    the same patches in the same order as a whole-volume accumulator would."""
    d, p = spec["patch"]
    n, h, w = image.shape
    for r in range(min(stride, n)):
        m = len(range(r, n, stride))  # slices of this residue class, sub-volume index j = slice r + stride * j
        rows = patch_grid(m, d)
        acc = cnt = None
        lo = 0  # sub's first slice not yet yielded: acc[:, j] holds slice lo + j
        for i, z0 in enumerate(rows):
            if z0 > lo:  # (never for the first row) slide the window up to this row's first slice
                k = z0 - lo
                acc[:, : d - k] = acc[:, k:].copy()
                acc[:, d - k :] = 0
                cnt[: d - k] = cnt[k:].copy()
                cnt[d - k :] = 0
                lo = z0
            # only this row's slices are read (prediction's image is read slice by slice: predict.StoredSlices)
            row = image[[r + stride * z for z in range(z0, min(z0 + d, m))]]
            for r0 in patch_grid(h, p):
                for c0 in patch_grid(w, p):
                    src = row[:, r0 : r0 + p, c0 : c0 + p].astype(np.float32)
                    x = np.zeros((d, p, p), np.float32)
                    x[: src.shape[0], : src.shape[1], : src.shape[2]] = src
                    with autocast(device, amp):
                        prob = torch.softmax(model(torch.from_numpy(x)[None, None].to(device)).float(), dim=1)[0]
                    prob = prob.cpu().numpy()[:, : src.shape[0], : src.shape[1], : src.shape[2]]
                    if acc is None:
                        acc = np.zeros((prob.shape[0], d, h, w), np.float32)
                        cnt = np.zeros((d, h, w), np.float32)
                    zz, rr, cc = (slice(0, src.shape[0]), slice(r0, r0 + src.shape[1]), slice(c0, c0 + src.shape[2]))
                    acc[:, zz, rr, cc] += prob
                    cnt[zz, rr, cc] += 1
            hi = rows[i + 1] if i + 1 < len(rows) else m  # slices below the next row's origin are final
            yield [r + stride * z for z in range(lo, hi)], torch.from_numpy(acc[:, : hi - lo] / cnt[: hi - lo]).permute(1, 0, 2, 3)


def to_source_grid(probs: torch.Tensor, attrs: dict) -> torch.Tensor:
    """Class probabilities (n, K, S, S) on the stored grid -> (n, K, H, W) on the scan's own canonical in-plane
    grid (H = y, W = x): the placement on the grid is undone (pixels the grid cut off are background), then the
    resampled slice is interpolated back to the scan's pixels (bilinear on probabilities, never label copies),
    the exact inverse of preprocessing's forward path.  The argmax is the caller's, on the returned grid."""
    nx, ny = (int(v) for v in attrs["canonical_shape"][:2])
    size = probs.shape[-1]
    rshape = tuple(int(v) for v in attrs["resampled_shape"])
    offset = tuple(int(v) for v in attrs["offset"])
    if rshape == (size, size) and offset == (0, 0):
        canvas = probs
    else:
        dst, src = placement(size, offset, rshape)
        canvas = torch.zeros((probs.shape[0], probs.shape[1], *rshape), dtype=probs.dtype)
        canvas[:, 0] = 1.0
        canvas[(slice(None), slice(None), *src)] = probs[(slice(None), slice(None), *dst)]
    if tuple(canvas.shape[-2:]) != (ny, nx):
        canvas = F.interpolate(canvas, size=(ny, nx), mode="bilinear", align_corners=False)
    return canvas
