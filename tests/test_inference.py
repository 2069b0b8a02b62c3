"""liverseg.inference with stub networks whose outputs are known in advance.

Most stubs return ``log(p)`` for probabilities ``p`` chosen by the test, so the softmax the code applies gives
``p`` back exactly and every expected value below is computed from the input alone, never by the code under test.
"""

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from liverseg import inference as I  # noqa: E402

CPU = torch.device("cpu")


def _logits(p0, p1, p2, dim=1):
    return torch.log(torch.stack([p0, p1, p2], dim=dim))


class Pointwise(torch.nn.Module):
    """(B, C, H, W) -> log of p = (0.75 - 0.5 * x_c, 0.5 * x_c, 0.25) per pixel, x_c the centre input channel."""

    def __init__(self, centre=1):
        super().__init__()
        self.centre, self.seen = centre, []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        c = x[:, self.centre]
        return _logits(0.75 - 0.5 * c, 0.5 * c, torch.full_like(c, 0.25))


def pointwise_probs(x):
    x = torch.as_tensor(np.asarray(x, np.float32))
    return torch.stack([0.75 - 0.5 * x, 0.5 * x, torch.full_like(x, 0.25)], dim=-3)


class Constant(torch.nn.Module):
    """The same class probabilities ``q`` at every pixel, whatever the input."""

    def __init__(self, q=(0.2, 0.5, 0.3)):
        super().__init__()
        self.q = torch.tensor(q)

    def forward(self, x):
        return torch.log(self.q)[None, :, None, None].expand(x.shape[0], 3, *x.shape[-2:]).clone()


# ---------------------------------------------------------------------------------------------- classify
def test_classify_uses_the_context_slices_in_order_and_returns_sigmoid_probabilities():
    rng = np.random.default_rng(0)
    v = rng.random(5).astype(np.float32)  # slice z is constant v[z]
    image = np.ascontiguousarray(np.broadcast_to(v[:, None, None], (5, 12, 12)))
    seen = []

    class Stub(torch.nn.Module):  # logit = prev + 2 * centre + 4 * next: any mix-up of the channels shows
        def forward(self, x):
            seen.append(tuple(x.shape))
            m = x.mean(dim=(2, 3))
            return m[:, 0] + 2 * m[:, 1] + 4 * m[:, 2]

    out = I.classify(Stub(), {"input_size": 8, "context": 1}, image, CPU, batch=2, amp=False)
    prev = v[[0, 0, 1, 2, 3]]  # the edge slice repeats beyond the volume
    nxt = v[[1, 2, 3, 4, 4]]
    want = 1 / (1 + np.exp(-(prev + 2 * v + 4 * nxt)))
    assert out.shape == (5,) and out.dtype == np.float32
    assert np.allclose(out, want, atol=1e-6)
    assert seen == [(2, 3, 8, 8), (2, 3, 8, 8), (1, 3, 8, 8)]  # resized to the model's input, batched


# ---------------------------------------------------------------------------------------------- TTA
@pytest.mark.parametrize("augment, want", [
    (None, [(False, 1.0)]),
    ({}, [(False, 1.0)]),
    ({"flip_prob": 0.0, "scale": 0.0}, [(False, 1.0)]),
    ({"flip_prob": 0.5}, [(False, 1.0), (True, 1.0)]),
    ({"scale": 0.1}, [(False, 1.0), (False, 0.9), (False, 1.1)]),
    ({"flip_prob": 0.5, "scale": 0.2, "rotate_deg": 15}, [(False, 1.0), (True, 1.0), (False, 0.8), (False, 1.2)]),
])
def test_tta_transforms_are_what_training_applied(augment, want):
    spec = {} if augment is None else {"augment": augment}
    got = I.tta_transforms(spec)
    assert [f for f, _ in got] == [f for f, _ in want]
    assert [z for _, z in got] == pytest.approx([z for _, z in want])


def _ramp(h, w):
    r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return torch.from_numpy((0.3 * r + 0.7 * c + 1.0).astype(np.float32))[None, None].repeat(2, 1, 1, 1)


