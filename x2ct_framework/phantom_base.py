"""The phantom's drawing primitives, shared by its versions: the canvas (HU and labels painted by signed
distance in millimetres), the shape functions and version 1's anatomy draw that version 2 extends."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch

from x2ct_framework.conventions import AIR, BONE, FAT, HEART, LUNG, SOFT, TABLE, VESSEL  # noqa: F401


def _triple(v, name: str) -> tuple:
    if isinstance(v, (int, float)):
        return (v, v, v)
    if len(v) != 3:
        raise ValueError(f"{name}: expected one number or three (D, H, W), got {v!r}")
    return tuple(v)


class _Canvas:
    """The HU volume, the label map and the patient coordinates of every voxel."""

    def __init__(self, shape: tuple[int, int, int], volume_mm: tuple[float, float, float], rotation_deg: float,
                 shift_mm: tuple[float, float, float]):
        self.shape = shape
        d, h, w = shape
        self.size = volume_mm  # (x, y, z) mm
        self.vox = (volume_mm[0] / w, volume_mm[1] / h, volume_mm[2] / d)
        self.vmean = sum(self.vox) / 3
        self.hu = torch.full(shape, -1000.0)
        self.labels = torch.zeros(shape, dtype=torch.uint8)
        self.wx = ((torch.arange(w) + 0.5) / w - 0.5) * volume_mm[0]  # world coordinates of voxel centres
        self.wy = ((torch.arange(h) + 0.5) / h - 0.5) * volume_mm[1]
        self.wz = ((torch.arange(d) + 0.5) / d - 0.5) * volume_mm[2]
        th = math.radians(rotation_deg)
        self.c, self.s = math.cos(th), math.sin(th)
        self.shift = shift_mm

    def coords(self, sl=(slice(None),) * 3):
        """Patient coordinates (x [1, h, w], y [1, h, w], z [d, 1, 1]) of the voxels in a box."""
        wx = self.wx[sl[2]][None, None, :] - self.shift[0]
        wy = self.wy[sl[1]][None, :, None] - self.shift[1]
        x = self.c * wx + self.s * wy
        y = -self.s * wx + self.c * wy
        z = (self.wz[sl[0]] - self.shift[2])[:, None, None]
        return x, y, z

    def world_point(self, p: Sequence[float]) -> tuple[float, float, float]:
        """Patient -> world: a turn about z, then the shift."""
        return (self.c * p[0] - self.s * p[1] + self.shift[0], self.s * p[0] + self.c * p[1] + self.shift[1],
                p[2] + self.shift[2])

    def box(self, lo: Sequence[float], hi: Sequence[float]):
        """Index slices of the world box holding the patient box [lo, hi] (mm), or None when outside."""
        corners = [self.world_point((x, y, lo[2])) for x in (lo[0], hi[0]) for y in (lo[1], hi[1])]
        xs, ys = [c[0] for c in corners], [c[1] for c in corners]
        zs = (lo[2] + self.shift[2], hi[2] + self.shift[2])
        out = []
        for vals, n, v, half in ((xs, self.shape[2], self.vox[0], self.size[0] / 2),
                                 (ys, self.shape[1], self.vox[1], self.size[1] / 2),
                                 (zs, self.shape[0], self.vox[2], self.size[2] / 2)):
            a = max(int(math.floor((min(vals) + half) / v - 0.5)), 0)
            b = min(int(math.ceil((max(vals) + half) / v - 0.5)) + 1, n)
            if a >= b:
                return None
            out.append(slice(a, b))
        return (out[2], out[1], out[0])

    def cover(self, sd: torch.Tensor) -> torch.Tensor:
        """Partial-volume coverage of a voxel from an (approximate) signed distance in mm (< 0 inside)."""
        return (0.5 - sd / self.vmean).clamp(0.0, 1.0)

    def paint(self, cov: torch.Tensor, value, label: int | None, sl=(slice(None),) * 3) -> None:
        hu = self.hu[sl]
        hu += cov * (value - hu)
        if label is not None:
            self.labels[sl][(cov > 0.5).expand_as(hu)] = label

    def tube(self, points: Sequence[Sequence[float]], radii: Sequence[float], value, label: int | None,
             min_radius: float = 0.0) -> None:
        """A tapered tube along a polyline (patient mm); segments thinner than ``min_radius`` are skipped."""
        pts = [tuple(float(c) for c in p) for p in points]
        wpts = [self.world_point(p) for p in pts]
        for i in range(len(pts) - 1):
            r0, r1 = float(radii[i]), float(radii[i + 1])
            if max(r0, r1) < min_radius:
                continue
            self._capsule(pts[i], pts[i + 1], wpts[i], wpts[i + 1], r0, r1, value, label)

    def _capsule(self, a, b, wa, wb, r0, r1, value, label) -> None:
        pad = max(r0, r1) + self.vmean
        sl = self.box([min(p, q) - pad for p, q in zip(a, b)], [max(p, q) + pad for p, q in zip(a, b)])
        if sl is None:
            return
        abx, aby, abz = wb[0] - wa[0], wb[1] - wa[1], wb[2] - wa[2]
        ll = (abx * abx + aby * aby + abz * abz) or 1e-9
        x = self.wx[sl[2]][None, None, :] - wa[0]
        y = self.wy[sl[1]][None, :, None] - wa[1]
        z = self.wz[sl[0]][:, None, None] - wa[2]
        t = ((x * (abx / ll) + y * (aby / ll)) + z * (abz / ll)).clamp_(0.0, 1.0)
        dist = ((x - t * abx).square_() + (y - t * aby).square_() + (z - t * abz).square_()).sqrt_()
        self.paint(self.cover(dist - (r0 + t * (r1 - r0))), value, label, sl)


def _ellipse_sd(x, y, ax, ay):
    """Approximate signed distance to an axis-aligned ellipse (first order: f / |grad f|)."""
    q = ((x / ax) ** 2 + (y / ay) ** 2).sqrt().clamp_min(1e-6)
    grad = ((x / ax**2) ** 2 + (y / ay**2) ** 2).sqrt() / q
    return (q - 1.0) / grad.clamp_min(1e-6)


def _ellipsoid_sd(x, y, z, ax, ay, az):
    q = ((x / ax) ** 2 + (y / ay) ** 2 + (z / az) ** 2).sqrt().clamp_min(1e-6)
    grad = ((x / ax**2) ** 2 + (y / ay**2) ** 2 + (z / az**2) ** 2).sqrt() / q
    return (q - 1.0) / grad.clamp_min(1e-6)


def _smoothstep(e0: float, e1: float, v):
    t = ((v - e0) / (e1 - e0)).clamp(0, 1) if isinstance(v, torch.Tensor) else min(max((v - e0) / (e1 - e0), 0), 1)
    return t * t * (3 - 2 * t)


def _rotate(vec, axis, angle):
    """Rodrigues rotation of 3-vectors (tuples) about a unit axis."""
    c, s = math.cos(angle), math.sin(angle)
    kx, ky, kz = axis
    vx, vy, vz = vec
    dot = kx * vx + ky * vy + kz * vz
    cx, cy, cz = ky * vz - kz * vy, kz * vx - kx * vz, kx * vy - ky * vx
    return (vx * c + cx * s + kx * dot * (1 - c), vy * c + cy * s + ky * dot * (1 - c),
            vz * c + cz * s + kz * dot * (1 - c))


def _unit(v):
    n = math.sqrt(sum(c * c for c in v)) or 1.0
    return tuple(c / n for c in v)


class _Anatomy:
    """The case's anatomy in patient millimetres, drawn from ``rng``; independent of the grid."""

    def __init__(self, rng: random.Random):
        u = rng.uniform
        self.sx, self.sy = u(0.9, 1.08), u(0.88, 1.1)
        self.yb = 10.0
        self.ax = 150.0 * self.sx
        self.ay_ant, self.ay_post = 100.0 * self.sy, 120.0 * self.sy
        self.fat = u(7.0, 24.0)
        self.cax = self.ax - self.fat - 18.0
        self.cay_ant = self.ay_ant - self.fat - 14.0
        self.cay_post = self.ay_post - self.fat - 30.0
        self.apex = u(-135.0, -118.0)
        self.dome_r = u(25.0, 55.0)
        self.dome_l = self.dome_r + u(6.0, 20.0)
        self.heart = (u(12.0, 28.0), u(-25.0, -10.0), self.dome_r + u(-30.0, -18.0))
        self.heart_scale = u(0.9, 1.12)
        self.heart_turn = math.radians(u(20.0, 38.0))
        self.pa_hu = u(260.0, 480.0)  # contrast timing: pulmonary arterial phase
        self.sys_hu = self.pa_hu * u(0.4, 0.7)  # left heart and aorta, later in the bolus
        self.spine_y = self.yb + self.cay_post - 20.0
        self.vert_h = u(17.0, 20.0)
        self.disc_h = u(4.5, 6.5)
        self.spine_top = u(-160.0, -145.0)
        self.sternum_top = self.apex + u(5.0, 15.0)
        self.rib_drop = u(40.0, 65.0)
        self.tree_seed = rng.getrandbits(32)

    # body cross-section (half-ellipse anterior / posterior), narrower toward the neck
    def body_sd(self, x, y, z):
        taper = 1.0 - 0.14 * _smoothstep(-100.0, -165.0, z)
        yy = y - self.yb
        ay = torch.where(yy < 0, torch.full_like(yy, self.ay_ant), torch.full_like(yy, self.ay_post))
        return _ellipse_sd(x, yy, self.ax * taper, ay * (0.96 + 0.04 * taper))

    def cavity_axes(self, z):
        """Thoracic cavity semi-axes (x, y anterior, y posterior) at height z: a dome at the apex, widening below."""
        tensor = isinstance(z, torch.Tensor)
        t = ((z - self.apex) / 100.0).clamp(0, 1) if tensor else min(max((z - self.apex) / 100.0, 0.0), 1.0)
        dome = (t * (2 - t)).sqrt() if tensor else (t * (2 - t)) ** 0.5
        widen = 0.9 + 0.1 * _smoothstep(self.apex + 60.0, self.dome_r + 10.0, z)
        return (self.cax * (0.15 + 0.85 * dome) * widen, self.cay_ant * (0.25 + 0.75 * dome),
                self.cay_post * (0.45 + 0.55 * dome))

    def dome(self, x, y, right: bool):
        top = self.dome_r if right else self.dome_l
        xc = -65.0 * self.sx if right else 70.0 * self.sx
        # deeper laterally (costophrenic angles) and posteriorly (posterior recesses)
        return top + ((x - xc) ** 2 + (0.8 * (y - self.yb)) ** 2) / 150.0 + 0.18 * (y - self.yb)

    def heart_frame(self, x, y, z):
        hx, hy, hz = self.heart
        dx, dy, dz = x - hx, y - hy, z - hz
        c, s = math.cos(self.heart_turn), math.sin(self.heart_turn)
        # long axis from the base (right, posterior, superior) toward the apex (left, anterior, inferior)
        u = c * dx - s * dy
        v = s * dx + c * dy
        ct, st = math.cos(0.5), math.sin(0.5)
        return ct * u + st * dz, v, -st * u + ct * dz

    def heart_sd(self, x, y, z, grow: float = 0.0):
        u, v, w = self.heart_frame(x, y, z)
        k = self.heart_scale
        return _ellipsoid_sd(u, v, w, 60.0 * k + grow, 45.0 * k + grow, 38.0 * k + grow)

    def lung_sd(self, x, y, z, right: bool):
        """Signed distance (approximate, mm) to one lung."""
        cx, cay_a, cay_p = self.cavity_axes(z)
        yy = y - self.yb
        ay = torch.where(yy < 0, cay_a if isinstance(cay_a, torch.Tensor) else torch.full_like(yy, cay_a),
                         cay_p if isinstance(cay_p, torch.Tensor) else torch.full_like(yy, cay_p))
        sd = _ellipse_sd(x, yy, cx, ay)
        sd = torch.maximum(sd, self.apex - z)  # above the apex
        sd = torch.maximum(sd, z - self.dome(x, y, right))  # below the diaphragm
        mid = 4.0
        side = (mid - x) if right else (x - mid)
        width = 16.0 + 10.0 * _smoothstep(-40.0, 0.0, z)
        sd = torch.maximum(sd, width - side)  # mediastinum
        spine = _ellipse_sd(x - 4.0, y - self.spine_y, 42.0, 34.0)
        sd = torch.maximum(sd, -spine)
        sd = torch.maximum(sd, -self.heart_sd(x, y, z, grow=6.0))
        return sd
