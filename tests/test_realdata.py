"""Real CT from ../shared/realdata (see its README): ingest as-is, HDF5 checked against the source."""

import h5py
import nibabel as nib
import numpy as np
import pytest

from liverseg.io import geometry_of, save_nifti_like
from liverseg.preprocess import preprocess_case

from conftest import realdata

CASES = [("117", "lits117_pypi", 128), ("902", "totalseg_tests", 512)]


@pytest.mark.parametrize("case, folder, native", CASES)
def test_real_case_hdf5_matches_source(tmp_path, case, folder, native):
    img_p = realdata(folder, f"volume-{case}.nii.gz")
    lab_p = realdata(folder, f"segmentation-{case}.nii.gz")
    out = tmp_path / f"{case}.h5"
    s = preprocess_case(case, img_p, out, label_path=lab_p, size=native)
    img, lab = nib.load(img_p), nib.load(lab_p)
    g = geometry_of(img)
    lab_can = g.to_canonical(np.asanyarray(lab.dataobj).astype(np.uint8))
    with h5py.File(out) as f:
        assert f["image"].shape[0] == lab_can.shape[2] == s["slices"]
        assert np.array_equal(f["liver_present"][:], (lab_can >= 1).any(axis=(0, 1)))
        assert np.array_equal(f["tumour_present"][:], (lab_can == 2).any(axis=(0, 1)))
        # at native size the stored label is the canonical label, slice by slice (H = y, W = x)
        assert np.array_equal(f["label"][:], np.transpose(lab_can, (2, 1, 0)))
        stored = np.transpose(f["label"][:], (2, 1, 0))
        assert np.allclose(f.attrs["affine"], img.affine)
    save_nifti_like(stored, g, tmp_path / "back.nii.gz")
    back = nib.load(tmp_path / "back.nii.gz")
    assert np.array_equal(np.asanyarray(back.dataobj), np.asanyarray(lab.dataobj).astype(np.uint8))
    assert np.allclose(back.affine, lab.affine)


def test_real_case_117_labels_and_window(tmp_path):
    img_p = realdata("lits117_pypi", "volume-117.nii.gz")
    lab_p = realdata("lits117_pypi", "segmentation-117.nii.gz")
    preprocess_case("117", img_p, tmp_path / "117.h5", label_path=lab_p, size=64)
    with h5py.File(tmp_path / "117.h5") as f:
        assert f["liver_present"][:].all()  # the crop holds liver on every slice (SOURCE.md)
        assert f["tumour_present"][:].any()
        im = f["image"][:].astype(np.float32)
        assert 0 <= im.min() and im.max() <= 1
        liver = im[f["label"][:] == 1]
        # median liver HU 118.6 -> (118.6 + 150) / 400 = 0.67 in the default window
        assert abs(np.median(liver) - 0.67) < 0.05