def test_warp_flip_mirrors_columns_and_zoom_magnifies():
    x = _ramp(12, 16)  # H != W: a row/column mix-up in the affine would show
    assert torch.allclose(I._warp(x, True, 1.0, inverse=False), x.flip(-1), atol=1e-5)
    z = I._warp(x, False, 2.0, inverse=False, padding="border")
    d_col = z[0, 0, 6, 5:11].diff()
    d_row = z[0, 0, 3:9, 8].diff()
    assert torch.allclose(d_col, torch.full_like(d_col, 0.35), atol=1e-4)  # x2 magnified: half the slope
    assert torch.allclose(d_row, torch.full_like(d_row, 0.15), atol=1e-4)


@pytest.mark.parametrize("flip, zoom", [(True, 1.0), (False, 0.9), (False, 1.1), (True, 0.9), (True, 1.15)])
def test_warp_inverse_undoes_the_forward_warp(flip, zoom):
    """Bilinear sampling is exact on a linear image, so forward then inverse gives the image back wherever the
    forward pass saw it (the interior), up to float error."""
    x = _ramp(24, 32)
    back = I._warp(I._warp(x, flip, zoom, inverse=False, padding="border"), flip, zoom, inverse=True)
    assert torch.allclose(back[..., 4:-4, 4:-4], x[..., 4:-4, 4:-4], atol=1e-4)
    if zoom > 1:  # maps going back are padded with zeros: the corners were never seen
        ones = I._warp(torch.ones(1, 1, 24, 32), flip, zoom, inverse=True)
        assert ones[0, 0, 0, 0] == 0 and ones[0, 0, -1, -1] == 0 and ones[0, 0, 12, 16] == pytest.approx(1)


# ---------------------------------------------------------------------------------------------- slice_probs
def test_slice_probs_on_the_stored_grid():
    rng = np.random.default_rng(1)
    image = rng.random((5, 16, 16)).astype(np.float32)
    stub = Pointwise(centre=1)
    spec = {"input_size": 16, "context": 1}
    got = list(I.slice_probs(stub, spec, image, [4, 0, 2], CPU, batch=2, amp=False))
    assert [zs for zs, _ in got] == [[4, 0], [2]]
    for zs, p in got:
        assert p.shape == (len(zs), 3, 16, 16)
        assert torch.allclose(p, pointwise_probs(image[zs]), atol=1e-6)
    # the context channels around slice 4 are 3, 4, 4 (edge repeated); around slice 0: 0, 0, 1
    first = stub.seen[0]
    assert np.array_equal(first[0].numpy(), image[[3, 4, 4]]) and np.array_equal(first[1].numpy(), image[[0, 0, 1]])


def test_slice_probs_resizes_to_the_input_and_to_out_size():
    image = np.full((2, 16, 16), 0.6, np.float32)  # constant slices survive any resize unchanged
    stub = Pointwise(centre=0)
    spec = {"input_size": 8, "context": 0}
    (zs, p), = I.slice_probs(stub, spec, image, [0, 1], CPU, amp=False)
    assert stub.seen[0].shape == (2, 1, 8, 8) and p.shape == (2, 3, 8, 8)
    (zs, p), = I.slice_probs(stub, spec, image, [0, 1], CPU, amp=False, out_size=12)
    assert p.shape == (2, 3, 12, 12)
    assert torch.allclose(p, pointwise_probs(np.full((2, 12, 12), 0.6)), atol=1e-6)


def test_flip_tta_maps_each_pass_back_before_averaging():
    """A stub whose output depends on the column only: p1 = 0.5 * c / (W - 1).  The flipped pass, mapped back,
    gives 0.5 * (W - 1 - c) / (W - 1), so the average is 0.25 at every pixel."""

    class ColumnStub(torch.nn.Module):
        def forward(self, x):
            w = x.shape[-1]
            c = (torch.arange(w, dtype=torch.float32) / (w - 1)).expand(x.shape[0], x.shape[-2], w)
            return _logits(0.5 - 0.5 * c, 0.5 * c, torch.full_like(c, 0.5))

    image = np.random.default_rng(2).random((1, 8, 8)).astype(np.float32)
    spec = {"input_size": 8, "context": 0, "augment": {"flip_prob": 0.5}}
    (_, plain), = I.slice_probs(ColumnStub(), spec, image, [0], CPU, amp=False, tta=False)
    (_, tta), = I.slice_probs(ColumnStub(), spec, image, [0], CPU, amp=False, tta=True)
    assert not torch.allclose(plain[:, 1], torch.full_like(plain[:, 1], 0.25))
    assert torch.allclose(tta[:, 1], torch.full_like(tta[:, 1], 0.25), atol=1e-6)
    assert torch.allclose(tta[:, 2], torch.full_like(tta[:, 2], 0.5), atol=1e-6)


