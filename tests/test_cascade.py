"""The V4 cascade: gate rules, B's fixed scale, B's training patches, selection helpers, lesion-safe resizing.

Stub networks with known outputs stand in for the models where routing matters more than learning."""

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn as nn

import liverseg.predict as P
from liverseg.cascade import BACKGROUND, USE_A, USE_B, PooledDice, gate_slices, liver_region
from liverseg.data import LiverPatchDataset, index_cases
from liverseg.geometry import tile_region
from liverseg.inference import tta_transforms
from liverseg.preprocess import preprocess_case, resize_slab
from liverseg.train import sensitivity_threshold

from conftest import write_nifti

S, Z = 32, 16


# ---------------------------------------------------------------------------------------------- gate table
def test_gate_table_route_and_suppress():
    scores = np.array([0.9, 0.1, 0.9, 0.1, 0.9, 0.1])
    present = np.array([False, False, True, True, True, False])
    zrange = (2, 5)
    route = gate_slices(scores, 0.5, present, zrange, "route")
    supp = gate_slices(scores, 0.5, present, zrange, "suppress")
    # slice:            0 pos, outside   1 neg, no comp   2 pos, in   3 neg, comp   4 pos, in   5 neg, no comp
    assert route.tolist() == [USE_A, USE_A, USE_B, USE_A, USE_B, USE_A]
    assert supp.tolist() == [USE_A, BACKGROUND, USE_B, USE_A, USE_B, BACKGROUND]
    # no liver found by A: nothing goes to B
    none = gate_slices(scores, 0.5, np.zeros(6, bool), None, "route")
    assert (none == USE_A).all()
    with pytest.raises(ValueError):
        gate_slices(scores, 0.5, present, zrange, "bogus")


def test_liver_region_is_largest_component_plus_margins():
    lab = np.zeros((Z, S, S), np.uint8)
    lab[4:12, 8:24, 10:20] = 1
    lab[0:2, 28:31, 28:31] = 1  # a small false positive elsewhere: not the largest component
    present, region, zr = liver_region(lab, margin=2, z_margin=1, patch=16)
    assert present.tolist() == [False] * 4 + [True] * 8 + [False] * 4
    # rows 8..23 -> (6, 26); cols 10..19 -> (8, 22), 14 wide, grown about its centre to one 16-pixel patch
    assert region == (6, 26, 7, 23)
    assert zr == (3, 13)
    present0, region0, zr0 = liver_region(np.zeros_like(lab), 2, 1, 16)
    assert not present0.any() and region0 is None and zr0 is None



@pytest.mark.parametrize("seed", range(6))
def test_liver_region_equals_the_largest_component_mask_definition(seed):
    """liver_region works from cc3d's per-component statistics (no whole-volume mask): on random blobby labels with
    several components, tumour voxels among them, it gives the slices and box of the largest 26-connected
    component of label >= 1, computed here with an explicit mask."""
    from scipy import ndimage

    from liverseg.geometry import bbox, grow, region_of, tile_region, z_range
    from liverseg.postprocess import largest_component

    rng = np.random.default_rng(seed)
    lab = (ndimage.gaussian_filter(rng.normal(size=(20, 48, 48)), 2.0) > 0.08).astype(np.uint8)
    lab[lab.astype(bool) & (rng.random(lab.shape) < 0.1)] = 2
    lab[:2], lab[:, :3], lab[:, :, :3] = 0, 0, 0  # the box starts inside on every axis: its offsets count
    comp = largest_component(lab >= 1, connectivity=26)
    want_present = comp.any(axis=(1, 2))
    want_region = tile_region(grow(region_of(bbox(comp)), 3), 48, 16)
    present, region, zr = liver_region(lab, margin=3, z_margin=2, patch=16)
    assert present.tolist() == want_present.tolist()
    assert region == want_region and zr == z_range(want_present, 2)


def test_liver_region_holds_no_whole_volume_mask():
    """Peak numpy memory of liver_region on a volume that is all liver (an untrained or failed model A) stays
    below 5x the uint8 labels: cc3d's uint32 component labels (4x) and little else.  The mask-based version (a
    bool mask, its uint8 crop, the labels, the component mask and its copy) took 6x here.  tracemalloc sees
    numpy's allocations only, not cc3d's internal ones."""
    import tracemalloc

    lab = np.ones((64, 128, 128), np.uint8)
    tracemalloc.start()
    liver_region(lab, margin=2, z_margin=1, patch=16)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 5 * lab.nbytes, peak / lab.nbytes

