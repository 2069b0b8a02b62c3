"""Real CT from ../shared/realdata (see its README): ingest as-is, HDF5 checked against the source."""

import h5py
import nibabel as nib
import numpy as np
import pytest

import torch

from liverseg.geometry import placement
from liverseg.inference import to_source_grid
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
        # at the native mm per pixel the stored label is the canonical label (H = y, W = x), moved so that the
        # body's centre is the grid's centre: no pixel is resampled
        a = dict(f.attrs)
        assert tuple(a["resampled_shape"]) == (native, native)
        dst, src = placement(native, a["offset"], (native, native))
        want = np.zeros_like(f["label"][:])
        want[(slice(None), *dst)] = np.transpose(lab_can, (2, 1, 0))[(slice(None), *src)]
        assert np.array_equal(f["label"][:], want)
        onehot = torch.nn.functional.one_hot(torch.from_numpy(f["label"][:].astype(np.int64)), 3).permute(0, 3, 1, 2)
        stored = np.transpose(to_source_grid(onehot.float(), a).argmax(dim=1).numpy().astype(np.uint8), (2, 1, 0))
        assert np.allclose(a["affine"], img.affine)
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