@pytest.mark.parametrize("augment", [
    {"flip_prob": 0.5},
    {"scale": 0.1},  # a zoomed pass's map-back is already weighted by its coverage: not weighted twice
    {"scale": 0.1, "flip_prob": 0.5},
])
def test_tta_of_a_constant_model_is_that_constant(augment):
    """Whatever the transforms, averaging a model that ignores its input must give its output back, and the
    class probabilities must sum to 1 at every pixel."""
    image = np.random.default_rng(3).random((2, 16, 16)).astype(np.float32)
    spec = {"input_size": 16, "context": 0, "augment": augment}
    (_, p), = I.slice_probs(Constant(), spec, image, [0, 1], CPU, amp=False, tta=True)
    assert torch.allclose(p.sum(dim=1), torch.ones(()), atol=1e-5)
    assert torch.allclose(p, torch.tensor([0.2, 0.5, 0.3])[None, :, None, None].expand_as(p), atol=1e-5)


def test_zoom_and_flip_tta_map_each_pass_back_in_the_interior():
    """A per-pixel linear model on a linear image: every pass, mapped back, agrees with the plain pass wherever it
    saw the whole neighbourhood (bilinear resampling is exact on linear images), so the average must too."""
    r, c = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
    image = ((0.3 * r + 0.7 * c) / 16).astype(np.float32)[None]
    spec = {"input_size": 16, "context": 0, "augment": {"scale": 0.1, "flip_prob": 0.5}}
    assert len(I.tta_transforms(spec)) == 4
    (_, p), = I.slice_probs(Pointwise(centre=0), spec, image, [0], CPU, amp=False, tta=True)
    want = pointwise_probs(image)
    assert torch.allclose(p[..., 3:-3, 3:-3], want[..., 3:-3, 3:-3], atol=1e-4)


# ---------------------------------------------------------------------------------------------- tile_probs
B_SPEC = {"patch_size": 8, "context": 1, "classes": 3}


def test_tile_probs_of_a_constant_model_is_the_constant_over_the_region():
    image = np.random.default_rng(4).random((3, 24, 24)).astype(np.float32)
    region = (3, 24, 5, 22)  # 21 x 17: neither a multiple of the stride nor square
    out = list(I.tile_probs(Constant(), B_SPEC, image, [0, 1, 2], region, CPU, batch=2, amp=False))
    assert [zs for zs, _ in out] == [[0, 1], [2]]
    for zs, p in out:
        assert p.shape == (len(zs), 3, 21, 17)
        assert torch.allclose(p, torch.tensor([0.2, 0.5, 0.3])[None, :, None, None].expand_as(p), atol=1e-6)


def test_tile_probs_puts_every_tile_back_where_it_was_cut():
    image = np.random.default_rng(5).random((3, 24, 24)).astype(np.float32)
    region = (3, 24, 5, 22)
    (zs, p), = I.tile_probs(Pointwise(centre=1), B_SPEC, image, [2, 0], region, CPU, amp=False)
    assert torch.allclose(p, pointwise_probs(image[[2, 0], 3:24, 5:22]), atol=1e-6)


def test_tile_probs_on_a_slice_smaller_than_the_patch_pads_with_zeros():
    image = np.random.default_rng(6).random((2, 6, 6)).astype(np.float32) + 0.1
    stub = Pointwise(centre=1)
    (zs, p), = I.tile_probs(stub, B_SPEC, image, [0, 1], (0, 6, 0, 6), CPU, amp=False)
    assert p.shape == (2, 3, 6, 6)
    assert torch.allclose(p, pointwise_probs(image), atol=1e-6)
    tile = stub.seen[0]
    assert tile.shape == (2, 3, 8, 8)
    assert (tile[..., 6:, :] == 0).all() and (tile[..., :, 6:] == 0).all()  # nothing invented beyond the slice


