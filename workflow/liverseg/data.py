"""Slices from the per-case HDF5 files as training samples: 2.5D context, liver crops, sampling, augmentation.

Workers of a DataLoader open their own HDF5 handles (h5py handles must not cross a fork).  Randomness lives in
the training loop, not in the workers: the sampler and the augmentation draw from streams derived from
(seed, epoch), so a resumed run continues exactly like an uninterrupted one and worker count does not matter.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import h5py
import numpy as np
import torch
import torch.nn.functional as F


def context_indices(z: int, n_slices: int, context: int) -> list[int]:
    """Neighbour slice indices z-context..z+context, repeating the edge slice beyond the volume."""
    return [min(max(z + d, 0), n_slices - 1) for d in range(-context, context + 1)]


def crop_box(bbox3d, size: int, margin: int) -> tuple[int, int, int, int]:
    """In-plane liver box [r0, r1, c0, c1] grown by ``margin`` pixels and clipped to the slice."""
    _, _, r0, r1, c0, c1 = (int(v) for v in bbox3d)
    return max(0, r0 - margin), min(size, r1 + margin), max(0, c0 - margin), min(size, c1 + margin)


def crop_resize(arr: np.ndarray, box, out_size: int, is_label: bool = False) -> torch.Tensor:
    """Crop (C, H, W) to ``box`` and resize to (C, out_size, out_size)."""
    r0, r1, c0, c1 = box
    t = torch.from_numpy(np.ascontiguousarray(arr[:, r0:r1, c0:c1]))[None].float()
    mode = "nearest-exact" if is_label else "bilinear"
    kw = {} if is_label else {"align_corners": False}
    return F.interpolate(t, size=(out_size, out_size), mode=mode, **kw)[0]


def paste_back(pred: torch.Tensor, box, size: int) -> torch.Tensor:
    """Inverse of crop_resize for (C, h, w) scores: resize to the box and place into a (C, size, size) canvas.

    The canvas outside the box is background (class 0 gets probability 1)."""
    r0, r1, c0, c1 = box
    out = torch.zeros((pred.shape[0], size, size), dtype=pred.dtype)
    out[0] = 1.0
    out[:, r0:r1, c0:c1] = F.interpolate(pred[None], size=(r1 - r0, c1 - c0), mode="bilinear", align_corners=False)[0]
    return out


@dataclass
class CaseIndex:
    path: str
    n_slices: int
    liver: np.ndarray
    tumour: np.ndarray
    bbox3d: np.ndarray
    size: int


def index_cases(paths: list[str]) -> list[CaseIndex]:
    out = []
    for p in paths:
        with h5py.File(p, "r") as f:
            if "label" not in f:
                raise ValueError(f"{p} has no label; only labelled cases can be used for training")
            out.append(
                CaseIndex(p, f["image"].shape[0], f["liver_present"][:], f["tumour_present"][:],
                          f.attrs["liver_bbox_3d"], int(f.attrs["size"]))
            )
    return out


class SliceDataset(torch.utils.data.Dataset):
    """Sample i is (case k, slice z); returns image (2c+1, S, S) float32, label (S, S) int64, liver flag."""

    def __init__(self, cases: list[CaseIndex], items: list[tuple[int, int]], context: int,
                 input_size: int, crop_margin: int | None = None):
        self.cases, self.items, self.context = cases, items, context
        self.input_size, self.crop_margin = input_size, crop_margin
        self._handles: dict[int, h5py.File] = {}
        self._pid = None

    def __len__(self):
        return len(self.items)

    def _file(self, k: int) -> h5py.File:
        if self._pid != os.getpid():  # first use in this process (main or a forked worker)
            self._handles, self._pid = {}, os.getpid()
        if k not in self._handles:
            self._handles[k] = h5py.File(self.cases[k].path, "r")
        return self._handles[k]

    def __getitem__(self, i):
        k, z = self.items[i]
        c = self.cases[k]
        f = self._file(k)
        idx = context_indices(z, c.n_slices, self.context)
        lo, hi = idx[0], idx[-1] + 1
        block = f["image"][lo:hi]  # contiguous read, then pick (edges repeat)
        img = block[[j - lo for j in idx]].astype(np.float32)
        lab = f["label"][z][None].astype(np.uint8)
        if self.crop_margin is not None:
            box = crop_box(c.bbox3d, c.size, self.crop_margin)
            x = crop_resize(img, box, self.input_size)
            y = crop_resize(lab, box, self.input_size, is_label=True)[0].long()
        elif c.size != self.input_size:
            x = F.interpolate(torch.from_numpy(img)[None], size=(self.input_size,) * 2, mode="bilinear",
                              align_corners=False)[0]
            y = F.interpolate(torch.from_numpy(lab)[None].float(), size=(self.input_size,) * 2,
                              mode="nearest-exact")[0, 0].long()
        else:
            x, y = torch.from_numpy(img), torch.from_numpy(lab[0]).long()
        return x, y, torch.tensor(float(c.liver[z]))


def epoch_indices(groups: list[list[int]], fractions: list[float], n: int, seed: int, epoch: int) -> list[int]:
    """Draw ``n`` dataset indices: ``fractions[g]`` of them from group g (with replacement), shuffled."""
    rng = np.random.default_rng([seed, epoch])
    counts = [int(round(n * f)) for f in fractions]
    counts[-1] = n - sum(counts[:-1])
    picks = []
    for g, cnt in zip(groups, counts):
        if cnt > 0 and g:
            picks.append(rng.choice(np.asarray(g), size=cnt, replace=True))
    out = np.concatenate(picks) if picks else np.zeros(0, np.int64)
    rng.shuffle(out)
    return out.tolist()


def augment(x: torch.Tensor, y: torch.Tensor | None, gen: torch.Generator, rotate_deg: float, scale: float,
            intensity: float, flip_prob: float, group: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random rotation/scaling (one affine warp), optional left-right flip and intensity jitter, on a batch.

    ``group`` consecutive samples share one draw (the slices of one V3 sequence move together)."""
    b = x.shape[0]
    n = b // group

    def draw(*shape):
        return torch.rand(n, *shape, generator=gen).repeat_interleave(group, dim=0)

    theta = (draw() * 2 - 1) * math.radians(rotate_deg)
    s = 1 + (draw() * 2 - 1) * scale
    flip = torch.where(draw() < flip_prob, -1.0, 1.0)
    cos, sin = torch.cos(theta) / s, torch.sin(theta) / s
    mat = torch.zeros(b, 2, 3)
    mat[:, 0, 0], mat[:, 0, 1] = cos * flip, -sin
    mat[:, 1, 0], mat[:, 1, 1] = sin * flip, cos
    grid = F.affine_grid(mat, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if y is not None:
        y = F.grid_sample(y[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
        y = y[:, 0].long()
    gain = 1 + (draw(1, 1, 1) * 2 - 1) * intensity
    bias = (draw(1, 1, 1) * 2 - 1) * intensity * 0.5
    return x * gain + bias, y


class SequenceDataset(SliceDataset):
    """V3: sample i is (case k, first slice z0) -> image (T, 2c+1, S, S), label (T, S, S), liver flag of the window."""

    def __init__(self, cases, items, context, input_size, seq_len: int):
        super().__init__(cases, items, context, input_size)
        self.seq_len = seq_len

    def __getitem__(self, i):
        k, z0 = self.items[i]
        c = self.cases[k]
        f = self._file(k)
        zs = [min(z, c.n_slices - 1) for z in range(z0, z0 + self.seq_len)]
        lo, hi = max(0, z0 - self.context), min(c.n_slices, zs[-1] + self.context + 1)
        block = f["image"][lo:hi].astype(np.float32)
        img = np.stack([block[[j - lo for j in context_indices(z, c.n_slices, self.context)]] for z in zs])
        lab = f["label"][zs[0] : zs[-1] + 1][[z - zs[0] for z in zs]].astype(np.int64)
        x, y = torch.from_numpy(img), torch.from_numpy(lab)
        if c.size != self.input_size:
            t, ch = x.shape[:2]
            x = F.interpolate(x.flatten(0, 1)[:, None], size=(self.input_size,) * 2, mode="bilinear",
                              align_corners=False).view(t, ch, self.input_size, self.input_size)
            y = F.interpolate(y[:, None].float(), size=(self.input_size,) * 2, mode="nearest-exact")[:, 0].long()
        return x, y, torch.tensor(float(c.liver[zs].any()))


class PatchDataset(SliceDataset):
    """V1: sample i is (case k, z0, r0, c0) -> image patch (1, D, P, P), label (D, P, P), liver flag."""

    def __init__(self, cases, items, patch: tuple[int, int]):
        super().__init__(cases, items, 0, patch[1])
        self.patch = patch

    def __getitem__(self, i):
        k, z0, r0, c0 = self.items[i]
        d, p = self.patch
        f = self._file(k)
        img = np.zeros((d, p, p), np.float32)
        lab = np.zeros((d, p, p), np.int64)
        src = f["image"][z0 : z0 + d, r0 : r0 + p, c0 : c0 + p]
        img[: src.shape[0], : src.shape[1], : src.shape[2]] = src
        src_l = f["label"][z0 : z0 + d, r0 : r0 + p, c0 : c0 + p]
        lab[: src_l.shape[0], : src_l.shape[1], : src_l.shape[2]] = src_l
        return torch.from_numpy(img)[None], torch.from_numpy(lab), torch.tensor(float((lab >= 1).any()))


def patch_grid(n: int, patch: int) -> list[int]:
    """Patch origins along one axis: stride patch/2, last patch flush with the end (or 0 if the axis is short)."""
    if n <= patch:
        return [0]
    starts = list(range(0, n - patch + 1, max(1, patch // 2)))
    if starts[-1] != n - patch:
        starts.append(n - patch)
    return starts
