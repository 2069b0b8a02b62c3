"""Slices from the per-case HDF5 files as training samples: 2.5D context, liver crops, sampling, augmentation.

Workers of a DataLoader open their own HDF5 handles (h5py handles must not cross a fork).  Randomness lives in
streams derived from (seed, epoch) and, per sample, from its draw key (seed, epoch, position in the epoch): a
resumed run continues exactly like an uninterrupted one, and neither the worker count nor the number of
data-parallel processes changes what a sample looks like.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from liverseg.geometry import context_indices, crop_padded, grow, mm_to_slices, tile_region, z_range


@dataclass
class CaseIndex:
    path: str
    n_slices: int
    liver: np.ndarray
    tumour: np.ndarray
    bbox3d: np.ndarray
    size: int
    identity: dict
    z_mm: float = 0.0  # slice spacing (mm): with the model's context_mm it sets ``stride``
    stride: int = 1  # slices between neighbours fed together (geometry.z_stride); set once the model is known

    def liver_zrange(self, z_margin_mm: float) -> tuple[int, int] | None:
        """Slices of the reference liver plus ``z_margin_mm`` mm on each side, in this case's slices (model B's
        z-range in training)."""
        return z_range(self.liver, mm_to_slices(z_margin_mm, self.z_mm))


def index_cases(paths: list[str]) -> list[CaseIndex]:
    out = []
    for p in paths:
        with h5py.File(p, "r") as f:
            if "label" not in f:
                raise ValueError(f"{p} has no label; only labelled cases can be used for training")
            a = f.attrs
            # What the slices were made from: hashes recorded at preprocessing, never the arrays re-read.
            identity = {k: str(a.get(k, "")) for k in ("case_id", "source_image_sha256", "source_label_sha256",
                                                       "pipeline_version", "window_mode", "window_lower",
                                                       "window_upper", "size", "spacing_mm")}
            out.append(
                CaseIndex(p, f["image"].shape[0], f["liver_present"][:], f["tumour_present"][:],
                          a["liver_bbox_3d"], int(a["size"]), identity, float(a["canonical_spacing"][2]))
            )
    return out


class SliceDataset(torch.utils.data.Dataset):
    """Sample i is (case k, slice z); returns image (2c+1, S, S) float32, label (S, S) int64, liver flag."""

    def __init__(self, cases: list[CaseIndex], items: list[tuple[int, int]], context: int, input_size: int):
        self.cases, self.items, self.context = cases, items, context
        self.input_size = input_size
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

    def __getitem__(self, draw):
        k, z = self.items[draw[0]]
        c = self.cases[k]
        f = self._file(k)
        idx = context_indices(z, c.n_slices, self.context, c.stride)
        lo, hi = idx[0], idx[-1] + 1
        block = f["image"][lo:hi]  # contiguous read, then pick (edges repeat)
        img = block[[j - lo for j in idx]].astype(np.float32)
        lab = f["label"][z][None].astype(np.uint8)
        if c.size != self.input_size:
            x = F.interpolate(torch.from_numpy(img)[None], size=(self.input_size,) * 2, mode="bilinear",
                              align_corners=False)[0]
            y = F.interpolate(torch.from_numpy(lab)[None].float(), size=(self.input_size,) * 2,
                              mode="nearest-exact")[0, 0].long()
        else:
            x, y = torch.from_numpy(img), torch.from_numpy(lab[0]).long()
        return x, y, torch.tensor(float(c.liver[z]))


def sequence_slices(z0: int, n_slices: int, seq_len: int, stride: int = 1) -> list[int]:
    """The slices of a V3 sequence starting at ``z0``: every ``stride``-th slice (a fixed distance in mm), the
    last one repeated past the volume's end."""
    return [min(z0 + j * stride, n_slices - 1) for j in range(seq_len)]