def test_tile_probs_weights_each_tile_towards_its_centre():
    """Each tile outputs one value (0.5 * the mean of its input).  Where tiles overlap, the pixel at a tile's
    centre must take (almost only) that tile's value: Gaussian weights, not a plain average."""

    class TileMean(torch.nn.Module):
        def forward(self, x):
            m = x[:, 1].mean(dim=(1, 2), keepdim=True).expand(-1, x.shape[-2], x.shape[-1])
            return _logits(0.75 - 0.5 * m, 0.5 * m, torch.full_like(m, 0.25))

    r, c = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
    image = np.repeat((r / 32 + c / 16).astype(np.float32)[None], 1, axis=0)
    (_, p), = I.tile_probs(TileMean(), B_SPEC, image, [0], (0, 16, 0, 16), CPU, amp=False)
    # tiles start at 0, 4 and 8 on each axis; pixel (7, 7) is 3 from the (4, 4) tile's origin (near its centre)
    # and on the edge of the tiles at 0 and at 8
    own = 0.5 * float(image[0, 4:12, 4:12].mean())
    plain = 0.5 * np.mean([image[0, a : a + 8, b : b + 8].mean() for a in (0, 4) for b in (0, 4)])
    assert abs(own - plain) > 0.02  # the two hypotheses are far apart
    assert float(p[0, 1, 7, 7]) == pytest.approx(own, abs=0.003)


# ---------------------------------------------------------------------------------------------- V3 sequences
class SequenceStub(torch.nn.Module):
    """(B, T, C, H, W) -> logits (B, T, 3, H, W) voting for class round(10 * centre channel) % 3."""

    def __init__(self, centre):
        super().__init__()
        self.centre, self.seen = centre, []

    def forward(self, x):
        self.seen.append(tuple(x.shape))
        k = torch.round(10 * x[:, :, self.centre]).long() % 3
        return torch.nn.functional.one_hot(k, 3).movedim(-1, 2).float() * 20


@pytest.mark.parametrize("n, t, input_size, stride", [(7, 3, 8, 1), (6, 3, 8, 1), (2, 3, 8, 1), (7, 3, 4, 1),
                                                     (5, 1, 8, 1), (11, 3, 8, 2), (7, 3, 8, 3), (2, 3, 8, 4)])
def test_segment_sequences_labels_every_slice_exactly_once(n, t, input_size, stride):
    """Every slice once, from a window whose slices are ``stride`` apart (context too: z_stride)."""
    image = np.ascontiguousarray(np.broadcast_to((np.arange(n) / 10).astype(np.float32)[:, None, None], (n, 8, 8)))
    stub = SequenceStub(centre=1)
    spec = {"seq_len": t, "input_size": input_size, "context": 1}
    got = list(I.segment_sequences(stub, spec, image, CPU, batch=2, amp=False, stride=stride))
    zs = [z for batch, _ in got for z in batch]
    assert sorted(zs) == list(range(n))  # every slice, none twice
    for batch, p in got:
        assert p.shape == (len(batch), 3, 8, 8)
        lab = p.argmax(dim=1).numpy()
        for z, m in zip(batch, lab):
            assert (m == z % 3).all(), z
    assert all(s[1:] == (t, 3, input_size, input_size) for s in stub.seen)
    for w in I.sequence_windows(n, t, stride):  # a window's slices are stride apart (the last repeated at the end)
        steps = set(np.diff(w).tolist())
        assert steps <= {stride, 0} and len(w) == t, w


