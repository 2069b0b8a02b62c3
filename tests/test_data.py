"""liverseg.data on one tiny preprocessed phantom: the case index, epoch sampling, augmentation and what each
dataset returns.  Expected values are read straight from the HDF5 arrays, never from the code under test.

(context_indices, tile_region, patch_grid and the box helpers live in liverseg.geometry and are tested there.)
"""

import hashlib
import os

import h5py
import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from liverseg import data as D  # noqa: E402

S = 16  # stored slice size


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """One labelled phantom (32 x 32 x 12, with tumour on fewer slices than liver) preprocessed to 16 x 16 slices, its arrays, and one
    unlabelled file."""
    from liverseg.phantom import PhantomSpec, write_case
    from liverseg.preprocess import preprocess_case

    root = tmp_path_factory.mktemp("data")
    img, lab = root / "volume-7.nii.gz", root / "segmentation-7.nii.gz"
    write_case(0, img, lab, PhantomSpec(size=32, slices=12))
    h5 = root / "7.h5"
    preprocess_case("7", img, h5, label_path=lab, size=S)
    unlabelled = root / "8.h5"
    preprocess_case("8", img, unlabelled, size=S)
    with h5py.File(h5) as f:
        image, label = f["image"][:].astype(np.float32), f["label"][:]
    liver, tumour = (label >= 1).any(axis=(1, 2)), (label == 2).any(axis=(1, 2))
    assert tumour.any() and not np.array_equal(liver, tumour) and not liver.all()  # what the tests need
    return {"h5": str(h5), "unlabelled": str(unlabelled), "image_path": img, "label_path": lab,
            "image": image, "label": label}


# ---------------------------------------------------------------------------------------------- index
def test_index_cases_reads_flags_box_and_identity(case):
    (c,) = D.index_cases([case["h5"]])
    lab = case["label"]
    liver = (lab >= 1).any(axis=(1, 2))
    assert c.path == case["h5"] and c.n_slices == lab.shape[0] and c.size == S
    assert np.array_equal(c.liver, liver)
    assert np.array_equal(c.tumour, (lab == 2).any(axis=(1, 2)))
    zz, rr, cc = np.nonzero(lab >= 1)
    assert list(c.bbox3d) == [zz.min(), zz.max() + 1, rr.min(), rr.max() + 1, cc.min(), cc.max() + 1]
    assert c.identity["case_id"] == "7" and c.identity["size"] == str(S)
    assert c.identity["source_image_sha256"] == hashlib.sha256(case["image_path"].read_bytes()).hexdigest()
    assert c.identity["source_label_sha256"] == hashlib.sha256(case["label_path"].read_bytes()).hexdigest()
    assert c.identity["window_mode"] == "fixed"


def test_liver_zrange(case):
    (c,) = D.index_cases([case["h5"]])
    zs = np.flatnonzero((case["label"] >= 1).any(axis=(1, 2)))
    n = case["label"].shape[0]
    assert c.liver_zrange(0) == (zs[0], zs[-1] + 1)
    assert c.liver_zrange(1) == (max(0, zs[0] - 1), min(n, zs[-1] + 2))
    assert c.liver_zrange(100) == (0, n)
    c.liver = np.zeros_like(c.liver)
    assert c.liver_zrange(2) is None


def test_index_cases_refuses_unlabelled_files(case):
    with pytest.raises(ValueError, match="has no label"):
        D.index_cases([case["h5"], case["unlabelled"]])


# ---------------------------------------------------------------------------------------------- sampling
GROUPS = [[0, 1, 2], [10, 11], [20]]


def test_epoch_draws_honour_the_fractions():
    draws = D.epoch_draws(GROUPS, [0.5, 0.3, 0.2], 100, seed=0, epoch=0)
    assert len(draws) == 100
    groups = np.array([g for _, g, _ in draws])
    assert [(groups == g).sum() for g in range(3)] == [50, 30, 20]
    for i, g, _ in draws:
        assert i in GROUPS[g]  # every index comes from the group it is labelled with
    assert len({i for i, g, _ in draws if g == 0}) == 3  # drawn with replacement over the whole group
    assert [k for _, _, k in draws] == [(0, 0, j) for j in range(100)]
    assert list(groups) != sorted(groups)  # shuffled, not group after group


def test_epoch_draws_always_give_n_and_skip_empty_or_zero_groups():
    draws = D.epoch_draws([[], [10, 11], [20], [30]], [0.5, 1 / 3, 1 / 3, 0.0], 10, seed=1, epoch=2)
    assert len(draws) == 10  # rounding never loses or adds a draw
    groups = {g for _, g, _ in draws}
    assert groups == {1, 2}  # an empty group and a zero fraction give nothing; ids stay the groups' positions
    assert all(i in [10, 11] for i, g, _ in draws if g == 1) and all(i == 20 for i, g, _ in draws if g == 2)
    assert D.epoch_draws([[], [1]], [1.0, 0.0], 5, 0, 0) == []


