"""Training of every model role in liverseg.roles (slice classifier, UNet++ A on whole slices, UNet++ B on
fixed-scale liver patches, and the V1/V3 variants).

Checkpoints: after every epoch ``<checkpoint_dir>/last.pt`` holds model, optimiser, scheduler, epoch, history,
the best weights so far and the moving average of the validation score (``smoothed_score``).  A rerun resumes
from it only when its resume key matches: the role's own config, the identity of every training and validation
case (the source files' sha256 and the pipeline version, recorded as HDF5 attributes at preprocessing), the
models the role depends on and the package version.  A finished training removes ``last.pt`` when it writes
``model.pt``, so a forced rerun trains every epoch again.
Randomness (sampling, patch placement, augmentation, torch's global RNG) is re-derived from (seed, epoch, draw) at
each epoch start, so a resumed run produces the same weights as an uninterrupted one.

Data-parallel (``train.gpus`` > 1, started by torchrun; liverseg.parallel): every process trains on its share of
each global batch, and the run computes what one process computes on the same batches (up to float rounding);
rank 0 alone validates and writes the checkpoint, log and model, whose files are those of a single-process run.

Best epoch, on the validation cases only, by the best moving average of the epochs' scores (EpochSelector,
``train.selection_smoothing``):
- segmenters: mean of liver Dice and tumour Dice, each pooled over every validation voxel (a per-case mean with
  "both empty = 1" would reward never predicting tumour);  model B is validated through the cascade: model A's
  liver region and z-range, the classifier's gate, B on the slices the gate sends it;
- classifier: balanced accuracy at the highest threshold that keeps slice sensitivity >= ``min_sensitivity``
  (0.99); that threshold is stored with the model and used for gating.
After training, test-time augmentation (A, B) and the gate mode (B) are chosen on the same validation cases and
stored in model.json under ``selection``; test cases never take part.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import logging
import math
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from liverseg import __version__
from liverseg import models as M
from liverseg.errors import ConfigError
from liverseg.plan import context_distance
from liverseg.cascade import PooledDice, b_counts, prepare_val_case
from liverseg.data import (LiverPatchDataset, PatchDataset, SequenceDataset, SliceDataset, augment, augment_draws,
                           epoch_draws, index_cases, intensity_jitter, sequence_slices)
from liverseg.geometry import patch_grid
from liverseg.inference import case_stride, classify, segment_sequences, slice_probs, sliding_window_3d
from liverseg.inference import tta_transforms
from liverseg.config import default, training_view
from liverseg.io import atomic_path, content_sha256
from liverseg.parallel import (Procs, all_sum, data_parallel, from_main, inner, per_process, processes, share,
                               sums)
from liverseg.roles import GATES, ROLES

log = logging.getLogger(__name__)


# How the kept epoch is chosen (EpochSelector); part of the resume key, so a checkpoint whose best epoch an earlier
# rule chose restarts instead of carrying that choice over.
SELECTION_RULE = "bias-corrected moving average, eligible from its window"


def resume_key(cfg: dict, role: str, train_cases: list, val_cases: list, needs: dict | None = None) -> str:
    """What a checkpoint must match to be resumed (see the module docstring).  The config part is exactly what the
    workflow's train rule passes (config.training_view), so what reruns a job and what restarts it agree."""
    relevant = {
        "config": training_view(cfg, role), "role": role,
        "train": [c.identity for c in train_cases], "val": [c.identity for c in val_cases],
        "needs": {r: content_sha256(p) for r, p in sorted((needs or {}).items())},
        "package_version": __version__,
        "selection": SELECTION_RULE,
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stored_grid(cases) -> dict:
    """The stored grid every training case shares (slice size, mm per pixel) and the context distance that
    ``slices.context_mm: auto`` gives on these cases (plan.context_distance, the figure plan.json reports as
    ``context_mm_auto`` for the same training and validation cases).  Cases preprocessed on different grids
    cannot train one model: that is a one-line error."""
    grids = {(c.size, round(float(c.identity.get("spacing_mm") or 0), 6)) for c in cases}
    if len(grids) > 1:
        raise ConfigError(f"training cases were preprocessed on different grids (size, mm per pixel): {sorted(grids)}; "
                          "preprocess them again with one plan")
    size, mm = grids.pop()
    return {"slice_size": int(size), "spacing_mm": float(mm) or None,
            "context_mm_auto": context_distance([c.z_mm for c in cases]) if cases else None}


def _mm_per_pixel(spec: dict) -> dict:
    """In-plane mm per pixel of the stored slices and at the model's input."""
    mm = spec.get("spacing_mm")
    if not mm:
        return {}
    resized = spec["role"] not in ("model_b", "v1_3dcnn")  # B and V1 take crops of the stored grid
    scale = spec["slice_size"] / spec["input_size"] if resized else 1.0
    return {"stored": round(mm, 4), "input": round(mm * scale, 4)}


def make_spec(cfg: dict, role: str, grid: dict) -> dict:
    """The model file's spec; ``grid`` is the training cases' stored grid (stored_grid)."""
    m = cfg["train"][role]
    kind = ROLES[role]["kind"]
    context = 0 if kind == "unet3d" else cfg["slices"]["context"]
    size = int(grid["slice_size"])
    cmm = cfg["slices"]["context_mm"]
    context_mm = float(cmm) if cmm not in (None, "auto") else grid["context_mm_auto"]
    spec = {
        "role": role,
        "kind": kind,
        "arch": {"classifier": "SliceClassifier", "segmenter": "UnetPlusPlus", "convlstm": "UnetPlusPlusConvLSTM",
                 "unet3d": "UNet3D"}[kind],
        "encoder": m.get("encoder"),
        "encoder_depth": m.get("encoder_depth"),
        "encoder_weights": cfg["train"]["encoder_weights"],
        "in_channels": 2 * context + 1,
        "context": context,
        "classes": 1 if role == "classifier" else 3,
        "input_size": m.get("input_size") or size,
        "slice_size": size,
        "spacing_mm": grid["spacing_mm"],
        "context_mm": round(float(context_mm), 4) if context_mm else None,
        "window": dict(cfg["window"]),
        "augment": dict(cfg["train"]["augment"]),
        "pipeline_version": __version__,
    }
    if role == "model_b":
        # B works on the stored grid at a fixed scale: its input is a patch of it, never a resized crop.
        spec["patch_size"] = min(int(m["patch_size"]), size)
        spec["input_size"] = spec["patch_size"]
        spec["crop_margin"] = int(m["crop_margin"])
        spec["z_margin_mm"] = float(m["z_margin_mm"])
        spec["box_shift"] = int(m["box_shift"])
    if spec["encoder_weights"] == "imagenet" and kind != "unet3d":
        spec["input_norm"] = M.imagenet_statistics(spec["encoder"], spec["in_channels"])
    if kind in ("segmenter", "convlstm"):
        spec["decoder_channels"] = list(m["decoder_channels"])[: m["encoder_depth"]]
    if kind == "segmenter" and m.get("full_res_channels"):
        spec["full_res_channels"] = int(m["full_res_channels"])
        spec["arch"] = "UnetPlusPlusFullRes"
    if kind == "convlstm":
        spec["seq_len"] = m["seq_len"]
    if kind == "unet3d":
        spec["channels_3d"] = list(m["channels_3d"])
        spec["patch"] = [m["patch_depth"], min(m["patch_size"], size)]
        spec["input_size"] = spec["patch"][1]
    return spec


class EpochSelector:
    """Which epoch's weights to keep: the best exponential moving average of the validation score (nnU-Net keeps
    its best checkpoint by the same kind of average of its pseudo-Dice).  A single epoch's score on a few
    validation cases is noisy, above all its tumour half: with three validation cases a tumour Dice of 0.01 in one
    epoch and 0 in the others (a few voxels) outweighed a liver Dice 0.006 better, and kept an under-trained
    epoch (issue 12).  ``smoothing`` 0 keeps the raw score's best epoch.

    nnU-Net's 1000 epochs hide two biases that our 16 do not (issue 12: model B's first epoch, whose over-called
    tumour scored a pooled tumour Dice of 0.064 against 0 to 0.019 later, outscored every later average and was
    kept over 15 trained epochs):
    - the average is bias-corrected as Adam's moments are (started at 0, divided by 1 - smoothing^n), so each epoch
      weighs by its age alone; started at the first score instead, epoch 1 would still weigh 0.9^9 = 39% of
      epoch 10's average;
    - an epoch is eligible only once the average spans its window, round(1 / (1 - smoothing)) epochs (10 at 0.9;
      at most ``epochs``, so the last epoch always is): before that it is one or two noisy scores, and their best
      is biased upwards.
    A NaN score counts as the worst possible."""

    def __init__(self, smoothing: float, epochs: int, smoothed: float | None = None, best: float = -math.inf,
                 seen: int = 0):
        self.smoothing, self.best, self.seen = float(smoothing), best, int(seen)
        self.warmup = min(int(epochs), max(1, round(1.0 / (1.0 - self.smoothing))))
        self.smoothed = smoothed
        # the uncorrected average, recovered from the corrected one a checkpoint holds
        self._ema = 0.0 if smoothed is None else smoothed * (1.0 - self.smoothing ** self.seen)

    def update(self, score: float) -> bool:
        """Add one epoch's score; True when it is the best so far (the weights to keep)."""
        a = self.smoothing
        score = float(score)
        self.seen += 1
        self._ema = a * self._ema + (1 - a) * (score if math.isfinite(score) else -1e9)
        self.smoothed = self._ema / (1.0 - a ** self.seen)
        if self.seen >= self.warmup and self.smoothed > self.best:
            self.best = self.smoothed
            return True
        return False


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0, procs: Procs = Procs()
                   ) -> torch.Tensor:
    """1 - mean soft Dice over the foreground classes, pooled over the batch (2D or 3D logits (B, K, ...)).

    Liver and tumour weigh equally, whatever their voxel counts: the tumour-aware half of the loss.  In a
    data-parallel run (``procs``) the batch is the global one: the sums are pooled over the processes."""
    probs = torch.softmax(logits.float(), dim=1)[:, 1:]
    onehot = torch.movedim(F.one_hot(target, logits.shape[1]), -1, 1).float()[:, 1:]
    dims = (0,) + tuple(range(2, logits.dim()))
    pooled = all_sum(torch.stack([(probs * onehot).sum(dim=dims), probs.sum(dim=dims) + onehot.sum(dim=dims)]), procs)
    inter, denom = pooled[0], pooled[1]
    return 1 - ((2 * inter + eps) / (denom + eps)).mean()


