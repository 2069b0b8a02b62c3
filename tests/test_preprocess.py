import h5py
import nibabel as nib
import numpy as np
import pytest

from liverseg.errors import CaseError
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


def _superior_axis(affine) -> int:
    """The stored axis that runs inferior-superior, read from the affine alone (nibabel's axis codes)."""
    codes = nib.aff2axcodes(affine)
    (ax,) = [i for i, c in enumerate(codes) if c in ("S", "I")]
    return ax


def test_hdf5_layout_matches_source(tiny_case, tmp_path):
    img_p, lab_p = tiny_case
    out = tmp_path / "1.h5"
    s = preprocess_case("1", img_p, out, label_path=lab_p, size=32)
    img = nib.load(img_p)
    # Oracle independent of liverseg.io: nibabel's own closest-canonical (RAS) reorientation of the label.
    lab_can = np.asanyarray(nib.as_closest_canonical(nib.load(lab_p)).dataobj)
    nz = img.shape[_superior_axis(img.affine)]  # one slice per voxel along the patient's long axis
    with h5py.File(out) as f:
        assert f["image"].shape == (nz, 32, 32) and f["label"].shape == (nz, 32, 32)
        assert lab_can.shape[2] == nz == s["slices"]
        assert f["image"].dtype == np.float16 and f["image"].chunks == (1, 32, 32)
        assert f["label"].dtype == np.uint8
        assert 0 <= f["image"][:].min() and f["image"][:].max() <= 1
        expected = (lab_can >= 1).any(axis=(0, 1))
        assert np.array_equal(f["liver_present"][:], expected)
        assert np.array_equal((f["label"][:] >= 1).any(axis=(1, 2)), expected)  # z runs inferior -> superior
        assert np.array_equal(f["tumour_present"][:], (f["label"][:] == 2).any(axis=(1, 2)))
        a = f.attrs
        assert a["case_id"] == "1" and a["labelled"]
        assert np.allclose(a["affine"], img.affine)
        assert tuple(a["original_shape"]) == img.shape
        assert a["window_lower"] == -150 and a["window_upper"] == 250 and a["size"] == 32
        zz, rr, cc = np.nonzero(f["label"][:] >= 1)
        assert list(a["liver_bbox_3d"]) == [zz.min(), zz.max() + 1, rr.min(), rr.max() + 1, cc.min(), cc.max() + 1]


