"""Whole-pipeline hardening: determinism of two clean runs, and runs killed with SIGKILL mid-way."""

import os
import signal
import subprocess
import sys
import time

import h5py
import pytest
import torch
import yaml

from conftest import ROOT, TINY_TRAIN

pytestmark = pytest.mark.slow

SMALL = {
    "dataset": {"source": "phantom", "phantom": {"n_cases": 4, "size": 48, "slices": 12, "seed": 3}},
    "slices": {"size": 32, "spacing_mm": 15.0, "context": 1},  # 480 mm: every phantom body fits
    "split": {"seed": 0, "test_fraction": 0.25, "val_fraction": 0.34},
    "train": {**TINY_TRAIN, "model_a": {**TINY_TRAIN["model_a"], "epochs": 3, "samples_per_epoch": 32}},
    "experiments": ["v2_unetpp_cca"],
}


def _cmd(wd, *args):
    return [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(wd), "--cores", "2",
            *args]


def _run(wd, *args):
    r = subprocess.run(_cmd(wd, *args), capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _setup(wd, cfg):
    wd.mkdir(parents=True, exist_ok=True)
    (wd / "config.yaml").write_text(yaml.safe_dump(cfg))
    return wd


def _tensors(path):
    return torch.load(path, weights_only=True)


def test_two_clean_runs_are_identical_and_another_seed_differs(tmp_path):
    a, b = _setup(tmp_path / "a", SMALL), _setup(tmp_path / "b", SMALL)
    c = _setup(tmp_path / "c", {**SMALL, "train": {**SMALL["train"], "seed": 7}})
    for wd in (a, b, c):
        _run(wd)
    wa, wb, wc = (_tensors(wd / "results/train/model_a/model.pt") for wd in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    tsv = "results/evaluate/v2_unetpp_cca/post/per_case.tsv"
    assert (a / tsv).read_text() == (b / tsv).read_text()


def _kill_when(proc, condition, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if condition():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.05)
    return False


def test_sigkill_during_training_then_rerun_incomplete_resumes(tmp_path):
    cfg = {**SMALL, "train": {**SMALL["train"], "model_a": {**SMALL["train"]["model_a"], "epochs": 6}}}
    wd = _setup(tmp_path / "k", cfg)
    proc = subprocess.Popen(_cmd(wd, "results/train/model_a/model.pt"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    ckpt = wd / "results/checkpoints/model_a/last.pt"

    def after_first_epoch():
        try:
            return ckpt.exists() and 1 <= torch.load(ckpt, weights_only=True)["epoch"] < 6
        except Exception:  # noqa: BLE001 - caught mid-rename
            return False

    assert _kill_when(proc, after_first_epoch), "training never wrote an epoch checkpoint"
    assert not (wd / "results/train/model_a/model.pt").exists()
    done = torch.load(ckpt, weights_only=True)["epoch"]
    _run(wd, "--unlock")  # a killed Snakemake leaves its directory lock behind, as for any user
    _run(wd, "--rerun-incomplete", "results/train/model_a/model.pt")
    log = (wd / "results/logs/train/model_a.log").read_text()
    assert f"resuming from checkpoint after epoch {done}" in log
    assert f"model_a epoch {done + 1}:" in log and "model_a epoch 1:" not in log
    assert (wd / "results/train/model_a/model.pt").exists()


def test_sigkill_during_hdf5_writing_leaves_nothing_that_looks_finished(tmp_path):
    cfg = {**SMALL, "dataset": {"source": "phantom", "phantom": {"n_cases": 3, "size": 384, "slices": 160}},
           "slices": {"size": 384, "context": 1}}
    wd = _setup(tmp_path / "h", cfg)
    _run(wd, "results/ingest/phantom/volume-0.nii.gz", "results/ingest/phantom/segmentation-0.nii.gz")
    proc = subprocess.Popen(_cmd(wd, "results/preprocess/0.h5"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    pre = wd / "results/preprocess"
    assert _kill_when(proc, lambda: pre.exists() and any(".tmp" in p.name for p in pre.iterdir())), \
        "never saw the temporary HDF5 file"
    assert not (pre / "0.h5").exists()
    _run(wd, "--unlock")
    _run(wd, "--rerun-incomplete", "results/preprocess/0.h5")
    with h5py.File(pre / "0.h5") as f:
        assert f["image"].shape == (160, 384, 384) and f.attrs["case_id"] == "0"
