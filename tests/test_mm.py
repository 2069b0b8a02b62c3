"""Millimetres, not pixels: the plan, in-plane resampling to it, the way back, and neighbours picked in mm.

Each "scan" here samples one analytic object (a body ellipse with an ellipsoidal "liver" and a spherical "tumour",
sizes in mm) at the scan's own voxel spacing, so scans of the same object at different spacings are compared
the way a scanner would produce them, not by resampling one array."""

import json

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import write_nifti
from liverseg.errors import ConfigError
from liverseg.geometry import context_indices, z_stride
from liverseg.inference import to_source_grid
from liverseg.plan import make_plan
from liverseg.preprocess import preprocess_case

BODY = (170.0, 120.0)  # semi-axes (mm) of the body ellipse, left-right and anterior-posterior
LIVER_C, LIVER_R = (-60.0, 10.0, 0.0), (70.0, 55.0, 60.0)  # centre (x, y, z) and semi-axes, mm
TUMOUR_C, TUMOUR_R = (-70.0, 15.0, 5.0), 15.0


def scan(shape, spacing, centre_offset=(0.0, 0.0), z0=-60.0):
    """(image int16, label uint8, affine) of the object sampled on a RAS grid of ``shape`` voxels at ``spacing`` mm,
    the grid centred at ``centre_offset`` mm from the body centre in-plane, slices from ``z0`` mm upwards."""
    nx, ny, nz = shape
    sx, sy, sz = spacing
    x = (np.arange(nx) - (nx - 1) / 2) * sx + centre_offset[0]
    y = (np.arange(ny) - (ny - 1) / 2) * sy + centre_offset[1]
    z = z0 + np.arange(nz) * sz
    X, Y, Z = np.meshgrid(x, y, z, indexing="ij")
    body = (X / BODY[0]) ** 2 + (Y / BODY[1]) ** 2 <= 1
    liver = sum(((v - c) / r) ** 2 for v, c, r in zip((X, Y, Z), LIVER_C, LIVER_R)) <= 1
    tumour = sum((v - c) ** 2 for v, c in zip((X, Y, Z), TUMOUR_C)) <= TUMOUR_R**2
    img = np.where(body, 40, -1000) + np.where(liver, 60, 0) - np.where(tumour & liver, 50, 0)
    lab = np.where(liver, np.where(tumour, 2, 1), 0).astype(np.uint8)
    aff = np.diag([sx, sy, sz, 1.0])
    aff[:3, 3] = [x[0], y[0], z[0]]
    return img.astype(np.int16), lab, aff


def _prep(tmp_path, name, shape, spacing, target=1.5, size=320, **kw):
    img, lab, aff = scan(shape, spacing, **kw)
    ip = write_nifti(tmp_path / f"v{name}.nii.gz", img, aff)
    lp = write_nifti(tmp_path / f"s{name}.nii.gz", lab, aff, np.uint8)
    h5 = tmp_path / f"{name}.h5"
    preprocess_case(name, ip, h5, label_path=lp, size=size, spacing_mm=target)
    with h5py.File(h5) as f:
        return f["image"][:].astype(np.float32), f["label"][:], dict(f.attrs), (img, lab, aff)


def test_the_same_object_at_0_55_and_1_0_mm_has_the_same_size_in_stored_pixels(tmp_path):
    """LiTS's in-plane range: a 0.55 mm and a 1.0 mm scan of one body give the liver the same width and area
    on the stored grid (within a pixel of rounding), and the body's centre at the grid's centre."""
    fine = _prep(tmp_path, "f", (700, 480, 5), (0.55, 0.55, 5.0))
    coarse = _prep(tmp_path, "c", (440, 320, 5), (1.0, 1.0, 5.0), centre_offset=(40.0, -25.0))  # off-centre
    for image, label, attrs, _ in (fine, coarse):
        assert attrs["spacing_mm"] == 1.5 and attrs["fov_mm"] == 480
    (fi, fl, _, _), (ci, cl, _, _) = fine, coarse
    z = 2  # both scans: slice 2 at z = -50 mm
    for lab in (fl, cl):
        cols = np.flatnonzero((lab[z] >= 1).any(axis=0))
        assert abs((cols[-1] - cols[0] + 1) * 1.5 - 2 * LIVER_R[0] * np.sqrt(1 - (50 / 60) ** 2)) <= 3.0
    assert abs(int((fl[z] >= 1).sum()) - int((cl[z] >= 1).sum())) <= 0.03 * (fl[z] >= 1).sum()
    # the body is centred whatever the scan's own centre: its stored masks coincide
    body_f, body_c = fi[z] > 0.2, ci[z] > 0.2
    assert (body_f & body_c).sum() / (body_f | body_c).sum() > 0.97
    rows, cols = np.nonzero(body_c)
    assert abs(rows.mean() - 159.5) <= 1.5 and abs(cols.mean() - 159.5) <= 1.5


