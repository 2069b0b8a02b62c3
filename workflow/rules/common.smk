import json
import os
import shlex
import sys
from pathlib import Path

# The package lives in workflow/liverseg (importable here without installation).
sys.path.insert(0, str(Path(workflow.basedir) / "workflow"))

from liverseg.config import training_view, validate as validate_config  # noqa: E402
from liverseg.errors import ConfigError  # noqa: E402
from liverseg.ingest import discover  # noqa: E402
from liverseg.parallel import launcher  # noqa: E402
from liverseg.roles import EXPERIMENTS, MODES, ROLES, fold_experiment, parse_experiment  # noqa: E402
from liverseg import resources as jobres  # noqa: E402
from liverseg.runenv import configure, local_gpus, torch_env_file  # noqa: E402

configure(workflow.basedir)

# The schema (defaults filled in) plus the checks a schema cannot express (experiment names from liverseg.roles).
try:
    validate_config(config)
except ConfigError as _exc:
    raise WorkflowError(f"liverseg: {_exc}") from None

R = config["results"]
try:
    DISCOVERY = discover(config)
except (ConfigError, FileNotFoundError) as _exc:  # one line, not a traceback
    raise WorkflowError(f"liverseg: {_exc}") from None
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


PLAN = f"{R}/plan/plan.json"


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
    if sp["test"] or sp["predict"]:
        report_files.append(f"{R}/report/statistics.tsv")
    return (
        [h5(c) for c in good]
        + report_files
        + expand(f"{R}/dicom_seg/{{experiment}}/{{case}}.dcm", experiment=exps, case=dicom_seg_cases(sp))
        + expand(f"{R}/report/overlays/{{experiment}}/{{case}}.png", experiment=exps, case=sp["test"])
        + expand(f"{R}/postprocess/{{experiment}}/{{case}}.nii.gz", experiment=exps, case=sp["predict"])
    )


# ---------------------------------------------------------------- training
# A fold ensemble (split.ensemble, split.folds = k > 1) trains every role on each fold: results/train/{role}/
# fold_{f}/, with its needs from the same fold.  Without it there is one model per role, at the path it always had.
ENSEMBLE = config["split"]["ensemble"]
FOLDS = list(range(config["split"]["folds"])) if ENSEMBLE else []


def model_file(role, fold=None):
    return f"{R}/train/{role}/model.pt" if fold is None else f"{R}/train/{role}/fold_{fold}/model.pt"


def model_spec(role, fold=None):
    """The JSON spec beside model.pt (models.load reads it from there): an input wherever the model is."""
    return f"{R}/train/{role}/model.json" if fold is None else f"{R}/train/{role}/fold_{fold}/model.json"


ENSEMBLE_THRESHOLD = f"{R}/train/classifier/ensemble.json"


def fold_cases(fold):
    """Fold ``fold``'s train and validation cases (split.json's folds_cases, written by liverseg.split)."""
    sp = split_data()
    if "folds_cases" not in sp:  # a k-fold split.json written before the fold lists were
        raise WorkflowError(f"liverseg: {R}/split/split.json has no folds_cases (written before fold ensembles); "
                            "rerun the split: snakemake --forcerun split")
    if len(sp["folds_cases"]) != len(FOLDS):  # split.folds edited since the split ran
        raise WorkflowError(f"liverseg: {R}/split/split.json holds {len(sp['folds_cases'])} folds but split.folds is "
                            f"{len(FOLDS)}; rerun the split (snakemake --forcerun split), which also re-plans, "
                            "re-preprocesses and retrains")
    return sp["folds_cases"][int(fold)]


def train_fold_inputs(wildcards):
    """train_inputs for fold ``wildcards.fold``: its cases, and the needed roles' models of the same fold."""
    fc = fold_cases(wildcards.fold)
    needs = ROLES[wildcards.role]["needs"]
    return {"train": [h5(c) for c in fc["train"]], "val": [h5(c) for c in fc["val"]],
            "needs": [model_file(r, wildcards.fold) for r in needs],
            "need_specs": [model_spec(r, wildcards.fold) for r in needs]}


def ensemble_val_cases(wildcards):
    """Every fold's validation cases (each fold's classifier scores its own: liverseg.ensemble)."""
    return [h5(c) for f in FOLDS for c in fold_cases(f)["val"]]


def ensemble_val_options(wildcards):
    return " ".join(f"--val {shlex.quote(f'{f}={h5(c)}')}" for f in FOLDS for c in fold_cases(f)["val"])