def sensitivity_threshold(scores: np.ndarray, truth: np.ndarray, min_sensitivity: float = default("train.min_sensitivity")
                          ) -> tuple[float, float]:
    """The highest threshold whose slice sensitivity is >= ``min_sensitivity``, and the balanced accuracy there.

    The gate may only drop liver slices rarely: a missed slice is lost liver, a false positive costs little."""
    pos, neg = int(truth.sum()), int((~truth).sum())
    if pos == 0:
        return 0.5, float(((scores >= 0.5) == truth).mean())
    ps = np.sort(scores[truth])
    # keep at least ceil(min_sensitivity * pos) positives: the threshold is the score of the k-th largest
    k = int(math.ceil(min_sensitivity * pos - 1e-9))
    thr = float(ps[pos - k]) if k > 0 else float(ps[-1]) + 1e-6
    pred = scores >= thr
    sens = (pred & truth).sum() / pos
    spec = (~pred & ~truth).sum() / neg if neg else 1.0
    return thr, float((sens + spec) / 2)


def _items_and_groups(cases, role: str, spec: dict):
    """Dataset items and sampling groups: (items, [groups], each group a list of item indices)."""
    items, liver, other, tumour = [], [], [], []
    if role == "v3_convlstm":
        t = spec["seq_len"]
        for k, c in enumerate(cases):  # sequences of t slices c.stride apart (sequence_slices)
            for z0 in range(max(c.n_slices - (t - 1) * c.stride, 1)):
                zs = sequence_slices(z0, c.n_slices, t, c.stride)
                i = len(items)
                items.append((k, z0))
                (liver if c.liver[zs].any() else other).append(i)
                if c.tumour[zs].any():
                    tumour.append(i)
        return items, liver, other, tumour
    if role == "v1_3dcnn":
        d, p = spec["patch"]
        for k, c in enumerate(cases):
            _, _, br0, br1, bc0, bc1 = (int(v) for v in c.bbox3d)
            st = c.stride  # a patch's d slices are st apart: the residue classes z mod st tile the volume
            for res in range(min(st, c.n_slices)):
                for j0 in patch_grid(len(range(res, c.n_slices, st)), d):
                    z0 = res + j0 * st
                    zl = c.liver[z0 : z0 + (d - 1) * st + 1 : st]
                    for r0 in patch_grid(c.size, p):
                        for c0 in patch_grid(c.size, p):
                            i = len(items)
                            items.append((k, z0, r0, c0))
                            hit = zl.any() and r0 < br1 and br0 < r0 + p and c0 < bc1 and bc0 < c0 + p
                            (liver if hit else other).append(i)
        return items, liver, other, tumour
    for k, c in enumerate(cases):
        if role == "model_b":
            zr = c.liver_zrange(spec["z_margin_mm"])
            zs = range(zr[0], zr[1]) if zr else []
        else:
            zs = range(c.n_slices)
        for z in zs:
            i = len(items)
            items.append((k, z))
            (liver if c.liver[z] else other).append(i)
            if c.tumour[z]:
                tumour.append(i)
    return items, liver, other, tumour


