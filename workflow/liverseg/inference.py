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
from liverseg.geometry import context_indices, patch_grid
from liverseg.models import autocast


def _stack(image: np.ndarray, zs: list[int], context: int) -> torch.Tensor:
    n = image.shape[0]
    return torch.from_numpy(
        np.stack([image[context_indices(z, n, context)] for z in zs]).astype(np.float32, copy=False)
    )


@torch.inference_mode()
def classify(model, spec: dict, image: np.ndarray, device: torch.device, batch: int = 64,
             amp: bool = True) -> np.ndarray:
    """Probability of "liver present" for every slice of ``image`` (Z, S, S)."""
    size = spec["input_size"]
    out = np.zeros(image.shape[0], np.float32)
    for s in range(0, image.shape[0], batch):
        zs = list(range(s, min(s + batch, image.shape[0])))
        x = _stack(image, zs, spec["context"])
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
                amp: bool = True, tta: bool = False, out_size: int | None = None
                ) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Whole-slice model (A): yield (slice indices, probabilities (n, K, s, s)) with s = ``out_size`` (default:
    the model's input size).  Slices are resized to the model's input, as in training."""
    size_in = spec["input_size"]
    transforms = tta_transforms(spec) if tta else [(False, 1.0)]
    for i in range(0, len(zs), batch):
        bz = zs[i : i + batch]
        x = _stack(image, bz, spec["context"])
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
               batch: int = default("predict.batch_size"), amp: bool = True, tta: bool = False) -> Iterator[tuple[list[int], torch.Tensor]]:
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
        x = _stack(image, bz, spec["context"])
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


@torch.inference_mode()
def segment_sequences(model, spec: dict, image: np.ndarray, device: torch.device, out_shape=None, batch: int = 2,
                      amp: bool = True) -> Iterator[tuple[list[int], np.ndarray]]:
    """V3: consecutive windows of ``seq_len`` slices (the last one flush with the end), labels per slice."""
    n, s = image.shape[0], image.shape[-1]
    t, size_in = spec["seq_len"], spec["input_size"]
    out_shape = out_shape or (s, s)
    starts = list(range(0, max(n - t, 0) + 1, t))
    if starts[-1] + t < n:
        starts.append(n - t)
    done = set()
    for i in range(0, len(starts), batch):
        windows = [[min(z, n - 1) for z in range(z0, z0 + t)] for z0 in starts[i : i + batch]]
        x = torch.stack([_stack(image, w, spec["context"]) for w in windows])  # (B, T, C, S, S)
        b = x.shape[0]
        if size_in != s:
            x = F.interpolate(x.flatten(0, 1), size=(size_in, size_in), mode="bilinear", align_corners=False)
            x = x.view(b, t, -1, size_in, size_in)
        with autocast(device, amp):
            p = torch.softmax(model(x.to(device)).float(), dim=2).cpu().flatten(0, 1)
        if tuple(p.shape[-2:]) != tuple(out_shape):
            p = F.interpolate(p, size=out_shape, mode="bilinear", align_corners=False)
        lab = p.argmax(dim=1).to(torch.uint8).numpy()
        zs = [z for w in windows for z in w]
        keep = [j for j, z in enumerate(zs) if z not in done and not done.add(z)]
        yield [zs[j] for j in keep], lab[keep]


@torch.inference_mode()
def sliding_window_3d(model, spec: dict, image: np.ndarray, device: torch.device, amp: bool = True) -> np.ndarray:
    """V1: class probabilities (3, Z, S, S) float16 from overlapping patches (stride half a patch), averaged."""
    d, p = spec["patch"]
    n, h, w = image.shape
    acc = np.zeros((3, n, h, w), np.float32)
    cnt = np.zeros((n, h, w), np.float32)
    for z0 in patch_grid(n, d):
        for r0 in patch_grid(h, p):
            for c0 in patch_grid(w, p):
                src = image[z0 : z0 + d, r0 : r0 + p, c0 : c0 + p].astype(np.float32)
                x = np.zeros((d, p, p), np.float32)
                x[: src.shape[0], : src.shape[1], : src.shape[2]] = src
                with autocast(device, amp):
                    prob = torch.softmax(model(torch.from_numpy(x)[None, None].to(device)).float(), dim=1)[0]
                prob = prob.cpu().numpy()[:, : src.shape[0], : src.shape[1], : src.shape[2]]
                acc[:, z0 : z0 + src.shape[0], r0 : r0 + src.shape[1], c0 : c0 + src.shape[2]] += prob
                cnt[z0 : z0 + src.shape[0], r0 : r0 + src.shape[1], c0 : c0 + src.shape[2]] += 1
    return (acc / cnt).astype(np.float16)


def resize_probs_to_slices(probs: np.ndarray, zs: list[int], out_shape) -> np.ndarray:
    """(3, Z, S, S) probabilities -> uint8 labels (len(zs), *out_shape) via bilinear resize then argmax."""
    p = torch.from_numpy(probs[:, zs].astype(np.float32)).permute(1, 0, 2, 3)
    if tuple(p.shape[-2:]) != tuple(out_shape):
        p = F.interpolate(p, size=out_shape, mode="bilinear", align_corners=False)
    return p.argmax(dim=1).to(torch.uint8).numpy()