def test_epoch_draws_depend_only_on_seed_and_epoch():
    a = D.epoch_draws(GROUPS, [0.5, 0.3, 0.2], 40, seed=3, epoch=5)
    assert a == D.epoch_draws(GROUPS, [0.5, 0.3, 0.2], 40, seed=3, epoch=5)
    other_epoch = D.epoch_draws(GROUPS, [0.5, 0.3, 0.2], 40, seed=3, epoch=6)
    other_seed = D.epoch_draws(GROUPS, [0.5, 0.3, 0.2], 40, seed=4, epoch=5)
    strip = lambda d: [(i, g) for i, g, _ in d]  # noqa: E731
    assert strip(other_epoch) != strip(a) and strip(other_seed) != strip(a)
    assert {k[:2] for _, _, k in other_epoch} == {(3, 6)}


# ---------------------------------------------------------------------------------------------- augmentation
def _batch(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, 16, 20, generator=g)  # H != W
    y = torch.randint(0, 3, (b, 16, 20), generator=g)
    return x, y


def _draws(n, epoch=0, first=0):
    return D.augment_draws([(0, epoch, j) for j in range(first, first + n)])


def test_augment_at_zero_strength_is_the_identity():
    x, y = _batch()
    xa, ya = D.augment(x, y, _draws(4), rotate_deg=0, scale=0, intensity=0, flip_prob=0)
    assert torch.allclose(xa, x, atol=1e-5)
    assert torch.equal(ya, y)


def test_augment_flip_mirrors_image_and_label_together():
    x, y = _batch()
    xa, ya = D.augment(x, y, _draws(4), rotate_deg=0, scale=0, intensity=0, flip_prob=1)
    assert torch.allclose(xa, x.flip(-1), atol=1e-5)
    assert torch.equal(ya, y.flip(-1))


def test_augmented_label_stays_integer_valued():
    x, _ = _batch()
    y = torch.zeros(4, 16, 20, dtype=torch.long)
    y[:, 4:12, 5:15] = 2  # only 0 and 2: an interpolating warp would invent 1s on the edge
    xa, ya = D.augment(x, y, _draws(4, first=2), rotate_deg=30, scale=0.2, intensity=0.1, flip_prob=0.5)
    assert ya.dtype == torch.int64 and ya.shape == y.shape and xa.shape == x.shape
    assert set(ya.unique().tolist()) <= {0, 2}
    assert not torch.equal(ya, y)  # something did move


def test_augment_draws_belong_to_the_sample_and_groups_share_them():
    """A sample's augmentation follows its draw key alone: the same in any batch, at any position, in any
    process's share of a batch (data-parallel training); groups (V3 sequences) share one row."""
    x = torch.rand(1, 1, 16, 16).repeat(4, 1, 1, 1)  # four identical samples
    kw = dict(rotate_deg=20, scale=0.15, intensity=0.1, flip_prob=0.5)
    a, _ = D.augment(x, None, _draws(4), **kw)
    assert torch.equal(a, D.augment(x, None, _draws(4), **kw)[0])
    assert not torch.allclose(a, D.augment(x, None, _draws(4, epoch=1), **kw)[0])
    halves = [D.augment(x[:2], None, _draws(2, first=f), **kw)[0] for f in (0, 2)]
    assert torch.equal(torch.cat(halves), a)  # the batch split in two gives the same samples
    rev = D.augment(x, None, D.augment_draws([(0, 0, j) for j in (3, 2, 1, 0)]), **kw)[0]
    assert torch.equal(rev, a.flip(0))  # reordered keys move their augmentation with them
    g, _ = D.augment(x, None, _draws(2), group=2, **kw)
    assert torch.equal(g[0], g[1]) and torch.equal(g[2], g[3]) and not torch.allclose(g[0], g[2])
    assert not torch.allclose(a[0], a[1])  # without a group every sample draws its own
    with pytest.raises(ValueError, match="rows of draws"):
        D.augment(x, None, _draws(3), **kw)


def test_intensity_jitter_is_one_gain_per_sample():
    x = torch.ones(3, 1, 2, 4, 4)
    u = _draws(3)
    out = D.intensity_jitter(x, u, 0.2)
    gains = out.flatten(1)
    assert torch.equal(gains, gains[:, :1].expand_as(gains))  # constant within a sample
    assert torch.allclose(gains[:, 0], 1 + (u[:, D.AUGMENT_DRAWS.index("gain")] * 2 - 1) * 0.2)


# ---------------------------------------------------------------------------------------------- datasets
def test_slice_dataset_items(case):
    cases = D.index_cases([case["h5"]])
    image, label = case["image"], case["label"]
    n = label.shape[0]
    zs = [0, n - 1, int(np.flatnonzero(cases[0].liver)[0])]
    ds = D.SliceDataset(cases, [(0, z) for z in zs], context=1, input_size=S)
    assert len(ds) == 3
    for i, z in enumerate(zs):
        x, y, flag = ds[(i, 0, None)]
        assert x.shape == (3, S, S) and x.dtype == torch.float32
        assert y.shape == (S, S) and y.dtype == torch.int64
        assert np.array_equal(x.numpy(), image[[max(z - 1, 0), z, min(z + 1, n - 1)]])
        assert np.array_equal(y.numpy(), label[z])
        assert float(flag) == float((label[z] >= 1).any())