def epoch_draws(groups: list[list[int]], fractions: list[float], n: int, seed: int, epoch: int) -> list[tuple]:
    """Draw ``n`` samples: ``fractions[g]`` of them from group g (with replacement), shuffled.

    Each draw is (dataset index, group, draw key); datasets that pick a random patch seed it with the key, so the
    epoch is the same whatever the number of DataLoader workers and whether the run was resumed."""
    rng = np.random.default_rng([seed, epoch])
    active = [i for i, (g, f) in enumerate(zip(groups, fractions)) if g and f > 0]  # group ids stay positions
    counts = {i: int(round(n * fractions[i])) for i in active}
    if active:
        counts[active[-1]] = n - sum(counts[i] for i in active[:-1])
    idx, grp = [], []
    for gi in active:
        if counts[gi] > 0:
            idx.append(rng.choice(np.asarray(groups[gi]), size=counts[gi], replace=True))
            grp.append(np.full(counts[gi], gi))
    if not idx:
        return []
    idx, grp = np.concatenate(idx), np.concatenate(grp)
    order = rng.permutation(len(idx))
    return [(int(idx[o]), int(grp[o]), (seed, epoch, j)) for j, o in enumerate(order)]


AUGMENT_DRAWS = ("rotate", "scale", "flip", "gain", "bias")  # the uniforms of one sample's augmentation


def augment_draws(keys: list[tuple]) -> torch.Tensor:
    """(n, len(AUGMENT_DRAWS)) uniforms in [0, 1): row i from the stream of draw key ``keys[i]`` (epoch_draws) alone.

    A sample is augmented the same way whatever batch, batch position or training process it lands in, so a
    data-parallel run sees exactly the augmented samples of a single-process one.  The stream is the key's with
    a trailing 1, apart from the one a dataset seeds with the bare key (model B's patch placement)."""
    rows = [np.random.default_rng([*key, 1]).random(len(AUGMENT_DRAWS)) for key in keys]
    return torch.from_numpy(np.asarray(rows, np.float64).reshape(len(keys), len(AUGMENT_DRAWS))).float()


