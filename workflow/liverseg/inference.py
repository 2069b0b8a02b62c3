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