def _sampling(role: str, m: dict, liver, other, tumour, n_items: int):
    """Groups and their shares of each epoch (an empty group gets share 0; positions are kept, since model B's
    dataset centres draws of group 0, the tumour group, on tumour); every segmenter oversamples tumour slices."""
    everything = list(range(n_items))
    sampler = ROLES[role]["sampler"]
    if sampler == "liver_balanced":
        groups, fracs = [liver, other], [0.5, 0.5]
    elif sampler == "tumour_patch":
        groups, fracs = [tumour, everything], [m["tumour_fraction"], 1 - m["tumour_fraction"]]
    else:
        # tumour slices are drawn out of the liver share, so the share of slices of every kind (background
        # included: what teaches the model to reject the spleen) stays 1 - liver_fraction
        lf = m["liver_fraction"]
        tf = min(m.get("tumour_fraction", 0.0), lf)
        groups, fracs = [tumour, liver, everything], [tf, lf - tf, 1 - lf]
    fracs = [f if g else 0.0 for g, f in zip(groups, fracs)]
    total = sum(fracs)
    return groups, [f / total if total else 0.0 for f in fracs]


# ---------------------------------------------------------------------------------------------- validation
def _read(path, label: bool = True):
    with h5py.File(path, "r") as f:
        return f["image"][:], (f["label"][:] if label else None)


