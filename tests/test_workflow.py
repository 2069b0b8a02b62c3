"""Integration: the real Snakemake DAG on a tiny phantom dataset in a temporary folder."""

import csv
import json
from pathlib import Path
import re
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from conftest import ROOT, TINY_TRAIN

TINY = {
    "dataset": {"source": "phantom", "phantom": {"n_cases": 8, "size": 64, "slices": 24, "seed": 1}},
    "slices": {"size": 48, "spacing_mm": 10.0, "context": 1},  # 480 mm: every phantom body fits
    "split": {"seed": 0, "test_fraction": 0.25, "val_fraction": 0.2},
    "train": {**TINY_TRAIN,
              "model_a": {**TINY_TRAIN["model_a"], "encoder_depth": 4, "decoder_channels": [32, 16, 8, 8],
                          "epochs": 24, "samples_per_epoch": 256, "batch_size": 16, "lr": 0.003},
              "model_b": {**TINY_TRAIN["model_b"], "epochs": 2, "samples_per_epoch": 32},
              "classifier": {**TINY_TRAIN["classifier"], "epochs": 2, "samples_per_epoch": 32}},
    "experiments": ["v1_3dcnn", "v2_unetpp_cca", "v3_convlstm", "v4_cascade"],
}


def snakemake(workdir, *args, check=True):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(workdir),
           "--cores", "2", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if check and r.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-4000:]}")
    return r


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    wd = tmp_path_factory.mktemp("wf")
    (wd / "config.yaml").write_text(yaml.safe_dump(TINY))
    snakemake(wd)
    return wd


def _dry_jobs(wd, *args):
    r = snakemake(wd, "-n", "--quiet", "rules", *args)
    jobs = {}
    for line in r.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] not in ("job", "total"):
            jobs[parts[0]] = int(parts[1])
    return jobs


def test_dag_produces_metrics_reports_and_models(demo_run):
    res = demo_run / "results"
    split = json.loads((res / "split" / "split.json").read_text())
    assert split["test"]
    for exp in TINY["experiments"]:
        for stage in ("raw", "post"):
            rows = list(csv.DictReader(open(res / "evaluate" / exp / stage / "per_case.tsv"), delimiter="\t"))
            assert sorted({r["case"] for r in rows}) == sorted(split["test"])
            assert {r["class"] for r in rows} == {"liver", "tumour"}
            summary = json.loads((res / "evaluate" / exp / stage / "summary.json").read_text())
            assert summary["aggregate"]["liver"]["cases"] == len(split["test"])
        for case in split["test"]:
            assert (res / "report" / "overlays" / exp / f"{case}.png").stat().st_size > 10_000
            assert (res / "predict" / exp / f"{case}_slices.tsv").exists()
    md = (res / "report" / "summary.md").read_text()
    assert "not run" not in md
    for name in ("V4 cascade", "V2 2D UNet++ + CCA", "V3 2.5D ConvLSTM + CCA", "V1 3D CNN + CCA"):
        assert re.search(rf"^\| {re.escape(name)}[^|]* \| [01]\.\d{{4}} ± ", md, re.M), name
    for role in ("classifier", "model_a", "model_b", "v3_convlstm", "v1_3dcnn"):
        assert (res / "train" / role / "model.pt").exists()
    # nothing unfinished is left behind
    assert not list(res.rglob("*.tmp*"))


def test_liver_is_found_after_a_short_training(demo_run):
    rows = list(csv.DictReader(open(demo_run / "results/evaluate/v2_unetpp_cca/post/per_case.tsv"), delimiter="\t"))
    liver = [float(r["dice"]) for r in rows if r["class"] == "liver"]
    assert min(liver) > 0.5, liver


