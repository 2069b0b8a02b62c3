"""The V4 cascade on the stored slice grid: model A, the slice classifier's gate, model B in A's liver region.

What each slice gets (the README's gate table; ``gate_slices`` is the rule, tested with stub networks):

=========================  ==============================  =====================================================
slice                      route (the study's routing)     suppress
=========================  ==============================  =====================================================
positive, in B's z-range   B inside A's liver region,      same as route
                           background outside it
positive, outside z-range  A                               A
negative, A's 3D liver     A                               A
component on the slice
negative, no A component   A                               background
=========================  ==============================  =====================================================

positive = classifier score >= the threshold chosen on validation (highest with slice sensitivity >= 0.99).
A's liver region = the in-plane box of model A's largest 3D liver component, grown by B's ``crop_margin`` and
then to at least one B patch; B's z-range = the slices of that component plus ``z_margin_mm`` (in whole
slices of the case) on each side.
When A finds no liver there is no region and no z-range: no slice goes to B, so the table's rows without B
apply (route: A everywhere; suppress: A on positive slices, background elsewhere), and the log says so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cc3d
import numpy as np
import torch

from liverseg.config import default
from liverseg.geometry import bbox, grow, mm_to_slices, paste, tile_region, z_range
from liverseg.inference import slice_probs, tile_probs

log = logging.getLogger(__name__)

BACKGROUND, USE_A, USE_B = 0, 1, 2


def run_a(model, spec, image: np.ndarray, device, batch: int = default("predict.batch_size"), amp: bool = True,
          tta: bool = False, stride: int = 1, on_batch=None) -> np.ndarray:
    """Model A over every slice: its labels (Z, S, S) uint8 on the stored grid (what the liver region is computed
    from).  ``on_batch(zs, probs)`` receives each batch's probabilities on the stored grid (n, K, S, S) float32,
    the ones the labels come from: prediction writes A's result as it goes, since holding A's probabilities of
    the whole volume, (Z, K, S, S), would be 3x the int16 volume at 512 x 512 (issue 13)."""
    n, size = image.shape[0], image.shape[-1]
    labels = np.zeros((n, size, size), np.uint8)
    for bz, p in slice_probs(model, spec, image, list(range(n)), device, batch=batch, amp=amp, tta=tta,
                             out_size=size, stride=stride):
        labels[bz] = p.argmax(dim=1).to(torch.uint8).numpy()
        if on_batch is not None:
            on_batch(bz, p)
    return labels


def z_margin_slices(spec_b: dict, z_mm: float | None) -> int:
    """B's z-margin in slices of a case with slice spacing ``z_mm``: ``z_margin_mm`` of the model's spec (models
    trained before the margin was in mm stored ``z_margin`` in slices)."""
    if "z_margin_mm" in spec_b:
        return mm_to_slices(float(spec_b["z_margin_mm"]), z_mm)
    return int(spec_b.get("z_margin", 0))


def liver_region(a_labels: np.ndarray, margin: int, z_margin: int, patch: int):
    """(slices where A's largest 3D liver component lies (Z,) bool, B's region (r0, r1, c0, c1) or None,
    B's z-range (z0, z1) or None) from A's labels (Z, S, S) on the stored grid."""
    size = a_labels.shape[-1]
    present = np.zeros(a_labels.shape[0], bool)
    box = bbox(a_labels)  # of every liver or tumour voxel (labels are 0, 1, 2)
    if box is None:
        return present, None, None
    # The largest component's box comes from cc3d's per-label statistics, never as a mask: at 512 x 512 x 900 a
    # whole-volume mask and its uint32 labels were 2.5x the int16 volume (issue 13).  A 3D-connected component
    # lies on consecutive slices, so its slices are its box's z-range.
    comps = cc3d.connected_components(a_labels[box], connectivity=26, binary_image=True)
    stats = cc3d.statistics(comps)
    del comps
    counts = np.asarray(stats["voxel_counts"]).copy()
    counts[0] = 0  # background
    zs, rs, cs = stats["bounding_boxes"][int(np.argmax(counts))]
    z0, z1 = box[0].start + zs.start, box[0].start + zs.stop
    present[z0:z1] = True
    region = (box[1].start + rs.start, box[1].start + rs.stop, box[2].start + cs.start, box[2].start + cs.stop)
    return present, tile_region(grow(region, margin), size, patch), z_range(present, z_margin)


def gate_slices(scores: np.ndarray, threshold: float, present: np.ndarray, zrange, gate: str) -> np.ndarray:
    """Per-slice source: USE_B, USE_A or BACKGROUND (see the module's table)."""
    if gate not in ("route", "suppress"):
        raise ValueError(f"unknown gate {gate!r}; choose route or suppress")
    positive = scores >= threshold
    codes = np.full(len(scores), USE_A, np.int8)
    if gate == "suppress":
        codes[~positive & ~present] = BACKGROUND
    if zrange is not None:
        inside = np.zeros(len(scores), bool)
        inside[zrange[0] : zrange[1]] = True
        codes[positive & inside] = USE_B
    return codes


def combine(a_probs: torch.Tensor, codes: np.ndarray, b_probs: torch.Tensor | None = None, region=None) -> torch.Tensor:
    """Final probabilities (n, K, S, S) of a batch of slices from A's probabilities, the slices' codes and B's
    probabilities over ``region`` for the slices coded USE_B (in order)."""
    out = a_probs.clone()
    bg = torch.zeros_like(out[0])
    bg[0] = 1.0
    codes = np.asarray(codes)
    out[torch.from_numpy(codes == BACKGROUND)] = bg
    use_b = np.flatnonzero(codes == USE_B)
    if use_b.size:
        b_slices = bg.expand(len(use_b), *bg.shape).clone()  # background outside B's region
        paste(b_slices, b_probs, region)
        out[use_b] = b_slices
    return out


def cascade_batches(image, codes, region, model_b, spec_b, device, batch: int = default("predict.batch_size"),
                    amp: bool = True, tta: bool = False, stride: int = 1):
    """Yield (slice indices, final probabilities (n, K, S, S) on the stored grid) in batches for the slices whose
    code is not USE_A (B's slices and background ones): A's result is already written for the others (run_a's
    ``on_batch``), and ``combine`` takes nothing from A on these slices."""
    n, size = image.shape[0], image.shape[-1]
    todo = np.flatnonzero(np.asarray(codes) != USE_A)
    for s in range(0, todo.size, batch):
        zs = [int(z) for z in todo[s : s + batch]]
        c = codes[zs]
        bz = [z for z, k in zip(zs, c) if k == USE_B]
        b = None
        if bz:
            b = torch.cat([p for _, p in tile_probs(model_b, spec_b, image, bz, region, device, batch=batch,
                                                      amp=amp, tta=tta, stride=stride)])
        k = int(spec_b["classes"])
        yield zs, combine(torch.zeros((len(zs), k, size, size)), c, b, region)


class PooledDice:
    """Liver and tumour Dice pooled over every voxel of every case seen (nnU-Net's pseudo-Dice, without the
    per-case empty-mask convention that would reward predicting no tumour on tumour-free cases)."""

    def __init__(self, counts: np.ndarray | None = None):
        # class (liver, tumour) x (intersection, predicted, reference)
        self.counts = np.zeros((2, 3), np.int64) if counts is None else np.array(counts, np.int64)

    @classmethod
    def of(cls, pred: np.ndarray, ref: np.ndarray) -> "PooledDice":
        pd = cls()
        pd.add(pred, ref)
        return pd

    def add(self, pred: np.ndarray, ref: np.ndarray) -> None:
        for k, (p, r) in enumerate(((pred >= 1, ref >= 1), (pred == 2, ref == 2))):
            self.counts[k] += (np.count_nonzero(p & r), np.count_nonzero(p), np.count_nonzero(r))

    def dice(self) -> tuple[float, float]:
        out = []
        for inter, p, r in self.counts:
            out.append(float("nan") if p + r == 0 else float(2 * inter / (p + r)))
        return out[0], out[1]

    def score(self) -> float:
        """Mean of liver and tumour Dice.  Tumour counts only when the reference holds tumour: without reference
        tumour its Dice is 0 for a single false-positive voxel and undefined otherwise, a step that would pick
        epochs by whether they predict any tumour at all rather than by how well they segment."""
        ld, td = self.dice()
        vals = [ld] + ([td] if self.counts[1, 2] > 0 else [])
        vals = [v for v in vals if not np.isnan(v)]
        return float(np.mean(vals)) if vals else 0.0


# ---------------------------------------------------------------------------------------------- validation
@dataclass
class ValCase:
    """One validation case prepared for B: the slices the cascade sends to B, B's region, and the pooled counts
    of every other slice (fixed while B trains, per gate)."""

    path: str
    b_slices: list
    region: tuple | None
    base: dict  # gate -> (2, 3) counts over the slices not sent to B
    z_mm: float = 0.0  # slice spacing: B's neighbours are picked in mm (inference.case_stride)


def prepare_val_case(path, models: dict, threshold: float, margin: int, z_margin_mm: float, patch: int, gates,
                     device, amp: bool = True, a_tta: bool = False, batch: int = default("predict.batch_size")) -> ValCase:
    """Run A and the classifier once on a validation case (``models``: role -> (model, spec)); B's z-range
    grows by ``z_margin_mm`` in this case's slices."""
    import h5py

    from liverseg.inference import case_stride, classify

    with h5py.File(path, "r") as f:
        image, label = f["image"][:], f["label"][:]
        z_mm = float(f.attrs["slice_spacing"])
    model_a, spec_a = models["model_a"]
    clf, spec_c = models["classifier"]
    a_labels = run_a(model_a, spec_a, image, device, batch=batch, amp=amp, tta=a_tta, stride=case_stride(spec_a, z_mm))
    scores = classify(clf, spec_c, image, device, amp=amp, stride=case_stride(spec_c, z_mm))
    present, region, zrange = liver_region(a_labels, margin, mm_to_slices(z_margin_mm, z_mm), patch)
    base, b_slices = {}, None
    for g in gates:
        codes = gate_slices(scores, threshold, present, zrange, g)
        pred = np.where((codes == USE_A)[:, None, None], a_labels, 0).astype(np.uint8)
        keep = codes != USE_B
        base[g] = PooledDice.of(pred[keep], label[keep]).counts
        b_slices = [int(z) for z in np.flatnonzero(codes == USE_B)]  # the same for every gate
    return ValCase(str(path), b_slices, region, base, z_mm)


def b_counts(vc: ValCase, model_b, spec_b, device, amp: bool = True, tta: bool = False, batch: int = default("predict.batch_size")) -> np.ndarray:
    """Pooled counts of B's labels on the slices the cascade sends to B (background outside B's region)."""
    import h5py

    from liverseg.inference import case_stride

    if not vc.b_slices:
        return np.zeros((2, 3), np.int64)
    # Runs every epoch: read only B's slices and their context neighbours, not the whole volume.  Inside the
    # slab, neighbours never need clamping except where the slab edge is the volume's edge, as in the volume.
    stride = case_stride(spec_b, vc.z_mm)
    ctx = int(spec_b["context"]) * stride
    with h5py.File(vc.path, "r") as f:
        n = f["image"].shape[0]
        lo, hi = max(0, vc.b_slices[0] - ctx), min(n, vc.b_slices[-1] + 1 + ctx)
        slab = f["image"][lo:hi]
        label = f["label"][vc.b_slices]
    zs = [z - lo for z in vc.b_slices]
    r0, r1, c0, c1 = vc.region
    pos = {z: i for i, z in enumerate(zs)}
    pred = np.zeros(label.shape, np.uint8)
    for bz, p in tile_probs(model_b, spec_b, slab, zs, vc.region, device, batch=batch, amp=amp, tta=tta,
                            stride=stride):
        pred[[pos[z] for z in bz], r0:r1, c0:c1] = p.argmax(dim=1).to(torch.uint8).numpy()
    return PooledDice.of(pred, label).counts