def _volume_counts(model, spec, role, case, device, amp, tta=False) -> np.ndarray:
    """Pooled counts of one validation case (CaseIndex, its stride set for this model) segmented by a whole-volume
    model, on the stored grid."""
    image, label = _read(case.path)
    n, size = image.shape[0], image.shape[-1]
    stride = case.stride
    pred = np.zeros_like(label)
    if role == "v3_convlstm":
        for bz, p in segment_sequences(model, spec, image, device, amp=amp, stride=stride):
            pred[bz] = p.argmax(dim=1).to(torch.uint8).numpy()
    elif role == "v1_3dcnn":
        for bz, p in sliding_window_3d(model, spec, image, device, amp=amp, stride=stride):
            pred[bz] = p.argmax(dim=1).to(torch.uint8).numpy()
    else:
        for bz, p in slice_probs(model, spec, image, list(range(n)), device, amp=amp, tta=tta, out_size=size,
                                 stride=stride):
            pred[bz] = p.argmax(dim=1).to(torch.uint8).numpy()
    return PooledDice.of(pred, label).counts


def _dice_row(pd: PooledDice) -> dict:
    ld, td = pd.dice()
    return {"val_liver_dice": ld, "val_tumour_dice": td, "score": pd.score()}


def validate(model, spec, role, val_cases, device, amp, ctx: dict | None = None) -> dict:
    model.eval()
    if role == "classifier":
        scores, truth = [], []
        for c in val_cases:
            image, _ = _read(c.path, label=False)
            scores.append(classify(model, spec, image, device, amp=amp, stride=c.stride))
            truth.append(c.liver.astype(bool))
        s, t = np.concatenate(scores), np.concatenate(truth)
        thr, bacc = sensitivity_threshold(s, t, ctx["min_sensitivity"])
        bce = float(F.binary_cross_entropy(torch.from_numpy(s).clamp(1e-6, 1 - 1e-6), torch.from_numpy(t).float()))
        return {"val_loss": bce, "val_balanced_accuracy": bacc, "threshold": thr, "score": bacc}
    total = np.zeros((2, 3), np.int64)
    if role == "model_b":
        for vc in ctx["val_prepared"]:
            total += vc.base[ctx["gate"]] + b_counts(vc, model, spec, device, amp)
    else:
        for c in val_cases:
            total += _volume_counts(model, spec, role, c, device, amp)
    return _dice_row(PooledDice(total))


