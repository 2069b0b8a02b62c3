import csv

import nibabel as nib
import numpy as np
import pytest

from liverseg.kaggle import read_submission, rle_decode, rle_encode, write_submission

from conftest import realdata, write_nifti


def test_rle_known_answer():
    m = np.array([[0, 1], [1, 1]], bool)  # column-major: [0, 1, 1, 1] -> starts at 2 (1-indexed), length 3
    assert rle_encode(m) == "2 3"
    assert rle_encode(np.zeros((3, 3), bool)) == "1 0"
    assert rle_encode(np.ones((2, 2), bool)) == "1 4"
    assert not rle_decode("1 0", (3, 3)).any()


@pytest.mark.parametrize("case, folder", [("117", "lits117_pypi"), ("902", "totalseg_tests")])
def test_round_trip_on_real_masks(case, folder):
    lab = np.asanyarray(nib.load(realdata(folder, f"segmentation-{case}.nii.gz")).dataobj) > 0
    for z in range(lab.shape[2]):
        m = lab[:, :, z]
        assert np.array_equal(rle_decode(rle_encode(m), m.shape), m)


def test_submission_file(tmp_path):
    vol = np.zeros((6, 5, 3), np.uint8)
    vol[1:3, 2:4, 1] = 1
    vol[2, 2, 2] = 2
    p = write_nifti(tmp_path / "p.nii.gz", vol, np.diag([-1, 1, 2, 1]))
    n = write_submission({"7": p}, tmp_path / "submission.csv")
    assert n == 3
    with open(tmp_path / "submission.csv") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["id", "rle"] and rows[1] == ["cell_7_0", "1 0"]
    sub = read_submission(tmp_path / "submission.csv")
    assert np.array_equal(rle_decode(sub["cell_7_1"], (6, 5)), vol[:, :, 1] > 0)
    assert np.array_equal(rle_decode(sub["cell_7_2"], (6, 5)), vol[:, :, 2] > 0)
