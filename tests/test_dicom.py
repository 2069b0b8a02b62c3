import nibabel as nib
import numpy as np
import pytest

from liverseg.errors import CaseError
from liverseg.io import geometry_of, load_nifti

from conftest import realdata


def test_jpeg2000_series_matches_the_reference_conversion():
    folder = realdata("totalseg_tests", "original", "example_ct_dicom")
    ref = nib.load(realdata("totalseg_tests", "volume-902.nii.gz"))
    img = load_nifti(folder, "902")
    assert img.shape == ref.shape
    # Same voxels and geometry once both are in the canonical RAS orientation (the reference stores rows flipped).
    ga, gr = geometry_of(img), geometry_of(ref)
    assert np.array_equal(ga.to_canonical(np.asanyarray(img.dataobj)), gr.to_canonical(np.asanyarray(ref.dataobj)))
    assert np.allclose(nib.as_closest_canonical(img).affine, nib.as_closest_canonical(ref).affine, atol=1e-4)


def test_folder_without_dicom_is_a_case_error(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CaseError, match="folder without DICOM"):
        load_nifti(tmp_path, "d1")
