"""Case-level split into train / validation / test, with k-fold cross-validation support.

Splitting by case, never by slice: neighbouring slices of one patient are nearly identical, so a slice-level split
(as in the original study) leaks patients into the test set and inflates every score.

With ``folds == 1`` the non-test cases are split once by ``val_fraction``.  With ``folds == k > 1`` the non-test
cases are cut into k folds; fold ``fold`` is the validation set and the rest is training, and ``folds_cases``
lists every fold's train/val cases (what a fold ensemble, ``split.ensemble``, trains).  The test set is the same
for every fold, so fold results are comparable.  Unlabelled cases are listed as ``predict`` and never trained on.
"""

from __future__ import annotations

import json
import logging
import math

import numpy as np

from liverseg.config import default
from liverseg.errors import ConfigError

log = logging.getLogger(__name__)


def make_split(
    labelled: list[str],
    unlabelled: list[str] = (),
    seed: int = default("split.seed"),
    test_fraction: float = default("split.test_fraction"),
    val_fraction: float = default("split.val_fraction"),
    folds: int = default("split.folds"),
    fold: int = default("split.fold"),
    failed: dict[str, str] | None = None,
) -> dict:
    if not 0 <= fold < max(folds, 1):
        raise ConfigError(f"invalid config value at 'split.fold': {fold} must be in [0, {folds}) (split.folds)")
    ids = sorted(set(labelled))
    rng = np.random.default_rng(seed)
    order = [ids[i] for i in rng.permutation(len(ids))]
    n = len(order)
    n_test = int(math.floor(n * test_fraction + 0.5)) if test_fraction > 0 else 0
    if test_fraction > 0 and n >= 3:
        n_test = max(1, n_test)
    n_test = min(n_test, max(n - 2, 0))  # always leave one training and one validation case when possible
    test, rest = order[:n_test], order[n_test:]
    if folds > 1:
        if len(rest) < folds:
            raise ConfigError(f"invalid config value at 'split.folds': {len(rest)} non-test cases cannot make {folds} folds")
        val = sorted(rest[fold::folds])
        # Every fold's lists in one place (the fold ensemble trains each fold from these): fold f validates on
        # rest[f::folds] and trains on the other folds; the test set is the same for all.
        fold_lists = [(sorted(c for c in rest if c not in set(rest[f::folds])), sorted(rest[f::folds]))
                      for f in range(folds)]
    else:
        n_val = int(math.floor(len(rest) * val_fraction + 0.5))
        n_val = min(max(1 if len(rest) >= 2 else 0, n_val), max(len(rest) - 1, 0))
        val = sorted(rest[:n_val])
    train = sorted(c for c in rest if c not in set(val))
    if not [c for c in train if c not in (failed or {})] and n:
        raise ValueError(f"no training case left: {n} labelled case(s) for test_fraction={test_fraction}")
    # Cases that failed their check keep their place in the assignment (so fixing one later changes only its own
    # subset) but are left out of every list that later stages read.
    failed = dict(failed or {})

    def ok(ids):
        return [c for c in ids if c not in failed]

    out = {
        "seed": seed,
        "folds": folds,
        "fold": fold,
        "train": ok(train),
        "val": ok(val),
        "test": ok(sorted(test)),
        "predict": ok(sorted(set(unlabelled))),
        "failed": {c: failed[c] for c in sorted(failed)},
        "failed_subset": {c: next(k for k, ids in (("train", train), ("val", val), ("test", test),
                                                   ("predict", unlabelled)) if c in ids)
                          for c in sorted(failed) if c in set(train) | set(val) | set(test) | set(unlabelled)},
    }
    if folds > 1:  # absent for a single split, whose split.json stays as it was
        out["folds_cases"] = [{"train": ok(t), "val": ok(v)} for t, v in fold_lists]
    return out


def split_from_checks(case_table, check_files: list, out, seed: int = default("split.seed"),
                      test_fraction: float = default("split.test_fraction"),
                      val_fraction: float = default("split.val_fraction"), folds: int = default("split.folds"),
                      fold: int = default("split.fold")) -> dict:
    """The workflow's split: the case table (liverseg.ingest.write_case_table) and one verdict file per case
    (liverseg.ingest.check_case); cases whose check failed are left out with their error.  Writes ``out``."""
    from liverseg.ingest import read_case_table

    rows = read_case_table(case_table)
    labelled = [r["case_id"] for r in rows if r["status"] == "labelled"]
    unlabelled = [r["case_id"] for r in rows if r["status"] == "predict-only"]
    verdicts = {}
    for f in check_files:
        v = json.loads(open(f).read())
        verdicts[v["case"]] = v
    missing = [c for c in labelled + unlabelled if c not in verdicts]
    if missing:
        raise ConfigError(f"no check verdict for case(s) {', '.join(missing[:5])}")
    failed = {c: verdicts[c]["error"] for c in labelled + unlabelled if not verdicts[c]["ok"]}
    split = make_split(labelled, unlabelled, seed, test_fraction, val_fraction, folds, fold, failed=failed)
    for err in failed.values():
        log.warning("left out: %s", err)
    write_split(split, out)
    log.info("split: %d train, %d val, %d test, %d predict-only",
             *(len(split[k]) for k in ("train", "val", "test", "predict")))
    return split


def write_split(split: dict, path) -> None:
    from liverseg.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(split, indent=2) + "\n")


def read_split(path) -> dict:
    with open(path) as fh:
        return json.load(fh)
