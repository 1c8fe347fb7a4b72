"""Synthetic CT: procedural KiTS-style phantoms, and CT rendered for real KiTS label maps.

Both paths share one abdomen model (body, fat, muscle, spine, aorta, IVC, liver, spleen, bowel)
and one painter for the labelled structures (kidney cortex/medulla by depth, heterogeneous tumor,
water-density cysts), so a model trained on one sees the same tissue statistics on the other.

Everything is generated in the canonical ``(Z, Y, X)`` RAS+ frame (``Z`` superior, ``Y`` anterior,
``X`` towards the patient's right) in mm, then written in the KiTS19 layout: array
``(slices, H, W)``, orientation IPL.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from scipy import ndimage

F32 = npt.NDArray[np.float32]

AIR, FAT, MUSCLE, WATER = -1000.0, -95.0, 50.0, 5.0


def smooth_noise(shape: tuple[int, ...], rng: np.random.Generator, cell: float) -> F32:
    """Zero-mean, unit-ish std noise with features about ``cell`` voxels wide (trilinear upsampling
    of a coarse Gaussian grid; torch does it an order of magnitude faster than scipy's zoom)."""
    low = tuple(max(2, int(np.ceil(s / cell)) + 1) for s in shape)
    base = torch.from_numpy(rng.standard_normal(low).astype(np.float32))
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(shape)]
    out = F.interpolate(base[None, None], size=shape, mode=mode, align_corners=True)[0, 0]
    return np.ascontiguousarray(out.numpy())