def test_rerun_is_a_no_op_and_a_postprocess_change_reruns_only_downstream(demo_run):
    assert _dry_jobs(demo_run) == {}
    (demo_run / "conn6.yaml").write_text(yaml.safe_dump({"postprocess": {"connectivity": 6}}))
    jobs = _dry_jobs(demo_run, "--configfile", str(demo_run / "config.yaml"), str(demo_run / "conn6.yaml"))
    assert set(jobs) == {"postprocess", "evaluate_case", "aggregate_metrics", "overlay", "summarize", "statistics",
                         "collect_statistics", "all"}
    assert jobs["postprocess"] == len(TINY["experiments"]) * 2  # every experiment's test cases, nothing else
    assert jobs["statistics"] == jobs["postprocess"]  # the volumes of each post-processed prediction


def test_deleting_one_h5_redoes_only_that_case(demo_run, tmp_path):
    split = json.loads((demo_run / "results/split/split.json").read_text())
    case = split["test"][0]
    h5 = demo_run / "results" / "preprocess" / f"{case}.h5"
    os.rename(h5, tmp_path / "kept.h5")
    try:
        jobs = _dry_jobs(demo_run)
    finally:
        os.rename(tmp_path / "kept.h5", h5)  # same file and mtime back, so later tests see an up-to-date run
    assert jobs["preprocess"] == 1 and "train" not in jobs and "make_phantom" not in jobs
    assert jobs["predict"] == len(TINY["experiments"])


def test_forcerun_classifier_reruns_it_and_its_descendants_only(demo_run):
    jobs = _dry_jobs(demo_run, "--forcerun", "results/train/classifier/model.pt")
    # the classifier and model B (validated through the cascade, so it needs the classifier) retrain; A does not
    assert jobs["train"] == 2
    assert not {"preprocess", "make_phantom"} & set(jobs)
    # only the cascade uses the classifier: V1, V2 and V3 predictions stay
    assert jobs["predict"] == 2  # two test cases, v4_cascade only


def test_until_stops_after_the_data_stages(tmp_path):
    wd = tmp_path / "fresh"
    wd.mkdir()
    (wd / "config.yaml").write_text(yaml.safe_dump(TINY))
    snakemake(wd, "--until", "split")
    res = wd / "results"
    assert (res / "split/split.json").exists() and not (res / "preprocess").exists()
    snakemake(wd, "data")
    n = TINY["dataset"]["phantom"]["n_cases"]
    assert len(list((res / "preprocess").glob("*.h5"))) == n and (res / "split/split.json").exists()
    assert not (res / "train").exists() and not (res / "predict").exists()


def test_kaggle_target_exports_the_test_cases(demo_run):
    (demo_run / "kaggle.yaml").write_text(yaml.safe_dump({"kaggle": {"cases": "test", "experiment": "v2_unetpp_cca"}}))
    snakemake(demo_run, "kaggle", "--configfile", str(demo_run / "config.yaml"), str(demo_run / "kaggle.yaml"))
    rows = (demo_run / "results/kaggle/submission.csv").read_text().splitlines()
    split = json.loads((demo_run / "results/split/split.json").read_text())
    slices = TINY["dataset"]["phantom"]["slices"]
    assert rows[0] == "id,rle" and len(rows) == 1 + slices * len(split["test"])
    assert {r.split(",")[0].rsplit("_", 1)[0] for r in rows[1:]} == {f"cell_{c}" for c in split["test"]}


def test_html_report(demo_run):
    snakemake(demo_run, "--report", str(demo_run / "report.html"))
    html = (demo_run / "report.html").read_text(errors="replace")
    assert len(html) > 100_000 and "summary.md" in html and "curves.png" in html


def _with(demo_run, name, override):
    (demo_run / name).write_text(yaml.safe_dump(override))
    return ["--configfile", str(demo_run / "config.yaml"), str(demo_run / name)]