def train_inputs(wildcards):
    """The role's training and validation cases, and the trained models it needs (liverseg.roles)."""
    sp = split_data()
    return {"train": [h5(c) for c in sp["train"]], "val": [h5(c) for c in sp["val"]],
            "needs": [model_file(r) for r in ROLES[wildcards.role]["needs"]],
            "need_specs": [model_spec(r) for r in ROLES[wildcards.role]["needs"]]}


def test_cases():
    return split_data()["test"]


def train_params_json(wildcards):
    """What this role's training reads from the config (liverseg.config.training_view) and nothing else, so an
    edit of another role's settings, of prediction or of how jobs run (threads, device, compression) retrains
    nothing; the same view is what the checkpoint's resume key hashes."""
    return json.dumps(training_view(config, wildcards.role), sort_keys=True)


def role_options(option, roles, files):
    """``--model``/``--needs`` options ROLE=FILE for the model files of ``roles`` (listed in the same order)."""
    return " ".join(f"{option} {shlex.quote(f'{r}={f}')}" for r, f in zip(roles, files))


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


def n_local_gpus():
    """GPUs local runs give GPU jobs one each: config resources.local_gpus, or those this machine shows."""
    n = config["resources"]["local_gpus"]
    return local_gpus() if n == "auto" else n


def uses_gpu(section):
    """A training/prediction job asks for a GPU only when one is configured: device cuda, or auto where a GPU is
    (the machine running Snakemake, or any cluster executor, whose nodes Snakemake cannot see).  Evaluated at job
    creation, once the executor is known; on a CPU-only workstation the profile's gpu limit then serialises
    nothing."""
    device = config[section]["device"]
    if device != "auto":
        return device == "cuda"
    return not workflow.local_exec or n_local_gpus() > 0


def gpus_per_job(section):
    """GPUs one job of ``section`` uses (train.gpus for data-parallel training; prediction uses one)."""
    return config["train"]["gpus"] if section == "train" else 1


def gpu_slots(section):
    """``--slots`` of liverseg.gpuslot, which runs a GPU job of a local run on its own GPU(s): the local GPU
    count, or 0 (command untouched) on a cluster executor, whose scheduler sets CUDA_VISIBLE_DEVICES itself
    (inside a SLURM job the job-step executor is not local either), and for jobs without a GPU."""
    return n_local_gpus() if workflow.local_exec and uses_gpu(section) else 0


def torch_env(section):
    """The conda env of a training/prediction job (config software.torch_build): the CUDA build where the job asks
    for a GPU, the CPU build elsewhere; decided per job, like the GPU request itself (uses_gpu)."""

    def env(wildcards):
        return torch_env_file(config["software"]["torch_build"], uses_gpu(section))

    return env


def gpu_resources(section):
    """GPU request of training/prediction jobs (see uses_gpu), with the matching SLURM partition, and the GPU
    slots of a local run (gpu_slots; resources rather than params, so a local run and a cluster run of the same
    job are not reruns of each other)."""

    def partition(kind):
        return slurm_resources(kind).get("slurm_partition", "")

    # A GPU job's CPUs: its threads plus its data-loader worker processes (training), so loading keeps up.
    # A training job on train.gpus GPUs runs one such process per GPU (torchrun), all on one machine.
    workers = config["train"]["workers"] if section == "train" else 0
    res = {"gpu": lambda wc: int(uses_gpu(section)) * gpus_per_job(section),
           "cpus_per_gpu": lambda wc, threads: threads + workers if uses_gpu(section) else 0,
           "gpu_slots": lambda wc: gpu_slots(section),
           "gpu_take": gpus_per_job(section)}
    if gpus_per_job(section) > 1:
        res["nodes"] = 1  # torchrun --standalone: every process of the job on one machine
    if config["cluster"]["gpu_partition"] or config["cluster"]["cpu_partition"]:
        res["slurm_partition"] = lambda wc: partition("gpu" if uses_gpu(section) else "cpu")
    if config["cluster"]["account"]:
        res["slurm_account"] = config["cluster"]["account"]
    if config["cluster"]["gpu_model"]:
        # per job, like "gpu": whether a job uses a GPU (device auto) is known only once the executor is; the
        # pinned plugin then asks --gpus=<model>:<gpu>, and ignores an empty model
        res["gpu_model"] = lambda wc: config["cluster"]["gpu_model"] if uses_gpu(section) else ""
    return res


