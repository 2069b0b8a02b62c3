"""Applying trained models to the slices of one case (used by validation during training and by prediction)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from liverseg.data import context_indices, paste_back
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


def _probs(model, x: torch.Tensor, device, amp: bool, tta: bool) -> torch.Tensor:
    with autocast(device, amp):
        p = torch.softmax(model(x.to(device)).float(), dim=1)
        if tta:
            p = 0.5 * (p + torch.softmax(model(x.flip(-1).to(device)).float(), dim=1).flip(-1))
    return p.cpu()


@torch.inference_mode()
def segment(model, spec: dict, image: np.ndarray, zs: list[int], device: torch.device, box=None,
            out_shape: tuple[int, int] | None = None, batch: int = 16, amp: bool = True,
            tta: bool = False) -> Iterator[tuple[list[int], np.ndarray]]:
    """Yield (slice indices, uint8 labels) in batches for the slices ``zs`` of ``image`` (Z, S, S).

    ``box`` (r0, r1, c0, c1 on the S grid) makes this a crop model: slices are cropped to it and the result is
    pasted back (background outside).  Class scores are resized to ``out_shape`` before the argmax, so upsampled
    labels follow the smooth score boundary rather than blocky nearest-neighbour steps.
    """
    size_in = spec["input_size"]
    s = image.shape[-1]
    out_shape = out_shape or (s, s)
    for i in range(0, len(zs), batch):
        bz = zs[i : i + batch]
        x = _stack(image, bz, spec["context"])
        if box is not None:
            r0, r1, c0, c1 = box
            x = F.interpolate(x[:, :, r0:r1, c0:c1], size=(size_in, size_in), mode="bilinear", align_corners=False)
        elif size_in != s:
            x = F.interpolate(x, size=(size_in, size_in), mode="bilinear", align_corners=False)
        p = _probs(model, x, device, amp, tta)
        if box is not None:
            p = torch.stack([paste_back(q, box, s) for q in p])
        if tuple(p.shape[-2:]) != tuple(out_shape):
            p = F.interpolate(p, size=out_shape, mode="bilinear", align_corners=False)
        yield bz, p.argmax(dim=1).to(torch.uint8).numpy()


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
    from liverseg.data import patch_grid

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
