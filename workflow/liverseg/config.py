"""Load a liverseg config the same way the Snakefile does: one JSON schema, defaults filled in.

The schema (workflow/schemas/config.schema.yaml) is the only place defaults live: the CLI's option defaults come
from ``default()`` and the stages' views of the config from the functions below.
"""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import yaml

from liverseg.errors import ConfigError
from liverseg.roles import EXPERIMENTS, ROLES

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"
SCHEMA_PATH = SCHEMA_DIR / "config.schema.yaml"


def _with_defaults(cls):
    validate_props = cls.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub:
                    instance.setdefault(name, copy.deepcopy(sub["default"]))
        yield from validate_props(validator, properties, instance, schema)

    return jsonschema.validators.extend(cls, {"properties": set_defaults})


def schema() -> dict:
    with open(SCHEMA_PATH) as fh:
        return yaml.safe_load(fh)


def sample_row_errors(row: dict) -> list[str]:
    """Messages for one sample-sheet row against workflow/schemas/samples.schema.yaml (empty when valid)."""
    with open(SCHEMA_DIR / "samples.schema.yaml") as fh:
        validator = jsonschema.Draft202012Validator(yaml.safe_load(fh))
    return [e.message for e in validator.iter_errors(row)]


# Keys renamed since earlier versions -> what to write instead.
RENAMED = {"train.model_b.z_margin": "z_margin_mm, a margin in mm (rounded up to whole slices of each case): "
                                     "2 slices of 5 mm are z_margin_mm: 10"}


def validate(cfg: dict) -> dict:
    """Validate in place and fill defaults; raise ConfigError naming the offending key."""
    for old, new in RENAMED.items():  # keys of earlier versions: say what they became, not just "not allowed"
        *path, last = old.split(".")
        node = cfg
        for k in path:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict) and last in node:
            raise ConfigError(f"invalid config value at '{old}': renamed to {new}")
    validator = _with_defaults(jsonschema.Draft202012Validator)(schema())
    errors = sorted(validator.iter_errors(cfg), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        key = ".".join(str(p) for p in e.absolute_path) or "(top level)"
        raise ConfigError(f"invalid config value at '{key}': {e.message}")
    if cfg["kaggle"]["train_on_all"] and cfg["kaggle"]["cases"] == "test":
        raise ConfigError("invalid config value at 'kaggle.cases': 'test' exports the held-out test cases, and "
                          "kaggle.train_on_all leaves none; use kaggle.cases: predict")
    if cfg["split"]["ensemble"] and cfg["split"]["folds"] < 2:
        raise ConfigError("invalid config value at 'split.ensemble': a fold ensemble needs split.folds >= 2 "
                          f"(got {cfg['split']['folds']})")
    for i, e in enumerate(cfg["experiments"]):
        if e not in EXPERIMENTS:
            raise ConfigError(f"invalid config value at 'experiments.{i}': unknown experiment {e!r}; known: "
                              f"{list(EXPERIMENTS)} (liverseg.roles.EXPERIMENTS)")
    return cfg


def load(path: str | Path | None = None, overrides: dict | None = None) -> dict:
    cfg = {}
    if path is not None:
        try:
            with open(path) as fh:
                cfg = yaml.safe_load(fh) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config {path}: {str(exc).splitlines()[0]}") from None
    if overrides:
        _merge(cfg, overrides)
    return validate(cfg)


def _merge(base: dict, extra: dict) -> None:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v


_DEFAULTS: dict | None = None


def default(dotted: str):
    """The schema's default of one key, e.g. ``default("window.lower")`` (the CLI's option defaults)."""
    global _DEFAULTS
    if _DEFAULTS is None:
        _DEFAULTS = validate({})
    v = _DEFAULTS
    for k in dotted.split("."):
        v = v[k]
    return copy.deepcopy(v)


# Settings that change how a job runs, not what it computes: they never retrain a model or restart a checkpoint.
EXECUTION_ONLY = {"train": ("threads", "device", "workers", "gpus"), "slices": ("compression",)}


def training_view(cfg: dict, role: str) -> dict:
    """Everything training ``role`` reads from the config and nothing else: the window and slice settings the
    data was made with, the shared training keys, the role's own section and, for a role validated through the
    cascade, the gate.  The workflow's train rule passes exactly this (so an edit elsewhere reruns nothing) and
    the resume key hashes exactly this."""
    r = ROLES[role]
    unread = set(EXECUTION_ONLY["train"])
    if r["validator"] != "slice_sensitivity":
        unread.add("min_sensitivity")
    if r["loss"] != "ce_dice":
        unread |= {"ce_weight", "dice_weight"}
    train = {k: v for k, v in cfg["train"].items() if k not in ROLES and k not in unread}
    train[role] = cfg["train"][role]
    slices = {k: v for k, v in cfg["slices"].items() if k not in EXECUTION_ONLY["slices"]}
    if r["kind"] == "unet3d":  # 3D patches: no 2.5D context, intensity jitter only
        slices.pop("context")
        train["augment"] = {"intensity": cfg["train"]["augment"]["intensity"]}
    out = {"window": cfg["window"], "train": train, "slices": slices}
    if r["validator"] == "cascade":
        out["predict"] = {"gate": cfg["predict"]["gate"]}
    return out
