import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import axcodes2ornt, inv_ornt_aff, ornt_transform

from liverseg.errors import CaseError
from liverseg.io import geometry_of, load_nifti, save_nifti_like

from conftest import write_nifti


@pytest.mark.parametrize("codes", [("R", "A", "S"), ("L", "P", "S"), ("L", "A", "I"), ("A", "R", "S"), ("S", "L", "P")])
def test_canonical_round_trip_and_write_back(tmp_path, codes):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 3, size=(5, 6, 7)).astype(np.uint8)
    aff = np.diag([0.7, 0.8, 2.5, 1.0])
    aff[:3, 3] = [10, -20, 30]
    t = ornt_transform(axcodes2ornt(("R", "A", "S")), axcodes2ornt(codes))
    arr = np.ascontiguousarray(nib.orientations.apply_orientation(base, t))
    aff_o = aff @ inv_ornt_aff(t, base.shape)
    path = write_nifti(tmp_path / "x.nii.gz", arr, aff_o)
    img = nib.load(path)
    g = geometry_of(img)
    can = g.to_canonical(np.asanyarray(img.dataobj))
    assert np.array_equal(can, base)  # canonical is the same RAS array whatever the storage order
    assert np.allclose(g.canonical_spacing, [0.7, 0.8, 2.5])
    out = tmp_path / "y.nii.gz"
    save_nifti_like(can, g, out)
    back = nib.load(out)
    assert back.shape == arr.shape and np.allclose(back.affine, aff_o)
    assert np.array_equal(np.asanyarray(back.dataobj), arr)
    assert not list(tmp_path.glob(".*tmp*"))


def test_load_errors_are_one_line_case_errors(tmp_path):
    with pytest.raises(CaseError, match="case c1: image file does not exist"):
        load_nifti(tmp_path / "nope.nii.gz", "c1")
    (tmp_path / "junk.nii").write_bytes(b"\x00\x01garbage" * 50)
    with pytest.raises(CaseError, match="case c1: cannot read image"):
        load_nifti(tmp_path / "junk.nii", "c1")
    write_nifti(tmp_path / "flat.nii.gz", np.zeros((4, 4), np.int16))
    with pytest.raises(CaseError, match="2 dimensions"):
        load_nifti(tmp_path / "flat.nii.gz", "c1")
    write_nifti(tmp_path / "four.nii.gz", np.zeros((4, 4, 4, 2), np.int16))
    with pytest.raises(CaseError, match="4 dimensions"):
        load_nifti(tmp_path / "four.nii.gz", "c1")
