import csv

import nibabel as nib
import numpy as np
import pytest

from liverseg.kaggle import read_submission, rle_decode, rle_encode, write_submission

from conftest import realdata, write_nifti


def competition_decode(rle: str, rows: int, cols: int) -> np.ndarray:
    """Decoder written from the competition's definition, independent of liverseg.kaggle: the slice (rows x
    columns) is flattened column-major (down the first column, then the next, ...); ``rle`` is pairs
    ``start length`` with 1-indexed starts; 0-based pixel k of that order is (row k % rows, column k // rows).
    Also checks the canonical form: runs in increasing order, separated by at least one background pixel, and
    an empty slice written as exactly ``1 0``."""
    nums = [int(v) for v in rle.split()]
    assert len(nums) % 2 == 0 and nums, rle
    mask = np.zeros((rows, cols), bool)
    if nums == [1, 0]:
        return mask
    end = -1  # 1-indexed position after the previous run
    for start, length in zip(nums[0::2], nums[1::2]):
        assert length >= 1 and start > end and start + length - 1 <= rows * cols, rle
        for k in range(start - 1, start - 1 + length):
            mask[k % rows, k // rows] = True
        end = start + length
    return mask


def test_rle_worked_example_from_the_competition():
    m = np.zeros((3, 2), np.uint8)  # rows x columns
    m[1, 0] = m[2, 0] = m[0, 1] = 1
    assert [int(m[r, c]) for c in range(2) for r in range(3)] == [0, 1, 1, 1, 0, 0]  # column-major, by hand
    assert rle_encode(m) == "2 3"
    assert rle_encode(m.astype(bool)) == "2 3"
    assert np.array_equal(competition_decode("2 3", 3, 2), m.astype(bool))
    assert rle_encode(np.zeros((3, 2), bool)) == "1 0"


@pytest.mark.parametrize("pixels, want", [
    ([(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)], "1 6"),
    ([(2, 1)], "6 1"),  # the last pixel in column-major order
    ([(0, 0), (2, 1)], "1 1 6 1"),
    ([(2, 0), (0, 1)], "3 2"),  # a run continues from the bottom of one column to the top of the next
    ([(0, 1)], "4 1"),  # row-major would put this pixel at 2
])
def test_rle_known_answers_on_a_non_square_slice(pixels, want):
    m = np.zeros((3, 2), bool)
    for r, c in pixels:
        m[r, c] = True
    assert rle_encode(m) == want
    assert np.array_equal(competition_decode(want, 3, 2), m)


@pytest.mark.parametrize("shape", [(7, 5), (1, 9), (9, 1), (16, 11), (4, 4)])
def test_random_masks_round_trip_through_the_competition_decoder(shape):
    rng = np.random.default_rng(sum(shape))
    for density in (0.0, 0.05, 0.3, 0.7, 0.95, 1.0):
        for _ in range(20):
            m = rng.random(shape) < density
            rle = rle_encode(m)
            assert np.array_equal(competition_decode(rle, *shape), m), (rle, m.astype(int))
            assert np.array_equal(rle_decode(rle, shape), m)


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


def test_submission_ids_order_and_masks_follow_the_stored_grid(tmp_path):
    """One row per slice along the third axis *as stored* (not the canonical one), ids cell_{volume}_{slice},
    volumes in numeric order, liver and tumour together, each mask rows x columns of that stored slice."""
    rng = np.random.default_rng(0)
    perm = np.array([[0, 0, 2.0, 0], [1.5, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]])  # stored axes: A, S, R
    vols = {}
    for vol, shape in (("10", (6, 5, 2)), ("9", (4, 7, 3)), ("100", (5, 3, 1))):
        arr = rng.integers(0, 3, size=shape).astype(np.uint8)
        arr[..., 0] = 0  # an empty first slice in every volume
        vols[vol] = (arr, write_nifti(tmp_path / f"{vol}.nii.gz", arr, perm))
    n = write_submission({v: p for v, (_, p) in vols.items()}, tmp_path / "s.csv")
    with open(tmp_path / "s.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["id", "rle"] and n == len(rows) - 1 == 2 + 3 + 1
    assert [r[0] for r in rows[1:]] == ["cell_9_0", "cell_9_1", "cell_9_2", "cell_10_0", "cell_10_1", "cell_100_0"]
    for rid, rle in rows[1:]:
        _, vol, z = rid.split("_")
        arr = vols[vol][0]
        assert np.array_equal(competition_decode(rle, arr.shape[0], arr.shape[1]), arr[:, :, int(z)] > 0), rid
        if z == "0":
            assert rle == "1 0"


def test_sample_submission_order_bom_and_refusals(tmp_path):
    """With a sample: its ids and order exactly (a BOM from a spreadsheet is fine); an id without a prediction, a
    malformed id or an empty sample is one ConfigError, and no file is left behind."""
    import nibabel as nib

    from liverseg.errors import ConfigError
    from liverseg.kaggle import write_submission

    vols = {}
    for v in ("9", "10"):
        lab = np.zeros((3, 2, 2), np.uint8)
        lab[1, 0, 1] = int(v) % 3 + 1
        nib.save(nib.Nifti1Image(lab, np.eye(4)), str(tmp_path / f"{v}.nii.gz"))
        vols[v] = str(tmp_path / f"{v}.nii.gz")
    sample = tmp_path / "sample.csv"
    sample.write_text("\ufeffid,rle\ncell_10_1,1 0\ncell_9_0,1 0\ncell_10_0,1 0\ncell_9_1,1 0\n", encoding="utf-8")
    assert write_submission(vols, tmp_path / "s.csv", sample=sample) == 4
    rows = (tmp_path / "s.csv").read_text().splitlines()
    assert rows == ["id,rle", "cell_10_1,2 1", "cell_9_0,1 0", "cell_10_0,1 0", "cell_9_1,2 1"]
    for text, msg in (("id,rle\ncell_11_0,1 0\n", "cell_11_0 has no prediction: volume 11 was not predicted"),
                      ("id,rle\ncell_9_5,1 0\n", "cell_9_5 has no prediction: volume 9 has 2 slices"),
                      ("id,rle\nrow_9_0,1 0\n", "is not cell_<volume>_<slice>"),
                      ("id,rle\ncell_9_\u00b2,1 0\n", "is not cell_<volume>_<slice>"),
                      ("id,rle\n", "lists no ids"), ("name,rle\nx,1 0\n", "has no 'id' column")):
        sample.write_text(text, encoding="utf-8")
        with pytest.raises(ConfigError, match=msg):
            write_submission(vols, tmp_path / "bad.csv", sample=sample)
        assert not (tmp_path / "bad.csv").exists()
