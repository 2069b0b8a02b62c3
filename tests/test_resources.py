"""Job sizes from file headers (liverseg.resources): what the workflow's mem_mb and runtime are computed from."""

import gzip

import h5py
import numpy as np
import pytest

from conftest import write_nifti
from liverseg import resources as R

SPEC = {"mem_mb": 1000, "mem_per_mb": 6, "runtime": 10, "runtime_per_gb": 20}


@pytest.mark.parametrize("dtype, itemsize", [(np.int16, 2), (np.uint8, 1), (np.float64, 8)])
def test_nifti_size_is_shape_times_stored_itemsize_not_file_size(tmp_path, dtype, itemsize):
    arr = np.zeros((64, 32, 40), dtype)  # zeros: the .gz file is a few hundred bytes
    p = write_nifti(tmp_path / "v.nii.gz", arr)
    assert R.nifti_mb(p) == pytest.approx(64 * 32 * 40 * itemsize / 2**20)
    assert R.volume_mb([p, p]) == pytest.approx(2 * R.nifti_mb(p))


def test_a_missing_input_is_left_to_be_determined_and_an_unreadable_one_counts_nothing(tmp_path):
    # Snakemake turns a FileNotFoundError naming one of the job's inputs into "<TBD>" and asks again later
    with pytest.raises(FileNotFoundError) as exc:
        R.nifti_mb(tmp_path / "later.nii.gz")
    assert exc.value.filename == str(tmp_path / "later.nii.gz")
    with pytest.raises(FileNotFoundError):
        R.h5_mb(tmp_path / "later.h5")
    (tmp_path / "junk.nii.gz").write_bytes(gzip.compress(b"not a header"))
    assert R.nifti_mb(tmp_path / "junk.nii.gz") == 0.0  # that case's own check reports it


def test_h5_size_is_its_arrays(tmp_path):
    with h5py.File(tmp_path / "c.h5", "w") as f:
        f.create_dataset("image", data=np.zeros((10, 64, 64), np.float16), compression="lzf")
        f.create_dataset("label", data=np.zeros((10, 64, 64), np.uint8), compression="lzf")
        f.create_dataset("liver_present", data=np.zeros(10, bool))
    assert R.h5_mb(tmp_path / "c.h5") == pytest.approx(10 * 64 * 64 * 3 / 2**20)


def test_memory_and_time_grow_with_size_and_attempt():
    assert R.mem_mb(SPEC, 0) == 1000 and R.runtime(SPEC, 0) == 10
    assert R.mem_mb(SPEC, 450) == 1000 + 6 * 450  # a 512 x 512 x 900 int16 volume
    assert R.mem_mb(SPEC, 450, attempt=2) == 2 * (1000 + 6 * 450)  # a retry after an out-of-memory kill
    assert R.runtime(SPEC, 2048, attempt=1) == 10 + 40 and R.runtime(SPEC, 2048, attempt=3) == 3 * 50
    assert R.mem_mb(SPEC, 100, base=8000) == 8600  # a training role's own base
    assert R.mem_mb(SPEC, 0.01) == 1001  # rounded up, never under


def test_prediction_memory_adds_one_batch_of_activations_by_slice_area_not_slice_count(tmp_path):
    """predict's fixed part grows with predict.batch_size x the stored slice area (the networks' activations),
    its proportional part with the case's arrays: more slices add only the latter."""
    for n, name in ((10, "short"), (40, "long")):
        with h5py.File(tmp_path / f"{name}.h5", "w") as f:
            f.create_dataset("image", data=np.zeros((n, 500, 200), np.float16))
            f.create_dataset("label", data=np.zeros((n, 500, 200), np.uint8))
    assert R.h5_slice_mpx(tmp_path / "short.h5") == pytest.approx(0.1)
    spec = {"mem_mb": 1500, "batch_mb_per_mpx": 1400, "mem_per_mb": 4, "runtime": 10, "runtime_per_gb": 60}
    base = R.predict_base_mb(spec, 16, R.h5_slice_mpx(tmp_path / "short.h5"))
    assert base == pytest.approx(1500 + 1400 * 16 * 0.1)
    short, long_ = (R.mem_mb(spec, R.h5_mb(tmp_path / f"{k}.h5"), 1, base=base) for k in ("short", "long"))
    assert long_ - short == pytest.approx(4 * 30 * 500 * 200 * 3 / 2**20, abs=1)
    assert R.mem_mb(spec, R.h5_mb(tmp_path / "short.h5"), 2, base=base) == pytest.approx(2 * short, abs=1)
    with pytest.raises(FileNotFoundError):
        R.h5_slice_mpx(tmp_path / "later.h5")


def test_the_source_grid_volume_of_a_case_sizes_the_optional_maps(tmp_path):
    with h5py.File(tmp_path / "c.h5", "w") as f:
        f.create_dataset("image", data=np.zeros((4, 8, 8), np.float16))
        f.attrs["canonical_shape"] = np.array([512, 400, 90])
    assert R.h5_source_mb(tmp_path / "c.h5") == pytest.approx(512 * 400 * 90 / 2**20)