@pytest.mark.parametrize("codes", [("R", "A", "S"), ("L", "P", "I"), ("S", "R", "A"), ("P", "I", "L")])
def test_slices_run_along_the_patient_axis_whatever_the_stored_order(tmp_path, codes):
    """A 12 x 20 x 7 (R-L x A-P x I-S) volume at 0.9 mm in-plane stored in several axis orders: always 7 slices,
    each 20 rows (A-P) by 12 columns (R-L) at 0.9 mm, placed in the middle of the 20 x 20 grid (never stretched
    to fill it), slice 0 the most inferior."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

    ras = np.full((12, 20, 7), -1000, np.int16)
    lab = np.zeros((12, 20, 7), np.uint8)
    ras[:, :, 1] = 100  # marks: slice 1 (inferior) holds liver everywhere, slice 4 only in its anterior half
    lab[:, :, 1] = 1
    ras[:, 10:, 4] = 100
    lab[:, 10:, 4] = 1
    aff = np.diag([0.9, 0.9, 3.0, 1.0])
    t = ornt_transform(axcodes2ornt(("R", "A", "S")), axcodes2ornt(codes))
    aff_o = aff @ inv_ornt_aff(t, ras.shape)
    ip = write_nifti(tmp_path / "v.nii.gz", apply_orientation(ras, t), aff_o)
    lp = write_nifti(tmp_path / "l.nii.gz", apply_orientation(lab, t), aff_o)
    preprocess_case("o", ip, tmp_path / "o.h5", label_path=lp, size=20, spacing_mm=0.9)
    with h5py.File(tmp_path / "o.h5") as f:
        assert f["label"].shape == (7, 20, 20)
        assert np.flatnonzero(f["liver_present"][:]).tolist() == [1, 4]
        assert tuple(f.attrs["resampled_shape"]) == (20, 12) and tuple(f.attrs["offset"]) == (0, 4)
        # the scan's 12 R-L columns sit centred (columns 4..15); the 4 columns on each side are padding
        assert (f["label"][1][:, 4:16] == 1).all() and (f["label"][1][:, :4] == 0).all()
        assert (f["label"][1][:, 16:] == 0).all()
        # rows run posterior -> anterior (canonical y), so the anterior half is the lower half of the rows
        assert (f["label"][4][10:, 4:16] == 1).all() and (f["label"][4][:10] == 0).all()
        image = f["image"][:].astype(np.float32)  # 100 HU -> 0.625, air -> 0; no resampling at 0.9 mm: exact
        assert (image[1][:, 4:16] == 0.625).all() and (image[4][10:, 4:16] == 0.625).all()
        assert (image[4][:10] == 0).all() and (image[:, :, :4] == 0).all()
        assert (image[[0, 2, 3, 5, 6]] == 0).all()
        assert np.allclose(f.attrs["canonical_spacing"], [0.9, 0.9, 3.0])


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



@pytest.mark.parametrize("slope, inter", [(1.0, 0.0), (2.0, -1024.0), (-0.5, 30.0)])
def test_stored_image_is_window_fixed_of_the_hu(tmp_path, slope, inter):
    """Without resampling (native spacing on a grid the scan's size), every stored pixel is window_fixed of its
    HU, raw * slope + inter, to float16 precision: values below, inside and above the window, any scaling."""
    rng = np.random.default_rng(0)
    raw = rng.integers(-1200, 1200, size=(16, 16, 4)).astype(np.int16)
    img = nib.Nifti1Image(raw, np.diag([1.0, 1.0, 2.0, 1.0]))
    img.header.set_slope_inter(slope, inter)
    p = tmp_path / "w.nii.gz"
    nib.save(img, str(p))
    preprocess_case("w", p, tmp_path / "w.h5", size=16, spacing_mm=1.0, lower=-150, upper=250)
    want = window_fixed(np.transpose(raw.astype(np.float64) * slope + inter, (2, 1, 0)), -150, 250)
    with h5py.File(tmp_path / "w.h5") as f:
        got = f["image"][:].astype(np.float32)
        assert tuple(f.attrs["offset"]) == (0, 0)
    assert np.abs(got - want).max() <= 2 ** -11  # one float16 step just below 1

# ---------------------------------------------------------------------------------------------- non-square grids
NX, NY, NZ = 40, 56, 12  # canonical R-L x A-P x I-S: a non-square in-plane matrix
SPACING = (0.7, 0.9, 3.0)  # anisotropic voxels (mm)
BX, BY = 5, 7  # label blocks: 8 x 8 blocks per slice, each 4 x 4 pixels once resized to 32 x 32
HU = {0: -1000, 1: 100, 2: 40}  # windowed to 0, 0.625 and 0.475


def blocky_case(codes, seed=0):
    """A labelled volume built from BX x BY in-plane blocks, stored in the axis order ``codes``.  Returns the
    stored image, label and affine, and the canonical (RAS) block grid (8, 8, NZ)."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

    rng = np.random.default_rng(seed)
    grid = rng.choice([0, 1, 1, 2], size=(NX // BX, NY // BY, NZ)).astype(np.uint8)
    grid[:, :, [0, NZ - 1]] = 0  # no liver on the first and last slice
    grid[:, :, 5] = np.where(grid[:, :, 5] == 2, 1, grid[:, :, 5])  # liver without tumour on slice 5
    lab = np.kron(grid, np.ones((BX, BY, 1), np.uint8))
    img = np.vectorize(HU.get)(lab).astype(np.int16)
    aff = np.diag(list(SPACING) + [1.0])
    aff[:3, 3] = [-20.0, 35.0, 7.5]
    t = ornt_transform(axcodes2ornt(("R", "A", "S")), axcodes2ornt(codes))
    aff_o = aff @ inv_ornt_aff(t, lab.shape)
    return (np.ascontiguousarray(apply_orientation(img, t)), np.ascontiguousarray(apply_orientation(lab, t)),
            aff_o, grid)


CODES = [("R", "A", "S"), ("L", "P", "S"), ("A", "R", "I"), ("P", "I", "L")]


TARGET, GRID = 0.7, 80  # 0.7 mm divides both block sides (5 x 0.7 = 3.5 mm, 7 x 0.9 = 6.3 = 9 x 0.7 mm)


@pytest.mark.parametrize("codes", CODES)
def test_non_square_anisotropic_slices_and_labels(tmp_path, codes):
    """40 x 56 pixels at 0.7 x 0.9 mm resampled to 0.7 mm: 40 columns x 72 rows, every 5 x 7 pixel block of the
    source now 5 x 9 pixels (its true shape in mm), placed on the 80 x 80 grid at the recorded offset."""
    img, lab, aff, grid = blocky_case(codes)
    ip = write_nifti(tmp_path / "v.nii.gz", img, aff)
    lp = write_nifti(tmp_path / "l.nii.gz", lab, aff)
    preprocess_case("ns", ip, tmp_path / "ns.h5", label_path=lp, size=GRID, spacing_mm=TARGET)
    with h5py.File(tmp_path / "ns.h5") as f:
        image, label, a = f["image"][:].astype(np.float32), f["label"][:], dict(f.attrs)
        liver_present, tumour_present = f["liver_present"][:], f["tumour_present"][:]
    assert image.shape == label.shape == (NZ, GRID, GRID)
    assert tuple(a["resampled_shape"]) == (72, 40) and a["spacing_mm"] == TARGET
    assert np.allclose(a["stored_spacing"], [0.7, 0.7])
    r0, c0 = (int(v) for v in a["offset"])
    assert 0 <= r0 <= GRID - 72 and 0 <= c0 <= GRID - 40
    for z in range(NZ):
        want = np.zeros((GRID, GRID), np.uint8)
        want[r0 : r0 + 72, c0 : c0 + 40] = np.kron(grid[:, :, z].T, np.ones((9, 5), np.uint8))  # rows = A-P
        assert np.array_equal(label[z], want), z
        # pixels at least one pixel inside a block see only that block after the bilinear resize
        inner = image[z, r0 : r0 + 72, c0 : c0 + 40].reshape(8, 9, 8, 5)[:, 2:7, :, 1:4]
        win = np.vectorize(lambda k: min(max((HU[k] + 150) / 400, 0.0), 1.0))(grid[:, :, z].T)
        assert np.allclose(inner, win[:, None, :, None], atol=2e-3), z
    assert np.array_equal(liver_present, (grid >= 1).any(axis=(0, 1)))
    assert np.array_equal(tumour_present, (grid == 2).any(axis=(0, 1)))
    assert not liver_present[0] and not tumour_present[5] and liver_present[5]
    assert list(a["canonical_shape"]) == [NX, NY, NZ]
    assert np.allclose(a["canonical_spacing"], SPACING)
    assert np.allclose(a["spacing"], np.linalg.norm(aff[:3, :3], axis=0))
    assert tuple(a["original_shape"]) == img.shape and np.allclose(a["affine"], aff)


@pytest.mark.parametrize("codes", CODES)
def test_stored_geometry_leads_back_to_the_original_grid(tmp_path, codes):
    """From the stored label and the file's attributes alone, prediction's way back (inference.to_source_grid on
    one-hot probabilities, then nibabel's reorientation): the source label voxel for voxel, on the source grid."""
    import torch
    from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

    from liverseg.inference import to_source_grid

    img, lab, aff, _ = blocky_case(codes, seed=1)
    ip = write_nifti(tmp_path / "v.nii.gz", img, aff)
    lp = write_nifti(tmp_path / "l.nii.gz", lab, aff)
    preprocess_case("ns", ip, tmp_path / "ns.h5", label_path=lp, size=GRID, spacing_mm=TARGET)
    with h5py.File(tmp_path / "ns.h5") as f:
        stored, a = f["label"][:], dict(f.attrs)
    nx, ny, nz = (int(v) for v in a["canonical_shape"])
    onehot = torch.nn.functional.one_hot(torch.from_numpy(stored.astype(np.int64)), 3).permute(0, 3, 1, 2).float()
    slices = to_source_grid(onehot, a).argmax(dim=1).numpy().astype(np.uint8)  # (z, y, x)
    canonical = np.transpose(slices, (2, 1, 0))
    assert canonical.shape == (nx, ny, nz)
    back = apply_orientation(canonical, ornt_transform(axcodes2ornt(("R", "A", "S")), io_orientation(a["affine"])))
    assert back.shape == tuple(a["original_shape"])
    assert np.array_equal(back, lab)


@pytest.mark.parametrize("shape", [(37, 53), (80, 64), (23, 23)])
def test_resampling_follows_torchs_pixel_centre_convention(shape):
    """resize_slab (Pillow, no torch import) against torch's antialiased bilinear and nearest-exact, up and down:
    the convention prediction's way back (inference.to_source_grid, torch) inverts."""
    import torch
    import torch.nn.functional as F

    from liverseg.preprocess import resize_slab

    rng = np.random.default_rng(3)
    img = rng.random((2, 48, 40)).astype(np.float32)
    lab = rng.integers(0, 2, size=(2, 48, 40)).astype(np.uint8)  # liver/background only: keep_lesions idle
    want = F.interpolate(torch.from_numpy(img)[:, None], size=shape, mode="bilinear", align_corners=False,
                         antialias=True)[:, 0].numpy()
    assert np.abs(resize_slab(img, shape) - want).max() < 1e-4
    want_l = F.interpolate(torch.from_numpy(lab)[:, None].float(), size=shape, mode="nearest-exact")[:, 0].numpy()
    assert np.array_equal(resize_slab(lab, shape, is_label=True), want_l.astype(np.uint8))