def augment(x: torch.Tensor, y: torch.Tensor | None, u: torch.Tensor, rotate_deg: float, scale: float,
            intensity: float, flip_prob: float, group: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random rotation/scaling (one affine warp), optional left-right flip and intensity jitter, on a batch.

    ``u``: the per-sample uniforms (augment_draws), one row per ``group`` consecutive samples, which share it
    (the slices of one V3 sequence move together)."""
    b = x.shape[0]
    if u.shape != (b // group, len(AUGMENT_DRAWS)):
        raise ValueError(f"augment: {b} samples in groups of {group} need {b // group} rows of draws, got {tuple(u.shape)}")

    def draw(name, *shape):
        return u[:, AUGMENT_DRAWS.index(name)].repeat_interleave(group).view(b, *shape)

    theta = (draw("rotate") * 2 - 1) * math.radians(rotate_deg)
    s = 1 + (draw("scale") * 2 - 1) * scale
    flip = torch.where(draw("flip") < flip_prob, -1.0, 1.0)
    cos, sin = torch.cos(theta) / s, torch.sin(theta) / s
    mat = torch.zeros(b, 2, 3)
    mat[:, 0, 0], mat[:, 0, 1] = cos * flip, -sin
    mat[:, 1, 0], mat[:, 1, 1] = sin * flip, cos
    grid = F.affine_grid(mat, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if y is not None:
        y = F.grid_sample(y[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
        y = y[:, 0].long()
    gain = 1 + (draw("gain", 1, 1, 1) * 2 - 1) * intensity
    bias = (draw("bias", 1, 1, 1) * 2 - 1) * intensity * 0.5
    return x * gain + bias, y


def intensity_jitter(x: torch.Tensor, u: torch.Tensor, intensity: float) -> torch.Tensor:
    """3D patches (B, 1, D, P, P): a gain per sample from its draws (augment_draws), no warp."""
    gain = 1 + (u[:, AUGMENT_DRAWS.index("gain")] * 2 - 1) * intensity
    return x * gain.view(-1, *([1] * (x.dim() - 1)))


class SequenceDataset(SliceDataset):
    """V3: sample i is (case k, first slice z0) -> image (T, 2c+1, S, S), label (T, S, S), liver flag of the window."""

    def __init__(self, cases, items, context, input_size, seq_len: int):
        super().__init__(cases, items, context, input_size)
        self.seq_len = seq_len

    def __getitem__(self, draw):
        k, z0 = self.items[draw[0]]
        c = self.cases[k]
        f = self._file(k)
        zs = sequence_slices(z0, c.n_slices, self.seq_len, c.stride)
        lo, hi = max(0, z0 - self.context * c.stride), min(c.n_slices, zs[-1] + self.context * c.stride + 1)
        block = f["image"][lo:hi].astype(np.float32)
        img = np.stack([block[[j - lo for j in context_indices(z, c.n_slices, self.context, c.stride)]] for z in zs])
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

    def __getitem__(self, draw):
        k, z0, r0, c0 = self.items[draw[0]]
        d, p = self.patch
        f = self._file(k)
        c = self.cases[k]
        img = np.zeros((d, p, p), np.float32)
        lab = np.zeros((d, p, p), np.int64)
        last = min(c.n_slices, z0 + (d - 1) * c.stride + 1)  # every stride-th slice from z0: d slices in mm
        src = f["image"][z0:last:c.stride, r0 : r0 + p, c0 : c0 + p]
        img[: src.shape[0], : src.shape[1], : src.shape[2]] = src
        src_l = f["label"][z0:last:c.stride, r0 : r0 + p, c0 : c0 + p]
        lab[: src_l.shape[0], : src_l.shape[1], : src_l.shape[2]] = src_l
        return torch.from_numpy(img)[None], torch.from_numpy(lab), torch.tensor(float((lab >= 1).any()))


class LiverPatchDataset(SliceDataset):
    """Model B: a ``patch`` x ``patch`` crop of the stored grid (never rescaled) around the liver.

    Sample (case k, slice z) with z anywhere in the reference liver's z-range plus a margin, so B also sees slices
    without liver the way it will at inference.  The liver box is the reference box grown by ``margin`` and then
    shifted edge by edge by up to ``shift`` pixels (the way model A's boxes err; its size in pixels is kept, the
    image is never rescaled).  The patch lies inside that box's tile region (as inference tiles it); a draw from
    the tumour group centres it on a random tumour pixel of the slice (nnU-Net's foreground oversampling)."""

    def __init__(self, cases, items, context: int, patch: int, margin: int, shift: int):
        super().__init__(cases, items, context, patch)
        self.patch, self.margin, self.shift = patch, margin, shift

    def __getitem__(self, draw):
        i, group, key = draw
        k, z = self.items[i]
        c = self.cases[k]
        f = self._file(k)
        rng = np.random.default_rng(list(key))
        p, size = self.patch, c.size
        _, _, r0, r1, c0, c1 = (int(v) for v in c.bbox3d)
        jitter = rng.integers(-self.shift, self.shift + 1, size=4) if self.shift else np.zeros(4, int)
        box = tuple(int(e + j) for e, j in zip(grow((r0, r1, c0, c1), self.margin), jitter))
        box = (box[0], max(box[1], box[0] + 1), box[2], max(box[3], box[2] + 1))
        region = tile_region(box, size, p)
        lab_full = f["label"][z]
        origin = []
        tum = np.argwhere(lab_full == 2) if c.tumour[z] else np.zeros((0, 2), int)
        centre = tum[rng.integers(len(tum))] if (group == 0 and len(tum)) else None
        for ax, (a0, a1) in enumerate(((region[0], region[1]), (region[2], region[3]))):
            hi = max(a0, a1 - p)
            if centre is not None:
                o = int(centre[ax]) - p // 2 + int(rng.integers(-(p // 4), p // 4 + 1))
            else:
                o = int(rng.integers(a0, hi + 1))
            origin.append(min(max(o, a0), hi))
        ro, co = origin
        idx = context_indices(z, c.n_slices, self.context, c.stride)
        lo, hi_ = idx[0], idx[-1] + 1
        block = f["image"][lo:hi_, ro : ro + p, co : co + p].astype(np.float32)
        img = crop_padded(block[[j - lo for j in idx]], 0, 0, p)
        lab = crop_padded(lab_full, ro, co, p).astype(np.int64)
        return torch.from_numpy(img), torch.from_numpy(lab), torch.tensor(float(c.liver[z]))