# ---------------------------------------------------------------- job size
def _files(input, names):
    """The input files under ``names`` (all of them when none are named); a name a job lacks adds nothing."""
    if not names:
        return list(input)
    out = []
    for n in names:
        v = getattr(input, n, [])
        out += [v] if isinstance(v, str) else list(v)
    return out


def sized(rule, *names, kind="nifti"):
    """mem_mb and runtime of ``rule`` from the size of its input volumes ``names`` (liverseg.resources, factors
    from config resources.<rule>), times the attempt, so a retry asks for more.  An input not made yet leaves
    them to be determined until it is (Snakemake evaluates them again before the job starts)."""
    spec = config["resources"][rule]

    def size(input):
        return jobres.volume_mb(_files(input, names), kind)

    return {"mem_mb": lambda wc, input, attempt: jobres.mem_mb(spec, size(input), attempt),
            "runtime": lambda wc, input, attempt: jobres.runtime(spec, size(input), attempt)}


def predict_sized():
    """Prediction: the process, the models and one batch's activations (predict.batch_size slices of the stored
    grid: liverseg.resources.predict_base_mb), plus the case's volumes, times the attempt."""
    spec = config["resources"]["predict"]
    batch = config["predict"]["batch_size"]

    # The optional maps are uint8 volumes on the scan's grid (3 classes + 1), held whole and copied once on saving.
    maps = 2 * (3 * config["predict"]["save_probabilities"] + config["predict"]["save_uncertainty"])

    def base(input):
        return (jobres.predict_base_mb(spec, batch, jobres.h5_slice_mpx(input.h5))
                + maps * jobres.h5_source_mb(input.h5))

    return {"mem_mb": lambda wc, input, attempt: jobres.mem_mb(spec, jobres.h5_mb(input.h5), attempt, base=base(input)),
            "runtime": lambda wc, input, attempt: jobres.runtime(spec, jobres.h5_mb(input.h5), attempt)}


def ensemble_threshold_sized():
    """The fold ensemble's threshold job: prediction's memory for its largest validation case, its time for all."""
    spec = config["resources"]["predict"]
    batch = config["predict"]["batch_size"]

    def mem(wc, input, attempt):
        big = max(input.val, key=jobres.h5_mb, default=None)
        if big is None:
            return jobres.mem_mb(spec, 0, attempt)
        base = jobres.predict_base_mb(spec, batch, jobres.h5_slice_mpx(big))
        return jobres.mem_mb(spec, jobres.h5_mb(big), attempt, base=base)

    return {"mem_mb": mem,
            "runtime": lambda wc, input, attempt: jobres.runtime(spec, sum(jobres.h5_mb(f) for f in input.val), attempt)}


def train_sized():
    """Training: the role's base (liverseg.roles) plus memory for its largest case (slices stream from HDF5;
    validation reads one whole case at a time) and time for all of its cases, times the attempt."""
    spec = config["resources"]["train"]

    def sizes(input):
        return [jobres.h5_mb(f) for f in _files(input, ("train", "val"))]

    # A data-parallel job (train.gpus > 1) runs one process per GPU, each with its own loaders and model.
    gpus = config["train"]["gpus"]
    return {"mem_mb": lambda wc, input, attempt: gpus * jobres.mem_mb(spec, max(sizes(input), default=0), attempt,
                                                                       base=ROLES[wc.role]["mem_mb"]),
            "runtime": lambda wc, input, attempt: jobres.runtime(spec, sum(sizes(input)), attempt,
                                                                 base=ROLES[wc.role]["runtime"])}


# ---------------------------------------------------------------- prediction and evaluation
# `<experiment>` and, for a fold ensemble, `<experiment>-fold<f>` (fold f's models alone: liverseg.roles).
wildcard_constraints:
    experiment="(?:" + "|".join(EXPERIMENTS) + ")" + ("(?:-fold(?:" + "|".join(map(str, FOLDS)) + "))?" if ENSEMBLE else ""),
    stage="raw|post",


def evaluated_experiments():
    """What the report compares: the configured experiments and, for a fold ensemble, each fold alone."""
    exps = config["experiments"]
    return exps + [fold_experiment(e, f) for e in exps for f in FOLDS]


def predict_mode(wildcards):
    return EXPERIMENTS[parse_experiment(wildcards.experiment)[0]]["mode"]


