import json
import os
import shlex
import sys
from pathlib import Path

from snakemake.utils import validate

# The package lives in workflow/liverseg (importable here without installation).
sys.path.insert(0, str(Path(workflow.basedir) / "workflow"))

from liverseg.ingest import discover  # noqa: E402
from liverseg.roles import EXPERIMENTS, MODES, ROLES  # noqa: E402
from liverseg.runenv import configure  # noqa: E402

configure(workflow.basedir)

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



def split_data():
    """The split written by the `split` checkpoint: train/val/test/predict hold only cases that passed their
    check; `failed` maps the others to their one-line error. Input functions calling this wait for the checkpoint."""
    with open(checkpoints.split.get().output[0]) as fh:
        return json.load(fh)


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


def check_file(case):
    return f"{R}/ingest/checks/{case}.json"


def data_targets(wildcards):
    sp = split_data()
    return [h5(c) for c in sp["train"] + sp["val"] + sp["test"] + sp["predict"]]


def all_targets(wildcards):
    exps = config["experiments"]
    sp = split_data()
    good = sp["train"] + sp["val"] + sp["test"] + sp["predict"]
    # Without labelled test cases there is nothing to evaluate; predict-only cases are still segmented.
    report_files = [f"{R}/report/summary.md", f"{R}/report/dice_per_case.png"] if sp["test"] else []
    return (
        [h5(c) for c in good]
        + report_files
        + expand(f"{R}/report/overlays/{{experiment}}/{{case}}.png", experiment=exps, case=sp["test"])
        + expand(f"{R}/postprocess/{{experiment}}/{{case}}.nii.gz", experiment=exps, case=sp["predict"])
    )


# ---------------------------------------------------------------- training
def model_file(role):
    return f"{R}/train/{role}/model.pt"


def train_inputs(wildcards):
    """The role's training and validation cases, and the trained models it needs (liverseg.roles)."""
    sp = split_data()
    return {"h5": [h5(c) for c in sp["train"] + sp["val"]],
            "needs": [model_file(r) for r in ROLES[wildcards.role]["needs"]]}


def train_split_json(wildcards):
    """Only the case lists training uses: a split change elsewhere (e.g. a fixed test case) does not retrain."""
    sp = split_data()
    return json.dumps({k: sp[k] for k in ("train", "val")})


def test_cases():
    return split_data()["test"]


def train_params_json(wildcards):
    """What this role's training reads from the config, and nothing else, so that a change to another role's
    settings (or to prediction) does not retrain it: window, slices, the shared train keys, the role's own
    section, and predict.gate for model B (validated through the cascade with that gate)."""
    role = wildcards.role
    train = {k: v for k, v in config["train"].items() if k == role or k not in ROLES}
    out = {"window": config["window"], "slices": config["slices"], "train": train}
    if role == "model_b":
        out["predict"] = {"gate": config["predict"]["gate"]}
    return json.dumps(out, sort_keys=True)


def slurm_resources(kind):
    """Partition/account resources for SLURM from config.cluster; nothing when unset (local runs ignore them)."""
    c = config["cluster"]
    out = {}
    part = c["gpu_partition"] if kind == "gpu" else c["cpu_partition"]
    if part:
        out["slurm_partition"] = part
    if c["account"]:
        out["slurm_account"] = c["account"]
    return out


def gpu_resources(section):
    """GPU request of training/prediction jobs: one GPU when the device may be CUDA, none for device: cpu."""
    use_gpu = config[section]["device"] in ("auto", "cuda")
    res = {"gpu": 1 if use_gpu else 0}
    if use_gpu:
        res["cpus_per_gpu"] = config[section]["threads"]
    return {**res, **slurm_resources("gpu" if use_gpu else "cpu")}


# ---------------------------------------------------------------- prediction and evaluation
wildcard_constraints:
    experiment="|".join(EXPERIMENTS),
    stage="raw|post",


def predict_mode(wildcards):
    return EXPERIMENTS[wildcards.experiment]["mode"]


def models_for(wildcards):
    return [model_file(r) for r in MODES[predict_mode(wildcards)]]


def stage_prediction(wildcards):
    folder = "predict" if wildcards.stage == "raw" else "postprocess"
    return f"{R}/{folder}/{wildcards.experiment}/{wildcards.case}.nii.gz"


def kaggle_cases():
    sp = split_data()
    return sp["predict"] if config["kaggle"]["cases"] == "predict" else sp["test"]


def kaggle_experiment():
    return config["kaggle"]["experiment"] or config["experiments"][-1]