def test_tile_region_grows_to_one_patch_inside_the_slice():
    assert tile_region((10, 14, 0, 4), 32, 16) == (4, 20, 0, 16)
    assert tile_region((0, 32, 5, 30), 32, 16) == (0, 32, 5, 30)
    assert tile_region((2, 5, 2, 5), 12, 16) == (0, 12, 0, 12)  # slice smaller than a patch


# ---------------------------------------------------------------------------------------------- stubs end to end
class _StubA(nn.Module):
    """Liver wherever the (centre channel of the) input is bright."""

    def forward(self, x):
        c = x[:, x.shape[1] // 2]
        liver = 20 * (c - 0.5)
        return torch.stack([-liver, liver, torch.full_like(c, -50.0)], dim=1)


class _StubB(nn.Module):
    """Tumour everywhere it looks: marks exactly the pixels B was asked about."""

    def forward(self, x):
        z = torch.zeros_like(x[:, 0])
        return torch.stack([z, z, z + 10], dim=1)


@pytest.fixture
def stub_case(tmp_path):
    hu = np.full((S, S, Z), -150.0, np.float32)
    hu[8:24, 8:24, 4:12] = 250  # the "liver", bright, slices 4..11
    hu[28:31, 28:31, 0:2] = 250  # a small bright blob at slices 0..1, not the largest component
    hu[28:31, 0:3, 5:7] = 250  # another one on slices 5..6, outside A's liver region: B slices drop it
    img = write_nifti(tmp_path / "volume-7.nii.gz", hu, np.eye(4))
    h5 = tmp_path / "7.h5"
    preprocess_case("7", img, h5, size=S)
    return h5


def _stub_models(monkeypatch, scores):
    window = {"mode": "fixed", "lower": -150.0, "upper": 250.0}
    base = {"window": window, "slice_size": S, "spacing_mm": 1.0, "context": 0, "classes": 3}
    specs = {
        "model_a": (_StubA(), {**base, "input_size": S}),
        "classifier": (None, {**base, "input_size": S, "threshold": 0.5}),
        "model_b": (_StubB(), {**base, "input_size": 16, "patch_size": 16, "crop_margin": 2, "z_margin_mm": 1}),
    }
    monkeypatch.setattr(P, "load_ensemble", lambda paths, device=None: specs[paths[0].parent.name])
    monkeypatch.setattr(P, "classify", lambda *a, **k: np.asarray(scores, np.float32))


@pytest.mark.parametrize("gate", ["route", "suppress"])
def test_cascade_routes_each_slice_as_the_table_says(stub_case, tmp_path, monkeypatch, gate):
    pos = {1, 5, 6, 9, 14}  # 1: positive outside B's z-range; 5, 6, 9: inside; 14: outside
    scores = [0.9 if z in pos else 0.1 for z in range(Z)]
    _stub_models(monkeypatch, scores)
    out = tmp_path / "p.nii.gz"
    s = P.predict_case("7", stub_case, P.models_in(tmp_path, "cascade"), out, tmp_path / "s.tsv", mode="cascade", device="cpu",
                       gate=gate, tta="false")
    vol = np.asarray(nib.load(out).dataobj)
    slices = [vol[:, :, z].T for z in range(Z)]  # RAS input: stored slice z is canonical[:, :, z].T
    region = (6, 26, 6, 26)  # A's component rows/cols 8..23, margin 2 (already >= one 16-pixel patch)
    assert s["region"] == region and s["z_range"] == (3, 13) and s["slices_to_b"] == 3
    for z in range(Z):
        got = slices[z]
        if z in (5, 6, 9):  # B: tumour inside the region, background outside
            want = np.zeros((S, S), np.uint8)
            want[6:26, 6:26] = 2
        else:  # A: the bright pixels as liver, or background
            want = np.zeros((S, S), np.uint8)
            if 4 <= z < 12:
                want[8:24, 8:24] = 1
            if z < 2 and (gate == "route" or z in pos):
                want[28:31, 28:31] = 1  # A's blob survives unless suppress and negative without A's component
        assert np.array_equal(got, want), f"slice {z}"
    rows = (tmp_path / "s.tsv").read_text().splitlines()
    assert [r.split("\t")[2] for r in rows[1:]].count("B") == 3


def test_b_patches_are_crops_of_the_stored_grid_never_rescaled(tmp_path):
    """Model B's training sample is a pixel-exact crop of the stored slices around the (shifted) liver box."""
    from liverseg.phantom import PhantomSpec, write_case

    img, lab = tmp_path / "volume-1.nii.gz", tmp_path / "segmentation-1.nii.gz"
    write_case(11, img, lab, PhantomSpec(size=64, slices=20))
    h5 = tmp_path / "1.h5"
    preprocess_case("1", img, h5, label_path=lab, size=64)
    (case,) = index_cases([str(h5)])
    zr = case.liver_zrange(2)
    items = [(0, z) for z in range(*zr)]
    ds = LiverPatchDataset([case], items, context=0, patch=24, margin=2, shift=3)
    with h5py.File(h5) as f:
        image, label = f["image"][:].astype(np.float32), f["label"][:]
    _, _, r0, r1, c0, c1 = (int(v) for v in case.bbox3d)
    for j in range(30):
        x, y, _ = ds[(j % len(items), j % 2, (0, 0, j))]
        assert x.shape == (1, 24, 24) and y.shape == (24, 24)
        z = items[j % len(items)][1]
        # find the crop: the patch must equal image[z, ro:ro+24, co:co+24] for some origin near the liver box
        hits = [(ro, co) for ro in range(0, 64 - 23) for co in range(0, 64 - 23)
                if np.array_equal(image[z, ro : ro + 24, co : co + 24], x[0].numpy())]
        assert hits, f"draw {j}: not a pixel-exact crop of slice {z}"
        ro, co = hits[0]
        assert np.array_equal(label[z, ro : ro + 24, co : co + 24], y.numpy())
        assert r0 - 2 - 3 - 24 < ro < r1 + 2 + 3 and c0 - 2 - 3 - 24 < co < c1 + 2 + 3


def test_b_tumour_draws_centre_on_tumour(tmp_path):
    from liverseg.phantom import PhantomSpec, write_case

    for seed in range(20, 40):  # a phantom with tumours
        img, lab = tmp_path / f"v{seed}.nii.gz", tmp_path / f"s{seed}.nii.gz"
        write_case(seed, img, lab, PhantomSpec(size=64, slices=20, max_tumours=5))
        h5 = tmp_path / f"{seed}.h5"
        preprocess_case(str(seed), img, h5, label_path=lab, size=64)
        (case,) = index_cases([str(h5)])
        if case.tumour.sum() >= 2:
            break
    items = [(0, int(z)) for z in np.flatnonzero(case.tumour)]
    ds = LiverPatchDataset([case], items, context=0, patch=16, margin=2, shift=3)
    hits = sum(int((ds[(j % len(items), 0, (1, 0, j))][1] == 2).any()) for j in range(20))
    assert hits == 20  # group 0 = tumour-centred: every patch holds tumour


# ---------------------------------------------------------------------------------------------- selection
def test_sensitivity_threshold_is_the_highest_that_keeps_99_percent():
    rng = np.random.default_rng(0)
    pos = rng.uniform(0.3, 1.0, 200)
    neg = rng.uniform(0.0, 0.6, 300)
    s = np.concatenate([pos, neg])
    t = np.concatenate([np.ones(200, bool), np.zeros(300, bool)])
    thr, _ = sensitivity_threshold(s, t, 0.99)
    assert (pos >= thr).mean() >= 0.99
    # any higher threshold loses the guarantee
    higher = np.sort(pos)[np.sort(pos) > thr][0]
    assert (pos >= higher).mean() < 0.99


def test_pooled_dice_does_not_reward_never_predicting_tumour():
    ref = [np.zeros((4, 8, 8), np.uint8) for _ in range(3)]
    for r in ref:
        r[:, 2:6, 2:6] = 1
    ref[0][1, 3:5, 3:5] = 2  # one case with a tumour
    never = [np.where(r >= 1, 1, 0).astype(np.uint8) for r in ref]  # perfect liver, no tumour ever
    found = [np.where(r >= 1, 1, 0).astype(np.uint8) for r in ref]
    found[0][1, 3, 3:5] = 2  # finds half the tumour, plus one false-positive pixel in each tumour-free case
    found[1][0, 2, 2] = 2
    found[2][0, 2, 2] = 2
    pd_never, pd_found = PooledDice(), PooledDice()
    for a, b, r in zip(never, found, ref):
        pd_never.add(a, r)
        pd_found.add(b, r)
    assert pd_found.score() > pd_never.score()
    # the old per-case mean with "both empty = 1" preferred never predicting tumour here
    from liverseg.metrics import liver_tumour_dice

    per_case = lambda preds: np.mean([sum(liver_tumour_dice(p, r)) / 2 for p, r in zip(preds, ref)])  # noqa: E731
    assert per_case(never) > per_case(found)


def test_tta_uses_only_transforms_training_applied():
    assert tta_transforms({"augment": {"flip_prob": 0.0, "scale": 0.0}}) == [(False, 1.0)]
    assert (True, 1.0) not in tta_transforms({"augment": {"flip_prob": 0.0, "scale": 0.1}})
    assert (True, 1.0) in tta_transforms({"augment": {"flip_prob": 0.5, "scale": 0.0}})
    zooms = [z for _, z in tta_transforms({"augment": {"flip_prob": 0.0, "scale": 0.1}})]
    assert min(zooms) >= 0.9 - 1e-9 and max(zooms) <= 1.1 + 1e-9


def test_tta_zoom_round_trip_is_identity_for_an_equivariant_model():
    """A pixel-wise model is equivariant to zooms: averaging the zoomed passes must give the plain pass back
    (away from the border the zoom-out pass never saw)."""
    from liverseg.inference import _probs

    class PixelWise(nn.Module):
        def forward(self, x):
            c = x[:, 0]
            return torch.stack([10 * (0.5 - c), 10 * (c - 0.5), torch.full_like(c, -10.0)], dim=1)

    x = torch.zeros(1, 1, 64, 64)
    x[:, :, 20:44, 16:40] = 1.0
    plain = _probs(PixelWise(), x, torch.device("cpu"), False)
    for zoom in (0.9, 1.1):  # each zoom alone against the plain pass: a wrong inverse would move the border
        tta = _probs(PixelWise(), x, torch.device("cpu"), False, [(False, 1.0), (False, zoom), (False, zoom)])
        assert torch.equal(plain.argmax(1), tta.argmax(1)), zoom
    tta = _probs(PixelWise(), x, torch.device("cpu"), False, [(False, 1.0), (False, 0.9), (False, 1.1), (True, 1.0)])
    assert torch.equal(plain.argmax(1), tta.argmax(1))


# ---------------------------------------------------------------------------------------------- label resizing
def test_label_downsampling_keeps_every_lesion():
    rng = np.random.default_rng(3)
    src = np.zeros((6, 120, 120), np.uint8)
    src[:, 10:110, 10:110] = 1
    for i in range(6):
        for _ in range(8):  # small lesions, 2..4 pixels across: nearest-neighbour at 1/3 scale drops many
            r, c = rng.integers(12, 104, 2)
            d = int(rng.integers(2, 5))
            src[i, r : r + d, c : c + d] = 2
    from scipy import ndimage

    out = resize_slab(src, 40, is_label=True)
    for i in range(6):
        n_src = ndimage.label(src[i] == 2, structure=np.ones((3, 3)))[1]
        n_out = ndimage.label(out[i] == 2, structure=np.ones((3, 3)))[1]
        lab, _ = ndimage.label(src[i] == 2, structure=np.ones((3, 3)))
        for j in range(1, n_src + 1):  # every source lesion left tumour at its place on the small grid
            rr, cc = np.nonzero(lab == j)
            assert (out[i, rr // 3, cc // 3] == 2).any(), (i, j)
        assert n_out <= n_src


def test_b_is_validated_on_model_a_boxes_not_the_reference(tmp_path):
    """B's validation region comes from model A's liver, even where the reference liver lies elsewhere."""
    from liverseg.cascade import prepare_val_case

    hu = np.full((S, S, Z), -150.0, np.float32)
    hu[2:14, 16:30, 3:10] = 250  # what the stub A will call liver
    ref = np.zeros((S, S, Z), np.uint8)
    ref[18:30, 2:14, 6:14] = 1  # the reference liver: elsewhere
    img = write_nifti(tmp_path / "volume-8.nii.gz", hu, np.eye(4))
    lab = write_nifti(tmp_path / "segmentation-8.nii.gz", ref, np.eye(4), dtype=np.uint8)
    h5 = tmp_path / "8.h5"
    preprocess_case("8", img, h5, label_path=lab, size=S)

    class AllPositive(nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0],), 5.0)

    models = {"model_a": (_StubA(), {"input_size": S, "context": 0, "classes": 3}),
              "classifier": (AllPositive(), {"input_size": S, "context": 0})}
    vc = prepare_val_case(h5, models, 0.5, margin=1, z_margin_mm=1, patch=16, gates=["route", "suppress"],
                          device=torch.device("cpu"), amp=False)
    # stored slice rows = y, columns = x (RAS input): A's liver rows 16..29, columns 2..13, slices 3..9
    assert vc.region == (15, 31, 0, 16)
    assert vc.b_slices == list(range(2, 11))
