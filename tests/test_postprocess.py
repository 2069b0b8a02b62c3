import nibabel as nib
import numpy as np
from scipy import ndimage

from liverseg.postprocess import largest_component, postprocess_case, postprocess_labels

from conftest import write_nifti


def _reference_largest(mask):
    """The original study's way: scipy label on the whole volume, keep the biggest label (26-connectivity)."""
    lab, n = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    if n == 0:
        return np.zeros_like(mask, bool)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == sizes.argmax()


def test_largest_component_matches_scipy_on_random_blobs():
    rng = np.random.default_rng(0)
    for _ in range(5):
        m = ndimage.binary_opening(rng.random((40, 50, 30)) > 0.7)
        assert np.array_equal(largest_component(m, 26), _reference_largest(m))
    assert not largest_component(np.zeros((5, 5, 5), bool)).any()


def test_connectivity_matters():
    m = np.zeros((6, 6, 6), bool)
    m[1:3, 1:3, 1:3] = True
    m[3:5, 3:5, 3:5] = True  # touches the first block at a corner only
    assert largest_component(m, 26).sum() == 16
    assert largest_component(m, 6).sum() == 8


def test_tumour_outside_kept_liver_is_removed_and_small_lesions_dropped():
    lab = np.zeros((30, 30, 10), np.uint8)
    lab[2:20, 2:20, 2:8] = 1
    lab[5:8, 5:8, 3:6] = 2  # tumour inside the liver: 27 voxels
    lab[10:11, 10:11, 4:5] = 2  # one-voxel lesion
    lab[25:28, 25:28, 2:5] = 2  # tumour blob away from the liver: dropped with its component
    out = postprocess_labels(lab)
    assert out[26, 26, 3] == 0 and out[6, 6, 4] == 2 and out[10, 10, 4] == 2
    out = postprocess_labels(lab, spacing=(1, 1, 2), min_lesion_mm3=10)
    assert out[10, 10, 4] == 1 and out[6, 6, 4] == 2


def test_fill_holes():
    lab = np.zeros((12, 12, 12), np.uint8)
    lab[2:10, 2:10, 2:10] = 1
    lab[5, 5, 5] = 0
    assert postprocess_labels(lab, fill_holes=True)[5, 5, 5] == 1
    assert postprocess_labels(lab)[5, 5, 5] == 0


def test_postprocess_case_keeps_geometry(tmp_path):
    lab = np.zeros((10, 12, 8), np.uint8)
    lab[1:5, 1:5, 1:5] = 1
    lab[7:9, 9:11, 6:7] = 1
    aff = np.diag([-0.8, 0.8, 3.0, 1])
    p = write_nifti(tmp_path / "p.nii.gz", lab, aff)
    postprocess_case("c", p, tmp_path / "o.nii.gz")
    o = nib.load(tmp_path / "o.nii.gz")
    assert np.allclose(o.affine, aff) and o.get_data_dtype() == np.uint8
    assert np.asanyarray(o.dataobj).sum() == 64