def _select(model, spec, role, val_cases, device, amp, ctx) -> dict:
    """Choose TTA (A, B) and the gate (B) on the validation cases, with the best weights."""
    model.eval()
    ttas = [False, True] if len(tta_transforms(spec)) > 1 else [False]
    table = []
    if role == "model_a":
        for tta in ttas:
            pd = PooledDice(sum(_volume_counts(model, spec, role, c, device, amp, tta) for c in val_cases))
            table.append({"tta": tta, **_dice_row(pd)})
    else:
        b = {tta: [b_counts(vc, model, spec, device, amp, tta) for vc in ctx["val_prepared"]] for tta in ttas}
        for gate in ctx["gates"]:
            for tta in ttas:
                total = sum(vc.base[gate] + bc for vc, bc in zip(ctx["val_prepared"], b[tta]))
                table.append({"gate": gate, "tta": tta, **_dice_row(PooledDice(total))})
    best = max(table, key=lambda r: r["score"])  # first of equals: no TTA, the study's routing
    out = {k: best[k] for k in ("gate", "tta") if k in best}
    out["table"] = [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()} for r in table]
    out["criterion"] = "mean of liver and tumour Dice pooled over the validation voxels"
    return out


class _LineWriter:
    """tqdm output for log files: one line per update instead of carriage-return redraws."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self):
        self.stream.flush()


def _progress(iterable, desc: str, disable: bool = False):
    """A progress bar: live on a terminal; in a rule's log, one line at most every 30 s (tail -f friendly)."""
    if sys.stderr.isatty():
        return tqdm(iterable, desc=desc, file=sys.stderr, mininterval=1, dynamic_ncols=True, disable=disable)
    return tqdm(iterable, desc=desc, file=_LineWriter(sys.stderr), mininterval=30, ncols=100, ascii=True,
                disable=disable)


def _plot(history: list[dict], path: Path, role: str, kept: int | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].plot(ep, [h["train_loss"] for h in history], "o-", label="train loss")
    if "val_loss" in history[0]:
        ax[0].plot(ep, [h["val_loss"] for h in history], "o-", label="val loss")
    ax[0].set_xlabel("epoch")
    ax[0].legend()
    for key in ("val_liver_dice", "val_tumour_dice", "val_balanced_accuracy"):
        if key in history[0]:
            ax[1].plot(ep, [h[key] for h in history], "o-", label=key.replace("val_", "val "))
    if "val_score_smoothed" in history[0]:  # what chooses the kept epoch (EpochSelector)
        ax[1].plot(ep, [h["val_score_smoothed"] for h in history], "--", color="grey", label="val score, moving average")
    if kept and kept > 0:
        ax[1].axvline(kept, color="black", lw=0.8, ls=":", label=f"kept epoch {kept}")
    ax[1].set_ylim(0, 1)
    ax[1].set_xlabel("epoch")
    ax[1].legend()
    fig.suptitle(f"{role}: learning curves")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)


def _write_csv(history: list[dict], path: Path) -> None:
    keys = list(history[0].keys())
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys, delimiter=",")
        w.writeheader()
        w.writerows(history)


def _load_needs(role: str, needs: dict | None, device) -> dict:
    missing = [r for r in ROLES[role]["needs"] if not needs or r not in needs]
    if missing:
        raise ValueError(f"{role} is validated through the cascade and needs trained model(s) {missing}")
    return {r: M.load(needs[r], device=device) for r in ROLES[role]["needs"]}


def _prepare_cascade_validation(cfg, spec, val_cases, models, device, amp) -> dict:
    """Model A and the classifier run once on each validation case; B's epochs then only run B."""
    gate_cfg = cfg["predict"]["gate"]
    gates = list(GATES) if gate_cfg == "auto" else [gate_cfg]
    spec_a, spec_c = models["model_a"][1], models["classifier"][1]
    a_tta = bool(spec_a.get("selection", {}).get("tta", False))
    prepared = [prepare_val_case(c.path, models, spec_c["threshold"], spec["crop_margin"], spec["z_margin_mm"],
                                 spec["patch_size"], gates, device, amp, a_tta=a_tta) for c in val_cases]
    return {"val_prepared": prepared, "gates": gates, "gate": "route" if gate_cfg == "auto" else gate_cfg}


