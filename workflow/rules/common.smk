import json
import os
import shlex
import sys
from pathlib import Path

from snakemake.utils import validate

# The package lives in workflow/liverseg; jobs (including --use-conda ones, which run another Python) find it
# through PYTHONPATH, and the venv that runs Snakemake comes first on PATH for plain runs.
_PKG_DIR = str(Path(workflow.basedir) / "workflow")
os.environ["PYTHONPATH"] = os.pathsep.join([_PKG_DIR] + [p for p in [os.environ.get("PYTHONPATH", "")] if p])
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if _PKG_DIR not in sys.path:
    sys.path.insert(0, _PKG_DIR)

from liverseg.ingest import discover  # noqa: E402
from liverseg.split import make_split  # noqa: E402

validate(config, schema="../schemas/config.schema.yaml")

R = config["results"]
DISCOVERY = discover(config)
for _cid, _reason in DISCOVERY.rejected:
    print(f"liverseg: case {_cid} rejected: {_reason}", file=sys.stderr)
CASES = {c.case_id: c for c in DISCOVERY.cases}
LABELLED = [c.case_id for c in DISCOVERY.cases if c.labelled]
UNLABELLED = [c.case_id for c in DISCOVERY.cases if not c.labelled]
if not CASES:
    raise WorkflowError(f"no usable case found for dataset.source={config['dataset']['source']!r}")

# The same function the split rule runs; evaluated here too so that training only waits for its own cases' files.
SPLIT = make_split(
    LABELLED,
    UNLABELLED,
    **{k: config["split"][k] for k in ("seed", "test_fraction", "val_fraction", "folds", "fold")},
)


wildcard_constraints:
    case="[A-Za-z0-9_-]+",


def case_image(wildcards):
    return CASES[wildcards.case].image


def case_label(wildcards):
    return CASES[wildcards.case].label


def existing_inputs(wildcards):
    """Input files that exist; a missing one is reported by the case's own job, not by the DAG."""
    c = CASES[wildcards.case]
    paths = {"image": c.image}
    if c.label:
        paths["label"] = c.label
    from_phantom = config["dataset"]["source"] == "phantom"
    return {k: v for k, v in paths.items() if from_phantom or os.path.exists(v)}


def h5(case):
    return f"{R}/preprocess/{case}.h5"


def data_targets():
    return [h5(c) for c in CASES] + [f"{R}/split/split.json"]


def all_targets():
    exps = config["experiments"]
    return (
        data_targets()
        + [f"{R}/report/summary.md", f"{R}/report/dice_per_case.png"]
        + expand(f"{R}/report/overlays/{{experiment}}/{{case}}.png", experiment=exps, case=SPLIT["test"])
        + expand(f"{R}/predict/{{experiment}}/{{case}}.nii.gz", experiment=exps, case=SPLIT["predict"])
    )