@dataclass
class Grid:
    """World coordinates (mm) of the canonical ``(Z, Y, X)`` grid, axis by axis."""

    z: F32
    y: F32
    x: F32

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.z.size, self.y.size, self.x.size)

    @property
    def spacing(self) -> tuple[float, float, float]:
        def sp(a: F32) -> float:
            return float(a[1] - a[0]) if a.size > 1 else 1.0

        return (sp(self.z), sp(self.y), sp(self.x))

    @classmethod
    def centred(cls, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> Grid:
        axes = [((np.arange(n) - (n - 1) / 2) * s).astype(np.float32) for n, s in zip(shape, spacing, strict=True)]
        return cls(z=axes[0], y=axes[1], x=axes[2])

    def bbox(self, centre: npt.ArrayLike, radius: float) -> tuple[slice, slice, slice]:
        c = np.asarray(centre, dtype=np.float64)
        out = []
        for axis, ci in zip((self.z, self.y, self.x), c, strict=True):
            lo = int(np.searchsorted(axis, ci - radius))
            hi = int(np.searchsorted(axis, ci + radius)) + 1
            out.append(slice(max(0, lo), min(axis.size, hi)))
        return (out[0], out[1], out[2])

    def local(self, sl: tuple[slice, slice, slice], centre: npt.ArrayLike) -> tuple[F32, F32, F32]:
        c = np.asarray(centre, dtype=np.float32)
        return (
            self.z[sl[0]][:, None, None] - c[0],
            self.y[sl[1]][None, :, None] - c[1],
            self.x[sl[2]][None, None, :] - c[2],
        )


def rotation(rng: np.random.Generator, max_deg: float) -> npt.NDArray[np.float32]:
    angles = np.deg2rad(rng.uniform(-max_deg, max_deg, size=3))
    cz, cy, cx = np.cos(angles)
    sz, sy, sx = np.sin(angles)
    rz = np.array([[1, 0, 0], [0, cz, -sz], [0, sz, cz]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[cx, -sx, 0], [sx, cx, 0], [0, 0, 1]])
    return (rz @ ry @ rx).astype(np.float32)


def ellipsoid(
    grid: Grid,
    centre: npt.ArrayLike,
    axes: tuple[float, float, float],
    rot: npt.NDArray[np.float32] | None = None,
    wobble: float = 0.0,
    rng: np.random.Generator | None = None,
) -> tuple[tuple[slice, slice, slice], F32]:
    """Normalised radius field (``<1`` inside) of a rotated, optionally wobbly ellipsoid, in its bbox."""
    sl = grid.bbox(centre, max(axes) * (1.0 + wobble) + 2.0)
    dz, dy, dx = grid.local(sl, centre)
    if rot is not None:
        r = rot
        u = r[0, 0] * dz + r[0, 1] * dy + r[0, 2] * dx
        v = r[1, 0] * dz + r[1, 1] * dy + r[1, 2] * dx
        w = r[2, 0] * dz + r[2, 1] * dy + r[2, 2] * dx
    else:
        u, v, w = dz, dy, dx
    rad = np.sqrt((u / axes[0]) ** 2 + (v / axes[1]) ** 2 + (w / axes[2]) ** 2).astype(np.float32)
    if wobble > 0 and rng is not None and rad.size:
        shape = rad.shape
        # Low-frequency surface perturbation: scale the radius by smooth noise.
        cell = max(2.0, min(shape) / 2.0)
        rad = rad * (1.0 + wobble * smooth_noise(shape, rng, cell))
    return sl, rad


@dataclass
class Abdomen:
    """Parameters of one synthetic abdomen (mm, HU)."""

    centre_xy: tuple[float, float]
    semi_x: float
    semi_y: float
    fat_mm: float
    spine_y: float
    phase: str  # "arterial" | "venous" | "nephrographic"


def sample_abdomen(rng: np.random.Generator, centre_xy: tuple[float, float] = (0.0, 0.0)) -> Abdomen:
    semi_y = float(rng.uniform(95, 130))
    return Abdomen(
        centre_xy=centre_xy,
        semi_x=float(rng.uniform(135, 175)),
        semi_y=semi_y,
        fat_mm=float(rng.uniform(6, 32)),
        spine_y=float(centre_xy[1] - semi_y * rng.uniform(0.38, 0.5)),
        phase=str(rng.choice(["arterial", "venous", "nephrographic"])),
    )


def render_abdomen(grid: Grid, ab: Abdomen, rng: np.random.Generator, kidney_z: float = 0.0) -> F32:
    """HU of everything but the labelled structures, on the canonical grid.

    Structures that do not change along z are painted as 2D masks into every slice in place
    (no full-volume temporaries); only the body outline, psoas, discs and the liver and spleen vary
    with z.
    """
    yy, xx = grid.y[:, None], grid.x[None, :]
    cx, cy = ab.centre_xy
    shape = grid.shape
    hu = np.full(shape, AIR, dtype=np.float32)
    phase0 = rng.uniform(0, 6)
    inner_x, inner_y = ab.semi_x - ab.fat_mm, ab.semi_y - ab.fat_mm
    wall = 10.0
    # Visceral fat with bowel loops: smooth noise thresholded into soft-tissue blobs.
    # (The order of random draws is part of the phantoms' definition: keep it.)
    blobs = smooth_noise(shape, rng, cell=max(3.0, 18.0 / grid.spacing[2])) > 0.35
    bowel_v = np.float32(rng.uniform(15, 45))
    fat_v = np.float32(rng.uniform(-110, -70))
    for k, z in enumerate(grid.z):
        sc = 1.0 + 0.04 * np.sin(z / 60.0 + phase0)  # the body outline varies a little along z
        sl = hu[k]
        sl[((xx - cx) / (ab.semi_x * sc)) ** 2 + ((yy - cy) / (ab.semi_y * sc)) ** 2 <= 1.0] = FAT
        sl[((xx - cx) / (inner_x * sc)) ** 2 + ((yy - cy) / (inner_y * sc)) ** 2 <= 1.0] = MUSCLE
        cav = ((xx - cx) / ((inner_x - wall) * sc)) ** 2 + ((yy - cy) / ((inner_y - wall) * sc)) ** 2 <= 1.0
        sl[cav] = np.where(blobs[k][cav], bowel_v, fat_v)
        # Psoas muscles either side of the spine, wider inferiorly.
        psoas_r = 12.0 + 8.0 * float(np.clip((kidney_z - z) / 120.0, 0, 1))
        for side in (-1, 1):
            sl[((xx - (cx + side * 32)) / psoas_r) ** 2 + ((yy - (ab.spine_y + 4)) / (psoas_r * 1.2)) ** 2 <= 1.0] = (
                MUSCLE + 5
            )

    # z-invariant structures: paraspinal muscles, spine, canal, aorta, IVC.
    def paint(mask2d: npt.NDArray[np.bool_], value: float) -> None:
        hu[:, mask2d] = np.float32(value)

    for side in (-1, 1):
        paint(((xx - (cx + side * 28)) / 22.0) ** 2 + ((yy - (ab.spine_y - 38)) / 20.0) ** 2 <= 1.0, MUSCLE)
    r_vb = np.sqrt((xx - cx) ** 2 + (yy - ab.spine_y) ** 2)
    disc_off = rng.uniform(0, 35)
    discs = np.mod(grid.z + disc_off, 35.0) < 6.0
    paint(r_vb <= 20.0, rng.uniform(180, 280))
    shell = (r_vb > 17.5) & (r_vb <= 20.0)
    for k in np.nonzero(~discs)[0]:
        hu[k][shell] = 650.0
    for k in np.nonzero(discs)[0]:
        hu[k][r_vb <= 20.0] = 80.0
    r_canal = np.sqrt((xx - cx) ** 2 + (yy - (ab.spine_y - 28)) ** 2)
    paint((r_canal <= 14.0) & (r_canal > 8.0), 500.0)
    paint(r_canal <= 8.0, 20.0)
    aorta_hu = {"arterial": 320.0, "venous": 170.0, "nephrographic": 140.0}[ab.phase]
    ivc_hu = {"arterial": 70.0, "venous": 150.0, "nephrographic": 130.0}[ab.phase]
    paint(np.sqrt((xx - (cx - 18)) ** 2 + (yy - (ab.spine_y + 30)) ** 2) <= rng.uniform(9, 13), aorta_hu)
    paint(((xx - (cx + 22)) / 14.0) ** 2 + ((yy - (ab.spine_y + 30)) / 10.0) ** 2 <= 1.0, ivc_hu)
    # Liver (patient right, +x) and spleen (left), superior to the kidneys' centre.
    liver_hu = {"arterial": 75.0, "venous": 110.0, "nephrographic": 105.0}[ab.phase]
    sl3, rad = ellipsoid(
        grid,
        (kidney_z + rng.uniform(50, 90), cy + rng.uniform(-5, 25), cx + ab.semi_x * rng.uniform(0.35, 0.5)),
        (rng.uniform(70, 100), ab.semi_y * rng.uniform(0.6, 0.8), ab.semi_x * rng.uniform(0.45, 0.6)),
        rot=rotation(rng, 10),
        wobble=0.08,
        rng=rng,
    )
    sub = hu[sl3]
    sub[(rad <= 1.0) & (sub > -500)] = liver_hu
    sl3, rad = ellipsoid(
        grid,
        (kidney_z + rng.uniform(40, 70), ab.spine_y + rng.uniform(10, 35), cx - ab.semi_x * rng.uniform(0.45, 0.6)),
        (rng.uniform(35, 55), rng.uniform(20, 30), rng.uniform(18, 28)),
        rot=rotation(rng, 20),
        wobble=0.08,
        rng=rng,
    )
    sub = hu[sl3]
    sub[(rad <= 1.0) & (sub > -500)] = liver_hu + rng.uniform(0, 20)
    return hu


def paint_labels(
    hu: F32,
    seg: npt.NDArray[np.uint8],
    spacing: tuple[float, float, float],
    rng: np.random.Generator,
    phase: str,
) -> None:
    """Paint kidney (cortex/medulla by depth), tumor, cyst and perirenal fat into ``hu`` in place."""
    fg = seg > 0
    if not fg.any():
        return
    idx = np.nonzero(fg)
    margin = [int(np.ceil(12.0 / s)) + 1 for s in spacing]
    sl = tuple(
        slice(max(0, int(i.min()) - m), min(n, int(i.max()) + m + 1))
        for i, m, n in zip(idx, margin, hu.shape, strict=True)
    )
    s = seg[sl]
    h = hu[sl]
    kidney = s == 1
    fgs = s > 0
    # Perirenal fat: a few mm of fat around the kidney, inside the body.
    dist_out = ndimage.distance_transform_edt(~fgs, sampling=spacing)
    rim = (dist_out > 0) & (dist_out <= rng.uniform(3, 8)) & (h > -500) & (h < 400)
    h[rim] = FAT + rng.uniform(-10, 15)
    # Kidney: cortex within ~5 mm of the surface, medulla deeper.
    depth = ndimage.distance_transform_edt(kidney, sampling=spacing)
    cortex_mm = rng.uniform(4, 7)
    cortex_hu, medulla_hu = {
        "arterial": (rng.uniform(170, 230), rng.uniform(70, 110)),
        "venous": (rng.uniform(150, 200), rng.uniform(110, 150)),
        "nephrographic": (rng.uniform(150, 190), rng.uniform(140, 180)),
    }[phase]
    k_hu = np.where(depth <= cortex_mm, cortex_hu, medulla_hu).astype(np.float32)
    k_hu += 8.0 * smooth_noise(s.shape, rng, cell=4.0)
    h[kidney] = k_hu[kidney]
    # Tumor: lower, heterogeneous enhancement; big ones get a necrotic core.
    tumor = s == 2
    if tumor.any():
        t_mean = rng.uniform(35, 110)
        tex = t_mean + rng.uniform(10, 28) * smooth_noise(s.shape, rng, cell=rng.uniform(2.5, 6))
        tdepth = ndimage.distance_transform_edt(tumor, sampling=spacing)
        if tdepth.max() > 12 and rng.random() < 0.6:
            core = tdepth > tdepth.max() * rng.uniform(0.45, 0.7)
            tex = np.where(core, rng.uniform(5, 30), tex)
        h[tumor] = tex[tumor].astype(np.float32)
    cyst = s == 3
    if cyst.any():
        h[cyst] = WATER + rng.uniform(0, 12)
    hu[sl] = h


def add_noise(hu: F32, rng: np.random.Generator, spacing: tuple[float, float, float]) -> F32:
    """Partial-volume blur, then CT-like noise; air stays near -1000."""
    sigma = [min(0.8, 0.6 / max(s, 0.3)) for s in spacing]
    out = ndimage.gaussian_filter(hu, sigma=sigma, output=np.float32)
    noise = rng.standard_normal(hu.shape, dtype=np.float32)
    noise *= np.float32(rng.uniform(6, 20))
    out += noise
    np.clip(out, -1024, 3071, out=out)
    return out


def kidney_geometry(
    grid: Grid, ab: Abdomen, rng: np.random.Generator, kidney_z: float, cysts: bool
) -> npt.NDArray[np.uint8]:
    """Labels of two bean-shaped kidneys with 0-2 tumors (some exophytic) and optional cysts."""
    seg = np.zeros(grid.shape, dtype=np.uint8)
    cx, _ = ab.centre_xy
    kidneys = []
    for side in (-1, 1):  # -1: patient left (-x), +1: patient right (+x)
        kz = kidney_z + (rng.uniform(5, 20) if side < 0 else rng.uniform(-15, 0))
        centre = np.array([kz, ab.spine_y + rng.uniform(8, 22), cx + side * rng.uniform(55, 75)], dtype=np.float32)
        axes = (rng.uniform(45, 60), rng.uniform(20, 27), rng.uniform(24, 31))
        rot = rotation(rng, 18)
        sl, rad = ellipsoid(grid, centre, axes, rot=rot, wobble=0.04, rng=rng)
        kid = rad <= 1.0
        # Renal sinus: a notch on the antero-medial side, left as unlabelled fat.
        hilum = centre + np.array([0.0, axes[1] * 0.5, -side * axes[2] * 0.75], dtype=np.float32)
        sl_h, rad_h = ellipsoid(grid, hilum, (axes[0] * 0.45, axes[1] * 0.55, axes[2] * 0.55))
        notch = np.zeros(grid.shape, dtype=bool)
        notch[sl_h] = rad_h <= 1.0
        sub = seg[sl]
        sub[kid & ~notch[sl]] = 1
        kidneys.append((centre, axes, rot))
    n_tumors = int(rng.choice([0, 1, 1, 1, 2], p=[0.12, 0.3, 0.3, 0.16, 0.12]))
    for _ in range(n_tumors):
        centre, axes, rot = kidneys[int(rng.integers(2))]
        direction = rng.standard_normal(3).astype(np.float32)
        direction /= np.linalg.norm(direction) + 1e-6
        # Position in the kidney's own frame, from central (0.3) to exophytic (1.25).
        depth = rng.uniform(0.3, 1.25)
        local = direction * np.array(axes, dtype=np.float32) * depth
        t_centre = centre + rot.T @ local
        radius = float(rng.choice([rng.uniform(6, 15), rng.uniform(15, 30), rng.uniform(30, 45)], p=[0.35, 0.45, 0.2]))
        t_axes = tuple(radius * rng.uniform(0.8, 1.2, size=3))
        sl, rad = ellipsoid(grid, t_centre, t_axes, rot=rotation(rng, 45), wobble=0.12, rng=rng)
        sub = seg[sl]
        sub[rad <= 1.0] = 2
    if cysts:
        for _ in range(int(rng.integers(0, 3))):
            centre, axes, rot = kidneys[int(rng.integers(2))]
            direction = rng.standard_normal(3).astype(np.float32)
            direction /= np.linalg.norm(direction) + 1e-6
            c_centre = centre + rot.T @ (direction * np.array(axes, dtype=np.float32) * rng.uniform(0.6, 1.1))
            r = float(rng.uniform(5, 16))
            sl, rad = ellipsoid(grid, c_centre, (r, r, r))
            sub = seg[sl]
            sub[(rad <= 1.0) & (sub != 2)] = 3
    return seg


def make_phantom(
    rng: np.random.Generator,
    inplane: int = 256,
    cysts: bool = False,
    slices: int | None = None,
) -> tuple[npt.NDArray[np.int16], npt.NDArray[np.uint8], tuple[float, float, float]]:
    """One procedural case in the canonical ``(Z, Y, X)`` frame: HU (int16), labels and spacing (mm).

    ``slices``: that many slices over the 15-22 cm of abdomen, instead of
    a slice thickness of 2.5-5 mm; for benchmarks that need one body at a given size.
    """
    pw = float(rng.uniform(360, 460) / inplane)  # field of view 36-46 cm
    st = float(rng.choice([2.5, 3.0, 4.0, 5.0]))  # drawn either way: the rest of the case keeps its draws
    extent = rng.uniform(150, 220)
    if slices is None:
        nz = round(extent / st)
    elif slices < 1:
        raise ValueError(f"slices must be at least 1, got {slices}")
    else:
        nz, st = slices, float(extent / slices)
    grid = Grid.centred((nz, inplane, inplane), (st, pw, pw))
    ab = sample_abdomen(rng, centre_xy=(float(rng.uniform(-15, 15)), float(rng.uniform(-10, 20))))
    kidney_z = float(rng.uniform(-25, 25))
    hu = render_abdomen(grid, ab, rng, kidney_z=kidney_z)
    seg = kidney_geometry(grid, ab, rng, kidney_z, cysts)
    # Labels live inside the body only.
    seg[hu <= -500] = 0
    paint_labels(hu, seg, grid.spacing, rng, ab.phase)
    hu = add_noise(hu, rng, grid.spacing)
    return np.round(hu).astype(np.int16), seg, grid.spacing


def render_for_labels(
    seg_zyx: npt.NDArray[np.uint8], spacing: tuple[float, float, float], rng: np.random.Generator
) -> npt.NDArray[np.int16]:
    """A plausible CT (int16 HU) for a real label map given in the canonical ``(Z, Y, X)`` frame.

    The abdomen is placed around the kidneys: the spine between them and behind, the body
    outline around that. Structures never overwrite labelled voxels.
    """
    grid = Grid.centred(seg_zyx.shape, spacing)  # type: ignore[arg-type]
    fg = np.nonzero(seg_zyx > 0)
    if fg[0].size:
        kz = float(grid.z[fg[0]].mean())
        ky = float(grid.y[fg[1]].mean())
        xs = grid.x[fg[2]]
        kx = float(0.5 * (xs.min() + xs.max())) if xs.size else 0.0
    else:
        kz, ky, kx = 0.0, 0.0, 0.0
    ab = sample_abdomen(rng)
    ab.spine_y = ky - rng.uniform(8, 20)
    ab.centre_xy = (kx, ab.spine_y + ab.semi_y * rng.uniform(0.38, 0.5))
    if fg[0].size:
        # Make sure the body contains every labelled voxel.
        half_w = float(np.abs(grid.x[fg[2]] - kx).max()) + 40.0
        ab.semi_x = max(ab.semi_x, half_w + ab.fat_mm)
    hu = render_abdomen(grid, ab, rng, kidney_z=kz)
    hu[seg_zyx > 0] = MUSCLE  # keep placeholders out of air before painting
    paint_labels(hu, seg_zyx, grid.spacing, rng, ab.phase)
    hu = add_noise(hu, rng, grid.spacing)
    return np.round(hu).astype(np.int16)
