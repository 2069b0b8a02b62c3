import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from liverseg.config import default
from liverseg.io import Geometry
from liverseg.phantom import (AORTA, BONE, GALLBLADDER, IVC, LUNG, PHASES, PhantomSpec, _PHASE_HU, anatomy, draw,
                              generate, scan_geometry)

SPEC = PhantomSpec(size=96, slices=40)


def _canonical(seed, spec=SPEC):
    img, lab, aff = generate(seed, spec)
    from nibabel.orientations import io_orientation, ornt_transform

    ornt = ornt_transform(io_orientation(aff), np.array([[0, 1], [1, 1], [2, 1]]))
    g = Geometry(img.shape, aff, ornt)
    return g.to_canonical(img), g.to_canonical(lab), aff, np.array(g.canonical_spacing)


def _spacing(aff):
    return np.sqrt((aff[:3, :3] ** 2).sum(axis=0))


def _plan(seed, spec):
    rng_anat, rng_scan, _ = np.random.default_rng(seed).spawn(3)
    a = anatomy(rng_anat, spec.max_tumours, spec.phase_weights, spec.arms_probability)
    return a, scan_geometry(rng_scan, a, spec)


def test_spec_defaults_and_presets():
    assert PhantomSpec().size == default("dataset.phantom.size")
    assert PhantomSpec().slices == default("dataset.phantom.slices")
    lits = PhantomSpec(preset="lits")
    assert lits.size is None and lits.slices is None and lits.spacing_mm == (0.55, 1.0)
    assert PhantomSpec(size=48, slices=12, max_tumours=2).max_tumours == 2
    with pytest.raises(ValueError):
        PhantomSpec(preset="nope")


def test_deterministic_by_seed():
    a = generate(7, SPEC)
    b = generate(7, SPEC)
    c = generate(8, SPEC)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])


def test_tissue_hu_and_labels():
    for seed in range(4):
        img, lab, tis, _, a, _ = draw(seed, SPEC)
        assert img.dtype == np.int16 and lab.dtype == np.uint8
        assert set(np.unique(lab)) <= {0, 1, 2}
        lo, hi = _PHASE_HU["liver"][a.phase]
        liver = np.median(img[lab == 1])
        assert lo - 8 <= liver <= hi + 8, (PHASES[a.phase], liver)
        assert np.median(img[0:3, -3:, :]) < -900 and np.median(img[-3:, -3:, :]) < -900  # air, anterior corners
        assert img.min() >= -1024 and img.max() > 400  # bone
        assert ((tis == BONE) <= (lab == 0)).all()


def test_tumour_contrast_follows_its_kind():
    seen = set()
    for seed in range(40):
        a, _ = _plan(seed, SPEC)
        if not any(t["dia"] >= 30 for t in a.tumours):
            continue
        img, lab, _, aff, a, g = draw(seed, SPEC)
        liver = np.median(img[lab == 1])
        for t in a.tumours:
            if t["dia"] < 30:
                continue
            i, j, k = np.rint((t["c"] - [g.xs[0], g.ys[0], g.zs[0]]) / [g.sp, g.sp, g.spz]).astype(int)
            if lab[i, j, k] != 2 or t["kind"] == "rim":
                continue
            core = np.median(img[i - 1 : i + 2, j - 1 : j + 2, k])
            if t["kind"] == "hypo":
                assert liver - core >= 5, (seed, liver, core)
            else:
                assert core - liver >= 10, (seed, liver, core)
            seen.add(t["kind"])
        if seen == {"hypo", "hyper"}:
            break
    assert seen == {"hypo", "hyper"}


def test_empty_slices_above_and_below_the_liver():
    for seed in range(4):
        _, lab, _, _ = _canonical(seed)
        present = (lab >= 1).any(axis=(0, 1))
        assert not present[0] and not present[-1]
        assert present.sum() >= 5
        # the liver sits on the patient's right (+x in RAS)
        xs = np.nonzero(lab >= 1)[0]
        assert xs.mean() > lab.shape[0] / 2


@pytest.mark.parametrize("size,slices", [(64, 40), (128, 64)])
def test_liver_size_is_in_mm_not_relative_to_the_fov(size, slices):
    fovs = []
    for seed in range(4):
        img, lab, aff, (inplane, _, spz) = _canonical(seed, PhantomSpec(size=size, slices=slices))
        x = np.nonzero((lab >= 1).any(axis=(1, 2)))[0]
        z = np.nonzero((lab >= 1).any(axis=(0, 1)))[0]
        lr, cc = (x.max() - x.min() + 1) * inplane, (z.max() - z.min() + 1) * spz
        assert 150 <= lr <= 220, (seed, lr)
        assert 130 <= cc <= 200, (seed, cc)
        fovs.append(inplane * size)
    assert max(fovs) - min(fovs) > 10  # the FOV varies while the liver stays anatomical