def test_slice_dataset_resizes_to_the_model_input(case):
    cases = D.index_cases([case["h5"]])
    image, label = case["image"], case["label"]
    z = int(np.flatnonzero(cases[0].tumour)[0])
    x, y, _ = D.SliceDataset(cases, [(0, z)], context=0, input_size=S // 2)[(0, 0, None)]
    assert x.shape == (1, S // 2, S // 2) and y.shape == (S // 2, S // 2) and y.dtype == torch.int64
    # halving: bilinear = the mean of each 2 x 2 block, nearest-exact = its lower-right pixel
    assert np.allclose(x[0].numpy(), image[z].reshape(S // 2, 2, S // 2, 2).mean(axis=(1, 3)), atol=1e-6)
    assert np.array_equal(y.numpy(), label[z][1::2, 1::2])


def test_sequence_dataset_items(case):
    cases = D.index_cases([case["h5"]])
    image, label = case["image"], case["label"]
    n = label.shape[0]
    ds = D.SequenceDataset(cases, [(0, n - 2), (0, 0)], context=1, input_size=S, seq_len=3)
    x, y, flag = ds[(0, 0, None)]
    assert x.shape == (3, 3, S, S) and y.shape == (3, S, S) and y.dtype == torch.int64
    zs = [n - 2, n - 1, n - 1]  # the window is clamped at the end of the volume
    for t, z in enumerate(zs):
        assert np.array_equal(x[t].numpy(), image[[z - 1, z, min(z + 1, n - 1)]])
        assert np.array_equal(y[t].numpy(), label[z])
    assert float(flag) == float((label[zs] >= 1).any())
    x, y, flag = ds[(1, 0, None)]
    assert np.array_equal(x[0].numpy(), image[[0, 0, 1]]) and np.array_equal(y.numpy(), label[0:3])
    assert float(flag) == float((label[0:3] >= 1).any())


def test_patch_dataset_items_are_zero_padded_past_the_volume(case):
    cases = D.index_cases([case["h5"]])
    image, label = case["image"], case["label"]
    n = label.shape[0]
    ds = D.PatchDataset(cases, [(0, n - 2, 10, 12), (0, 0, 0, 0)], patch=(4, 8))
    x, y, flag = ds[(0, 0, None)]
    assert x.shape == (1, 4, 8, 8) and y.shape == (4, 8, 8) and y.dtype == torch.int64
    assert np.array_equal(x[0, :2, :6, :4].numpy(), image[n - 2 :, 10:, 12:])
    assert np.array_equal(y[:2, :6, :4].numpy(), label[n - 2 :, 10:, 12:])
    pad = np.ones((4, 8, 8), bool)
    pad[:2, :6, :4] = False
    assert (x[0].numpy()[pad] == 0).all() and (y.numpy()[pad] == 0).all()
    assert float(flag) == float((y >= 1).any())
    x, y, _ = ds[(1, 0, None)]
    assert np.array_equal(x[0].numpy(), image[:4, :8, :8]) and np.array_equal(y.numpy(), label[:4, :8, :8])


def _find_crop(patch, full):
    p = patch.shape[-1]
    return [(r, c) for r in range(full.shape[-2] - p + 1) for c in range(full.shape[-1] - p + 1)
            if np.array_equal(full[..., r : r + p, c : c + p], patch)]


@pytest.mark.parametrize("shift, p", [(0, 4), (1, 4), (3, 8)])
def test_liver_patch_dataset_items_are_aligned_crops(case, shift, p):
    cases = D.index_cases([case["h5"]])
    image, label = case["image"], case["label"]
    n = label.shape[0]
    tz = [int(z) for z in np.flatnonzero(cases[0].tumour)]
    ds = D.LiverPatchDataset(cases, [(0, z) for z in tz], context=1, patch=p, margin=1, shift=shift)
    for i, z in enumerate(tz):
        for key in range(8):
            draw = (i, 0, (0, 0, key))  # group 0: the tumour-centred draw
            x, y, flag = ds[draw]
            assert x.shape == (3, p, p) and y.shape == (p, p) and y.dtype == torch.int64
            ctx = image[[max(z - 1, 0), z, min(z + 1, n - 1)]]
            origins = _find_crop(x.numpy(), ctx)
            assert origins, "the image patch is not a crop of the slice and its neighbours"
            assert any(np.array_equal(y.numpy(), label[z][r : r + p, c : c + p]) for r, c in origins)
            if shift <= 1:  # the jittered box still holds the whole liver (margin 1): the tumour is in the patch
                # (a patch of 4 in a liver region of ~10 pixels: a patch not centred on a tumour often misses it)
                assert (y == 2).any()
            assert float(flag) == 1.0
            x2, y2, _ = ds[draw]
            assert torch.equal(x, x2) and torch.equal(y, y2)  # the draw key fixes the crop
