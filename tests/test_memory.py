"""Issue 13, memory at LiTS size: labels of every stored dtype are read and checked slab by slab into uint8, and
no whole-volume float64 copy of a label or an image is ever made (tracemalloc counts numpy's allocations)."""

import tracemalloc

import nibabel as nib
import numpy as np
import pytest

from liverseg import io
from liverseg.errors import CaseError
from liverseg.ingest import load_validated

SHAPE = (6, 5, 70)  # 30 voxels a slice: with SLAB_VOXELS = 64, two slices a slab, 35 slabs
NON_INTEGER = "case 9: label holds non-integer values; expected integers 0 (bg), 1 (liver), 2 (tumour)"


@pytest.fixture(autouse=True)
def small_slabs(monkeypatch):
    monkeypatch.setattr(io, "SLAB_VOXELS", 64)


def _label():
    lab = np.zeros(SHAPE, np.uint8)
    lab[1:5, 1:4, 3:60] = 1
    lab[2:4, 2:3, 30:45] = 2
    return lab


def _write(path, stored, aff=None, scaling=None):
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(stored.dtype)
    img = nib.Nifti1Image(stored, np.eye(4) if aff is None else aff, header=hdr)
    if scaling:
        img.header.set_slope_inter(*scaling)
    nib.save(img, str(path))
    return path


def _case(tmp_path, stored, scaling=None):
    img = np.random.default_rng(0).integers(-200, 300, size=SHAPE).astype(np.int16)
    ip = _write(tmp_path / "volume-9.nii.gz", img)
    lp = _write(tmp_path / "segmentation-9.nii.gz", stored, scaling=scaling)
    return ip, lp


@pytest.mark.parametrize("dtype", ["uint8", "int16", "uint16", "float32", "float64"])
@pytest.mark.parametrize("scaling", [None, (0.5, -1.0)])
def test_labels_of_every_stored_dtype_come_out_as_uint8(tmp_path, dtype, scaling):
    lab = _label()
    stored = lab.astype(np.float64) if scaling is None else (lab.astype(np.float64) - scaling[1]) / scaling[0]
    ip, lp = _case(tmp_path, stored.astype(dtype), scaling)
    assert nib.load(str(lp)).get_data_dtype() == np.dtype(dtype)
    _, _, _, _, got = load_validated("9", ip, lp)
    assert got.dtype == np.uint8 and np.array_equal(got, lab)
    assert np.array_equal(io.read_labels(io.load_nifti(lp, "9", "label")), lab)  # unchecked (evaluate's) path


@pytest.mark.parametrize("dtype, scaling, edit, message", [
    # a non-integer value anywhere wins over out-of-range values met earlier, as the whole-volume check had it
    ("float32", None, {(0, 0, 1): 3.0, (0, 0, 65): 0.5}, NON_INTEGER),
    ("float64", None, {(1, 1, 40): 1.25}, NON_INTEGER),
    ("float32", None, {(1, 1, 40): np.nan}, NON_INTEGER),
    ("int16", (0.5, 0.0), {(1, 1, 40): 3}, NON_INTEGER),  # stored 3 -> 1.5
    ("int16", None, {(0, 0, 1): -1, (5, 4, 69): 3, (2, 2, 2): 3},
     "case 9: label values [-1, 3] outside {0, 1, 2} (0 bg, 1 liver, 2 tumour)"),
    ("uint16", None, {(0, 0, 68): 255}, "case 9: label values [255] outside {0, 1, 2} (0 bg, 1 liver, 2 tumour)"),
    ("float64", None, {(3, 3, 10): 7.0}, "case 9: label values [7] outside {0, 1, 2} (0 bg, 1 liver, 2 tumour)"),
    ("int16", (1.0, 2.0), {}, "case 9: label values [3, 4] outside {0, 1, 2} (0 bg, 1 liver, 2 tumour)"),
])
def test_bad_label_values_give_the_one_line_error(tmp_path, dtype, scaling, edit, message):
    stored = _label().astype(dtype)
    for idx, v in edit.items():
        stored[idx] = v
    ip, lp = _case(tmp_path, stored, scaling)
    with pytest.raises(CaseError) as ei:
        load_validated("9", ip, lp)
    assert str(ei.value) == message


def _peak(fn):
    tracemalloc.start()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


BIG = (256, 256, 160)  # 10.5 M voxels: a float64 copy is 84 MB


@pytest.fixture(scope="module")
def big_label():
    lab = np.zeros(BIG, np.uint8)
    lab[60:200, 50:180, 20:140] = 1
    lab[100:130, 90:120, 60:90] = 2
    return lab


@pytest.mark.parametrize("dtype", ["int16", "uint16", "float32", "float64"])
def test_reading_a_label_makes_no_whole_volume_float_copy(tmp_path, monkeypatch, big_label, dtype):
    """Peak numpy memory of reading and checking the label stays under 4 bytes a voxel: the uint8 result (1) plus
    slab temporaries; one float64 copy of the volume alone is 8 (the int16 path used to make two)."""
    monkeypatch.setattr(io, "SLAB_VOXELS", 1 << 20)
    p = _write(tmp_path / "l.nii.gz", big_label.astype(dtype))
    img = io.load_nifti(p, "m", "label")
    got, peak = _peak(lambda: io.read_labels(img, "m", p))
    assert np.array_equal(got, big_label)
    assert peak < 4 * big_label.size, peak / big_label.size


def test_a_float64_image_is_read_as_float32_without_a_float64_copy(tmp_path, monkeypatch, big_label):
    monkeypatch.setattr(io, "SLAB_VOXELS", 1 << 20)
    hu = np.where(big_label > 0, 60.0, -1000.0) + np.arange(BIG[2])[None, None, :] * 0.5
    ip = _write(tmp_path / "v.nii.gz", hu.astype(np.float64))
    lp = _write(tmp_path / "l.nii.gz", big_label.astype(np.int16))
    (_, raw, slope, inter, lab), peak = _peak(lambda: load_validated("m", ip, lp))
    assert raw.dtype == np.float32 and (slope, inter) == (1.0, 0.0)
    assert np.array_equal(raw, hu.astype(np.float32)) and np.array_equal(lab, big_label)
    # float32 image (4) + uint8 label (1) + slabs; the float64 image alone would be 8
    assert peak < 6 * big_label.size, peak / big_label.size
