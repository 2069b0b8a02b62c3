"""Training of the slice classifier and the two UNet++ specialists (model A: all slices, model B: liver crops).

Checkpoints: after every epoch ``<checkpoint_dir>/last.pt`` holds model, optimiser, scheduler, epoch, history and the
best weights so far.  A rerun with the same config hash resumes from it; a different config starts afresh.
Randomness (sampling, augmentation, torch's global RNG) is re-derived from (seed, epoch) at each epoch start,
so a resumed run produces the same weights as an uninterrupted one, and two runs with one seed on CPU are equal.

Best checkpoint criterion (validation cases, per-case means, never pixel-pooled):
- segmenters: mean over cases of (liver Dice + tumour Dice) / 2, with the empty-mask convention of metrics.py;
- classifier: balanced accuracy at the threshold that maximises Youden's J (sensitivity + specificity - 1);
  that threshold is stored with the model and used for gating.
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
from liverseg.data import (PatchDataset, SequenceDataset, SliceDataset, augment, crop_box, epoch_indices,
                           index_cases, patch_grid)
from liverseg.inference import classify, resize_probs_to_slices, segment, segment_sequences, sliding_window_3d
from liverseg.io import atomic_path
from liverseg.metrics import liver_tumour_dice
from liverseg import models as M

log = logging.getLogger(__name__)
ROLES = ("classifier", "model_a", "model_b", "v3_convlstm", "v1_3dcnn")
KINDS = {"classifier": "classifier", "model_a": "segmenter", "model_b": "segmenter", "v3_convlstm": "convlstm",
         "v1_3dcnn": "unet3d"}


def config_hash(cfg: dict, role: str, split: dict) -> str:
    relevant = {
        "window": cfg["window"], "slices": cfg["slices"], "role": role, "model": cfg["train"][role],
        "common": {k: v for k, v in cfg["train"].items() if k not in ROLES and k not in ("device", "workers")},
        "train_cases": split["train"], "val_cases": split["val"],
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def make_spec(cfg: dict, role: str) -> dict:
    m = cfg["train"][role]
    kind = KINDS[role]
    context = 0 if kind == "unet3d" else cfg["slices"]["context"]
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
        "input_size": m.get("input_size") or cfg["slices"]["size"],
        "slice_size": cfg["slices"]["size"],
        "window": dict(cfg["window"]),
        "crop": role == "model_b",
        "crop_margin": cfg["train"]["model_b"]["crop_margin"] if role == "model_b" else None,
        "pipeline_version": __version__,
    }
    if kind in ("segmenter", "convlstm"):
        spec["decoder_channels"] = list(m["decoder_channels"])[: m["encoder_depth"]]
    if kind == "convlstm":
        spec["seq_len"] = m["seq_len"]
    if kind == "unet3d":
        spec["channels_3d"] = list(m["channels_3d"])
        spec["patch"] = [m["patch_depth"], min(m["patch_size"], cfg["slices"]["size"])]
        spec["input_size"] = spec["patch"][1]
    return spec


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - mean soft Dice over the foreground classes, pooled over the batch (2D or 3D logits (B, K, ...))."""
    probs = torch.softmax(logits.float(), dim=1)[:, 1:]
    onehot = torch.movedim(F.one_hot(target, logits.shape[1]), -1, 1).float()[:, 1:]
    dims = (0,) + tuple(range(2, logits.dim()))
    inter = (probs * onehot).sum(dim=dims)
    denom = probs.sum(dim=dims) + onehot.sum(dim=dims)
    return 1 - ((2 * inter + eps) / (denom + eps)).mean()


