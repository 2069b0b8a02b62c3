"""liverseg.geometry: boxes, tiles, crops, paste-back and context indices shared by every stage."""

import numpy as np
import pytest

from liverseg.geometry import (bbox, context_indices, crop_padded, grow, paste, patch_grid, region_of, tile_region,
                               z_range)


def test_bbox_is_tight_half_open_and_padded_within_the_array():
    m = np.zeros((6, 7, 8), bool)
    m[2, 3, 4] = m[4, 5, 1] = True
    assert bbox(m) == (slice(2, 5), slice(3, 6), slice(1, 5))
    assert bbox(m, pad=1) == (slice(1, 6), slice(2, 7), slice(0, 6))
    assert bbox(m, pad=9) == (slice(0, 6), slice(0, 7), slice(0, 8))
    assert bbox(np.zeros((3, 3), bool)) is None
    assert bbox(np.array([0, 0, 1, 1, 0, 1, 0], bool)) == (slice(2, 6),)  # 1D: a z-range
    crop = m[bbox(m)]
    assert crop.sum() == m.sum() and crop[0].any() and crop[-1].any() and crop[:, :, 0].any()


def test_bbox_matches_argwhere_on_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(20):
        m = rng.random((9, 11, 5)) > 0.97
        if not m.any():
            continue
        idx = np.argwhere(m)
        assert bbox(m) == tuple(slice(int(lo), int(hi) + 1) for lo, hi in zip(idx.min(0), idx.max(0)))


def test_region_grow_and_tile_region():
    box = bbox(np.pad(np.ones((1, 4, 2), bool), ((0, 0), (10, 18), (3, 27))))
    assert region_of(box) == (10, 14, 3, 5)
    assert grow((10, 14, 3, 5), 2) == (8, 16, 1, 7)
    assert tile_region((10, 14, 0, 4), 32, 16) == (4, 20, 0, 16)  # grown about its centre, kept inside
    assert tile_region((0, 32, 5, 30), 32, 16) == (0, 32, 5, 30)  # already large enough
    assert tile_region((2, 5, 2, 5), 12, 16) == (0, 12, 0, 12)  # slice smaller than a patch
    assert tile_region((-4, 40, -1, 3), 32, 8) == (0, 32, 0, 8)  # clipped to the grid first
    assert tile_region((28, 31, 0, 32), 32, 16) == (16, 32, 0, 32)  # at the far edge: moved back inside


def test_patch_grid_covers_every_pixel_with_half_overlap():
    for n, p in ((64, 16), (70, 16), (16, 16), (10, 16), (33, 8)):
        starts = patch_grid(n, p)
        covered = np.zeros(max(n, p), int)
        for s in starts:
            covered[s : s + p] += 1
        assert covered[:n].min() >= 1 and starts[-1] + p >= n and starts[0] == 0
        assert all(b - a <= p // 2 for a, b in zip(starts, starts[1:]))


def test_crop_padded_and_paste_round_trip_on_a_non_square_grid():
    a = np.arange(5 * 7, dtype=np.float32).reshape(5, 7)
    c = crop_padded(a, 3, 4, 4, fill=-1)
    assert c.shape == (4, 4) and np.array_equal(c[:2, :3], a[3:5, 4:7]) and (c[2:] == -1).all() and (c[:, 3] == -1).all()
    out = np.zeros_like(a)
    paste(out, a[1:4, 2:6], (1, 4, 2, 6))
    assert np.array_equal(out[1:4, 2:6], a[1:4, 2:6]) and out.sum() == a[1:4, 2:6].sum()
    stack = np.stack([a, a + 1])
    assert crop_padded(stack, 0, 0, 3).shape == (2, 3, 3)


def test_context_indices_repeat_the_edge_slice():
    assert context_indices(0, 5, 2) == [0, 0, 0, 1, 2]
    assert context_indices(4, 5, 1) == [3, 4, 4]
    assert context_indices(2, 5, 0) == [2]


@pytest.mark.parametrize("present, margin, want", [
    ([0, 0, 1, 1, 0, 0], 1, (1, 5)), ([1, 0, 0], 3, (0, 3)), ([0, 0, 0], 1, None)])
def test_z_range(present, margin, want):
    assert z_range(np.array(present, bool), margin) == want