@pytest.mark.parametrize("codes", [("L", "P", "S"), ("R", "A", "I"), ("A", "S", "R")])
def test_label_through_preprocess_and_back_keeps_grid_exactly_and_dice(tmp_path, codes):
    """Anisotropic voxels (0.7 x 0.9 x 4 mm) stored in several orientations, resampled to 1.6 mm and placed on the
    grid, then brought back the way prediction does (one-hot probabilities, to_source_grid, argmax, the writer):
    same shape and affine as the source, liver Dice >= 0.99 and tumour Dice >= 0.95."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

    from liverseg.io import Geometry, save_nifti_like

    img, lab, aff = scan((380, 300, 12), (0.7, 0.9, 4.0), centre_offset=(-20.0, 10.0), z0=-24.0)
    t = ornt_transform(axcodes2ornt(("R", "A", "S")), axcodes2ornt(codes))
    img_o, lab_o = apply_orientation(img, t), apply_orientation(lab, t)
    aff_o = aff @ inv_ornt_aff(t, img.shape)
    ip = write_nifti(tmp_path / "v.nii.gz", img_o, aff_o)
    lp = write_nifti(tmp_path / "s.nii.gz", lab_o, aff_o, np.uint8)
    preprocess_case("rt", ip, tmp_path / "rt.h5", label_path=lp, size=224, spacing_mm=1.6)
    with h5py.File(tmp_path / "rt.h5") as f:
        stored, attrs = f["label"][:], dict(f.attrs)
    onehot = torch.nn.functional.one_hot(torch.from_numpy(stored.astype(np.int64)), 3).permute(0, 3, 1, 2).float()
    back = to_source_grid(onehot, attrs).argmax(dim=1).numpy().astype(np.uint8)  # (z, y, x) canonical
    geom = Geometry(tuple(int(v) for v in attrs["original_shape"]), np.asarray(attrs["affine"]), np.asarray(attrs["ornt"]))
    save_nifti_like(np.transpose(back, (2, 1, 0)), geom, tmp_path / "back.nii.gz")
    out = nib.load(tmp_path / "back.nii.gz")
    assert out.shape == lab_o.shape and np.array_equal(out.affine, nib.load(ip).affine)
    got = np.asanyarray(out.dataobj)
    for k, bar in ((1, 0.99), (2, 0.95)):
        a, b = got >= k if k == 1 else got == 2, lab_o >= k if k == 1 else lab_o == 2
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) >= bar, k


def test_a_body_wider_than_the_grid_is_cut_around_its_centre_with_a_warning(tmp_path, caplog):
    image, label, attrs, _ = _prep(tmp_path, "w", (400, 280, 3), (1.0, 1.0, 5.0), target=2.0, size=96)
    assert tuple(attrs["resampled_shape"]) == (140, 200)
    r0, c0 = (int(v) for v in attrs["offset"])
    assert r0 == round(47.5 - 69.5) and c0 == round(47.5 - 99.5)  # the body's centre lands on the grid's centre
    assert "body is wider than the stored field of view" in caplog.text
    caplog.clear()
    _prep(tmp_path, "n", (400, 280, 3), (1.0, 1.0, 5.0), target=2.0, size=192)  # 384 mm: only air is cut
    assert "wider" not in caplog.text


def test_1_mm_and_5_mm_scans_give_comparable_2_5d_inputs(tmp_path):
    """The 2.5D channels of a slice are its neighbours ``context_mm`` away whatever the slice spacing: a 1 mm and
    a 5 mm scan of the same object give the same three channels at the same z (index-based neighbours would
    put the 1 mm scan's channels 1 mm apart and the 5 mm scan's 5 mm apart)."""
    fine = _prep(tmp_path, "z1", (200, 140, 61), (2.0, 2.0, 1.0), target=2.0, size=224, z0=-30.0)
    coarse = _prep(tmp_path, "z5", (200, 140, 13), (2.0, 2.0, 5.0), target=2.0, size=224, z0=-30.0)
    context_mm = 5.0
    zf, zc = 30, 6  # z = 0 mm in both
    sf, sc = z_stride(context_mm, 1.0), z_stride(context_mm, 5.0)
    assert (sf, sc) == (5, 1)
    xf = fine[0][context_indices(zf, fine[0].shape[0], 1, sf)]
    xc = coarse[0][context_indices(zc, coarse[0].shape[0], 1, sc)]
    assert np.abs(xf - xc).max() < 1e-3  # the same object at the same three z: identical channels
    xf_index = fine[0][context_indices(zf, fine[0].shape[0], 1)]  # what index neighbours would feed
    assert np.abs(xf_index - xc).max() > 0.1


def test_plan_uses_training_and_validation_headers_only():
    def v(case, sp, shape):
        return {"case": case, "ok": True, "canonical_spacing": list(sp), "canonical_shape": list(shape)}

    verdicts = [v("a", (0.7, 0.7, 1.0), (512, 512, 300)), v("b", (0.8, 0.8, 5.0), (512, 512, 60)),
                v("c", (0.9, 0.9, 2.0), (512, 512, 100)), v("t", (3.0, 3.0, 9.0), (512, 512, 40))]
    plan = make_plan(verdicts, ["a", "b", "c"])
    # context: the 90th percentile of 1, 2 and 5 mm slices (numpy's linear interpolation: 2 + 0.8 * 3 = 4.4)
    assert plan["spacing_mm"] == 0.8 and plan["slice_spacing_mm"] == 2.0 and plan["context_mm_auto"] == 4.4
    assert plan["fov_mm"] >= 0.9 * 512 and plan["size"] % 32 == 0 and plan["size"] == 576  # 460.8 mm / 0.8 -> 576
    assert plan["cases"] == 3  # the test case "t" (3 mm, 1536 mm wide) changes nothing
    fixed = make_plan(verdicts, ["a", "b", "c"], spacing_mm=1.5, size=256)
    assert (fixed["spacing_mm"], fixed["size"], fixed["fov_mm"]) == (1.5, 256, 384.0)
    with pytest.raises(ConfigError, match="no training or validation case"):
        make_plan(verdicts, ["zz"])


def test_models_at_another_mm_per_pixel_are_refused(tmp_path):
    from liverseg.models import ModelFileError
    from liverseg.predict import check_compatible

    _, _, attrs, _ = _prep(tmp_path, "m", (200, 140, 3), (2.0, 2.0, 5.0), target=2.0, size=224)
    spec = {"window": {"mode": "fixed", "lower": -150.0, "upper": 250.0}, "slice_size": 224, "spacing_mm": 2.0}
    check_compatible(spec, attrs, "m.pt")
    with pytest.raises(ModelFileError, match="mm per pixel"):
        check_compatible({**spec, "spacing_mm": 2.5}, attrs, "m.pt")
    old = {k: v for k, v in spec.items() if k != "spacing_mm"}  # a model file from before the plan
    with pytest.raises(ModelFileError, match="predates the millimetre plan"):
        check_compatible(old, attrs, "m.pt")


def test_plan_rule_output_is_what_preprocess_reads(tmp_path):
    """plan.json as the rule writes it; a verdict from before verdicts carried header geometry is completed from
    the image header named in the case table (an existing results/ keeps working)."""
    from liverseg.plan import read_plan, write_plan

    checks = []
    for i, (sp, shape) in enumerate((((0.8, 0.8, 2.5), (512, 512, 90)), ((0.6, 0.6, 1.0), (512, 512, 200)))):
        p = tmp_path / f"{i}.json"
        p.write_text(json.dumps({"case": str(i), "ok": True, "error": "", "canonical_spacing": sp,
                                 "canonical_shape": shape}))
        checks.append(p)
    (tmp_path / "split.json").write_text(json.dumps({"train": ["0", "2"], "val": ["1"], "test": [], "predict": []}))
    old = tmp_path / "2.json"
    old.write_text(json.dumps({"case": "2", "ok": True, "error": ""}))  # an older verdict: no geometry
    img = write_nifti(tmp_path / "v2.nii.gz", np.zeros((4, 1000, 3), np.int16), np.diag([0.9, 0.9, 5.0, 1.0]))
    (tmp_path / "cases.tsv").write_text(f"case_id\timage\tlabel\n2\t{img}\t\n")
    with pytest.raises(ConfigError):  # without the case table the old verdict cannot be planned with
        write_plan(tmp_path / "split.json", [old], tmp_path / "p0.json")
    plan = write_plan(tmp_path / "split.json", checks + [old], tmp_path / "plan.json", cases_tsv=tmp_path / "cases.tsv")
    assert plan["cases"] == 3 and plan["largest_extent_mm"] == 900.0  # 1000 x 0.9 mm from the header
    assert read_plan(tmp_path / "plan.json") == {"spacing_mm": 0.8, "size": 1152}  # 900 / 0.8 = 1125 -> 1152


def test_b_z_margin_is_the_same_in_mm_on_1_mm_and_5_mm_scans():
    """Model B's z-range grows by ``z_margin_mm`` whatever the slice spacing: the reference liver spanning
    z = 20..40 mm grows to 10..50 mm on a 1 mm and on a 5 mm scan (a margin in slices would give 2 mm on one
    and 10 mm on the other); prediction converts the model's margin the same way, and a model.json from before
    (``z_margin`` in slices) keeps its slices."""
    from liverseg.cascade import z_margin_slices
    from liverseg.data import CaseIndex
    from liverseg.geometry import mm_to_slices

    def case(z_mm):
        z = np.arange(0, 60, z_mm)  # slice positions in mm
        liver = (z >= 20) & (z <= 40)
        return CaseIndex("x", len(z), liver, np.zeros_like(liver), np.zeros(6), 8, {}, z_mm), z

    for z_mm in (1.0, 5.0):
        c, z = case(z_mm)
        z0, z1 = c.liver_zrange(10.0)
        assert (z[z0], z[z1 - 1]) == (10.0, 50.0), z_mm
        assert z_margin_slices({"z_margin_mm": 10.0}, z_mm) == z1 - 1 - np.flatnonzero(c.liver)[-1]
    assert [mm_to_slices(10, s) for s in (1.0, 2.5, 3.0, 5.0, 7.2)] == [10, 4, 4, 2, 2]
    assert mm_to_slices(0, 5.0) == 0
    assert z_margin_slices({"z_margin": 3}, 1.0) == 3