def test_config_edits_rerun_only_what_reads_them(demo_run):
    """Each stage's params hold only the config it reads: model B's learning rate retrains B alone and redoes only
    the V4 predictions after it; how jobs run (threads, GPUs per training, HDF5 compression) reruns nothing."""
    split = json.loads((demo_run / "results/split/split.json").read_text())
    jobs = _dry_jobs(demo_run, *_with(demo_run, "blr.yaml", {"train": {**TINY["train"], "model_b": {
        **TINY["train"]["model_b"], "lr": 0.0123}}}))
    assert jobs["train"] == 1 and jobs["predict"] == len(split["test"]), jobs  # model_b; v4_cascade only
    r = snakemake(demo_run, "-n", *_with(demo_run, "blr.yaml", {"train": {**TINY["train"], "model_b": {
        **TINY["train"]["model_b"], "lr": 0.0123}}}))
    assert re.search(r"output: results/train/model_b/model.pt", r.stdout)
    assert not re.search(r"output: results/train/(classifier|model_a|v1_3dcnn|v3_convlstm)/", r.stdout)
    assert not re.search(r"output: results/predict/(v1_3dcnn|v2_unetpp_cca|v3_convlstm)/", r.stdout)
    for name, over in (("thr.yaml", {"train": {**TINY["train"], "threads": 2, "gpus": 2}, "predict": {"threads": 1}}),
                       ("lzf.yaml", {"slices": {**TINY["slices"], "compression": "lzf"}})):
        assert _dry_jobs(demo_run, *_with(demo_run, name, over)) == {}, name


def test_everything_evaluation_and_overlays_read_is_an_input(demo_run):
    """Reference labels, CT images and the case's HDF5 (its window) are inputs of evaluation and overlays, not
    params, so a changed label reruns them (Snakemake reruns a job whose input content changed)."""
    split = json.loads((demo_run / "results/split/split.json").read_text())
    r = snakemake(demo_run, "-n", "--forcerun", "evaluate_case", "overlay")
    blocks = r.stdout.split("\n\n")
    for case in split["test"]:
        label = f"results/ingest/phantom/segmentation-{case}.nii.gz"
        image = f"results/ingest/phantom/volume-{case}.nii.gz"
        for exp in TINY["experiments"]:
            ev = next(b for b in blocks if f"output: results/evaluate/{exp}/post/cases/{case}.tsv" in b)
            assert re.search(rf"input: .*{re.escape(label)}", ev), ev
            ov = next(b for b in blocks if f"output: results/report/overlays/{exp}/{case}.png" in b)
            inputs = next(ln for ln in ov.splitlines() if ln.strip().startswith("input:"))
            for f in (label, image, f"results/preprocess/{case}.h5"):
                assert f in inputs, (f, inputs)


def _job_block(stdout, rule):
    return stdout[stdout.index(f"rule {rule}:"):].split("\n\n")[0]


