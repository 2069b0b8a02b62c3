"""A prediction as a DICOM Segmentation (SEG) of its source series, made with highdicom, for PACS viewers and OHIF.

Segments (BINARY, algorithm type AUTOMATIC, algorithm "liverseg" with the package version and model files):
1 "Liver" (SNOMED CT 10200004, category Anatomical Structure 91723000): the whole liver, labels 1 and 2, as in
  the statistics' liver volume; 2 "Liver tumour" (Neoplasm 108369006, category Morphologically Abnormal Structure
  49755003, anatomic region Liver): label 2.  The segments overlap, as the tumours lie inside the liver.

Each frame is the mask of one source instance: the label volume is brought onto the source series' own grid
(liverseg.dicom.select_series), each instance's ImagePositionPatient is checked to fall on its slice of that
grid, and highdicom copies the instance's position and UID into the frame.  Frames empty in a segment are
omitted (a reader treats a missing frame as empty).
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

from liverseg import __version__
from liverseg.dicom import select_series
from liverseg.errors import CaseError
from liverseg.io import atomic_path, read_labels

log = logging.getLogger(__name__)
GRID_TOLERANCE_MM = 1e-2  # the prediction carries the affine read_series built, rounded through NIfTI float32


def frames_for_series(labels: np.ndarray, affine: np.ndarray, series, case: str) -> np.ndarray:
    """A label volume on any axis order/flip of the series' grid -> (instances, rows, columns) in the order of
    ``series.items``; frame k is the mask of instance k, checked through its ImagePositionPatient."""
    ornt = ornt_transform(io_orientation(affine), io_orientation(series.affine))
    data = apply_orientation(labels, ornt)
    aff = affine @ inv_ornt_aff(ornt, labels.shape)
    want = (series.cols, series.rows, len(series.items))
    if data.shape != want or not np.allclose(aff, series.affine, atol=GRID_TOLERANCE_MM):
        raise CaseError(case, f"prediction grid {labels.shape} does not match DICOM series {series.uid} "
                              f"({series.rows} rows x {series.cols} columns x {len(series.items)} slices)")
    inv = np.linalg.inv(aff)
    for k, (f, ds) in enumerate(series.items):
        lps = np.array(ds.ImagePositionPatient, float)
        ijk = (inv @ np.array([-lps[0], -lps[1], lps[2], 1.0]))[:3]  # LPS -> RAS -> voxel
        if not np.allclose(ijk, (0, 0, k), atol=1e-2):
            raise CaseError(case, f"DICOM instance {f.name} at {lps.tolist()} falls on voxel {ijk.round(3).tolist()}"
                                  f" of the prediction, not on the first pixel of slice {k}")
    return np.ascontiguousarray(np.transpose(data, (2, 1, 0)))  # voxel (column, row, slice) -> (slice, row, column)


def _source_headers(series, case: str) -> list:
    """The series' headers as highdicom takes them.  Anonymisers leave real files with empty identifiers: an
    empty SpecificCharacterSet means the default repertoire (written as absent); an empty SOP class or instance
    UID is the file meta's (the same identity); an empty study or series UID gets a UID derived from the frame of
    reference, with a warning, since the SEG cannot then be filed with the scan's own study."""
    from pydicom.uid import generate_uid

    out = []
    for _, ds in series.items:
        ds = copy.copy(ds)
        if "SpecificCharacterSet" in ds and not ds.SpecificCharacterSet:
            del ds.SpecificCharacterSet
        if not ds.get("SOPClassUID"):
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        if not ds.get("SOPInstanceUID"):
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        out.append(ds)
    seed = [str(out[0].get("FrameOfReferenceUID", "")), *sorted(str(d.SOPInstanceUID) for d in out)]
    for key in ("StudyInstanceUID", "SeriesInstanceUID"):
        if not out[0].get(key):
            uid = generate_uid(entropy_srcs=[key, *seed])
            log.warning("case %s: the source series has no %s; the DICOM-SEG refers to %s instead", case, key, uid)
            for d in out:
                setattr(d, key, uid)
    return out


def source_uid(ds) -> str:
    """An instance's SOPInstanceUID, or its file meta's when anonymisation emptied it (as _source_headers)."""
    return str(ds.get("SOPInstanceUID") or ds.file_meta.MediaStorageSOPInstanceUID)


def segment_descriptions(model_versions: list[dict] | None = None) -> list:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    params = {f"{m['role']}{i}": f"{Path(m['file']).name} sha256:{m['sha256']} config:{m['config_hash']}"
              for i, m in enumerate(model_versions or [])}
    alg = hd.AlgorithmIdentificationSequence(name="liverseg", family=codes.cid7162.ArtificialIntelligence,
                                             version=__version__, parameters=params or None)
    common = {"algorithm_type": hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, "algorithm_identification": alg}
    return [
        hd.seg.SegmentDescription(segment_number=1, segment_label="Liver",
                                  segmented_property_category=codes.SCT.AnatomicalStructure,
                                  segmented_property_type=codes.SCT.Liver, **common),
        hd.seg.SegmentDescription(segment_number=2, segment_label="Liver tumour",
                                  segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
                                  segmented_property_type=codes.SCT.Neoplasm, anatomic_regions=[codes.SCT.Liver],
                                  **common),
    ]


def labels_to_seg(labels: np.ndarray, affine: np.ndarray, series, case: str, model_versions: list[dict] | None = None):
    """highdicom Segmentation of a label volume (0/1/2) for a selected series (liverseg.dicom.select_series)."""
    import highdicom as hd

    frames = frames_for_series(labels, affine, series, case)
    stacked = np.stack([frames >= 1, frames == 2], axis=-1).astype(np.uint8)
    src = _source_headers(series, case)
    with warnings.catch_warnings():
        # highdicom re-checks the source's patient name; an anonymised single-component name is not our error
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
        return hd.seg.Segmentation(
            source_images=src, pixel_array=stacked, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=segment_descriptions(model_versions), series_instance_uid=hd.UID(),
            series_number=int(getattr(src[0], "SeriesNumber", 0) or 0) + 1000, sop_instance_uid=hd.UID(),
            instance_number=1, manufacturer="liverseg", manufacturer_model_name="liverseg",
            software_versions=__version__, device_serial_number="none", content_label="LIVERSEG",
            content_description="automatic liver and liver tumour segmentation",
            series_description="liverseg liver and tumour", omit_empty_frames=bool(stacked.any()))


def write_seg(case: str, pred_path, series_folder, out_path, series_uid: str | None = None,
              model_versions: list[dict] | None = None) -> dict:
    """A prediction NIfTI on a DICOM series' grid -> DICOM-SEG file referencing that series."""
    img = nib.load(str(pred_path))
    labels = read_labels(img)
    if labels.max(initial=0) > 2:
        raise CaseError(case, f"prediction {pred_path} holds label values above 2")
    series = select_series(series_folder, case, series_uid)
    seg = labels_to_seg(labels, np.asarray(img.affine, float), series, case, model_versions)
    with atomic_path(out_path) as tmp:
        seg.save_as(str(tmp))
    summary = {"case": case, "seg": str(out_path), "series_uid": series.uid, "frames": int(seg.NumberOfFrames),
               "source_instances": len(series.items)}
    log.info("case %s: DICOM-SEG %s", case, summary)
    return summary
