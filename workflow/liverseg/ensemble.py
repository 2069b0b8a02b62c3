"""The classifier threshold of a fold ensemble, chosen on the pooled out-of-fold validation cases.

Each fold's classifier scores the slices of its own validation fold (cases it never trained on); the scores of
all folds are pooled and the threshold is the highest that keeps slice sensitivity >= train.min_sensitivity on
the pool (train.sensitivity_threshold, the rule single models use), as nnU-Net chooses its postprocessing on the
pooled out-of-fold predictions.  The ensemble applies it to the mean of the folds' scores on new slices: the
pooled scores are single-fold scores (no out-of-fold score of the averaged classifier exists, since every other
fold trained on those cases), so the sensitivity guarantee holds for each member's scores, not exactly for their
mean.  This replaces the mean of the members' own thresholds (models.load_ensemble), which was chosen on no data
at all and can sit far from the pooled choice when folds disagree.
"""

from __future__ import annotations

import json
import logging

import h5py
import numpy as np

from liverseg.config import default
from liverseg.errors import ModelFileError
from liverseg.inference import case_stride, classify
from liverseg.io import atomic_path
from liverseg.models import load, resolve_device
from liverseg.train import sensitivity_threshold

log = logging.getLogger(__name__)


def pooled_threshold(scores: list, truths: list, min_sensitivity: float = default("train.min_sensitivity")) -> dict:
    """Threshold on the pooled scores of all folds (``scores[f]``, ``truths[f]``: fold f's validation slices)."""
    s = np.concatenate([np.asarray(x, np.float32) for x in scores])
    t = np.concatenate([np.asarray(x, bool) for x in truths])
    thr, bacc = sensitivity_threshold(s, t, min_sensitivity)
    per_fold = [sensitivity_threshold(np.asarray(x, np.float32), np.asarray(y, bool), min_sensitivity)[0]
                for x, y in zip(scores, truths)]
    return {"threshold": thr, "balanced_accuracy": bacc, "min_sensitivity": float(min_sensitivity),
            "slices": int(t.size), "liver_slices": int(t.sum()), "fold_thresholds": per_fold,
            "mean_of_fold_thresholds": float(np.mean(per_fold))}


def fold_scores(model_path, val_h5: list, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """One fold's classifier on its validation cases: slice scores and "liver present" truth, as training's
    validation computes them (same stride from the model's context and each case's slice spacing)."""
    dev = resolve_device(device)
    model, spec = load(model_path, device=dev)
    scores, truth = [], []
    for p in val_h5:
        with h5py.File(p, "r") as f:
            image, liver = f["image"][:], f["liver_present"][:].astype(bool)
            z_mm = float(f.attrs["canonical_spacing"][2])
        scores.append(classify(model, spec, image, dev, amp=True, stride=case_stride(spec, z_mm)))
        truth.append(liver)
    if not scores:
        raise ModelFileError(f"classifier {model_path} has no validation case to score")
    return np.concatenate(scores), np.concatenate(truth)


def ensemble_threshold(models: list, val_h5: list[list], out, min_sensitivity: float = default("train.min_sensitivity"),
                       device: str = "cpu") -> dict:
    """``models[f]`` is fold f's classifier, ``val_h5[f]`` its validation cases; writes ``out`` (JSON)."""
    if len(models) != len(val_h5):
        raise ModelFileError(f"{len(models)} classifier(s) for {len(val_h5)} fold(s) of validation cases")
    pairs = [fold_scores(m, v, device) for m, v in zip(models, val_h5)]
    result = pooled_threshold([s for s, _ in pairs], [t for _, t in pairs], min_sensitivity)
    result.update(folds=len(models), models=[str(m) for m in models],
                  what="classifier threshold of the fold ensemble: highest threshold keeping slice sensitivity "
                       ">= min_sensitivity on the pooled out-of-fold validation slices")
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    log.info("ensemble threshold %.4f on %d pooled slices (fold thresholds %s)", result["threshold"],
             result["slices"], result["fold_thresholds"])
    return result


def read_threshold(path) -> float:
    try:
        return float(json.loads(open(path).read())["threshold"])
    except (OSError, ValueError, KeyError) as exc:
        raise ModelFileError(f"cannot read the ensemble threshold from {path}: {exc}") from None