# ---------------------------------------------------------------------------------------------- V1 3D
class Pointwise3D(torch.nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.shape = shape

    def forward(self, x):
        assert tuple(x.shape) == self.shape
        v = x[:, 0]
        return _logits(0.74 - 0.5 * v, 0.5 * v + 0.01, torch.full_like(v, 0.25))


def _volume(gen, n):
    """The (K, Z, S, S) volume of a generator of (slice indices, (n, K, S, S)); every slice exactly once."""
    got = {}
    for zs, p in gen:
        for z, q in zip(zs, p.numpy()):
            assert z not in got, z
            got[z] = q
    assert sorted(got) == list(range(n))
    return np.stack([got[z] for z in range(n)], axis=1)


@pytest.mark.parametrize("shape, stride", [((11, 13, 21), 1), ((3, 8, 8), 1), ((9, 21, 10), 1), ((11, 13, 21), 3),
                                           ((3, 8, 8), 5)])
def test_sliding_window_3d_covers_every_voxel_with_the_right_patch(shape, stride):
    image = np.random.default_rng(7).random(shape).astype(np.float32)
    spec = {"patch": [4, 8]}
    probs = _volume(I.sliding_window_3d(Pointwise3D((1, 1, 4, 8, 8)), spec, image, CPU, amp=False, stride=stride),
                    shape[0])
    assert probs.shape == (3,) + shape and probs.dtype == np.float32
    want = np.stack([0.74 - 0.5 * image, 0.5 * image + 0.01, np.full(shape, 0.25)])
    assert np.isfinite(probs).all()
    assert np.allclose(probs, want, atol=2e-3)


class PositionDependent3D(torch.nn.Module):
    """Logits that depend on the input and on the voxel's place in the patch: overlapping patches disagree, so
    the average depends on exactly which patches cover a voxel, and how many."""

    def forward(self, x):
        d, p = x.shape[2], x.shape[-1]
        zz = torch.linspace(-1, 1, d)[:, None, None]
        rr = torch.linspace(-1, 1, p)[None, :, None]
        cc = torch.linspace(-1, 1, p)[None, None, :]
        v = x[:, 0]
        return torch.stack([2 * v + zz, 1.5 * v * rr + cc, zz * cc - v], dim=1)


def _whole_volume_reference(model, spec, image, stride):
    """V1 as it was before issue 13: a (3, Z, S, S) float32 accumulator over the whole volume, float16 out."""
    from liverseg.geometry import patch_grid

    d, p = spec["patch"]
    n, h, w = image.shape
    out = np.zeros((3, n, h, w), np.float16)
    for r in range(min(stride, n)):
        sub = image[r::stride]
        m = sub.shape[0]
        acc = np.zeros((3, m, h, w), np.float32)
        cnt = np.zeros((m, h, w), np.float32)
        for z0 in patch_grid(m, d):
            for r0 in patch_grid(h, p):
                for c0 in patch_grid(w, p):
                    src = sub[z0 : z0 + d, r0 : r0 + p, c0 : c0 + p].astype(np.float32)
                    x = np.zeros((d, p, p), np.float32)
                    x[: src.shape[0], : src.shape[1], : src.shape[2]] = src
                    prob = torch.softmax(model(torch.from_numpy(x)[None, None]).float(), dim=1)[0].numpy()
                    prob = prob[:, : src.shape[0], : src.shape[1], : src.shape[2]]
                    acc[:, z0 : z0 + src.shape[0], r0 : r0 + src.shape[1], c0 : c0 + src.shape[2]] += prob
                    cnt[z0 : z0 + src.shape[0], r0 : r0 + src.shape[1], c0 : c0 + src.shape[2]] += 1
        out[:, r::stride] = (acc / cnt).astype(np.float16)
    return out


@pytest.mark.parametrize("shape, patch, stride", [((37, 20, 20), (8, 8), 1), ((50, 13, 21), (8, 8), 3),
                                                  ((5, 16, 16), (8, 8), 1), ((29, 24, 24), (6, 16), 2)])
def test_sliding_window_3d_by_rows_equals_the_whole_volume_accumulator(shape, patch, stride):
    """Issue 13: accumulating one row of patches at a time gives what the whole-volume accumulator gave."""
    image = np.random.default_rng(3).random(shape).astype(np.float32)
    spec = {"patch": list(patch)}
    model = PositionDependent3D()
    ref = _whole_volume_reference(model, spec, image, stride).astype(np.float32)
    new = _volume(I.sliding_window_3d(model, spec, image, CPU, amp=False, stride=stride), shape[0])
    assert np.abs(new - ref).max() <= 1e-3
    top2 = np.sort(ref, axis=0)[-2:]
    clear = top2[1] - top2[0] > 1e-3  # not a tie at float16 resolution
    assert clear.mean() > 0.9
    assert np.array_equal(new.argmax(axis=0)[clear], ref.argmax(axis=0)[clear])
