import h5py
import nibabel as nib
import numpy as np
import pytest

from liverseg.errors import CaseError
from liverseg.io import geometry_of
from liverseg.preprocess import preprocess_case, resize_slab, window_fixed, window_study_v2

from conftest import write_nifti


def test_window_fixed_clips_and_scales():
    hu = np.array([-1000, -150, 50, 250, 3000], np.int16)
    out = window_fixed(hu, -150, 250)
    assert out.dtype == np.float32
    assert np.allclose(out, [0, 0, 0.5, 1, 1])


def test_window_study_v2_range_and_shape():
    rng = np.random.default_rng(0)
    s = rng.normal(40, 200, size=(64, 64)).astype(np.float32)
    out = window_study_v2(s)
    assert out.shape == s.shape and out.dtype == np.float32
    assert out.min() == pytest.approx(0) and out.max() == pytest.approx(1)


def test_resize_labels_stay_labels():
    lab = np.zeros((2, 40, 40), np.uint8)
    lab[:, 10:30, 10:30] = 1
    lab[:, 15:20, 15:20] = 2
    out = resize_slab(lab, 16, is_label=True)
    assert out.shape == (2, 16, 16) and set(np.unique(out)) == {0, 1, 2}


def test_hdf5_layout_matches_source(tiny_case, tmp_path):
    img_p, lab_p = tiny_case
    out = tmp_path / "1.h5"
    s = preprocess_case("1", img_p, out, label_path=lab_p, size=32)
    img = nib.load(img_p)
    g = geometry_of(img)
    lab_can = g.to_canonical(np.asanyarray(nib.load(lab_p).dataobj))
    with h5py.File(out) as f:
        assert f["image"].shape == (img.shape[2] if g.ornt[2, 0] == 2 else f["image"].shape[0], 32, 32)
        assert f["image"].dtype == np.float16 and f["image"].chunks == (1, 32, 32)
        assert f["label"].dtype == np.uint8
        assert 0 <= f["image"][:].min() and f["image"][:].max() <= 1
        nz = lab_can.shape[2]
        assert f["image"].shape[0] == nz == s["slices"]
        expected = (lab_can >= 1).any(axis=(0, 1))
        assert np.array_equal(f["liver_present"][:], expected)
        assert np.array_equal(f["tumour_present"][:], (f["label"][:] == 2).any(axis=(1, 2)))
        a = f.attrs
        assert a["case_id"] == "1" and a["labelled"]
        assert np.allclose(a["affine"], img.affine)
        assert tuple(a["original_shape"]) == img.shape
        assert a["window_lower"] == -150 and a["window_upper"] == 250 and a["size"] == 32
        bb = f["liver_bbox"][:]
        z = int(np.flatnonzero(expected)[0])
        r0, r1, c0, c1 = bb[z]
        assert (f["label"][z][r0:r1, c0:c1] >= 1).any()
        assert (bb[~expected] == -1).all()


def _case(tmp_path, img, lab=None, img_aff=None, lab_aff=None, dtype=np.int16):
    ip = write_nifti(tmp_path / "volume-9.nii.gz", img, img_aff, dtype)
    lp = write_nifti(tmp_path / "segmentation-9.nii.gz", lab, lab_aff) if lab is not None else None
    return ip, lp


GOOD = np.random.default_rng(1).integers(-200, 300, size=(16, 16, 6)).astype(np.int16)
LAB = np.zeros((16, 16, 6), np.uint8)
LAB[4:10, 4:10, 2:4] = 1


@pytest.mark.parametrize(
    "kind, match",
    [
        ("missing", "does not exist"),
        ("truncated", "truncated or corrupt|cannot read"),
        ("random_bytes", "cannot read image"),
        ("2d", "2 dimensions"),
        ("4d", "4 dimensions"),
        ("shape", "label shape"),
        ("affine", "label affine differs"),
        ("label_value", r"label values \[3\]"),
        ("label_float", "non-integer"),
        ("nan", "NaN or infinite"),
        ("constant", "constant"),
        ("empty", "empty"),
    ],
)
def test_bad_inputs_give_one_line_errors_and_no_output(tmp_path, kind, match):
    out = tmp_path / "out.h5"
    lab = LAB
    img = GOOD
    img_aff = lab_aff = None
    dtype = np.int16
    if kind == "2d":
        img = GOOD[:, :, 0]
        lab = None
    elif kind == "4d":
        img = np.stack([GOOD, GOOD], axis=-1)
        lab = None
    elif kind == "shape":
        lab = LAB[:, :, :5]
    elif kind == "affine":
        lab_aff = np.diag([1, 1, 1.5, 1])
    elif kind == "label_value":
        lab = LAB.copy()
        lab[0, 0, 0] = 3
    elif kind == "label_float":
        lab = LAB.astype(np.float32) * 0.5
    elif kind == "nan":
        img = GOOD.astype(np.float32)
        img[1, 1, 1] = np.nan
        dtype = np.float32
    elif kind == "constant":
        img = np.full_like(GOOD, -1000)
    elif kind == "empty":
        img = np.zeros((16, 0, 6), np.int16)
        lab = None
    ip, lp = _case(tmp_path, img, lab, img_aff, lab_aff, dtype)
    if kind == "missing":
        ip = str(tmp_path / "nope.nii.gz")
    elif kind == "truncated":
        data = open(ip, "rb").read()
        open(ip, "wb").write(data[: len(data) // 2])
    elif kind == "random_bytes":
        ip = str(tmp_path / "volume-9.nii")
        open(ip, "wb").write(np.random.default_rng(0).bytes(5000))
    with pytest.raises(CaseError, match=match) as ei:
        preprocess_case("9", ip, out, label_path=lp, size=16)
    assert "\n" not in str(ei.value) and str(ei.value).startswith("case 9: ")
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".h5" or ".tmp" in p.name]


def test_float_labels_with_integer_values_are_accepted(tmp_path):
    ip, lp = _case(tmp_path, GOOD, LAB.astype(np.float32))
    preprocess_case("9", ip, tmp_path / "ok.h5", label_path=lp, size=16)
    with h5py.File(tmp_path / "ok.h5") as f:
        assert f["liver_present"][:].sum() == 2


def test_scaled_int16_image_is_windowed_in_hu(tmp_path):
    arr = np.full((8, 8, 3), 50, np.int16)
    arr[0, 0, 0] = 0
    img = nib.Nifti1Image(arr, np.eye(4))
    img.header.set_slope_inter(2.0, -50.0)  # stored 50 -> 2 * 50 - 50 = 50 HU
    p = tmp_path / "s.nii.gz"
    nib.save(img, str(p))
    preprocess_case("s", p, tmp_path / "s.h5", size=8)
    with h5py.File(tmp_path / "s.h5") as f:
        assert float(f["image"][1, 2, 2]) == pytest.approx((50 + 150) / 400, abs=1e-3)