def train(role: str, train_h5: list, val_h5: list, cfg: dict, outputs: dict, checkpoint_dir,
          threads: int = default("train.threads"), needs: dict[str, str] | None = None,
          device: str = default("train.device"), workers: int = default("train.workers")) -> dict:
    """Train one model on the preprocessed cases ``train_h5``, choose its epoch on ``val_h5``; write
    ``outputs["model"]`` (weights), ``["spec"]`` (model.json), ``["log"]`` (CSV) and ``["curves"]`` (PNG).

    ``needs``: role -> model.pt of the trained models this role depends on (liverseg.roles, column ``needs``).
    ``threads``, ``device``, ``workers``: how the job runs, passed apart from ``cfg`` (config.training_view leaves
    them out, so changing them retrains nothing); so is the number of processes: started by torchrun
    (``train.gpus``, liverseg.parallel), this process trains its share of every batch and rank 0 writes the files."""
    if role not in ROLES:
        raise ValueError(f"unknown model role {role!r}")
    missing = sorted({r for r in ROLES[role]["needs"]} - set(needs or {}))
    if missing:
        raise ConfigError(f"training {role} needs the trained model(s) {missing} (give --needs ROLE=MODEL_PT)")
    absent = [str(p) for p in [*train_h5, *val_h5, *(needs or {}).values()] if not Path(p).is_file()]
    if absent:
        raise ConfigError(f"{role}: input file(s) not found: {', '.join(absent[:5])}")
    torch.set_num_threads(max(1, threads))
    with processes(M.resolve_device(device)) as (procs, device):
        return _train(role, train_h5, val_h5, cfg, outputs, checkpoint_dir, needs, device, workers, procs)


