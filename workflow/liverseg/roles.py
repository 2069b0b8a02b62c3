"""The one table of model roles and experiments.

Read by the config check (`experiments` must name rows of EXPERIMENTS), by the workflow (workflow/rules/common.smk: which models a rule needs, the `train` rule's `{role}` wildcard
and resources), by the CLI (choices of `--role` and `--mode`), by training (dataset, sampler, loss, validator) and
by prediction (which models a mode loads).  Adding a role or an experiment means adding a row here.

Columns of ROLES:
  kind       network family built by models.build
  data       what one training sample is: a whole slice (resized to the model's input), a fixed-size patch of the
             stored grid around the liver, a sequence of slices, a 3D patch
  sampler    how an epoch is drawn: liver/non-liver balanced, liver- and tumour-oversampled slices, tumour-centred
             patches inside the liver's z-range, liver-oversampled sequences or 3D patches
  loss       bce (classifier) or ce_dice (cross-entropy + soft Dice over liver and tumour)
  validator  how the best epoch is chosen on the validation cases: slice sensitivity-constrained threshold, pooled
             Dice of whole volumes, or pooled Dice of whole volumes through the cascade (A's boxes, the gate)
  predictor  how the model is applied: per slice, tiles inside A's liver box, sequences, 3D sliding window
  needs      roles whose trained models this role needs at training time (B is validated through the cascade)
  mem_mb, runtime   job resources of its `train` rule (minutes)
"""

from __future__ import annotations

ROLES: dict[str, dict] = {
    "classifier": {"kind": "classifier", "data": "slice", "sampler": "liver_balanced", "loss": "bce",
                   "validator": "slice_sensitivity", "predictor": "classify", "needs": [],
                   "mem_mb": 8000, "runtime": 240},
    "model_a": {"kind": "segmenter", "data": "slice", "sampler": "liver_tumour", "loss": "ce_dice",
                "validator": "volume", "predictor": "slices", "needs": [], "mem_mb": 12000, "runtime": 720},
    "model_b": {"kind": "segmenter", "data": "liver_patch", "sampler": "tumour_patch", "loss": "ce_dice",
                "validator": "cascade", "predictor": "tiles", "needs": ["classifier", "model_a"],
                "mem_mb": 12000, "runtime": 720},
    "v3_convlstm": {"kind": "convlstm", "data": "sequence", "sampler": "liver_tumour", "loss": "ce_dice",
                    "validator": "volume", "predictor": "sequences", "needs": [], "mem_mb": 16000, "runtime": 720},
    "v1_3dcnn": {"kind": "unet3d", "data": "patch3d", "sampler": "liver_tumour", "loss": "ce_dice",
                 "validator": "volume", "predictor": "sliding_window_3d", "needs": [], "mem_mb": 16000,
                 "runtime": 720},
}

# Prediction modes: the models each loads, in order (the first one is the whole-volume segmenter).
MODES: dict[str, list[str]] = {
    "cascade": ["model_a", "classifier", "model_b"],
    "model_a": ["model_a"],
    "v3_convlstm": ["v3_convlstm"],
    "v1_3dcnn": ["v1_3dcnn"],
}

# The original study's experiments, in its results table's order: prediction mode and the table's row title.
EXPERIMENTS: dict[str, dict] = {
    "v4_cascade": {"mode": "cascade", "title": "V4 cascade: classifier + UNet++ A/B, gated, + CCA"},
    "v2_unetpp_cca": {"mode": "model_a", "title": "V2 2D UNet++ + CCA"},
    "v3_convlstm": {"mode": "v3_convlstm", "title": "V3 2.5D ConvLSTM + CCA"},
    "v1_3dcnn": {"mode": "v1_3dcnn", "title": "V1 3D CNN + CCA"},
}

GATES = ("route", "suppress")


# A fold ensemble (config split.ensemble) evaluates each experiment twice over: `<experiment>` is the ensemble of
# all folds and `<experiment>-fold<f>` fold f's models alone (the report's single-fold rows).
FOLD_SUFFIX = "-fold"


def fold_experiment(experiment: str, fold: int) -> str:
    return f"{experiment}{FOLD_SUFFIX}{fold}"


def parse_experiment(name: str) -> tuple[str, int | None]:
    """``v4_cascade-fold1`` -> ("v4_cascade", 1); ``v4_cascade`` -> ("v4_cascade", None)."""
    base, sep, fold = name.rpartition(FOLD_SUFFIX)
    if sep and base in EXPERIMENTS and fold.isdigit():
        return base, int(fold)
    return name, None