def test_same_patient_at_two_matrix_sizes():
    (_, la, _, _, _, ga), (_, lb, _, _, _, gb) = (draw(5, PhantomSpec(size=64, slices=30)),
                                                  draw(5, PhantomSpec(size=128, slices=60)))
    ext = []
    for lab, g in ((la, ga), (lb, gb)):
        x = np.nonzero(lab.any(axis=(1, 2)))[0]
        ext.append((g.xs[x.max()] - g.xs[x.min()], g.sp))
    assert abs(ext[0][0] - ext[1][0]) <= 2 * ext[0][1] + 1


def test_lung_above_the_dome_and_ribs_beside_the_liver():
    for seed in range(3):
        img, lab, tis, _, a, g = draw(seed, SPEC)
        zl = np.nonzero(lab.any(axis=(0, 1)))[0]
        top = img[:, :, zl.max() + 1 :]
        assert top.shape[2] >= 1 and (top < -700).mean() > 0.03  # lung bases (the body fills ~ half the FOV)
        assert ((tis[:, :, zl.max() + 1 :] == LUNG) & (top > -700)).mean() < 0.2 * (tis == LUNG).mean() + 0.01
        xs = g.xs[:, None, None]
        mid = slice(zl.min() + (zl.max() - zl.min()) // 4, zl.max() - (zl.max() - zl.min()) // 4)
        far = (np.abs(xs) > 60) & (tis[:, :, mid] == BONE)
        ribs = [far[:, :, k].any() for k in range(far.shape[2])]
        assert np.mean(ribs) > 0.5, seed  # ribs in most slices through the liver
        assert np.median(img[:, :, mid][far]) > 250


def test_gallbladder_and_ivc_are_not_liver():
    n_gb = 0
    for seed in range(4):
        _, lab, tis, _, a, _ = draw(seed, SPEC)
        for t in (GALLBLADDER, IVC, AORTA):
            assert not lab[tis == t].any()
        n_gb += int((tis == GALLBLADDER).any())
        # the IVC runs partly inside the liver's outline (retrohepatic)
        assert (ndimage.binary_dilation(tis == IVC, iterations=2) & (lab == 1)).any()
    assert n_gb >= 2


def test_phases_tumour_kinds_and_sizes_vary():
    phases, kinds, dias, n_none = set(), set(), [], 0
    for seed in range(80):
        a, _ = _plan(seed, PhantomSpec(max_tumours=4))
        phases.add(a.phase)
        kinds |= {t["kind"] for t in a.tumours}
        dias += [t["dia"] for t in a.tumours]
        n_none += not a.tumours
    assert phases == {0, 1, 2}
    assert {"hypo", "hyper"} <= kinds
    assert 5 <= min(dias) < 8 and 60 < max(dias) <= 80 and np.median(dias) < 25
    assert n_none >= 3


def test_spacing_and_orientation_vary():
    codes = set()
    for seed in range(12):
        _, _, aff = generate(seed, PhantomSpec(size=32, slices=12))
        codes.add(nib.aff2axcodes(aff))
        fov = sorted(_spacing(aff))
        assert 300 <= 32 * np.median(fov) <= 520  # FOV / size (two of the three spacings are in-plane)
    assert len(codes) >= 3
    sp = np.array([[g.sp, g.spz, g.fov] for g in (_plan(s, PhantomSpec(size=None, slices=None))[1] for s in range(30))])
    assert 2.0 <= sp[:, 0].min() and sp[:, 0].max() <= 4.0 and np.ptp(sp[:, 0]) > 0.5
    assert 2.5 <= sp[:, 1].min() and sp[:, 1].max() <= 5.0 and np.ptp(sp[:, 1]) > 0.5
    assert 340 <= sp[:, 2].min() and sp[:, 2].max() <= 480


def test_lits_preset_geometry():
    geo = [_plan(s, PhantomSpec(preset="lits"))[1] for s in range(30)]
    sp = np.array([g.sp for g in geo])
    n = np.array([g.n for g in geo])
    assert 0.55 <= sp.min() and sp.max() <= 1.0
    assert 300 <= n.min() and n.max() <= 910 and np.ptp(n) > 100
    cap = PhantomSpec().max_voxels
    for g in geo:  # in the preset's range, or thickened only as far as the voxel cap demands (then at the cap)
        assert 0.7 <= g.spz <= 5.0 + 1e-6 or 0.9 * cap <= g.n ** 2 * g.nz <= 1.02 * cap, (g.spz, g.n, g.nz)
    assert sum(0.7 <= g.spz <= 5.0 + 1e-6 for g in geo) >= 20
    img, lab, aff = generate(3, PhantomSpec(preset="lits", slices=6))
    assert sorted(img.shape)[1:] == [geo[3].n, geo[3].n]
    assert np.allclose(sorted(_spacing(aff))[:2], geo[3].sp)
