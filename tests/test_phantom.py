import nibabel as nib
import numpy as np

from liverseg.io import Geometry
from liverseg.phantom import PhantomSpec, generate

SPEC = PhantomSpec(size=96, slices=40)


def _canonical(seed):
    img, lab, aff = generate(seed, SPEC)
    from nibabel.orientations import io_orientation, ornt_transform

    ornt = ornt_transform(io_orientation(aff), np.array([[0, 1], [1, 1], [2, 1]]))
    g = Geometry(img.shape, aff, ornt)
    return g.to_canonical(img), g.to_canonical(lab), aff


def test_deterministic_by_seed():
    a = generate(7, SPEC)
    b = generate(7, SPEC)
    c = generate(8, SPEC)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])


def test_tissue_hu_and_labels():
    for seed in range(4):
        img, lab, _ = _canonical(seed)
        assert img.dtype == np.int16 and lab.dtype == np.uint8
        assert set(np.unique(lab)) <= {0, 1, 2}
        liver = np.median(img[lab == 1])
        assert 50 <= liver <= 140, liver
        assert np.median(img[0:3, 0:3, :]) < -900  # air in the corners
        assert img.max() > 300  # bone
        if (lab == 2).any():
            drop = liver - np.median(img[lab == 2])
            assert 10 <= drop <= 80, drop


def test_empty_slices_above_and_below_the_liver():
    for seed in range(4):
        _, lab, _ = _canonical(seed)
        present = (lab >= 1).any(axis=(0, 1))
        assert not present[0] and not present[-1]
        assert present.sum() >= 5
        # the liver sits on the patient's right (+x in RAS)
        xs = np.nonzero(lab >= 1)[0]
        assert xs.mean() > lab.shape[0] / 2


def test_spacing_and_orientation_vary():
    codes, sp = set(), []
    for seed in range(12):
        _, _, aff = generate(seed, PhantomSpec(size=32, slices=12))
        codes.add(nib.aff2axcodes(aff))
        sp.append(np.sqrt((aff[:3, :3] ** 2).sum(axis=0)))
    sp = np.array(sp)
    assert len(codes) >= 3
    assert sp[:, :2].min() >= 0.6 and sp[:, :2].max() <= 1.0
    assert sp[:, 2].min() >= 1.0 and sp[:, 2].max() <= 5.0