@pytest.mark.parametrize("visible, device, gpus", [("", "auto", 0), ("0", "auto", 1), ("0", "cpu", 0), ("", "cuda", 1)])
def test_jobs_ask_for_a_gpu_only_when_one_is_configured(demo_run, monkeypatch, visible, device, gpus):
    """device auto asks for a GPU only where the machine shows one (CUDA_VISIBLE_DEVICES stands in for a GPU
    machine here), so on a CPU-only workstation the default profile's `gpu: 1` limit serialises nothing."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    over = {"train": {**TINY["train"], "device": device}, "predict": {"device": device}}
    r = snakemake(demo_run, "-n", "--forcerun", "results/train/model_a/model.pt", *_with(demo_run, "dev.yaml", over))
    for rule in ("train", "predict"):
        assert re.search(rf"resources:.*\bgpu={gpus}\b", _job_block(r.stdout, rule)), _job_block(r.stdout, rule)


def test_training_jobs_get_how_to_run_from_the_config(demo_run):
    """Execution settings are left out of the rerun key but still reach the job."""
    over = {"train": {**TINY["train"], "device": "cpu", "workers": 3}, "predict": {"device": "cpu", "batch_size": 5}}
    r = snakemake(demo_run, "-n", "-p", "--forcerun", "results/train/model_a/model.pt",
                  *_with(demo_run, "run.yaml", over))
    train_cmd = next(ln for ln in r.stdout.splitlines() if "liverseg train --role model_a" in ln)
    assert "--device cpu --workers 3" in train_cmd, train_cmd
    pred_cmd = next(ln for ln in r.stdout.splitlines() if "liverseg predict-case" in ln)
    assert "--device cpu" in pred_cmd and "--batch 5" in pred_cmd, pred_cmd


@pytest.mark.slow
@pytest.mark.parametrize("fmt, seg_jobs", [("dicom-seg", 2), ("nifti", 0)])
def test_dicom_predict_only_cases_get_a_seg_and_every_case_statistics(tmp_path, fmt, seg_jobs):
    """A sample sheet with phantom cases and one predict-only DICOM series: after the split, the plan holds a
    statistics job per experiment and test/predict case, one table, and a DICOM-SEG job per experiment for the
    DICOM case only when predict.output_format asks for one."""
    from conftest import realdata
    from liverseg.phantom import PhantomSpec, write_case

    ct = realdata("dcmqi_ct3slice", "ct")
    rows = ["case_id\timage\tlabel"]
    for i in range(6):
        write_case(i, tmp_path / f"v{i}.nii.gz", tmp_path / f"s{i}.nii.gz", PhantomSpec(size=32, slices=8))
        rows.append(f"c{i}\tv{i}.nii.gz\ts{i}.nii.gz")
    rows.append(f"dq\t{ct}\t")
    (tmp_path / "samples.tsv").write_text("\n".join(rows) + "\n")
    wd = tmp_path / "run"
    wd.mkdir()
    cfg = {"dataset": {"source": "samplesheet", "samplesheet": str(tmp_path / "samples.tsv")},
           "split": {"seed": 0, "test_fraction": 0.34, "val_fraction": 0.2}, "predict": {"output_format": fmt},
           "experiments": ["v2_unetpp_cca", "v4_cascade"]}
    (wd / "config.yaml").write_text(yaml.safe_dump(cfg))
    snakemake(wd, "--until", "split")
    split = json.loads((wd / "results/split/split.json").read_text())
    assert split["predict"] == ["dq"] and split["test"]
    jobs = _dry_jobs(wd)
    assert jobs["statistics"] == 2 * (len(split["test"]) + 1) and jobs["collect_statistics"] == 1
    assert jobs.get("dicom_seg", 0) == seg_jobs


@pytest.mark.slow
def test_jobs_ask_for_memory_by_case_size_and_a_local_gpu_job_gets_its_own_gpu(tmp_path):
    """mem_mb comes from the case's header (shape x stored itemsize x the config's factor) and reaches the check
    as its memory limit; with local_gpus: 2 each GPU job runs under liverseg.gpuslot with two slots, and on a
    machine whose jobs need no GPU the wrapper is given none."""
    import h5py

    from liverseg import resources as jobres
    from liverseg.roles import ROLES

    wd = tmp_path / "wf"
    wd.mkdir()
    factor = {"mem_mb": 500, "mem_per_mb": 1000, "runtime": 5, "runtime_per_gb": 100000}
    cfg = {**TINY, "dataset": {"source": "phantom", "phantom": {"n_cases": 4, "size": 64, "slices": 24, "seed": 1}},
           "experiments": ["v2_unetpp_cca"], "resources": {"local_gpus": 2, "check_case": factor},
           "train": {**TINY["train"], "device": "auto"}, "predict": {"device": "auto"}}
    (wd / "config.yaml").write_text(yaml.safe_dump(cfg))
    snakemake(wd, "data")
    r = snakemake(wd, "-n", "-p", "--forcerun", "check_case")
    ph = wd / "results/ingest/phantom"
    mb = jobres.nifti_mb(ph / "volume-0.nii.gz") + jobres.nifti_mb(ph / "segmentation-0.nii.gz")
    assert mb == pytest.approx(64 * 64 * 24 * 3 / 2**20)  # int16 image + uint8 label
    mem, minutes = 500 + int(np.ceil(1000 * mb)), 5 + int(np.ceil(100000 * mb / 1024))
    block = next(b for b in r.stdout.split("\n\n") if "output: results/ingest/checks/0.json" in b)
    assert re.search(rf"resources: .*runtime={minutes}, mem_mb={mem}\b", block), block
    assert f"--max-memory-mb {mem} " in r.stdout
    # training: the role's base plus memory for its largest case (a plain dry run: the split stands)
    r = snakemake(wd, "-n", "-p")
    split = json.loads((wd / "results/split/split.json").read_text())
    largest = max(jobres.h5_mb(wd / f"results/preprocess/{c}.h5") for c in split["train"] + split["val"])
    with h5py.File(wd / f"results/preprocess/{split['train'][0]}.h5") as f:
        assert jobres.h5_mb(wd / f"results/preprocess/{split['train'][0]}.h5") == pytest.approx(
            f["image"].size * 3 / 2**20)
    block = _job_block(r.stdout, "train")
    role = re.search(r"wildcards: role=(\w+)", block).group(1)
    assert re.search(rf"mem_mb={ROLES[role]['mem_mb'] + int(np.ceil(4 * largest))}\b", block), block
    for rule in ("train", "predict-case"):
        cmd = next(ln for ln in r.stdout.splitlines() if f"liverseg {rule}" in ln).removeprefix("Shell command: ")
        assert cmd.startswith("python -m liverseg.gpuslot --slots 2 --take 1 -- python -m liverseg "), cmd
    over = {"train": {**TINY["train"], "device": "cpu"}, "predict": {"device": "cpu"}}
    (wd / "cpu.yaml").write_text(yaml.safe_dump(over))
    r = snakemake(wd, "-n", "-p", "--configfile", str(wd / "config.yaml"), str(wd / "cpu.yaml"))
    for rule in ("train", "predict-case"):
        cmd = next(ln for ln in r.stdout.splitlines() if f"liverseg {rule}" in ln).removeprefix("Shell command: ")
        assert cmd.startswith("python -m liverseg.gpuslot --slots 0 --take 1 -- "), cmd


@pytest.mark.slow
def test_single_split_keeps_its_model_paths_and_a_fold_ensemble_trains_each_fold(tmp_path):
    """split.folds 1 (and folds 2 without ensemble): one model per role at results/train/{role}/model.pt, nothing
    of the ensemble in the plan.  ensemble: true: each role on each fold, model B's needs from its own fold, the
    pooled threshold, and the ensemble's and each fold's predictions."""
    plans = {}
    for name, split in (("single", {}), ("kfold", {"folds": 2}), ("ens", {"folds": 2, "ensemble": True})):
        wd = tmp_path / name
        wd.mkdir()
        cfg = {**TINY, "split": {**TINY["split"], **split}, "experiments": ["v4_cascade"]}
        (wd / "config.yaml").write_text(yaml.safe_dump(cfg))
        snakemake(wd, "--until", "split")
        plans[name] = snakemake(wd, "-n", "-p").stdout
    for name in ("single", "kfold"):
        out = plans[name]
        for role in ("classifier", "model_a", "model_b"):
            assert f"output: results/train/{role}/model.pt" in out
        assert "fold_" not in out and "ensemble" not in out and "--classifier-threshold-file" not in out
        assert re.search(r"output: results/predict/v4_cascade/\S+\.nii\.gz", out)
    ens = plans["ens"]
    assert not re.search(r"output: results/train/\w+/model\.pt", ens)
    for f in (0, 1):
        b = next(ln for ln in ens.splitlines() if f"--out-model results/train/model_b/fold_{f}/model.pt" in ln)
        assert f"--needs classifier=results/train/classifier/fold_{f}/model.pt" in b
        assert f"--needs model_a=results/train/model_a/fold_{f}/model.pt" in b
    assert "output: results/train/classifier/ensemble.json" in ens
    # The pooled threshold: fold f's classifier scores exactly fold f's validation cases, never its training
    # cases or a test case (with k = 2 the folds' validation sets together cover every non-test case, so the
    # pairing of models and cases is what must be checked).
    sp = json.loads((tmp_path / "ens" / "results/split/split.json").read_text())
    cmd = next(ln for ln in ens.splitlines() if "liverseg ensemble-threshold" in ln)
    assert re.findall(r"--model (\S+)", cmd) == [f"results/train/classifier/fold_{f}/model.pt" for f in (0, 1)]
    for f in (0, 1):
        cases = {Path(h).stem for h in re.findall(rf"--val {f}=(\S+)", cmd)}
        assert cases == set(sp["folds_cases"][f]["val"]) and cases
        assert not cases & (set(sp["folds_cases"][f]["train"]) | set(sp["test"]))
    pred = [ln for ln in ens.splitlines() if "liverseg predict-case" in ln]
    whole = [ln for ln in pred if "results/predict/v4_cascade/" in ln]
    assert whole and all(ln.count("--model ") == 6 and "--classifier-threshold-file" in ln for ln in whole)
    for f in (0, 1):
        one = [ln for ln in pred if f"results/predict/v4_cascade-fold{f}/" in ln]
        assert one and all(ln.count("--model ") == 3 and ln.count(f"fold_{f}/") == 3 for ln in one)
        assert not any("--classifier-threshold-file" in ln for ln in one)


@pytest.mark.slow
def test_fold_ensemble_trains_both_folds_and_reports_the_ensemble_and_each_fold(tmp_path):
    """k = 2 with ensemble: true on tiny phantom data, end to end: both folds of the cascade's three roles, the
    pooled threshold used by the ensemble's predictions, probability and uncertainty maps, and a comparison
    table with rows for the ensemble and for each fold alone."""
    import nibabel as nib

    wd = tmp_path / "ens"
    wd.mkdir()
    train = {**TINY["train"], "model_a": {**TINY["train"]["model_a"], "epochs": 8, "samples_per_epoch": 128}}
    cfg = {**TINY, "split": {**TINY["split"], "folds": 2, "ensemble": True}, "experiments": ["v4_cascade"],
           "train": train, "predict": {"save_probabilities": True, "save_uncertainty": True}}
    (wd / "config.yaml").write_text(yaml.safe_dump(cfg))
    snakemake(wd)
    res = wd / "results"
    split = json.loads((res / "split/split.json").read_text())
    for role in ("classifier", "model_a", "model_b"):
        assert not (res / "train" / role / "model.pt").exists()
        for f in (0, 1):
            assert (res / "train" / role / f"fold_{f}" / "model.pt").exists()
    thr = json.loads((res / "train/classifier/ensemble.json").read_text())
    assert len(thr["fold_thresholds"]) == 2
    assert thr["slices"] == TINY["dataset"]["phantom"]["slices"] * (8 - len(split["test"]))  # every non-test case once
    for case in split["test"]:
        log = (res / "logs/predict/v4_cascade" / f"{case}.log").read_text()
        used = json.loads(next(ln for ln in log.splitlines() if ln.startswith("{")))["threshold"]
        assert used == pytest.approx(thr["threshold"])
        p = nib.load(str(res / "predict/v4_cascade" / f"{case}_probabilities.nii.gz"))
        assert np.allclose(np.asanyarray(p.dataobj).sum(-1), 1, atol=3 / 255)
        u = np.asanyarray(nib.load(str(res / "predict/v4_cascade" / f"{case}_uncertainty.nii.gz")).dataobj)
        assert 0 <= u.min() and u.max() <= 1 + 1e-6  # uint8 x scl_slope 1/255 in float32: 255 reads as 1.00000006
    md = (res / "report/summary.md").read_text()
    for suffix in ("(ensemble of 2 folds)", "(fold 0 alone)", "(fold 1 alone)"):
        assert re.search(rf"^\| V4 cascade[^|]*{re.escape(suffix)} \| [01]\.\d{{4}} ± ", md, re.M), (suffix, md)
    for exp in ("v4_cascade", "v4_cascade-fold0", "v4_cascade-fold1"):
        assert (res / "evaluate" / exp / "post" / "summary.json").exists()
    assert _dry_jobs(wd) == {}