def _train(role, train_h5, val_h5, cfg, outputs, checkpoint_dir, needs, device, workers, procs: Procs) -> dict:
    tc, m = cfg["train"], cfg["train"][role]
    amp = bool(tc["amp"]) and device.type == "cuda"
    seed = int(tc["seed"])
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)

    train_cases = index_cases([str(p) for p in train_h5])
    val_cases = index_cases([str(p) for p in val_h5])
    if not val_cases and procs.main:
        log.warning("%s: no validation cases; the last epoch is kept", role)
    spec = make_spec(cfg, role, stored_grid(train_cases + val_cases))
    for c in train_cases + val_cases:
        c.stride = case_stride(spec, c.z_mm)
    key = resume_key(cfg, role, train_cases, val_cases, needs)
    spec["config_hash"] = key
    spec["mm_per_pixel"] = _mm_per_pixel(spec)
    items, liver, other, tumour = _items_and_groups(train_cases, role, spec)
    if not items or (role != "model_b" and not liver):
        raise ValueError(f"{role}: the training cases hold no {'liver ' if role != 'classifier' else ''}slices to learn from")
    groups, fracs = _sampling(role, m, liver, other, tumour, len(items))
    data = ROLES[role]["data"]
    if data == "sequence":
        dataset = SequenceDataset(train_cases, items, spec["context"], spec["input_size"], spec["seq_len"])
    elif data == "patch3d":
        dataset = PatchDataset(train_cases, items, tuple(spec["patch"]))
    elif data == "liver_patch":
        dataset = LiverPatchDataset(train_cases, items, spec["context"], spec["patch_size"], spec["crop_margin"],
                                    spec["box_shift"])
    else:
        dataset = SliceDataset(train_cases, items, spec["context"], spec["input_size"])

    ctx = {"min_sensitivity": float(tc["min_sensitivity"])}
    if ROLES[role]["needs"] and procs.main:  # only rank 0 validates
        models = _load_needs(role, needs, device)
        if val_cases:
            ctx.update(_prepare_cascade_validation(cfg, spec, val_cases, models, device, amp))
        del models

    per = per_process(m["batch_size"], procs)  # samples of each batch this process trains on (a bad split fails here)
    torch.manual_seed(seed)
    try:
        net = M.build(spec).to(device)
    except KeyError as exc:  # smp's answer to an unknown encoder name
        raise ConfigError(f"invalid config value at 'train.{role}.encoder': {str(exc)[:160].strip(chr(34))}") from None
    # Several processes: ``model`` is the DistributedDataParallel wrapper that trains, ``net`` the model it holds
    # (validated by rank 0, saved: its state dict is a single-process model's).
    model = data_parallel(net, procs, device)
    net = inner(model)
    opt = torch.optim.AdamW(model.parameters(), lr=m["lr"], weight_decay=tc["weight_decay"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=m["epochs"], eta_min=m["lr"] * 0.02)
    scaler = torch.amp.GradScaler("cuda", enabled=amp and not torch.cuda.is_bf16_supported())
    start_epoch, history, best = 0, [], {"score": -math.inf, "state": None, "epoch": -1, "val": {}}
    selector = EpochSelector(tc["selection_smoothing"], m["epochs"])

    ckpt_path = checkpoint_dir / "last.pt"
    if ckpt_path.exists():
        try:
            ck = torch.load(ckpt_path, map_location=device, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a damaged checkpoint only costs a fresh start
            log.warning("%s: ignoring unreadable checkpoint %s (%s)", role, ckpt_path, str(exc).splitlines()[0])
            ck = None
        if ck is not None and ck.get("config_hash") == key:
            net.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
            start_epoch, history, best = int(ck["epoch"]), list(ck["history"]), ck["best"]
            selector = EpochSelector(tc["selection_smoothing"], m["epochs"], ck.get("smoothed_score"), best["score"],
                                     seen=start_epoch)
            if procs.main:
                log.info("%s: resuming from checkpoint after epoch %d (%s)", role, start_epoch, ckpt_path)
            if ck.get("stopped"):  # stopped early before it could write model.pt: no more epochs
                start_epoch = m["epochs"]
        elif ck is not None and procs.main:
            log.info("%s: checkpoint %s has another resume key (config, data, code or needed models changed); "
                     "starting afresh", role, ckpt_path)

    patience = int(tc["early_stopping_patience"])
    if val_cases and procs.main and selector.warmup > 1:
        log.info("%s: the kept epoch is chosen from epoch %d of %d on (selection_smoothing %s)%s", role,
                 selector.warmup, m["epochs"], selector.smoothing,
                 "; early stopping cannot fire in so few epochs" if patience and selector.warmup + patience > m["epochs"]
                 else "")
    kind = ROLES[role]["kind"]
    for epoch in range(start_epoch, m["epochs"]):
        torch.manual_seed(seed * 100003 + epoch)
        # every process draws the whole epoch and takes its share of each global batch (liverseg.parallel.share)
        draws = share(epoch_draws(groups, fracs, m["samples_per_epoch"], seed, epoch), m["batch_size"], procs)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=per, sampler=draws, num_workers=workers, drop_last=True, persistent_workers=False,
        )
        model.train()
        t0, seen, loss_sum, n_batches = time.time(), 0, 0.0, 0
        bar = _progress(loader, f"{role} epoch {epoch + 1}/{m['epochs']}", disable=not procs.main)
        aug = tc["augment"]
        for b, (x, y, has_liver) in enumerate(bar):
            u = augment_draws([d[2] for d in draws[b * per : (b + 1) * per]])  # per sample: see data.augment_draws
            if kind == "unet3d":  # 3D patches: intensity jitter only
                x = intensity_jitter(x, u, aug["intensity"])
            elif kind == "convlstm":
                t = x.shape[1]
                xa, ya = augment(x.flatten(0, 1), y.flatten(0, 1), u, aug["rotate_deg"], aug["scale"],
                                 aug["intensity"], aug["flip_prob"], group=t)
                x, y = xa.view(x.shape), ya
            else:
                x, y = augment(x, None if role == "classifier" else y, u, aug["rotate_deg"], aug["scale"],
                               aug["intensity"], aug["flip_prob"])
            x = x.to(device, non_blocking=True)
            with M.autocast(device, amp):
                out = model(x)
                if kind == "convlstm":
                    out = out.flatten(0, 1)
                # Means over this process's equal share: DistributedDataParallel's average of the gradients makes
                # them the global batch's; soft Dice pools its sums over the processes itself.
                if ROLES[role]["loss"] == "bce":
                    loss = F.binary_cross_entropy_with_logits(out.float(), has_liver.to(device))
                else:
                    y = y.to(device)
                    loss = (tc["ce_weight"] * F.cross_entropy(out.float(), y)
                            + tc["dice_weight"] * soft_dice_loss(out, y, procs=procs))
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc["grad_clip"])
            scaler.step(opt)
            scaler.update()
            loss_sum += float(loss.detach())
            n_batches += 1
            seen += x.shape[0] * (x.shape[1] if kind == "convlstm" else x.shape[2] if kind == "unet3d" else 1)
            bar.set_postfix(loss=f"{loss_sum / n_batches:.4f}", refresh=False)  # this process's share
        bar.close()
        loss_sum, seen = sums([loss_sum / procs.world, seen], procs, device)  # the global batches' mean loss
        lr = opt.param_groups[0]["lr"]
        sched.step()
        train_s = time.time() - t0
        stop = False
        if procs.main:
            val = validate(net, spec, role, val_cases, device, amp, ctx) if val_cases else {"score": float(epoch)}
            is_best = selector.update(val["score"])
            row = {"epoch": epoch + 1, "train_loss": round(loss_sum / max(n_batches, 1), 6), "lr": lr,
                   **{k: round(v, 6) for k, v in val.items() if k != "score"},
                   **({"val_score": round(float(val["score"]), 6), "val_score_smoothed": round(selector.smoothed, 6)}
                      if val_cases else {}),  # without validation cases the "score" is the epoch: the last is kept
                   "seconds": round(time.time() - t0, 2), "slices_per_s": round(seen / max(train_s, 1e-9), 2)}
            history.append(row)
            log.info("%s epoch %d: %s", role, epoch + 1, json.dumps(row))
            if is_best:
                best = {"score": selector.best, "state": copy.deepcopy(net.state_dict()), "epoch": epoch + 1,
                        "val": {k: float(v) for k, v in val.items()}}
            # counted from the kept epoch, so never before the selector's window is full (no epoch is kept before)
            stop = bool(patience and best["epoch"] > 0 and epoch + 1 - best["epoch"] >= patience)
            ck = {"config_hash": key, "epoch": epoch + 1, "model": net.state_dict(), "optimizer": opt.state_dict(),
                  "scheduler": sched.state_dict(), "history": history, "best": best, "stopped": stop,
                  "smoothed_score": selector.smoothed}
            with atomic_path(ckpt_path) as tmp:
                torch.save(ck, tmp)
            _write_csv(history, checkpoint_dir / "log.csv")
        if from_main(stop, procs, device):  # the other processes wait here while rank 0 validates
            if procs.main:
                log.info("%s: early stop, no improvement for %d epochs", role, patience)
            break

    if not procs.main:  # rank 0 writes the model
        return spec
    # The saved model is a plain one (BatchNorm, not its synchronised variant) with the best weights.
    model = M.build(spec, download=False).to(device) if procs.distributed else net  # weights loaded next
    model.load_state_dict(best["state"])
    model.eval()
    spec.update({
        "best_epoch": best["epoch"], "epochs_run": len(history), "seed": seed,
        "criterion": ("balanced accuracy at the highest threshold with slice sensitivity >= "
                      f"{ctx['min_sensitivity']}" if role == "classifier"
                      else "mean of liver and tumour Dice pooled over the validation voxels"
                      + (" (through the cascade)" if role == "model_b" else ""))
                     + f"; best moving average over epochs (smoothing {selector.smoothing}, from epoch "
                       f"{selector.warmup})",
        "validation": best["val"], "train_cases": [c.identity["case_id"] for c in train_cases],
        "val_cases": [c.identity["case_id"] for c in val_cases],
        "torch_version": torch.__version__,
    })
    if role == "classifier":
        spec["threshold"] = float(best["val"].get("threshold", 0.5))
    if val_cases and role in ("model_a", "model_b"):
        spec["selection"] = _select(model, spec, role, val_cases, device, amp, ctx)
        log.info("%s: chosen on validation: %s", role, json.dumps({k: v for k, v in spec["selection"].items()
                                                                   if k != "table"}))
    out = {k: Path(v) for k, v in outputs.items()}
    for f in out.values():
        f.parent.mkdir(parents=True, exist_ok=True)
    _write_csv(history, out["log"])
    _plot(history, out["curves"], role, best["epoch"])
    M.save(model.cpu(), spec, out["model"], out["spec"])
    # A finished training is never resumed: a forced rerun must train again, not hand back these weights.
    ckpt_path.unlink(missing_ok=True)
    log.info("%s: best epoch %d, %s", role, best["epoch"], json.dumps(best["val"]))
    return spec
