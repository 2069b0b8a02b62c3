"""Fault matrix through the whole DAG: good cases mixed with one case of each bad kind, run with --keep-going."""

import json
import os
import re
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import yaml

from conftest import ROOT, write_nifti
from liverseg.phantom import PhantomSpec, write_case
from liverseg.split import make_split
from test_workflow import TINY

pytestmark = pytest.mark.slow

GOOD = [f"g{i}" for i in range(6)]
# case id -> (what is wrong, expected message in its check log); all but the last three can be fixed by restoring
BAD = {
    "b_trunc": ("truncated .nii.gz", "cannot read image"),
    "b_label3": ("label value 3", r"label values \[3\] outside"),
    "b_frac": ("float label with fractions", "non-integer values"),
    "b_nan": ("NaN voxels", "NaN or infinite"),
    "b_const": ("constant image", "is constant"),
    "b_shape": ("label shape differs", "label shape"),
    "b_affine": ("label affine differs", "label affine differs"),
    "b_random": ("random bytes named .nii", "cannot read image"),
    "b_2d": ("2D image", "has 2 dimensions"),
    "b_4d": ("4D image", "has 4 dimensions"),
    "b_nolabel": ("sample sheet claims a missing label", "label file does not exist"),
    "b_loop": ("symlink loop", "image file does not exist"),
}
FIXABLE = ["b_trunc", "b_label3", "b_frac", "b_nan", "b_const", "b_shape", "b_affine"]
REJECTED = ["bad id", "quo'te"]


