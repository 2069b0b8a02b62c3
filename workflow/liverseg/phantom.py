"""A synthetic abdominal CT phantom with LiTS-style labels (0 background, 1 liver, 2 tumour).

The anatomy is drawn in coordinates relative to the field of view (the body fills most of it), so a small matrix
still shows a whole abdomen.  The recorded voxel spacing and orientation vary the way real scans do, which
exercises every geometry path, but organ sizes in mm are not physiological at small matrix sizes.

HU values follow the usual ranges: air -1000, fat about -100, soft tissue about 40, contrast-enhanced liver 60..130,
hypodense tumours 20..70 HU below the liver, bone 300..1200.  The spleen has liver-like HU on purpose: it is the
distractor a model must learn to reject by shape and position rather than by intensity.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform
from scipy import ndimage

from liverseg.config import default

# Orientations a phantom may be stored in: RAS, LPS (DICOM), LAS (typical dcm2niix/LiTS), and a z-flipped one.
ORIENTATIONS = [("R", "A", "S"), ("L", "P", "S"), ("L", "A", "S"), ("R", "A", "I"), ("A", "R", "S")]


@dataclass
class PhantomSpec:
    size: int = default("dataset.phantom.size")
    slices: int = default("dataset.phantom.slices")
    inplane_spacing: tuple[float, float] = (0.6, 1.0)
    slice_spacing: tuple[float, float] = (1.0, 5.0)
    max_tumours: int = default("dataset.phantom.max_tumours")
    noise_hu: tuple[float, float] = (8.0, 20.0)


def _ellipsoid(x, y, z, c, r):
    return ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2 <= 1.0


def generate(seed: int, spec: PhantomSpec = PhantomSpec()) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (image int16, label uint8, affine) for one phantom case, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    n, nz = spec.size, spec.slices
    # Canonical RAS grid: axis 0 -> patient right (+x), axis 1 -> anterior (+y), axis 2 -> superior (+z).
    xs = np.linspace(-1, 1, n, dtype=np.float32)
    zs = np.linspace(0, 1, nz, dtype=np.float32)
    x, y, z = np.meshgrid(xs, xs, zs, indexing="ij")

    hu = np.full((n, n, nz), -1000.0, dtype=np.float32)
    label = np.zeros((n, n, nz), dtype=np.uint8)

    # Body: an ellipse whose width breathes slowly along z.
    ax_a = rng.uniform(0.78, 0.92) * (1 + 0.04 * np.sin(2 * np.pi * z + rng.uniform(0, 6)))
    ax_b = rng.uniform(0.55, 0.68)
    body_r = (x / ax_a) ** 2 + ((y + 0.05) / ax_b) ** 2
    body = body_r <= 1.0
    inner = body_r <= rng.uniform(0.72, 0.85)
    hu[body] = rng.uniform(-115, -85)  # subcutaneous fat
    hu[inner] = rng.uniform(30, 50)  # muscle / bowel wall
    # Visceral fat and gas pockets make the inside less uniform than one soft-tissue value.
    for _ in range(rng.integers(6, 12)):
        c = (rng.uniform(-0.5, 0.5), rng.uniform(-0.3, 0.3), rng.uniform(0, 1))
        r = (rng.uniform(0.05, 0.15), rng.uniform(0.05, 0.15), rng.uniform(0.1, 0.3))
        blob = _ellipsoid(x, y, z, c, r) & inner
        hu[blob] = rng.choice([rng.uniform(-120, -80), rng.uniform(-900, -600), rng.uniform(10, 40)])

    # Spine (posterior, midline): cortical ring, cancellous core, canal.
    sy = -ax_b + 0.22
    rr = np.sqrt(x**2 + (y - sy) ** 2)
    hu[rr <= 0.13] = rng.uniform(900, 1200)
    hu[rr <= 0.10] = rng.uniform(300, 450)
    canal = np.sqrt(x**2 + (y - sy + 0.17) ** 2) <= 0.045
    hu[canal] = rng.uniform(15, 30)
    # Aorta just anterior of the spine, contrast-filled.
    hu[np.sqrt((x + 0.05) ** 2 + (y - sy - 0.2) ** 2) <= 0.06] = rng.uniform(150, 250)

    # Liver extent along z: empty slices above and below.
    z0 = rng.uniform(0.15, 0.3)
    z1 = rng.uniform(0.65, 0.85)
    zc, zr = (z0 + z1) / 2, (z1 - z0) / 2

    # Kidneys, lower half of the liver range and below, with enhancing cortex.
    for side in (1, -1):
        kc = (side * rng.uniform(0.28, 0.36), sy + rng.uniform(0.1, 0.18), z0 + rng.uniform(-0.05, 0.15))
        kr = (rng.uniform(0.09, 0.12), rng.uniform(0.12, 0.16), rng.uniform(0.15, 0.22))
        kidney = _ellipsoid(x, y, z, kc, kr)
        hu[kidney] = rng.uniform(140, 200)
        hu[_ellipsoid(x, y, z, kc, [v * 0.55 for v in kr])] = rng.uniform(20, 40)

    # Spleen on the patient's left, with liver-like HU: the distractor.
    liver_hu = rng.uniform(60, 130)
    sc = (-rng.uniform(0.45, 0.55), sy + rng.uniform(0.25, 0.35), zc + rng.uniform(0.0, 0.15))
    spleen = _ellipsoid(x, y, z, sc, (rng.uniform(0.1, 0.15), rng.uniform(0.15, 0.2), rng.uniform(0.15, 0.22)))
    hu[spleen & inner] = liver_hu + rng.uniform(-15, 15)

    # Liver: union of 3..5 ellipsoidal lobes on the patient's right, tapering towards its ends.
    liver = np.zeros_like(body)
    cx, cy = rng.uniform(0.3, 0.45), rng.uniform(-0.05, 0.15)
    for k in range(rng.integers(3, 6)):
        c = (cx + rng.uniform(-0.2, 0.12) - 0.08 * k, cy + rng.uniform(-0.12, 0.12), zc + rng.uniform(-0.3, 0.3) * zr)
        r = (rng.uniform(0.2, 0.36), rng.uniform(0.2, 0.32), zr * rng.uniform(0.6, 1.0))
        liver |= _ellipsoid(x, y, z, c, r)
    liver &= inner & (z >= z0) & (z <= z1)
    liver &= ~(rr <= 0.16)
    hu[liver] = liver_hu
    label[liver] = 1

    # Tumours: hypodense spheres clipped to the liver.
    coords = np.argwhere(liver)
    for _ in range(int(rng.integers(0, spec.max_tumours + 1)) if coords.size else 0):
        cz = coords[rng.integers(len(coords))]
        c = (xs[cz[0]], xs[cz[1]], zs[cz[2]])
        rad = rng.uniform(0.03, 0.12)
        t = _ellipsoid(x, y, z, c, (rad, rad * rng.uniform(0.8, 1.2), rad * rng.uniform(1.0, 2.0))) & liver
        hu[t] = liver_hu - rng.uniform(20, 70)
        label[t] = 2

    # Scanner blur then noise; the blur also softens the organ edges the labels keep sharp.
    hu = ndimage.gaussian_filter(hu, sigma=(rng.uniform(0.5, 1.0),) * 2 + (0.3,))
    hu += rng.normal(0.0, rng.uniform(*spec.noise_hu), size=hu.shape).astype(np.float32)
    image = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)

    sp_xy = rng.uniform(*spec.inplane_spacing)
    sp_z = rng.uniform(*spec.slice_spacing)
    affine = np.diag([sp_xy, sp_xy, sp_z, 1.0])
    affine[:3, 3] = rng.uniform(-200, 0, size=3)

    target = ORIENTATIONS[int(rng.integers(len(ORIENTATIONS)))]
    transform = ornt_transform(axcodes2ornt(("R", "A", "S")), axcodes2ornt(target))
    image_o = apply_orientation(image, transform)
    label_o = apply_orientation(label, transform)
    affine_o = affine @ inv_ornt_aff(transform, image.shape)
    return np.ascontiguousarray(image_o), np.ascontiguousarray(label_o), affine_o


def write_case(case_seed: int, image_path, label_path, spec: PhantomSpec = PhantomSpec()) -> None:
    from liverseg.io import atomic_path

    image, label, affine = generate(case_seed, spec)
    for arr, path in ((image, image_path), (label, label_path)):
        img = nib.Nifti1Image(arr, affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        with atomic_path(path) as tmp:
            nib.save(img, str(tmp))