def experiment_models(wildcards):
    """(role, fold) of every model file the experiment loads, in MODES order: one per role; for a fold ensemble's
    experiment every fold of each role (predict-case averages files of one role), for `-fold<f>` fold f's."""
    base, fold = parse_experiment(wildcards.experiment)
    roles = MODES[EXPERIMENTS[base]["mode"]]
    if fold is not None:
        return [(r, fold) for r in roles]
    return [(r, f) for r in roles for f in FOLDS] if ENSEMBLE else [(r, None) for r in roles]


def models_for(wildcards):
    return [model_file(r, f) for r, f in experiment_models(wildcards)]


def specs_for(wildcards):
    return [model_spec(r, f) for r, f in experiment_models(wildcards)]


def model_options(wildcards, input):
    """``--model ROLE=FILE`` per model file (input.models, in experiment_models order)."""
    return role_options("--model", [r for r, _ in experiment_models(wildcards)], input.models)


def uses_ensemble_threshold(wildcards):
    """The fold ensemble's cascade takes the pooled out-of-fold threshold (a single fold keeps its own)."""
    base, fold = parse_experiment(wildcards.experiment)
    return ENSEMBLE and fold is None and "classifier" in MODES[EXPERIMENTS[base]["mode"]]


def threshold_input(wildcards):
    return ENSEMBLE_THRESHOLD if uses_ensemble_threshold(wildcards) else []


# Options the predict rule adds only when the config asks for them, so that a single-model run without them has
# the command (and params, and outputs) it always had: an edit of a rule's command reruns its jobs.
PREDICT_OUTPUTS = {k: f"{R}/predict/{{experiment}}/{{case}}_{k}.nii.gz" for k, on in
                   (("probabilities", config["predict"]["save_probabilities"]),
                    ("uncertainty", config["predict"]["save_uncertainty"])) if on}
PREDICT_OPTIONS = "".join(f" --{k} {{output.{k}:q}}" for k in PREDICT_OUTPUTS) + (
    " {params.threshold}" if ENSEMBLE else "")
PREDICT_PARAMS = {"threshold": lambda wc, input: (f"--classifier-threshold-file {shlex.quote(input.threshold)}"
                                                  if uses_ensemble_threshold(wc) else "")} if ENSEMBLE else {}


def stage_prediction(wildcards):
    folder = "predict" if wildcards.stage == "raw" else "postprocess"
    return f"{R}/{folder}/{wildcards.experiment}/{wildcards.case}.nii.gz"


def kaggle_cases():
    sp = split_data()
    return sp["predict"] if config["kaggle"]["cases"] == "predict" else sp["test"]


def kaggle_experiment():
    return config["kaggle"]["experiment"] or config["experiments"][-1]


def kaggle_sample():
    """The competition's sample_submission.csv ("" when there is none): `auto` finds it in dataset.directory."""
    k = config["kaggle"]["sample_submission"]
    if k == "auto":
        d = config["dataset"]["directory"]
        k = os.path.join(d, "sample_submission.csv") if config["dataset"]["source"] == "directory" and d else ""
        return k if k and os.path.isfile(k) else ""
    return k


def split_test_fraction():
    """kaggle.train_on_all: the submission's models use every labelled case (no held-out test cases)."""
    return 0.0 if config["kaggle"]["train_on_all"] else config["split"]["test_fraction"]


def predict_benchmark(experiment, case):
    """Snakemake's timing file of one prediction job (the summary's inference seconds per case)."""
    return f"{R}/benchmarks/predict/{experiment}/{case}.tsv"


def statistics_inputs(wildcards):
    """The statistics JSON of every experiment's test and predict-only cases (results/report/statistics.tsv)."""
    sp = split_data()
    return [f"{R}/statistics/{e}/{c}.json" for e in config["experiments"] for c in sp["test"] + sp["predict"]]


def dicom_seg_cases(sp):
    """Predict-only cases whose image is a DICOM series folder get a DICOM-SEG when predict.output_format asks
    (the workflow always keeps the NIfTI, so dicom-seg and both mean the same here)."""
    if config["predict"]["output_format"] == "nifti":
        return []
    return [c for c in sp["predict"] if os.path.isdir(CASES[c].image)]


def summary_inputs(wildcards):
    """Every experiment's summary.json (raw and post-processed) and, per experiment, its prediction timings."""
    exps = evaluated_experiments()
    out = {"summaries": expand(f"{R}/evaluate/{{experiment}}/{{stage}}/summary.json", experiment=exps, stage=["raw", "post"])}
    for e in exps:
        out[f"timing_{e}"] = [predict_benchmark(e, c) for c in test_cases()]
    return out