def _make_dataset(root):
    data = root / "data"
    orig = root / "orig"
    data.mkdir()
    orig.mkdir()
    spec = PhantomSpec(size=48, slices=16)
    rows = []
    for i, cid in enumerate(GOOD + FIXABLE + ["nolivr"]):
        write_case(200 + i, orig / f"{cid}_img.nii.gz", orig / f"{cid}_lab.nii.gz", spec)
        shutil.copy(orig / f"{cid}_img.nii.gz", data / f"{cid}_img.nii.gz")
        shutil.copy(orig / f"{cid}_lab.nii.gz", data / f"{cid}_lab.nii.gz")
        rows.append((cid, f"{cid}_img.nii.gz", f"{cid}_lab.nii.gz"))
    raw = (data / "b_trunc_img.nii.gz").read_bytes()
    (data / "b_trunc_img.nii.gz").write_bytes(raw[: len(raw) // 2])
    lb = nib.load(orig / "b_label3_lab.nii.gz")
    lab = np.asanyarray(lb.dataobj).copy()
    lab[lab == 1] = 3
    write_nifti(data / "b_label3_lab.nii.gz", lab, lb.affine)
    lab = np.asanyarray(nib.load(orig / "b_frac_lab.nii.gz").dataobj).astype(np.float32) * 0.5
    write_nifti(data / "b_frac_lab.nii.gz", lab, nib.load(orig / "b_frac_lab.nii.gz").affine)
    im = nib.load(orig / "b_nan_img.nii.gz")
    arr = np.asanyarray(im.dataobj).astype(np.float32)
    arr[3, 3, 3] = np.nan
    write_nifti(data / "b_nan_img.nii.gz", arr, im.affine)
    im = nib.load(orig / "b_const_img.nii.gz")
    write_nifti(data / "b_const_img.nii.gz", np.full(im.shape, -1000, np.int16), im.affine)
    lb = nib.load(orig / "b_shape_lab.nii.gz")
    write_nifti(data / "b_shape_lab.nii.gz", np.asanyarray(lb.dataobj)[:, :, :-1], lb.affine)
    lb = nib.load(orig / "b_affine_lab.nii.gz")
    aff = lb.affine.copy()
    aff[0, 3] += 5.0
    write_nifti(data / "b_affine_lab.nii.gz", np.asanyarray(lb.dataobj), aff)
    lb = nib.load(orig / "nolivr_lab.nii.gz")
    write_nifti(data / "nolivr_lab.nii.gz", np.zeros(lb.shape, np.uint8), lb.affine)
    (data / "b_random.nii").write_bytes(np.random.default_rng(0).bytes(4000))
    rows.append(("b_random", "b_random.nii", ""))
    write_nifti(data / "b_2d.nii.gz", np.zeros((8, 8), np.int16))
    rows.append(("b_2d", "b_2d.nii.gz", ""))
    write_nifti(data / "b_4d.nii.gz", np.random.default_rng(1).integers(0, 9, (8, 8, 4, 2)).astype(np.int16))
    rows.append(("b_4d", "b_4d.nii.gz", ""))
    shutil.copy(orig / "g0_img.nii.gz", data / "b_nolabel_img.nii.gz")
    rows.append(("b_nolabel", "b_nolabel_img.nii.gz", "b_nolabel_lab_missing.nii.gz"))
    os.symlink("loop_b.nii.gz", data / "loop_a.nii.gz")
    os.symlink("loop_a.nii.gz", data / "loop_b.nii.gz")
    rows.append(("b_loop", "loop_a.nii.gz", ""))
    for cid in REJECTED:
        rows.append((cid, "g0_img.nii.gz", ""))
    (data / "samples.tsv").write_text("case_id\timage\tlabel\n" + "".join(f"{a}\t{b}\t{c}\n" for a, b, c in rows))
    return data, orig


def _labelled():
    return GOOD + FIXABLE + ["nolivr", "b_nolabel"]


def _seed_with_fixable_test_case():
    unlabelled = ["b_random", "b_2d", "b_4d", "b_loop"]
    for seed in range(100):
        sp = make_split(_labelled(), unlabelled, seed=seed, test_fraction=0.3, val_fraction=0.2)
        fix = [c for c in FIXABLE if c in sp["test"]]
        train_ok = [c for c in sp["train"] if c in GOOD]
        if fix and len(train_ok) >= 2 and any(c in GOOD for c in sp["val"]) and any(c in GOOD for c in sp["test"]):
            return seed, fix[0]
    raise AssertionError("no seed puts a fixable bad case in the test set")


def _snakemake(wd, *args):
    cmd = [sys.executable, "-m", "snakemake", *args, "-s", str(ROOT / "Snakefile"), "--directory", str(wd),
           "--cores", "2", "--keep-going"]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_fault_matrix(tmp_path):
    data, orig = _make_dataset(tmp_path)
    seed, fix = _seed_with_fixable_test_case()
    wd = tmp_path / "run"
    wd.mkdir()
    cfg = {**TINY, "dataset": {"source": "samplesheet", "samplesheet": str(data / "samples.tsv")},
           "split": {"seed": seed, "test_fraction": 0.3, "val_fraction": 0.2}, "experiments": ["v2_unetpp_cca"]}
    (wd / "config.yaml").write_text(yaml.safe_dump(cfg))
    r = _snakemake(wd)
    assert r.returncode == 0, r.stderr[-4000:]
    for cid in REJECTED:
        assert f"case {cid} rejected: case id may hold only letters" in r.stderr
    res = wd / "results"
    split = json.loads((res / "split/split.json").read_text())
    # each bad case failed at its check, with its one-line message, and left nothing that looks finished
    assert set(split["failed"]) == set(BAD)
    for cid, (_, pattern) in BAD.items():
        lines = (res / "logs/ingest/check" / f"{cid}.log").read_text().strip().splitlines()
        assert re.search(pattern, lines[-1]) and lines[-1].startswith(f"liverseg check: error: case {cid}: "), lines
        assert not (res / "preprocess" / f"{cid}.h5").exists()
        assert not (res / "predict" / "v2_unetpp_cca" / f"{cid}.nii.gz").exists()
    # every good case went through; the labelled test cases have their metrics rows
    good = set(split["train"] + split["val"] + split["test"] + split["predict"])
    assert good == set(GOOD) | {"nolivr"}
    rows = (res / "evaluate/v2_unetpp_cca/post/per_case.tsv").read_text().splitlines()[1:]
    assert {r.split("\t")[0] for r in rows} == set(split["test"])
    summary = (res / "report/summary.md").read_text()
    for cid in list(BAD) + REJECTED:
        assert f"`{cid}`" in summary
    assert not list(res.rglob("*.tmp*"))

    # fixing one bad test case redoes only that case
    shutil.copy(orig / f"{fix}_img.nii.gz", data / f"{fix}_img.nii.gz")
    shutil.copy(orig / f"{fix}_lab.nii.gz", data / f"{fix}_lab.nii.gz")
    r = _snakemake(wd, "-n", "--quiet", "rules")
    jobs = {p[0]: int(p[1]) for p in (ln.split() for ln in r.stdout.splitlines()) if len(p) == 2 and p[1].isdigit()}
    assert jobs.get("check_case") == 1 and "train" not in jobs and "make_phantom" not in jobs, jobs
    r = _snakemake(wd)
    assert r.returncode == 0, r.stderr[-3000:]
    split = json.loads((res / "split/split.json").read_text())
    assert fix in split["test"] and fix not in split["failed"]
    rows = (res / "evaluate/v2_unetpp_cca/post/per_case.tsv").read_text().splitlines()[1:]
    assert fix in {r.split("\t")[0] for r in rows}


def test_checks_that_crash_or_run_out_of_memory_leave_verdicts_and_the_split_goes_on(tmp_path):
    """A reader exception nothing expects and a case too big for the check's memory (the rule passes its mem_mb
    on as the reading process's limit) are failed verdicts: the split comes out with the other cases."""
    import struct

    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for i in range(4):
        write_case(300 + i, data / f"g{i}_img.nii.gz", data / f"g{i}_lab.nii.gz", PhantomSpec(size=48, slices=16))
        rows.append((f"g{i}", f"g{i}_img.nii.gz", f"g{i}_lab.nii.gz"))
    write_nifti(data / "odd.nii", np.arange(512, dtype=np.int16).reshape(8, 8, 8))
    raw = bytearray((data / "odd.nii").read_bytes())
    struct.pack_into("<h", raw, 70, 999)  # unknown NIfTI data type code: nibabel raises HeaderDataError
    (data / "odd.nii").write_bytes(bytes(raw))
    rows.append(("odd", "odd.nii", ""))
    big = np.zeros((512, 512, 300), np.int16)  # 150 MB as an array, about 1 MB compressed
    big[::7, ::5, ::3] = 40
    write_nifti(data / "big.nii.gz", big)
    rows.append(("big", "big.nii.gz", ""))
    (data / "samples.tsv").write_text("case_id\timage\tlabel\n" + "".join(f"{a}\t{b}\t{c}\n" for a, b, c in rows))
    wd = tmp_path / "run"
    wd.mkdir()
    cfg = {"dataset": {"source": "samplesheet", "samplesheet": str(data / "samples.tsv")},
           "resources": {"check_case": {"mem_mb": 400, "mem_per_mb": 0}}}
    (wd / "config.yaml").write_text(yaml.safe_dump(cfg))
    r = _snakemake(wd, "results/split/split.json")
    assert r.returncode == 0, r.stderr[-4000:]
    split = json.loads((wd / "results/split/split.json").read_text())
    assert set(split["failed"]) == {"odd", "big"}, split["failed"]
    assert "HeaderDataError" in split["failed"]["odd"]
    assert split["failed"]["big"].startswith("case big: out of memory while reading it (limit 400 MB")
    assert set(split["train"] + split["val"] + split["test"]) == {f"g{i}" for i in range(4)}