def youden_threshold(scores: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Threshold maximising sensitivity + specificity - 1, and the balanced accuracy there."""
    pos, neg = truth.sum(), (~truth).sum()
    if pos == 0 or neg == 0:
        return 0.5, float(((scores >= 0.5) == truth).mean())
    best_t, best_j = 0.5, -1.0
    for t in np.unique(np.concatenate([scores, [0.5]])):
        pred = scores >= t
        sens = (pred & truth).sum() / pos
        spec = (~pred & ~truth).sum() / neg
        if sens + spec - 1 > best_j:
            best_t, best_j = float(t), float(sens + spec - 1)
    return best_t, (best_j + 1) / 2


def _items_and_groups(cases, role: str, spec: dict):
    items, liver, other, tumour = [], [], [], []
    if role == "v3_convlstm":
        t = spec["seq_len"]
        for k, c in enumerate(cases):
            for z0 in range(max(c.n_slices - t, 0) + 1):
                i = len(items)
                items.append((k, z0))
                (liver if c.liver[z0 : z0 + t].any() else other).append(i)
                if c.tumour[z0 : z0 + t].any():
                    tumour.append(i)
        return items, liver, other, tumour
    if role == "v1_3dcnn":
        d, p = spec["patch"]
        for k, c in enumerate(cases):
            _, _, br0, br1, bc0, bc1 = (int(v) for v in c.bbox3d)
            for z0 in patch_grid(c.n_slices, d):
                for r0 in patch_grid(c.size, p):
                    for c0 in patch_grid(c.size, p):
                        i = len(items)
                        items.append((k, z0, r0, c0))
                        hit = c.liver[z0 : z0 + d].any() and r0 < br1 and br0 < r0 + p and c0 < bc1 and bc0 < c0 + p
                        (liver if hit else other).append(i)
        return items, liver, other, tumour
    for k, c in enumerate(cases):
        for z in range(c.n_slices):
            if role == "model_b" and not c.liver[z]:
                continue
            i = len(items)
            items.append((k, z))
            (liver if c.liver[z] else other).append(i)
            if c.tumour[z]:
                tumour.append(i)
    return items, liver, other, tumour


def _sampling(role: str, m: dict, liver, other, tumour, n_items: int):
    everything = list(range(n_items))
    if role == "classifier":
        groups, fracs = [liver, other], [0.5, 0.5]
    elif role in ("model_a", "v3_convlstm", "v1_3dcnn"):
        groups, fracs = [liver, everything], [m["liver_fraction"], 1 - m["liver_fraction"]]
    else:
        groups, fracs = [tumour, everything], [m["tumour_fraction"], 1 - m["tumour_fraction"]]
    keep = [(g, f) for g, f in zip(groups, fracs) if g and f > 0]
    total = sum(f for _, f in keep)
    return [g for g, _ in keep], [f / total for _, f in keep]


def validate(model, spec, role, val_cases, device, amp) -> dict:
    model.eval()
    if role == "classifier":
        scores, truth = [], []
        for c in val_cases:
            with h5py.File(c.path, "r") as f:
                image = f["image"][:]
            scores.append(classify(model, spec, image, device, amp=amp))
            truth.append(c.liver.astype(bool))
        s, t = np.concatenate(scores), np.concatenate(truth)
        thr, bacc = youden_threshold(s, t)
        bce = float(F.binary_cross_entropy(torch.from_numpy(s).clamp(1e-6, 1 - 1e-6), torch.from_numpy(t).float()))
        return {"val_loss": bce, "val_balanced_accuracy": bacc, "threshold": thr, "score": bacc}
    liver_d, tumour_d = [], []
    for c in val_cases:
        with h5py.File(c.path, "r") as f:
            image, label = f["image"][:], f["label"][:]
        if role in ("v3_convlstm", "v1_3dcnn"):
            pred = np.zeros_like(label)
            if role == "v3_convlstm":
                for bz, lab in segment_sequences(model, spec, image, device, amp=amp):
                    pred[bz] = lab
            else:
                probs = sliding_window_3d(model, spec, image, device, amp=amp)
                pred = resize_probs_to_slices(probs, list(range(c.n_slices)), label.shape[1:])
            ld, td = liver_tumour_dice(pred, label)
            liver_d.append(ld)
            tumour_d.append(td)
            continue
        if role == "model_b":
            zs = [int(z) for z in np.flatnonzero(c.liver)]
            if not zs:
                continue
            box = crop_box(c.bbox3d, c.size, spec["crop_margin"])
        else:
            zs, box = list(range(c.n_slices)), None
        pred = np.zeros((len(zs),) + label.shape[1:], np.uint8)
        pos = {z: i for i, z in enumerate(zs)}
        for bz, lab in segment(model, spec, image, zs, device, box=box, amp=amp):
            pred[[pos[z] for z in bz]] = lab
        ld, td = liver_tumour_dice(pred, label[zs])
        liver_d.append(ld)
        tumour_d.append(td)
    ld, td = float(np.mean(liver_d)) if liver_d else 0.0, float(np.mean(tumour_d)) if tumour_d else 0.0
    return {"val_liver_dice": ld, "val_tumour_dice": td, "score": (ld + td) / 2}


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


def _progress(iterable, desc: str):
    """A progress bar: live on a terminal; in a rule's log, one line at most every 30 s (tail -f friendly)."""
    if sys.stderr.isatty():
        return tqdm(iterable, desc=desc, file=sys.stderr, mininterval=1, dynamic_ncols=True)
    return tqdm(iterable, desc=desc, file=_LineWriter(sys.stderr), mininterval=30, ncols=100, ascii=True)


def _plot(history: list[dict], path: Path, role: str) -> None:
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


def train(role: str, h5_paths: dict[str, str], split: dict, cfg: dict, out_dir, checkpoint_dir,
          threads: int = 1) -> dict:
    """Train one model; write model.pt, model.json, log.csv and curves.png into ``out_dir``."""
    if role not in ROLES:
        raise ValueError(f"unknown model role {role!r}")
    tc, m = cfg["train"], cfg["train"][role]
    torch.set_num_threads(max(1, threads))
    device = M.resolve_device(tc["device"])
    amp = bool(tc["amp"]) and device.type == "cuda"
    seed = int(tc["seed"])
    out_dir, checkpoint_dir = Path(out_dir), Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)

    train_cases = index_cases([h5_paths[c] for c in split["train"]])
    val_cases = index_cases([h5_paths[c] for c in split["val"]]) if split["val"] else []
    if not val_cases:
        log.warning("%s: no validation cases; the last epoch is kept", role)
    spec = make_spec(cfg, role)
    chash = config_hash(cfg, role, split)
    spec["config_hash"] = chash
    items, liver, other, tumour = _items_and_groups(train_cases, role, spec)
    if not items or (role not in ("model_b",) and not liver):
        raise ValueError(f"{role}: the training cases hold no {'liver ' if role != 'classifier' else ''}slices to learn from")
    groups, fracs = _sampling(role, m, liver, other, tumour, len(items))
    if role == "v3_convlstm":
        dataset = SequenceDataset(train_cases, items, spec["context"], spec["input_size"], spec["seq_len"])
    elif role == "v1_3dcnn":
        dataset = PatchDataset(train_cases, items, tuple(spec["patch"]))
    else:
        dataset = SliceDataset(train_cases, items, spec["context"], spec["input_size"],
                               crop_margin=spec["crop_margin"] if role == "model_b" else None)

    torch.manual_seed(seed)
    model = M.build(spec).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=m["lr"], weight_decay=tc["weight_decay"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=m["epochs"], eta_min=m["lr"] * 0.02)
    scaler = torch.amp.GradScaler("cuda", enabled=amp and not torch.cuda.is_bf16_supported())
    start_epoch, history, best = 0, [], {"score": -math.inf, "state": None, "epoch": -1, "val": {}}

    ckpt_path = checkpoint_dir / "last.pt"
    if ckpt_path.exists():
        try:
            ck = torch.load(ckpt_path, map_location=device, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a damaged checkpoint only costs a fresh start
            log.warning("%s: ignoring unreadable checkpoint %s (%s)", role, ckpt_path, str(exc).splitlines()[0])
            ck = None
        if ck is not None and ck.get("config_hash") == chash:
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
            start_epoch, history, best = int(ck["epoch"]), list(ck["history"]), ck["best"]
            log.info("%s: resuming from checkpoint after epoch %d (%s)", role, start_epoch, ckpt_path)
        elif ck is not None:
            log.info("%s: checkpoint %s is from another config; starting afresh", role, ckpt_path)

    patience = int(tc["early_stopping_patience"])
    for epoch in range(start_epoch, m["epochs"]):
        torch.manual_seed(seed * 100003 + epoch)
        gen = torch.Generator().manual_seed(seed * 100003 + epoch)
        idx = epoch_indices(groups, fracs, m["samples_per_epoch"], seed, epoch)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=m["batch_size"], sampler=idx, num_workers=tc["workers"], drop_last=True,
            persistent_workers=False,
        )
        model.train()
        t0, seen, loss_sum, n_batches = time.time(), 0, 0.0, 0
        bar = _progress(loader, f"{role} epoch {epoch + 1}/{m['epochs']}")
        for x, y, has_liver in bar:
            aug = tc["augment"]
            if role == "v1_3dcnn":  # 3D patches: intensity jitter only
                gain = 1 + (torch.rand(x.shape[0], 1, 1, 1, 1, generator=gen) * 2 - 1) * aug["intensity"]
                x = x * gain
            elif role == "v3_convlstm":
                b, t = x.shape[:2]
                xa, ya = augment(x.flatten(0, 1), y.flatten(0, 1), gen, aug["rotate_deg"], aug["scale"],
                                 aug["intensity"], aug["flip_prob"], group=t)
                x, y = xa.view(x.shape), ya
            else:
                x, y = augment(x, None if role == "classifier" else y, gen, aug["rotate_deg"], aug["scale"],
                               aug["intensity"], aug["flip_prob"])
            x = x.to(device, non_blocking=True)
            with M.autocast(device, amp):
                out = model(x)
                if role == "v3_convlstm":
                    out = out.flatten(0, 1)
                if role == "classifier":
                    loss = F.binary_cross_entropy_with_logits(out.float(), has_liver.to(device))
                else:
                    y = y.to(device)
                    loss = tc["ce_weight"] * F.cross_entropy(out.float(), y) + tc["dice_weight"] * soft_dice_loss(out, y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc["grad_clip"])
            scaler.step(opt)
            scaler.update()
            loss_sum += float(loss.detach())
            n_batches += 1
            seen += x.shape[0] * (x.shape[1] if role == "v3_convlstm" else x.shape[2] if role == "v1_3dcnn" else 1)
            bar.set_postfix(loss=f"{loss_sum / n_batches:.4f}", refresh=False)
        bar.close()
        lr = opt.param_groups[0]["lr"]
        sched.step()
        train_s = time.time() - t0
        val = validate(model, spec, role, val_cases, device, amp) if val_cases else {"score": float(epoch)}
        row = {"epoch": epoch + 1, "train_loss": round(loss_sum / max(n_batches, 1), 6), "lr": lr,
               **{k: round(v, 6) for k, v in val.items() if k != "score"},
               "seconds": round(time.time() - t0, 2), "slices_per_s": round(seen / max(train_s, 1e-9), 2)}
        history.append(row)
        log.info("%s epoch %d: %s", role, epoch + 1, json.dumps(row))
        if val["score"] > best["score"]:
            best = {"score": float(val["score"]), "state": copy.deepcopy(model.state_dict()), "epoch": epoch + 1,
                    "val": {k: float(v) for k, v in val.items()}}
        ck = {"config_hash": chash, "epoch": epoch + 1, "model": model.state_dict(), "optimizer": opt.state_dict(),
              "scheduler": sched.state_dict(), "history": history, "best": best}
        with atomic_path(ckpt_path) as tmp:
            torch.save(ck, tmp)
        _write_csv(history, checkpoint_dir / "log.csv")
        if patience and epoch + 1 - best["epoch"] >= patience:
            log.info("%s: early stop, no improvement for %d epochs", role, patience)
            break

    model.load_state_dict(best["state"])
    spec.update({
        "best_epoch": best["epoch"], "epochs_run": len(history), "seed": seed,
        "criterion": "balanced accuracy at Youden threshold" if role == "classifier"
        else "mean per-case (liver Dice + tumour Dice) / 2",
        "validation": best["val"], "train_cases": split["train"], "val_cases": split["val"],
        "torch_version": torch.__version__,
    })
    if role == "classifier":
        spec["threshold"] = float(best["val"].get("threshold", 0.5))
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_csv(history, out_dir / "log.csv")
    _plot(history, out_dir / "curves.png", role)
    M.save(model.cpu(), spec, out_dir / "model.pt", out_dir / "model.json")
    log.info("%s: best epoch %d, %s", role, best["epoch"], json.dumps(best["val"]))
    return spec
