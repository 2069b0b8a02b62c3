import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, write_nifti

COMMANDS = ["phantom", "cases", "preprocess", "split", "train", "predict-case", "postprocess", "evaluate-case",
            "aggregate", "overlay", "summarize"]


def run(*args):
    return subprocess.run([sys.executable, "-m", "liverseg", *args], capture_output=True, text=True, cwd=ROOT)


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help(cmd):
    r = run(cmd, "--help")
    assert r.returncode == 0 and "usage: liverseg" in r.stdout


def test_preprocess_bad_input_is_one_line(tmp_path):
    write_nifti(tmp_path / "v.nii.gz", np.zeros((4, 4), np.int16))
    r = run("preprocess", "--case", "c7", "--image", str(tmp_path / "v.nii.gz"), str(tmp_path / "o.h5"))
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines == [f"liverseg preprocess: error: case c7: image {tmp_path / 'v.nii.gz'} has 2 dimensions (4, 4); a 3D volume is required"]
    assert not (tmp_path / "o.h5").exists()


def test_phantom_then_preprocess_by_hand(tmp_path):
    r = run("phantom", "--seed", "2", "--size", "32", "--slices", "10", str(tmp_path / "v.nii.gz"), str(tmp_path / "s.nii.gz"))
    assert r.returncode == 0, r.stderr
    r = run("preprocess", "--case", "2", "--image", str(tmp_path / "v.nii.gz"), "--label", str(tmp_path / "s.nii.gz"),
            "--size", "32", str(tmp_path / "2.h5"))
    assert r.returncode == 0, r.stderr
    assert '"slices": 10' in r.stdout


def test_evaluate_shape_mismatch_names_the_case(tmp_path):
    write_nifti(tmp_path / "p.nii.gz", np.zeros((4, 4, 4), np.uint8))
    write_nifti(tmp_path / "r.nii.gz", np.zeros((4, 4, 5), np.uint8))
    r = run("evaluate-case", "--case", "x1", "--pred", str(tmp_path / "p.nii.gz"), "--ref", str(tmp_path / "r.nii.gz"),
            str(tmp_path / "o.tsv"))
    assert r.returncode == 1 and "case x1: prediction shape (4, 4, 4) differs from reference shape (4, 4, 5)" in r.stderr
