"""A synthetic abdominal CT phantom with LiTS-style labels (0 background, 1 liver, 2 tumour).

The anatomy is drawn in patient coordinates in millimetres, as a scanner sees a body: a patient of random habitus
lies supine on the table, the scanner reconstructs a random field of view (FOV) around them, and the voxel grid only
samples that scene.  A 32x32 matrix therefore still shows a whole body (at about 12 mm voxels) and the liver is
15-22 cm wide whatever the matrix.  Canonical grid: RAS, +x towards the patient's right (liver side, as in the
previous phantom), +y anterior, +z superior; z = 0 is the top of the liver dome, x = y = 0 the body centre.

Every organ is an implicit surface (a signed "radius" <= 1) perturbed by smooth random fields (Gaussian bumps on a
coarse lattice), drawn only inside its bounding box.  The result is stored in one of several orientations.

Labels follow LiTS: 1 liver (intrahepatic portal and hepatic veins included), 2 tumour; gallbladder, IVC (also its
retrohepatic part), portal trunk outside the liver and everything else are 0.

Ranges used (mm / HU) and where they come from.  No parameter was fitted to, or read from, any real scan.

Anatomy (sizes of a normal adult)
  ==================================================  =========================================================
  body LR width 280-380 mm, AP 200-280 mm;            Gray's Anatomy (general abdominal proportions)
  subcutaneous fat 5-40 mm, abdominal wall 8-15 mm
  liver LR 160-205 mm, AP 125-165 mm (right lobe),    Kratzer et al. 2003, J Ultrasound Med, "Factors affecting
  craniocaudal 140-190 mm; right lobe large, left     liver size: a sonographic survey of 2080 subjects"
  lobe thin, crossing the midline anteriorly          (craniocaudal span); Gray's Anatomy (lobes, position)
  kidney length 100-125 mm, width 50-64 mm,           Emamian et al. 1993, AJR, "Kidney dimensions at
  thickness 40-50 mm; right kidney 10-25 mm lower     sonography: correlation with age, sex, and habitus in
                                                      665 adult volunteers"; Gray's Anatomy (right lower)
  spleen length 80-120 mm, width 60-90 mm,            Bezerra et al. 2005, AJR, "Determination of splenomegaly
  thickness 36-50 mm                                  by CT: is there a place for a single measurement?"
  vertebral body 40-52 mm wide, 30-38 mm AP,          Gray's Anatomy
  24-30 mm tall, discs 7-10 mm; canal 16-22 mm;
  aorta 20-26 mm, IVC 20-26 mm; portal vein 12-16 mm;
  gallbladder 60-90 x 25-40 mm; pancreas head 28-36 mm,
  body/tail 16-24 mm; stomach, colon 36-52 mm, small
  bowel 18-28 mm; ribs 10-14 mm tall, posterior end
  higher than anterior end; diaphragm domes (right
  higher), costophrenic recesses reaching 75-100 mm
  below the dome posteriorly
  ==================================================  =========================================================

Attenuation (HU)
  ==================================================  =========================================================
  air -1000, lung -900..-800, fat -120..-80,          standard CT attenuation (Hounsfield) tables
  water/bile 0..25, muscle 40..60, unenhanced blood
  35..50, cancellous bone 150..350, cortical bone
  500..1000 (humerus up to 1400), intervertebral
  disc 70..110
  liver: non-contrast 50..70, arterial 60..90,        Bae 2010, Radiology, "Intravenous contrast medium
  portal-venous 90..130; aorta 35..50 / 250..400 /    administration and scan timing at CT: considerations and
  140..200; portal vein 35..50 / 90..150 / 140..200;  approaches" (enhancement by phase and organ)
  hepatic veins 30..45 / 40..60 / 130..180; IVC
  35..50 / 60..110 / 110..160; spleen 40..55 /
  90..140 (mottled) / 100..130; kidney cortex
  28..40 / 150..230 / 150..200, medulla 28..40 /
  50..90 / 110..170; pancreas 35..50 / 100..150 /
  80..120
  tumours 10..70 HU below the liver (hypodense),      Bae 2010 (arterial-phase hyperenhancement of
  20..60 above in arterial phase (hyperdense),        hypervascular lesions); sizes 5..80 mm, log-uniform
  or hypodense with an enhancing rim
  ==================================================  =========================================================

Scanner: in-plane reconstruction kernel a Gaussian of sigma 0.4..1.2 mm (sometimes with mild unsharp masking),
slice profile FWHM 1.0..1.6 slice spacings, noise 8..30 HU (slightly correlated), int16 clipped to -1024..3071.
The spleen has liver-like HU in the portal phase on purpose: it is the distractor a model must reject by shape and
position.  Presets: "demo" (FOV 340-480 mm, 2-4 mm pixels, 2.5-5 mm slices) and "lits" (FOV 300-500 mm,
0.55-1.0 mm pixels, 0.7-5 mm slices, like the LiTS challenge data).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform
from scipy import ndimage

from liverseg.config import default

# Orientations a phantom may be stored in: RAS, LPS (DICOM), LAS (typical dcm2niix/LiTS), and a z-flipped one.
ORIENTATIONS = [("R", "A", "S"), ("L", "P", "S"), ("L", "A", "S"), ("R", "A", "I"), ("A", "R", "S")]
PHASES = ("non-contrast", "arterial", "portal-venous")
PRESETS = {
    "demo": {"fov_mm": (340.0, 480.0), "spacing_mm": (2.0, 4.0), "slice_spacing_mm": (2.5, 5.0)},
    "lits": {"fov_mm": (300.0, 500.0), "spacing_mm": (0.55, 1.0), "slice_spacing_mm": (0.7, 5.0)},
}
_FROM_PRESET = "preset"

# Tissue ids of the internal tissue map (returned by ``draw`` for tests and inspection).
AIR, TABLE, FAT, MUSCLE, CAVFAT, LUNG, HEART, BOWEL, COLON, STOMACH, PANCREAS, KIDNEY, SPLEEN, AORTA, IVC, PORTAL, \
    LIVER, LVESSEL, GALLBLADDER, TUMOUR, BONE, ARM, CANAL, DISC = range(24)

# HU ranges per contrast phase (non-contrast, arterial, portal-venous); see the module docstring for sources.
_PHASE_HU = {
    "liver": ((50, 70), (60, 90), (90, 130)),
    "spleen": ((40, 55), (90, 140), (100, 130)),
    "aorta": ((35, 50), (250, 400), (140, 200)),
    "ivc": ((35, 50), (60, 110), (110, 160)),
    "portal": ((35, 50), (90, 150), (140, 200)),
    "hepatic": ((30, 45), (40, 60), (130, 180)),
    "cortex": ((28, 40), (150, 230), (150, 200)),
    "medulla": ((28, 40), (50, 90), (110, 170)),
    "pancreas": ((35, 50), (100, 150), (80, 120)),
    "bowel_wall": ((35, 45), (60, 100), (80, 120)),
    "myocardium": ((35, 50), (90, 140), (90, 130)),
    "blood": ((35, 50), (200, 350), (130, 190)),
    "muscle": ((40, 55), (45, 60), (48, 60)),
}


@dataclass
class PhantomSpec:
    """What kind of scan to draw.

    ``size``/``slices``: in-plane matrix and number of slices.  Given, they fix the grid and the spacing follows from
    the random FOV (spacing = FOV/size) and scan length (slice spacing = length/slices).  ``None`` draws the spacing
    from the preset and derives the matrix.  Left unset they come from the config (``dataset.phantom.*``) for the
    ``demo`` preset and are ``None`` (drawn) for ``lits``.  Range fields left ``None`` take the preset's values.
    """

    preset: str = "demo"
    size: int | None = _FROM_PRESET  # type: ignore[assignment]
    slices: int | None = _FROM_PRESET  # type: ignore[assignment]
    max_tumours: int = default("dataset.phantom.max_tumours")
    fov_mm: tuple[float, float] | None = None
    spacing_mm: tuple[float, float] | None = None
    slice_spacing_mm: tuple[float, float] | None = None
    noise_hu: tuple[float, float] = (8.0, 30.0)
    kernel_sigma_mm: tuple[float, float] = (0.4, 1.2)
    phase_weights: tuple[float, float, float] = (0.2, 0.25, 0.55)
    arms_probability: float = 0.4
    max_voxels: int = 90_000_000  # drawn-spacing scans thicken their slices rather than exceed this

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"unknown phantom preset {self.preset!r}; choose from {sorted(PRESETS)}")
        for k, v in PRESETS[self.preset].items():
            if getattr(self, k) is None:
                setattr(self, k, v)
        if self.size == _FROM_PRESET:
            self.size = default("dataset.phantom.size") if self.preset == "demo" else None
        if self.slices == _FROM_PRESET:
            self.slices = default("dataset.phantom.slices") if self.preset == "demo" else None

    @classmethod
    def from_config(cls, phantom: dict) -> "PhantomSpec":
        """The spec of a validated config's ``dataset.phantom`` section (what the workflow's cases were drawn with)."""
        return cls(preset=phantom["preset"], size=phantom["size"], slices=phantom["slices"],
                   max_tumours=phantom["max_tumours"])


# ----------------------------------------------------------------------------------------------------------------
# smooth random fields and the voxel grid


class _Field:
    """Unit-variance smooth random field in 3-D: Gaussian bumps on a lattice of ``step`` mm (resolution free)."""

    def __init__(self, rng, lo, hi, step):
        self.step = float(step)
        self.c = [np.arange(l - 2 * step, h + 2 * step + 1e-3, step, dtype=np.float32) for l, h in zip(lo, hi)]
        self.g = rng.standard_normal([len(c) for c in self.c]).astype(np.float32)

    def _w(self, a, c):
        a = np.asarray(a, np.float32).ravel()
        w = np.exp(-0.5 * ((a[:, None] - c[None, :]) / (0.6 * self.step)) ** 2)
        return (w / np.sqrt((w * w).sum(1, keepdims=True) + 1e-12)).astype(np.float32)

    def grid(self, x, y, z):
        t = np.tensordot(self._w(x, self.c[0]), self.g, axes=(1, 0))
        t = np.tensordot(t, self._w(y, self.c[1]), axes=(1, 1))
        return np.tensordot(t, self._w(z, self.c[2]), axes=(1, 1))

    def points(self, p):
        p = np.atleast_2d(p)
        return np.einsum("abc,na,nb,nc->n", self.g, self._w(p[:, 0], self.c[0]), self._w(p[:, 1], self.c[1]),
                         self._w(p[:, 2], self.c[2]))


class _Field1:
    def __init__(self, rng, lo, hi, step):
        self.step = float(step)
        self.c = np.arange(lo - 2 * step, hi + 2 * step + 1e-3, step)
        self.g = rng.standard_normal(len(self.c))

    def __call__(self, a):
        a = np.asarray(a, np.float64)
        w = np.exp(-0.5 * ((a[..., None] - self.c) / (0.6 * self.step)) ** 2)
        return (w @ self.g) / np.sqrt((w * w).sum(-1) + 1e-12)


def _lut(*ids, invert=False):
    lut = np.zeros(256, bool)
    lut[list(ids)] = True
    return ~lut if invert else lut


class _Canvas:
    def __init__(self, xs, ys, zs):
        self.ax = (xs, ys, zs)
        shape = (len(xs), len(ys), len(zs))
        self.hu = np.full(shape, -1000.0, np.float32)
        self.tissue = np.zeros(shape, np.uint8)
        self.label = np.zeros(shape, np.uint8)
        self.cav = np.zeros(shape, bool)

    def boxes(self, lo, hi, max_vox=3_000_000):
        """Yield (slices, (X, Y, Z) open coordinate grids) covering the box [lo, hi] mm, in z-chunks."""
        idx = []
        for a, l, h in zip(self.ax, lo, hi):
            i0, i1 = int(np.searchsorted(a, l)), int(np.searchsorted(a, h, side="right"))
            if i1 <= i0:
                return
            idx.append((i0, i1))
        (i0, i1), (j0, j1), (k0, k1) = idx
        xs, ys, zs = self.ax
        step = max(1, max_vox // ((i1 - i0) * (j1 - j0)))
        for k in range(k0, k1, step):
            ke = min(k1, k + step)
            yield ((slice(i0, i1), slice(j0, j1), slice(k, ke)),
                   (xs[i0:i1, None, None], ys[None, j0:j1, None], zs[None, None, k:ke]))

    def paint(self, sl, mask, tid, val, allow=None, label=0):
        t = self.tissue[sl]
        mask = np.broadcast_to(mask, t.shape)
        if allow is not None:
            mask = mask & allow[t]
        if not mask.any():
            return mask
        t[mask] = tid
        h = self.hu[sl]
        h[mask] = np.broadcast_to(val, mask.shape)[mask] if np.ndim(val) else val
        if label is not None:
            self.label[sl][mask] = label
        return mask


def _segments(cv, pts, radii, fn, pad=0.0):
    """Call ``fn(sl, X, Y, Z, dist, radius, cy)`` per polyline segment inside its box (cy: centreline y nearby)."""
    pts = np.asarray(pts, np.float32)
    for p0, p1, r0, r1 in zip(pts[:-1], pts[1:], radii[:-1], radii[1:]):
        rr = max(r0, r1) + pad
        d = p1 - p0
        l2 = float(d @ d) + 1e-6
        for sl, (X, Y, Z) in cv.boxes(np.minimum(p0, p1) - rr, np.maximum(p0, p1) + rr):
            t = np.clip(((X - p0[0]) * d[0] + (Y - p0[1]) * d[1] + (Z - p0[2]) * d[2]) / l2, 0, 1)
            dist = np.sqrt((X - p0[0] - t * d[0]) ** 2 + (Y - p0[1] - t * d[1]) ** 2 + (Z - p0[2] - t * d[2]) ** 2)
            fn(sl, X, Y, Z, dist, r0 + t * (r1 - r0), p0[1] + t * d[1])


# ----------------------------------------------------------------------------------------------------------------
# the patient (all random draws about anatomy happen here, independent of the voxel grid)

_NB = 720
_TH = ((np.arange(_NB) + 0.5) / _NB * 2 * np.pi - np.pi)


def _u(rng, lo, hi):
    return float(rng.uniform(lo, hi))


def _skin_R(A, th, z):
    """Skin radius (mm) at angles th (NB,) and heights z (nz,): (nz, NB)."""
    c, s = np.cos(th), np.sin(th)
    b = np.where(s > 0, A.b_ant, A.b_post)
    p = np.where(s > 0, A.p_ant, A.p_post)
    r0 = 1.0 / ((np.abs(c) / A.a) ** p + (np.abs(s) / b) ** p) ** (1.0 / p)
    z = np.atleast_1d(z)
    harm = sum(A.harm_amp / m * (A.hc[m](z)[:, None] * np.cos(m * th) + A.hs[m](z)[:, None] * np.sin(m * th))
               for m in range(2, 6))
    scale = 1 + 0.02 * A.zscale(z)[:, None] + A.trend * np.clip(-z / 250.0, -0.5, 1.0)[:, None]
    return r0[None, :] * scale * (1 + harm)


def _fat_T(A, th, z):
    s, c = np.sin(th), np.cos(th)
    f = A.fat0 * (0.8 + 0.4 * np.maximum(s, 0) + 0.25 * c * c)
    return f[None, :] * (1 + 0.15 * A.fatz(np.atleast_1d(z))[:, None])


def _wall_T(A, th):
    return A.w0 + A.w_post * np.exp(-0.5 * ((th + np.pi / 2) / 0.42) ** 2)


def _zd(A, X, Y):
    """Height (mm) of the diaphragm above (x, y): two domes, the right one higher, deep posterior recesses."""
    def dome(cx, cy, apex, sx_lat, lateral_sign):
        sx = np.where((X - cx) * lateral_sign > 0, sx_lat, A.d_sx_med)
        sy = np.where(Y < cy, A.d_sy_post, A.d_sy_ant)
        return apex - A.d_depth * (((X - cx) / sx) ** 2 + ((Y - cy) / sy) ** 2)

    z = np.maximum(dome(A.dR[0], A.dR[1], A.dR[2], A.d_sx_lat, 1), dome(A.dL[0], A.dL[1], A.dL[2], A.d_sx_lat, -1))
    return np.maximum(z, A.d_zmin)


def _liver_f(A, X, Y, Z):
    """Normalised implicit liver (<= 1 inside) before the field perturbation and the clipping."""
    t = -Z / A.Lcc
    s = np.where(t < 0.3, np.sqrt(np.clip(1 - ((0.3 - t) / 0.3) ** 2, 0, 1)), np.clip((1 - t) / 0.7, 0, 1) ** 0.7)
    s = np.maximum(s, 1e-3)
    cx = A.cxR + A.shiftR * np.clip((t - 0.35) / 0.65, 0, 1)
    cy = A.cyR - A.shiftRy * np.clip((t - 0.35) / 0.65, 0, 1)
    fr = np.sqrt(((X - cx) / (A.rxR * s)) ** 2 + ((Y - cy) / (A.ryR * s)) ** 2)
    fr = np.where((t >= 0) & (t <= 1), fr, 9.0)
    u = (X - A.xtip) / (A.xjoin - A.xtip)
    uc = np.clip(u, 0, 1)
    hl = A.hL0 * (0.2 + 0.8 * uc ** 0.8)
    yc = np.interp(X, A.front_x, A.front_y) - 2 - hl
    ztop = np.minimum(_zd(A, X, yc + 0 * Y) - 5, -A.Lcc * 0.04)  # the left lobe hangs under the diaphragm
    zbot = ztop - A.Lcc * (A.tL - 0.06) * (0.4 + 0.6 * uc)
    hz = np.maximum((ztop - zbot) / 2, 1.0)
    fl = ((np.abs(Y - yc) / hl) ** 3 + (np.abs(Z - (ztop + zbot) / 2) / hz) ** 3) ** (1 / 3)
    fl = np.where((u >= 0) & (X <= A.cxR), fl, 9.0)
    return np.minimum(fr, fl)


def _grow(rng, segs, p, d, length, r, depth):
    d = d / np.linalg.norm(d)
    e = p + d * length
    segs.append((p, e, r, r * 0.85))
    if depth > 0 and r > 1.2:
        for _ in range(2):
            nd = d + rng.normal(0, 0.6, 3)
            _grow(rng, segs, e, nd, length * _u(rng, 0.6, 0.8), r * _u(rng, 0.62, 0.8), depth - 1)


def _walk(rng, lo, hi, n, step):
    p = rng.uniform(lo, hi)
    d = rng.normal(size=3)
    pts = [p.copy()]
    for _ in range(n):
        d = d / np.linalg.norm(d) + rng.normal(0, 0.7, 3)
        d /= np.linalg.norm(d)
        p = p + d * step
        for i in range(3):  # reflect at the region's walls
            if p[i] < lo[i] or p[i] > hi[i]:
                d[i] = -d[i]
                p[i] = np.clip(p[i], lo[i], hi[i])
        pts.append(p.copy())
    return np.array(pts)


def anatomy(rng, max_tumours: int, phase_weights=(0.2, 0.25, 0.55), arms_probability=0.4) -> SimpleNamespace:
    """Draw one patient: every size and position in mm, every HU; nothing here depends on the voxel grid."""
    A = SimpleNamespace()
    A.phase = int(rng.choice(3, p=np.asarray(phase_weights) / np.sum(phase_weights)))
    A.hu = {k: _u(rng, *v[A.phase]) for k, v in _PHASE_HU.items()}
    # liver span first: it fixes the scan range
    A.Lcc = _u(rng, 140, 190)
    A.above, A.below = _u(rng, 30, 90), _u(rng, 30, 100)
    A.z_top, A.z_bot = A.above, -A.Lcc - A.below
    zlo, zhi = A.z_bot - 20, A.z_top + 20

    # body outline: superellipse, flatter posteriorly, slowly varying along z
    A.a = _u(rng, 140, 190)
    ap = _u(rng, 200, 280)
    ratio = _u(rng, 0.85, 0.95)
    A.b_ant, A.b_post = ap / (1 + ratio), ap * ratio / (1 + ratio)
    A.p_ant, A.p_post = _u(rng, 2.0, 2.4), _u(rng, 2.6, 3.4)
    A.harm_amp = _u(rng, 0.01, 0.03)
    A.hc = {m: _Field1(rng, zlo, zhi, 90) for m in range(2, 6)}
    A.hs = {m: _Field1(rng, zlo, zhi, 90) for m in range(2, 6)}
    A.zscale, A.fatz = _Field1(rng, zlo, zhi, 70), _Field1(rng, zlo, zhi, 70)
    A.trend = _u(rng, 0.0, 0.05)
    A.fat0 = float(np.clip(5 + (A.a - 140) / 50 * 22 + rng.uniform(-3, 10), 5, 36))
    A.w0 = _u(rng, 8, 15)
    A.hu_fat, A.hu_cavfat = _u(rng, -120, -80), _u(rng, -110, -75)
    # spine: vertebral body centre from the posterior skin
    A.L_post = _u(rng, 68, 82)
    A.vb_rx, A.vb_ry = _u(rng, 20, 26), _u(rng, 15, 19)
    A.y_vb = -A.b_post + A.fat0 * 0.8 + A.L_post
    A.w_post = A.L_post + 0.2 * A.vb_ry - A.w0
    A.sp_pitch, A.sp_disc, A.sp_phase = _u(rng, 32, 38), _u(rng, 7, 10), _u(rng, 0, 40)
    A.sp_cort = _u(rng, 1.5, 2.5)
    A.canal_r = _u(rng, 8, 11)
    A.hu_cancel, A.hu_cort = _u(rng, 150, 350), _u(rng, 500, 1000)
    A.hu_disc, A.hu_canal = _u(rng, 70, 110), _u(rng, 0, 20)

    # nominal cavity (inside fat and wall) at z = 0, for placing organs
    rc = _skin_R(A, _TH, np.array([-A.Lcc / 2]))[0] - _fat_T(A, _TH, np.array([-A.Lcc / 2]))[0] - _wall_T(A, _TH)
    bx, by = rc * np.cos(_TH), rc * np.sin(_TH)
    ant = (_TH > 0.05) & (_TH < np.pi - 0.05)
    order = np.argsort(bx[ant])
    A.front_x, A.front_y = bx[ant][order], by[ant][order]
    A.a_in = float(rc[np.argmin(np.abs(_TH))])
    A.b_in = float(np.interp(0.0, A.front_x, A.front_y))

    # liver: right lobe under the right dome, thin left lobe anterior, crossing the midline
    A.W = _u(rng, 160, 205)
    xR = A.a_in - _u(rng, 2, 6)
    A.rxR = A.W * _u(rng, 0.30, 0.36)
    A.cxR = xR - A.rxR
    A.ryR = _u(rng, 62, 82)
    A.cyR = float(np.interp(A.cxR, A.front_x, A.front_y)) - A.ryR - _u(rng, 2, 6)
    A.shiftR, A.shiftRy = A.rxR * _u(rng, 0.2, 0.45), _u(rng, 0, 20)
    A.xtip = xR - A.W
    A.xjoin = A.cxR - 0.3 * A.rxR
    A.hL0 = _u(rng, 26, 38)
    A.tL = _u(rng, 0.42, 0.58)
    A.liver_field = _Field(rng, (A.xtip - 20, A.cyR - A.ryR - 40, -A.Lcc - 20), (xR + 20, A.b_in + 20, 20), 40)
    A.liver_amp = _u(rng, 0.06, 0.11)
    A.liver_tex = _Field(rng, (A.xtip - 20, A.cyR - A.ryR - 40, -A.Lcc - 20), (xR + 20, A.b_in + 20, 20), 12)

    # diaphragm
    A.dR = (A.cxR, A.cyR + 20, _u(rng, 3, 5))
    A.dL = (-_u(rng, 55, 80), A.cyR + 20, -_u(rng, 10, 25))
    A.d_depth, A.d_sx_lat, A.d_sx_med = _u(rng, 75, 100), _u(rng, 70, 95), _u(rng, 130, 160)
    A.d_sy_post, A.d_sy_ant = _u(rng, 90, 110), _u(rng, 200, 260)
    A.d_zmin = -_u(rng, 100, 115)
    A.hu_lung = _u(rng, -900, -830)

    # heart above the diaphragm, anterior-left
    A.heart_r = np.array([_u(rng, 55, 70), _u(rng, 45, 55), _u(rng, 45, 60)])
    hx, hy = -_u(rng, 20, 40), A.b_in * _u(rng, 0.15, 0.35)
    A.heart_c = np.array([hx, hy, float(_zd(A, np.float64(hx), np.float64(hy))) + A.heart_r[2] * 0.75])

    # kidneys (right lower), with tilt
    A.kidneys = []
    zk_left = -A.Lcc * _u(rng, 0.5, 0.62)
    for side in (1, -1):
        zc = zk_left - (_u(rng, 10, 25) if side == 1 else 0.0)
        A.kidneys.append(dict(c=np.array([side * _u(rng, 58, 72), A.y_vb + _u(rng, 0, 12), zc]),
                              r=np.array([_u(rng, 25, 32), _u(rng, 20, 25), _u(rng, 50, 62)]),
                              tilt=side * _u(rng, 0.1, 0.25), side=side))
    A.kid_field = _Field(rng, (-120, A.y_vb - 60, A.z_bot - 80), (120, A.y_vb + 60, 0), 30)
    A.z12 = zk_left + _u(rng, 0, 25)  # posterior end of the 12th rib

    # spleen: posterolateral left, crescent
    ths = math.radians(_u(rng, -158, -138))
    rcs = float(np.interp(ths, _TH, rc))
    A.spl_r = np.array([_u(rng, 18, 25), _u(rng, 30, 45), _u(rng, 40, 60)])  # radial, tangential, cc
    A.spl_th = ths
    A.spl_c = np.array([(rcs - A.spl_r[0] - 4) * math.cos(ths), (rcs - A.spl_r[0] - 4) * math.sin(ths),
                        A.dL[2] - 8 - A.spl_r[2]])
    A.spl_field = _Field(rng, A.spl_c - 70, A.spl_c + 70, 25)

    # stomach (LUQ): fundus under the left dome, body, antrum crossing to the pylorus
    dist = _u(rng, 0.7, 1.1)
    zdl = A.dL[2]
    A.stomach_pts = np.array([[A.dL[0] + 5, A.y_vb + 55, zdl - 35], [A.dL[0] + 10, 0.25 * A.b_in, zdl - 70],
                              [-20, A.b_in - 40, zdl - 105], [25, A.b_in - 55, zdl - 115]])
    A.stomach_r = np.array([40, 34, 22, 11]) * dist
    A.stomach_air = _u(rng, 5, 35)
    A.stomach_fill = _u(rng, 0, 25)
    A.stomach_wall = _u(rng, 3, 5)

    # pancreas (head right, tail to the splenic hilum), splenic vein behind it, portal trunk to the porta hepatis
    zp = zk_left + _u(rng, 0, 20)
    A.panc_pts = np.array([[_u(rng, 30, 45), A.y_vb + 55, zp - 15], [5, A.y_vb + 62, zp],
                           [-35, A.y_vb + 55, zp + 12], [A.spl_c[0] * 0.8, A.spl_c[1] + 30, zp + 25]])
    A.panc_r = np.array([_u(rng, 14, 18), _u(rng, 10, 12), _u(rng, 9, 12), _u(rng, 8, 10)])
    A.panc_field = _Field(rng, A.panc_pts.min(0) - 40, A.panc_pts.max(0) + 40, 12)
    A.porta = np.array([A.cxR - 0.6 * A.rxR, A.cyR - 0.1 * A.ryR, -A.Lcc * 0.5])
    conf = np.array([5.0, A.y_vb + 45, zp])
    A.splenic_v = np.array([A.panc_pts[3] + [0, -12, 0], A.panc_pts[2] + [0, -13, 0], conf])
    A.portal_trunk = np.array([conf, (conf + A.porta) / 2 + [0, 5, 0], A.porta])
    A.portal_r = _u(rng, 6, 8)

    # IVC: right of the aorta, retrohepatic, into the right atrium
    A.ivc_r = _u(rng, 10, 13)
    A.ivc_pts = np.array([[22, A.y_vb + 22, A.z_bot - 20], [24, A.y_vb + 24, -A.Lcc * 0.6],
                          [28, A.y_vb + 32, -A.Lcc * 0.25], [22, A.y_vb + 36, A.dR[2] - 10],
                          [10, A.heart_c[1] - 10, A.heart_c[2]]])
    A.aorta_r = _u(rng, 10, 13)
    ao_x, ao_y = -_u(rng, 10, 18), A.y_vb + A.vb_ry + A.aorta_r + _u(rng, 1, 5)
    A.aorta_pts = np.array([[ao_x, ao_y - 8, A.z_top + 20], [ao_x, ao_y, -A.Lcc * 0.3],
                            [ao_x + 3, ao_y + 4, A.z_bot - 20]])

    # gallbladder: pear from the porta (neck) to the fundus at the inferior-anterior liver edge
    A.gb = None
    if rng.random() < 0.85:
        neck = A.porta + [_u(rng, 0, 10), 18, 8]
        fx = A.cxR - A.rxR * _u(rng, 0.35, 0.6)
        fy = float(np.interp(fx, A.front_x, A.front_y)) - _u(rng, 15, 28)
        fundus = np.array([fx, fy, -A.Lcc * _u(rng, 0.72, 0.82)])
        A.gb = dict(pts=np.array([neck, (neck + fundus) / 2, fundus]), r=np.array([5, _u(rng, 9, 13), _u(rng, 12, 19)]),
                    hu=_u(rng, 0, 25))

    # intrahepatic vessels: hepatic veins from the IVC near the dome, portal tree from the porta
    zh = -_u(rng, 15, 30)
    ivc_at = np.array([np.interp(zh, A.ivc_pts[::-1, 2], A.ivc_pts[::-1, i]) for i in range(2)])
    root = np.array([ivc_at[0], ivc_at[1], zh])
    A.hep_segs, A.por_segs = [], []
    for d, ln in (((1, 0.15, -0.35), _u(rng, 60, 80)), ((0.25, 1, -0.5), _u(rng, 50, 70)),
                  ((-0.8, 0.8, -0.1), _u(rng, 40, 60))):
        _grow(rng, A.hep_segs, root, np.array(d, float), ln, _u(rng, 4.5, 6.5), 3)
    for d, ln in (((1, -0.1, 0.35), _u(rng, 25, 35)), ((1, 0.4, 0.6), _u(rng, 25, 35)),
                  ((-1, 0.5, 0.15), _u(rng, 40, 60))):
        _grow(rng, A.por_segs, A.porta.copy(), np.array(d, float), ln, _u(rng, 4.5, 6.0), 3)

    # bowel loops and colon in the lower abdomen
    xb = A.a_in - 25
    A.bowel_lo = np.array([-xb, A.y_vb + 20, A.z_bot - 30])
    A.bowel_hi = np.array([xb, A.b_in - 12, -A.Lcc * 0.6])
    A.loops = []
    for _ in range(int(rng.integers(10, 17))):
        pts = _walk(rng, A.bowel_lo, A.bowel_hi, int(rng.integers(5, 11)), _u(rng, 14, 22))
        A.loops.append(dict(pts=pts, r=_u(rng, 9, 14), wall=_u(rng, 1.5, 3), fill=_u(rng, 0, 30),
                            air=_u(rng, -0.2, 0.6) if rng.random() < 0.35 else None))
    cr = _u(rng, 18, 26)
    xc = A.a_in - cr - _u(rng, 8, 20)
    lz = -A.Lcc
    A.colon_pts = np.array([[xc, -5, A.z_bot - 30], [xc, 0, lz + 20], [xc - 20, A.b_in - cr - 15, lz + 25],
                            [0, A.b_in - cr - 10, lz + _u(rng, -40, 10)], [-xc + 20, A.b_in - cr - 20, lz * 0.6],
                            [-xc, -5, lz * 0.55], [-xc, -20, A.z_bot - 30]])
    A.colon_r, A.colon_air = cr, _u(rng, 0.0, 0.6)
    A.colon_field = _Field(rng, A.colon_pts.min(0) - 40, A.colon_pts.max(0) + 40, 8)
    A.mes_segs = [(p, p + rng.normal(0, 12, 3), _u(rng, 1.2, 2.5))
                  for p in rng.uniform(A.bowel_lo, A.bowel_hi, size=(int(rng.integers(20, 40)), 3))]
    lung_lo = np.array([-A.a_in, A.y_vb - 20, A.d_zmin])
    lung_hi = np.array([A.a_in, A.b_in, A.z_top + 10])
    A.lung_segs = [(p, p + rng.normal(0, 14, 3), _u(rng, 1.0, 2.8))
                   for p in rng.uniform(lung_lo, lung_hi, size=(int(rng.integers(80, 140)), 3))]

    # psoas, paraspinal muscles, ribs, sternum
    A.psoas_top, A.psoas_r = zk_left + _u(rng, 0, 30), _u(rng, 18, 26)
    A.para = (_u(rng, 30, 40), _u(rng, 28, 35), _u(rng, 22, 30))
    A.rib_P, A.rib_D, A.rib_h, A.rib_t = _u(rng, 28, 36), _u(rng, 70, 110), _u(rng, 10, 14), _u(rng, 6, 9)
    A.rib_off, A.rib_hu = _u(rng, 2, 5), _u(rng, 500, 900)
    A.rib_end = np.array([0.33, 0.5, 0.72, 0.8, 0.85] + [0.95] * 10) * np.pi
    A.cart_hu = _u(rng, 100, 250)
    A.xiphoid_z = -_u(rng, 20, 60)
    A.arms = rng.random() < arms_probability
    A.arm = dict(gap=_u(rng, 5, 25), r=_u(rng, 38, 50), y=_u(rng, -30, 15), fat=_u(rng, 5, 12),
                 hr=_u(rng, 11, 14), hu_cort=_u(rng, 800, 1400))
    A.table = dict(gap=_u(rng, 0, 4), curve=_u(rng, 15, 35), half=_u(rng, 190, 240), shell=_u(rng, 3, 6),
                   depth=_u(rng, 35, 60), hu=_u(rng, 150, 400), foam=_u(rng, -950, -800))

    # tumours: sizes log-uniform 5..80 mm, centres well inside the liver
    A.tumours = []
    n_t = int(rng.integers(0, max_tumours + 1))
    for _ in range(n_t):
        cand = rng.uniform((A.xtip, A.cyR - A.ryR, -A.Lcc), (A.cxR + A.rxR, A.b_in, 0), size=(400, 3))
        f = _liver_f(A, cand[:, 0], cand[:, 1], cand[:, 2]) + A.liver_amp * A.liver_field.points(cand)
        ok = (f < 0.75) & (cand[:, 2] < _zd(A, cand[:, 0], cand[:, 1]) - 10)
        if not ok.any():
            continue
        c = cand[np.argmax(ok)]
        dia = float(np.exp(rng.uniform(np.log(5), np.log(80))))
        r = dia / 2 * np.array([1, _u(rng, 0.8, 1.2), _u(rng, 0.8, 1.25)])
        kind = "hypo"
        if A.phase == 1 and rng.random() < 0.4:
            kind = "hyper"
        elif A.phase > 0 and rng.random() < 0.2:
            kind = "rim"
        lo, hi = (40, 70) if dia < 10 else ((10, 40) if A.phase == 0 else (10, 70))
        A.tumours.append(dict(c=c, r=r, kind=kind, dia=dia,
                              delta=-_u(rng, lo, hi) if kind != "hyper" else _u(rng, 20, 60),
                              rim=_u(rng, 10, 40), field=_Field(rng, c - dia, c + dia, max(dia / 2.5, 3.0)),
                              lob=_u(rng, 0.08, 0.25)))
    return A


# ----------------------------------------------------------------------------------------------------------------
# the scan


def scan_geometry(rng, A, spec: PhantomSpec) -> SimpleNamespace:
    """Field of view, matrix and spacing of one scan of patient ``A`` (no voxels drawn)."""
    G = SimpleNamespace()
    width = 2 * A.a * 1.06 + 30
    lo, hi = spec.fov_mm
    G.fov = _u(rng, min(max(lo, width), hi), hi) if width < hi else width
    G.off = np.array([_u(rng, -15, 15), _u(rng, -25, 5)])  # body centre relative to the FOV centre
    if spec.size is not None:
        G.n = int(spec.size)
        G.sp = G.fov / G.n
    else:
        G.sp = _u(rng, *spec.spacing_mm)
        G.n = int(round(G.fov / G.sp))
        G.fov = G.n * G.sp
    length = A.z_top - A.z_bot
    if spec.slices is not None:
        G.nz = int(spec.slices)
        G.spz = length / G.nz
    else:
        lo, hi = spec.slice_spacing_mm
        G.spz = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        G.spz = max(G.spz, length * G.n * G.n / spec.max_voxels)
        G.nz = max(1, int(round(length / G.spz)))
    G.thickness = G.spz * _u(rng, 1.0, 1.6)
    G.kernel = _u(rng, *spec.kernel_sigma_mm)
    G.sharpen = _u(rng, 0.3, 0.8) if rng.random() < 0.3 else 0.0
    G.noise = _u(rng, *spec.noise_hu)
    G.noise_corr = _u(rng, 0.5, 0.9)
    G.origin_shift = np.array([_u(rng, -30, 30), _u(rng, -30, 30), _u(rng, -300, 100)])
    G.orient = ORIENTATIONS[int(rng.integers(len(ORIENTATIONS)))]
    G.xs = ((np.arange(G.n) + 0.5) * G.sp - G.fov / 2 - G.off[0]).astype(np.float32)
    G.ys = ((np.arange(G.n) + 0.5) * G.sp - G.fov / 2 - G.off[1]).astype(np.float32)
    G.zs = (A.z_bot + (np.arange(G.nz) + 0.5) * G.spz).astype(np.float32)
    return G


def _draw_body(cv, A):
    xs, ys, zs = cv.ax
    X2, Y2 = xs[:, None], ys[None, :]
    r2 = np.sqrt(X2 * X2 + Y2 * Y2)
    tb = np.clip(((np.arctan2(Y2, X2) + np.pi) / (2 * np.pi) * _NB).astype(np.int32), 0, _NB - 1)
    skin = _skin_R(A, _TH, zs)
    fat_in = skin - _fat_T(A, _TH, zs)
    cav_in = fat_in - _wall_T(A, _TH)[None, :]
    zd2 = _zd(A, X2, Y2).astype(np.float32)
    med = (np.abs(X2 + 5) < 28) & (Y2 < A.y_vb + 50)
    # dependent (posterior) lung is denser
    lung_tex = np.broadcast_to(A.hu_lung + 40 * np.clip(-(Y2 - A.y_vb) / 150, -0.5, 1), r2.shape)
    hm = A.hu["muscle"]
    # table first: the body lies on it; thin shells are supersampled so coarse grids get partial volume, not gaps
    T = A.table
    y_back = -float(skin[:, np.argmin(np.abs(_TH + np.pi / 2))].min())
    ss = int(np.clip(np.ceil(3 * (xs[1] - xs[0]) / T["shell"]), 1, 12)) if len(xs) > 1 else 1
    off = ((np.arange(ss) + 0.5) / ss - 0.5) * (float(xs[1] - xs[0]) if len(xs) > 1 else 1.0)
    Xf, Yf = (xs[:, None] + off[None, :]).ravel()[:, None], (ys[:, None] + off[None, :]).ravel()[None, :]
    ytop = y_back - T["gap"] + T["curve"] * (Xf / 200.0) ** 2
    tab = np.full((Xf.size, Yf.size), -1000.0, np.float32)
    inside_x = np.abs(Xf) < T["half"]
    tab[np.broadcast_to(inside_x & (Yf <= ytop - T["shell"]) & (Yf > ytop - T["depth"]), tab.shape)] = T["foam"]
    shell = inside_x & (((Yf <= ytop) & (Yf > ytop - T["shell"])) |
                        ((Yf <= ytop - T["depth"]) & (Yf > ytop - T["depth"] - T["shell"])))
    tab[np.broadcast_to(shell, tab.shape)] = T["hu"]
    tab = tab.reshape(len(xs), ss, len(ys), ss).mean(axis=(1, 3))
    m3 = np.broadcast_to((tab > -999)[:, :, None], cv.hu.shape)
    cv.hu[m3] = np.broadcast_to(tab[:, :, None], cv.hu.shape)[m3]
    cv.tissue[m3] = TABLE
    for k, z in enumerate(zs):
        body = r2 < skin[k][tb]
        inner = r2 < fat_in[k][tb]
        cav = r2 < cav_in[k][tb]
        h, t = cv.hu[:, :, k], cv.tissue[:, :, k]
        h[body], t[body] = A.hu_fat, FAT
        h[inner], t[inner] = hm, MUSCLE
        below = cav & (z < zd2 - 3)
        h[below], t[below] = A.hu_cavfat, CAVFAT
        lung = cav & (z > zd2 + 2) & ~med
        h[lung], t[lung] = lung_tex[lung], LUNG
        mediast = cav & (z > zd2 + 2) & med
        h[mediast], t[mediast] = A.hu_cavfat + 20, CAVFAT
        cv.cav[:, :, k] = cav
    # paraspinal muscles (inside the fat, both sides of the spinous process)
    dx, rx, ry = A.para
    yc = A.y_vb - A.vb_ry - 2 * A.canal_r - ry + 5
    for side in (1, -1):
        m = ((X2 - side * dx) / rx) ** 2 + ((Y2 - yc) / ry) ** 2 <= 1
        m3 = np.broadcast_to(m[:, :, None], cv.hu.shape) & (cv.tissue == MUSCLE) | \
            (np.broadcast_to(m[:, :, None], cv.hu.shape) & (cv.tissue == CAVFAT))
        cv.hu[m3], cv.tissue[m3] = hm, MUSCLE
        cv.cav[m3] = False
    return skin, cav_in, r2, tb


def _ellipsoid_paint(cv, c, r, tid, val, allow, field=None, amp=0.0, label=0, clip_cav=True, extra=None, rot=None):
    lo, hi = c - r * 1.3, c + r * 1.3
    for sl, (X, Y, Z) in cv.boxes(lo, hi):
        dx, dy, dz = X - c[0], Y - c[1], Z - c[2]
        if rot is not None:
            cs, sn = math.cos(rot), math.sin(rot)
            dx, dy = cs * dx + sn * dy, -sn * dx + cs * dy
        f = (dx / r[0]) ** 2 + (dy / r[1]) ** 2 + (dz / r[2]) ** 2
        if field is not None:
            f = f + amp * field.grid(X, Y, Z)
        m = f <= 1
        if extra is not None:
            m = m & extra(X, Y, Z)
        if clip_cav:
            m = m & cv.cav[sl]
        cv.paint(sl, m, tid, val(f, X, Y, Z) if callable(val) else val, allow, label)


def _tube_paint(cv, pts, radii, wall, hu_wall, hu_lumen, tid, allow, clip_cav=True, lumen_fn=None):
    radii = np.broadcast_to(np.asarray(radii, np.float32), (len(pts),))

    def walls(sl, X, Y, Z, dist, rad, cy):
        m = dist <= rad + wall
        cv.paint(sl, m & cv.cav[sl] if clip_cav else m, tid, hu_wall, allow)

    def lumen(sl, X, Y, Z, dist, rad, cy):
        m = dist <= rad
        m = m & cv.cav[sl] if clip_cav else m
        val = lumen_fn(X, Y, Z, rad, cy) if lumen_fn is not None else hu_lumen
        cv.paint(sl, m, tid, val, _lut(tid) | allow)

    if wall > 0:
        _segments(cv, pts, radii, walls, pad=wall)
    _segments(cv, pts, radii, lumen)


def _draw_organs(cv, A):
    H = A.hu
    soft_cav = _lut(CAVFAT)
    not_bone = _lut(BONE, invert=True)
    # heart (above the diaphragm) with pericardial fat
    above = lambda X, Y, Z: Z > _zd(A, X, Y) + 3  # noqa: E731
    hc, hr = A.heart_c, A.heart_r
    allow_th = _lut(LUNG, CAVFAT, MUSCLE)
    _ellipsoid_paint(cv, hc, hr * 1.1, CAVFAT, A.hu_cavfat, allow_th, extra=above)
    _ellipsoid_paint(cv, hc, hr, HEART, H["myocardium"], allow_th | _lut(HEART), extra=above)
    _ellipsoid_paint(cv, hc + [5, 0, 5], hr * 0.72, HEART, H["blood"], _lut(HEART), extra=above)
    # lung vessels
    for p0, p1, r in A.lung_segs:
        _segments(cv, [p0, p1], [r, r * 0.7],
                  lambda sl, X, Y, Z, d, rad, cy: cv.paint(sl, d <= rad, LUNG, 40.0, _lut(LUNG)))
    # small bowel: walls then lumens, fluid with an occasional air pocket (air anterior: the patient is supine)
    allow_b = _lut(CAVFAT, BOWEL)
    for lp in A.loops:
        def lum(X, Y, Z, rad, cy, lp=lp):
            v = np.full(np.broadcast_shapes(X.shape, Y.shape, Z.shape), lp["fill"], np.float32)
            if lp["air"] is not None:
                v = np.where(Y > cy + lp["air"] * rad, -1000.0, v)
            return v
        _tube_paint(cv, lp["pts"], lp["r"], lp["wall"], H["bowel_wall"], None, BOWEL, allow_b, lumen_fn=lum)
    # colon: air anterior, mottled stool posterior
    cf = A.colon_field

    def colon_lumen(X, Y, Z, rad, cy):
        fld = cf.grid(X, Y, Z)
        stool = np.where(fld > 0.9, -700.0, 25.0 + 15 * fld).astype(np.float32)
        return np.where(Y > cy + A.colon_air * rad, -1000.0, stool)
    _tube_paint(cv, A.colon_pts, A.colon_r, 2.5, H["bowel_wall"], None, COLON, _lut(CAVFAT, BOWEL),
                lumen_fn=colon_lumen)
    for p0, p1, r in A.mes_segs:
        _segments(cv, [p0, p1], [r, r], lambda sl, X, Y, Z, d, rad, cy: cv.paint(sl, (d <= rad) & cv.cav[sl], CAVFAT,
                                                                                 H["portal"] * 0.8, _lut(CAVFAT)))
    # psoas (grows below its origin), kidneys, spleen, stomach, pancreas, vessels, gallbladder
    psoas_allow = _lut(CAVFAT, BOWEL, COLON)
    for side in (1, -1):
        box = (side * 80 - 60, A.y_vb - 40, A.z_bot - 10), (side * 80 + 60, A.y_vb + 40, A.psoas_top)
        for sl, (X, Y, Z) in cv.boxes(*box):
            r = A.psoas_r * np.clip((A.psoas_top - Z) / 110, 0, 1) ** 0.6
            cx = side * (A.vb_rx + r * 0.8)
            m = ((X - cx) ** 2 + ((Y - A.y_vb - 3) * 1.15) ** 2) <= r * r
            cv.paint(sl, m, MUSCLE, H["muscle"], psoas_allow)
    kid_allow = _lut(CAVFAT, BOWEL, COLON, MUSCLE)
    for k in A.kidneys:
        c, r, tilt, side = k["c"], k["r"], k["tilt"], k["side"]
        for sl, (X, Y, Z) in cv.boxes(c - r * 1.3, c + r * 1.3):
            dx, dy, dz = X - c[0], Y - c[1], Z - c[2]
            dx, dz = math.cos(tilt) * dx - math.sin(tilt) * dz, math.sin(tilt) * dx + math.cos(tilt) * dz
            f = (dx / r[0]) ** 2 + (dy / r[1]) ** 2 + (dz / r[2]) ** 2 + 0.08 * A.kid_field.grid(X, Y, Z)
            sinus = (((dx + side * r[0] * 0.55) / (r[0] * 0.55)) ** 2 + (dy / (r[1] * 0.45)) ** 2
                     + (dz / (r[2] * 0.5)) ** 2)
            val = np.where(f < 0.5, H["medulla"], H["cortex"]).astype(np.float32)
            val = np.where(sinus <= 1, np.where(sinus < 0.3, 10.0, -80.0), val)
            cv.paint(sl, (f <= 1) & cv.cav[sl], KIDNEY, val, kid_allow)
    spl_val = H["spleen"]

    def spleen_val(f, X, Y, Z):
        if A.phase == 1:  # arterial: arciform, mottled
            return spl_val + 25 * A.spl_field.grid(X, Y, Z)
        return spl_val
    c, r, th = A.spl_c, A.spl_r, A.spl_th
    for sl, (X, Y, Z) in cv.boxes(c - r.max() * 1.3, c + r.max() * 1.3):
        dx, dy, dz = X - c[0], Y - c[1], Z - c[2]
        ur = math.cos(th) * dx + math.sin(th) * dy
        ut = -math.sin(th) * dx + math.cos(th) * dy
        f = ((ur + 0.35 * ut * ut / r[1]) / r[0]) ** 2 + (ut / r[1]) ** 2 + (dz / r[2]) ** 2
        f = f + 0.12 * A.spl_field.grid(X, Y, Z)
        m = (f <= 1) & cv.cav[sl] & (Z < _zd(A, X, Y) - 3)
        cv.paint(sl, m, SPLEEN, spleen_val(f, X, Y, Z), _lut(CAVFAT, BOWEL, COLON, MUSCLE))
    below = lambda X, Y, Z: Z < _zd(A, X, Y) - 3  # noqa: E731
    sp = A.stomach_pts
    air_level = float((sp[:, 1] + A.stomach_r).max()) - A.stomach_air

    def stomach_lumen(X, Y, Z):
        return np.where(Y > air_level, -1000.0, A.stomach_fill).astype(np.float32) + 0 * Z

    allow_s = _lut(CAVFAT, BOWEL, COLON)

    def s_wall(sl, X, Y, Z, dist, rad, cy):
        cv.paint(sl, (dist <= rad + A.stomach_wall) & cv.cav[sl] & below(X, Y, Z), STOMACH, H["bowel_wall"], allow_s)

    def s_lumen(sl, X, Y, Z, dist, rad, cy):
        cv.paint(sl, (dist <= rad) & cv.cav[sl] & below(X, Y, Z), STOMACH, stomach_lumen(X, Y, Z),
                 _lut(STOMACH))
    _segments(cv, sp, A.stomach_r, s_wall, pad=A.stomach_wall)
    _segments(cv, sp, A.stomach_r, s_lumen)

    pf = A.panc_field

    def panc(sl, X, Y, Z, dist, rad, cy):
        m = dist <= rad * (1 + 0.15 * pf.grid(X, Y, Z))
        cv.paint(sl, m & cv.cav[sl], PANCREAS, H["pancreas"], _lut(CAVFAT, BOWEL, COLON, STOMACH))
    _segments(cv, A.panc_pts, A.panc_r, panc)
    allow_v = _lut(CAVFAT, BOWEL, COLON, PANCREAS, MUSCLE, STOMACH)
    _tube_paint(cv, A.splenic_v, 4.5, 0, None, H["portal"], PORTAL, allow_v)
    _tube_paint(cv, A.portal_trunk, A.portal_r, 0, None, H["portal"], PORTAL, allow_v)
    vessel_allow = _lut(BONE, LUNG, invert=True)
    _tube_paint(cv, A.aorta_pts, A.aorta_r, 0, None, H["aorta"], AORTA, vessel_allow, clip_cav=False)
    _tube_paint(cv, A.ivc_pts, A.ivc_r, 0, None, H["ivc"], IVC, vessel_allow & _lut(AORTA, invert=True), clip_cav=False)
    if A.gb is not None:
        _tube_paint(cv, A.gb["pts"], A.gb["r"], 1.5, H["bowel_wall"], A.gb["hu"], GALLBLADDER,
                    _lut(CAVFAT, BOWEL, COLON, STOMACH))


def _draw_liver(cv, A):
    H = A.hu
    lo = (A.xtip - 15, A.cyR - A.ryR - 40, -A.Lcc - 10)
    hi = (A.cxR + A.rxR + A.shiftR + 15, A.b_in + 10, 10)
    allow = _lut(CAVFAT, BOWEL, COLON, STOMACH, PANCREAS, PORTAL, MUSCLE)
    for sl, (X, Y, Z) in cv.boxes(lo, hi):
        f = _liver_f(A, X, Y, Z) + A.liver_amp * A.liver_field.grid(X, Y, Z)
        m = (f <= 1) & cv.cav[sl] & (Z < _zd(A, X, Y) - 3)
        m &= (X ** 2 + (Y - A.y_vb) ** 2) > (A.vb_rx + 12) ** 2
        cv.paint(sl, m, LIVER, H["liver"] + 3 * A.liver_tex.grid(X, Y, Z), allow, label=1)
    for segs, hu in ((A.por_segs, H["portal"]), (A.hep_segs, H["hepatic"])):
        for p0, p1, r0, r1 in segs:
            _segments(cv, [p0, p1], [r0, r1], lambda sl, X, Y, Z, d, rad, cy, hu=hu: cv.paint(
                sl, d <= rad, LVESSEL, hu, _lut(LIVER, LVESSEL), label=1))
    for t in A.tumours:
        c, r = t["c"], t["r"]
        base = H["liver"] + t["delta"]
        for sl, (X, Y, Z) in cv.boxes(c - r * 1.4, c + r * 1.4):
            fld = t["field"].grid(X, Y, Z)
            f = np.sqrt(((X - c[0]) / r[0]) ** 2 + ((Y - c[1]) / r[1]) ** 2 + ((Z - c[2]) / r[2]) ** 2) + t["lob"] * fld
            val = base + 4 * fld
            if t["kind"] == "rim":
                rim = min(0.35, max(2.0, 0.1 * t["dia"]) / (t["dia"] / 2))
                val = np.where(f > 1 - rim, H["liver"] + t["rim"], val)
            elif t["dia"] > 40 and t["kind"] == "hypo":  # necrotic centre
                val = np.where(f < 0.45, base - 15, val)
            cv.paint(sl, f <= 1, TUMOUR, val, _lut(LIVER, LVESSEL, TUMOUR), label=2)


def _draw_bones(cv, A, cav_in, r2, tb):
    xs, ys, zs = cv.ax
    # spine: vertebral bodies with cortex, discs, canal, posterior elements
    i0, i1 = np.searchsorted(xs, -60), np.searchsorted(xs, 60, side="right")
    yc_canal = A.y_vb - A.vb_ry - A.canal_r - 2
    j0, j1 = np.searchsorted(ys, yc_canal - A.canal_r - 40), np.searchsorted(ys, A.y_vb + A.vb_ry + 3, side="right")
    X, Y = xs[i0:i1, None], ys[None, j0:j1]
    ev = (X / A.vb_rx) ** 2 + ((Y - A.y_vb) / A.vb_ry) ** 2
    ev_in = (X / (A.vb_rx - A.sp_cort)) ** 2 + ((Y - A.y_vb) / (A.vb_ry - A.sp_cort)) ** 2
    rcan = np.sqrt(X ** 2 + (Y - yc_canal) ** 2)
    ring = (rcan > A.canal_r) & (rcan < A.canal_r + 6) & (Y < A.y_vb - A.vb_ry + 3)
    spinous = (np.abs(X) < 4) & (Y < yc_canal - A.canal_r) & (Y > yc_canal - A.canal_r - 35)
    transverse = (np.abs(X) > 8) & (np.abs(X) < 42) & (np.abs(Y - yc_canal - 3) < 5)
    for k, z in enumerate(zs):
        s = (z - A.sp_phase) % A.sp_pitch
        h, t, lab = cv.hu[i0:i1, j0:j1, k], cv.tissue[i0:i1, j0:j1, k], cv.label[i0:i1, j0:j1, k]
        if s < A.sp_disc:
            m = ev <= 1
            h[m], t[m] = A.hu_disc, DISC
        else:
            m = ev <= 1
            h[m], t[m] = A.hu_cort, BONE
            mi = ev_in <= 1
            h[mi] = A.hu_cancel
            post = ring | (spinous if s < A.sp_pitch * 0.7 else False) | (transverse if s > A.sp_pitch * 0.5 else False)
            h[post], t[post] = A.hu_cort * 0.85, BONE
            m = m | post
        lab[m] = 0
        c = rcan <= A.canal_r
        h[c], t[c], lab[c] = A.hu_canal, CANAL, 0
    # ribs: arcs just outside the cavity, posterior end higher than the anterior end; costal cartilage anteriorly
    X2, Y2 = xs[:, None], ys[None, :]
    phi = np.arccos(np.clip(-Y2 / np.maximum(r2, 1e-3), -1, 1))  # 0 posterior .. pi anterior
    vphi = A.rib_D * phi / np.pi
    nrib = len(A.rib_end)
    for k, z in enumerate(zs):
        rc = cav_in[k][tb] + A.rib_off + A.rib_t / 2
        dr = np.abs(r2 - rc)
        near = dr < A.rib_t / 2
        if not near.any():
            continue
        jf = (z + vphi - A.z12) / A.rib_P
        j = np.rint(jf)
        dz = np.abs(jf - j) * A.rib_P
        ji = np.clip(j.astype(int), 0, nrib - 1)
        rib = near & (j >= 0) & (j < nrib) & (dz < A.rib_h / 2) & (phi > 0.14 * np.pi) & (phi <= A.rib_end[ji])
        if not rib.any():
            continue
        marrow = rib & (dr < A.rib_t / 2 - 1.5) & (dz < A.rib_h / 2 - 1.5)
        cart = rib & (phi > 0.8 * np.pi)
        h, t, lab = cv.hu[:, :, k], cv.tissue[:, :, k], cv.label[:, :, k]
        h[rib], t[rib], lab[rib] = A.rib_hu, BONE, 0
        h[marrow] = A.hu_cancel
        h[cart] = A.cart_hu
        # sternum / xiphoid at the top
        if z > A.xiphoid_z:
            rst = cav_in[k][np.argmin(np.abs(_TH - np.pi / 2))] + 8
            st = (np.abs(X2) < (14 if z > A.xiphoid_z + 30 else 7)) & (np.abs(Y2 - rst) < 6)
            h[st], t[st], lab[st] = A.hu_cancel + 150, BONE, 0
    # arms beside the body: fat, muscle, humerus
    if A.arms:
        a = A.arm
        skin0 = _skin_R(A, np.array([0.0, np.pi]), np.array([0.0]))[0]
        for side, sk in ((1, skin0[0]), (-1, skin0[1])):
            cx = side * (sk + a["gap"] + a["r"])
            d = np.sqrt((X2 - cx) ** 2 + (Y2 - a["y"]) ** 2)
            dh = np.sqrt((X2 - cx - side * 5) ** 2 + (Y2 - a["y"] + 5) ** 2)
            for m, v, tid in ((d < a["r"], A.hu_fat, ARM), (d < a["r"] - a["fat"], A.hu["muscle"], ARM),
                              (dh < a["hr"], a["hu_cort"], BONE), (dh < a["hr"] - 4, -20.0, BONE)):
                m3 = np.broadcast_to(m[:, :, None], cv.hu.shape)
                cv.hu[m3], cv.tissue[m3] = v, tid


def _scanner(hu, G, rng):
    """Reconstruction kernel, slice profile, correlated noise; returns int16 in place of ``hu`` slice by slice."""
    s_xy = math.sqrt((G.kernel / G.sp) ** 2 + 0.35 ** 2)
    s_z = math.sqrt((G.thickness / 2.355 / G.spz) ** 2 + 0.2 ** 2)
    for i in range(0, hu.shape[0], 64):
        hu[i:i + 64] = ndimage.gaussian_filter1d(hu[i:i + 64], s_z, axis=2, mode="nearest")
    delta = np.zeros((31, 31), np.float32)
    delta[15, 15] = 1
    gain = 1.0 / float(np.sqrt((ndimage.gaussian_filter(delta, G.noise_corr) ** 2).sum()))
    out = np.empty(hu.shape, np.int16)
    for k in range(hu.shape[2]):
        sl = ndimage.gaussian_filter(hu[:, :, k], s_xy, mode="nearest")
        if G.sharpen:
            sl += G.sharpen * (sl - ndimage.gaussian_filter(sl, 2 * s_xy, mode="nearest"))
        noise = ndimage.gaussian_filter(rng.standard_normal(sl.shape, dtype=np.float32), G.noise_corr)
        sl += noise * (G.noise * gain)
        out[:, :, k] = np.clip(np.rint(sl), -1024, 3071)
    return out


def draw(seed: int, spec: PhantomSpec = PhantomSpec()):
    """Canonical (RAS) scene of one case: (image int16, label, tissue map, affine, anatomy, geometry)."""
    rng_anat, rng_scan, rng_noise = np.random.default_rng(seed).spawn(3)
    A = anatomy(rng_anat, spec.max_tumours, spec.phase_weights, spec.arms_probability)
    G = scan_geometry(rng_scan, A, spec)
    cv = _Canvas(G.xs, G.ys, G.zs)
    _, cav_in, r2, tb = _draw_body(cv, A)
    _draw_organs(cv, A)
    _draw_liver(cv, A)
    _draw_bones(cv, A, cav_in, r2, tb)
    image = _scanner(cv.hu, G, rng_noise)
    del cv.hu
    affine = np.diag([G.sp, G.sp, G.spz, 1.0])
    affine[:3, 3] = np.array([G.xs[0], G.ys[0], G.zs[0]]) + G.origin_shift
    return image, cv.label, cv.tissue, affine, A, G


def generate(seed: int, spec: PhantomSpec = PhantomSpec()) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (image int16, label uint8, affine) for one phantom case, deterministic in ``seed``."""
    image, label, _, affine, _, G = draw(seed, spec)
    transform = ornt_transform(axcodes2ornt(("R", "A", "S")), axcodes2ornt(G.orient))
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
