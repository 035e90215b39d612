"""A seeded, CTPA-like synthetic chest phantom at any resolution (the framework's embedded data).

``chest_phantom(resolution, seed)`` returns a volume in HU and a label map in the canonical
orientation (``x2ct_framework.io``: D superior -> inferior, H anterior -> posterior, W patient
right -> left). Anatomy is described in millimetres and rendered with partial-volume edges, so the
same seed gives the same patient at every resolution; only detail below the voxel size differs
(vessel trees branch until their radius falls under half a voxel). Everything is vectorised torch:
large structures are implicit surfaces evaluated on the grid, tubes (vessels, ribs, airways) are
tapered capsules evaluated in their bounding boxes.

What is in it: body outline with subcutaneous fat and muscle, lungs with parenchymal texture and
diaphragm domes, heart with contrast-filled chambers and epicardial fat, aorta, venae cavae,
pulmonary trunk and arteries that branch and taper down to the voxel size, pulmonary veins,
trachea and main bronchi, thoracic vertebrae with discs and posterior elements, ribs with costal
cartilage, sternum, clavicles, scapulae, liver, stomach with gas, and an optional scanner table.
Per case: body size, fat, position, rotation, heart size and place, diaphragm height, contrast
timing and vessel branching all vary.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import threading
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from x2ct_framework.conventions import AIR, BONE, FAT, HEART, LUNG, SOFT, TABLE, VESSEL  # noqa: F401
from x2ct_framework.conventions import LABEL_NAMES as LABELS
from x2ct_framework.conventions import hu_to_unit
from x2ct_framework.phantom_base import (_Anatomy, _Canvas, _ellipse_sd, _ellipsoid_sd, _rotate,  # noqa: F401
                                         _smoothstep, _triple, _unit)

PHANTOM_VERSION = 2  # the default; every version in PHANTOM_VERSIONS stays reproducible
PHANTOM_VERSIONS = (1, 2)


def _vessel_tree(canvas: _Canvas, anat: _Anatomy, rng: random.Random, start, direction, radius: float,
                 value: float, right: bool, min_radius: float, max_depth: int = 14) -> int:
    """Binary branching tree from ``start``; children follow Murray's law (r^3 = r_a^3 + r_b^3), taper
    along each segment and turn back into the lung when they would cross the pleura.

    Every branch draws from its own seed, so a finer grid adds smaller branches without changing
    the larger ones.
    """
    centre = (-75.0 * anat.sx if right else 75.0 * anat.sx, anat.yb + 10.0, (anat.apex + anat.dome_r) / 2 + 10.0)

    def depth_in_lung(p) -> float:
        return -float(anat.lung_sd(torch.tensor([p[0]]), torch.tensor([p[1]]), torch.tensor([p[2]]), right)[0])

    stack = [(start, _unit(direction), radius, 0, rng.getrandbits(32))]
    count = 0
    while stack:
        p, d, r, depth, seed = stack.pop()
        if r < min_radius or depth > max_depth:
            continue
        local = random.Random(seed)
        length = r * local.uniform(3.0, 4.5) + 3.0
        to_centre = _unit(tuple(ci - pi for ci, pi in zip(centre, p)))
        end = None
        for bend, scale in ((0.0, 1.0), (0.6, 0.8), (1.2, 0.55)):
            dd = _unit(tuple(di + bend * ci for di, ci in zip(d, to_centre)))
            cand = tuple(pi + scale * length * di for pi, di in zip(p, dd))
            if depth == 0 or depth_in_lung(cand) > 0.6 * r + 1.0:
                d, end = dd, cand
                break
        if end is None:
            continue
        r_end = r * 0.9
        canvas.tube([p, end], [r, r_end], value, VESSEL, min_radius=min_radius)
        count += 1
        # two children in a random plane through d, split by an asymmetric angle
        ref = (0.0, 0.0, 1.0) if abs(d[2]) < 0.9 else (1.0, 0.0, 0.0)
        n = _unit((d[1] * ref[2] - d[2] * ref[1], d[2] * ref[0] - d[0] * ref[2], d[0] * ref[1] - d[1] * ref[0]))
        n = _rotate(n, d, local.uniform(0, 2 * math.pi))
        split = local.uniform(0.6, 0.95)
        r_a = r_end * (1.0 / (1.0 + split**3)) ** (1 / 3)
        r_b = r_a * split
        ang_a, ang_b = math.radians(local.uniform(12, 30)), -math.radians(local.uniform(25, 48))
        stack.append((end, _rotate(d, n, ang_a), r_a, depth + 1, local.getrandbits(32)))
        stack.append((end, _rotate(d, n, ang_b), r_b, depth + 1, local.getrandbits(32)))
    return count


def _render(anat: _Anatomy, canvas: _Canvas, rng_noise: torch.Generator, table: bool, noise_hu: float) -> None:
    cv = canvas
    x, y, z = cv.coords()
    min_r = 0.4 * min(cv.vox)  # thinner vessels than this leave less than a fifth of a voxel

    # body: fat under the skin, muscle and mediastinal soft tissue inside
    body = anat.body_sd(x, y, z)
    cv.paint(cv.cover(body), -95.0, FAT)
    cv.paint(cv.cover(body + anat.fat), 45.0, SOFT)
    # liver under the right dome, stomach under the left one (each evaluated in its bounding box)
    bottom_z = cv.size[2] / 2 + 20.0
    sl = cv.box([-anat.ax - 10, -anat.ay_ant - 20, anat.dome_r - 10], [90.0, anat.ay_post + 20, bottom_z])
    if sl is not None:
        bx, by, bz = cv.coords(sl)
        below_r = bz - anat.dome(bx, by, True) - 6.0
        liver = torch.maximum(torch.maximum(anat.body_sd(bx, by, bz) + anat.fat + 8.0, -below_r),
                              bx - (25.0 + 0.3 * (bz - anat.dome_r)))
        cv.paint(cv.cover(liver), 62.0, SOFT, sl)
    sx_, sz = 72.0 * anat.sx, anat.dome_l + 48.0
    sl = cv.box([sx_ - 50, -50, sz - 55], [sx_ + 50, 40, sz + 55])
    if sl is not None:
        bx, by, bz = cv.coords(sl)
        stomach = _ellipsoid_sd(bx - sx_, by + 5.0, bz - sz, 42.0, 38.0, 46.0)
        cv.paint(cv.cover(stomach), 25.0, SOFT, sl)
        cv.paint(cv.cover(torch.maximum(stomach + 4.0, bz - (sz - 16.0))), -1000.0, AIR, sl)
    # mediastinal fat in front of the great vessels
    sl = cv.box([-35, -75, -125], [40, 0, 15])
    if sl is not None:
        bx, by, bz = cv.coords(sl)
        cv.paint(cv.cover(_ellipsoid_sd(bx - 2.0, by + 35.0, bz + 55.0, 28.0, 22.0, 55.0)), -90.0, FAT, sl)

    # lungs with parenchymal texture
    d, h, w = cv.shape
    coarse = torch.randn((1, 1, max(2, d // 6), max(2, h // 6), max(2, w // 6)), generator=rng_noise)
    texture = F.interpolate(coarse, size=cv.shape, mode="trilinear", align_corners=False)[0, 0]
    lowest = max(anat.dome(sgn * anat.cax, anat.yb + anat.cay_post, sgn < 0) for sgn in (-1.0, 1.0)) + 10.0
    for right in (True, False):
        xr = (-anat.cax - 10.0, 10.0) if right else (-10.0, anat.cax + 10.0)
        sl = cv.box([xr[0], anat.yb - anat.cay_ant - 10, anat.apex - 5], [xr[1], anat.yb + anat.cay_post + 10, lowest])
        if sl is None:
            continue
        bx, by, bz = cv.coords(sl)
        cv.paint(cv.cover(anat.lung_sd(bx, by, bz, right)), -855.0 + 35.0 * texture[sl], LUNG, sl)

    # heart: epicardial fat, myocardium, right (anterior) and left chambers with contrast
    hsl = cv.box([anat.heart[0] - 95, anat.heart[1] - 95, anat.heart[2] - 95],
                 [anat.heart[0] + 95, anat.heart[1] + 95, anat.heart[2] + 95])
    if hsl is not None:
        hx, hy, hz = cv.coords(hsl)
        cv.paint(cv.cover(anat.heart_sd(hx, hy, hz, grow=4.0)), -90.0, FAT, hsl)
        cv.paint(cv.cover(anat.heart_sd(hx, hy, hz)), 50.0, HEART, hsl)
        inner = anat.heart_sd(hx, hy, hz, grow=-9.0 * anat.heart_scale)
        _, vv, _ = anat.heart_frame(hx, hy, hz)
        right_side = vv + 4.0  # septum: a plane along the long axis, the right heart anterior
        cv.paint(cv.cover(torch.maximum(inner, right_side)), anat.pa_hu * 0.92, HEART, hsl)
        cv.paint(cv.cover(torch.maximum(inner, 8.0 - vv)), anat.sys_hu, HEART, hsl)

    hx, hy, hz = anat.heart
    sy = anat.spine_y
    top = -cv.size[2] / 2 - 10.0
    bottom = cv.size[2] / 2 + 10.0
    # great vessels
    root = (hx - 12.0, hy + 5.0, hz - 28.0)
    aorta = [root, (hx - 30.0, hy - 8.0, hz - 62.0), (hx - 26.0, hy - 6.0, hz - 95.0), (2.0, hy + 12.0, hz - 118.0),
             (18.0, sy - 30.0, hz - 112.0), (22.0, sy - 12.0, hz - 85.0), (20.0, sy - 10.0, hz - 20.0),
             (12.0, sy - 14.0, bottom)]
    cv.tube(aorta, [14.0, 15.0, 14.0, 13.0, 12.0, 11.5, 11.0, 10.5], anat.sys_hu, VESSEL)
    arch_top = (2.0, hy + 12.0, hz - 118.0)
    for dx, r in ((-14.0, 6.5), (0.0, 4.5), (12.0, 5.0)):  # brachiocephalic, left carotid, left subclavian
        cv.tube([(arch_top[0] + dx, arch_top[1], arch_top[2] + 4.0), (arch_top[0] + 1.8 * dx, arch_top[1] - 4.0, top)],
                [r, r * 0.9], anat.sys_hu, VESSEL)
    cv.tube([(hx - 52.0, hy - 2.0, top), (hx - 50.0, hy + 2.0, hz - 60.0), (hx - 45.0, hy + 6.0, hz - 25.0)],
            [10.0, 10.5, 11.0], anat.pa_hu * 1.25, VESSEL)  # superior vena cava
    cv.tube([(hx - 40.0, hy + 25.0, hz + 30.0), (hx - 35.0, sy - 25.0, hz + 60.0), (-20.0, sy - 25.0, bottom)],
            [12.0, 12.0, 11.0], 110.0, VESSEL)  # inferior vena cava
    valve = (hx - 2.0, hy - 28.0, hz - 40.0)
    bif = (hx - 10.0, hy + 2.0, hz - 72.0)
    cv.tube([valve, (hx - 4.0, hy - 20.0, hz - 60.0), bif], [13.0, 13.5, 13.0], anat.pa_hu, VESSEL)
    r_hilum = (-58.0 * anat.sx, hy + 22.0, hz - 62.0)
    l_hilum = (56.0 * anat.sx, hy + 28.0, hz - 72.0)
    cv.tube([bif, (bif[0] - 25.0, bif[1] + 10.0, bif[2] + 4.0), r_hilum], [11.0, 10.5, 9.5], anat.pa_hu, VESSEL)
    cv.tube([bif, (bif[0] + 22.0, bif[1] + 14.0, bif[2] - 8.0), l_hilum], [10.5, 10.0, 9.0], anat.pa_hu, VESSEL)

    # pulmonary arterial and venous trees
    tree_rng = random.Random(anat.tree_seed)
    lobes = {True: [(-0.45, 0.15, -0.9), (-0.5, -0.8, 0.25), (-0.35, 0.55, 0.75), (-0.8, 0.2, 0.5)],
             False: [(0.45, 0.1, -0.9), (0.5, -0.8, 0.3), (0.35, 0.55, 0.75), (0.8, 0.25, 0.45)]}
    for right, hilum in ((True, r_hilum), (False, l_hilum)):
        for direction in lobes[right]:
            jitter = tuple(c + tree_rng.uniform(-0.15, 0.15) for c in direction)
            _vessel_tree(cv, anat, tree_rng, hilum, jitter, 6.5, anat.pa_hu, right, min_r)
    la = (hx - 2.0, hy + 42.0, hz - 30.0)
    for right in (True, False):
        sign = -1.0 if right else 1.0
        for dz in (-14.0, 14.0):
            ostium = (la[0] + sign * 26.0, la[1] + 4.0, la[2] + dz)
            direction = (sign * 0.8, 0.25, 0.55 * math.copysign(1.0, dz))
            _vessel_tree(cv, anat, tree_rng, ostium, direction, 6.0, anat.sys_hu, right, 1.6 * min_r)

    # airways: trachea, main and lobar bronchi (wall, then lumen)
    carina = (2.0, sy - 38.0, hz - 88.0)
    trachea = [(0.0, sy - 45.0, top), (1.0, sy - 42.0, hz - 130.0), carina]
    rb = [carina, (-22.0, sy - 36.0, hz - 78.0), (-45.0 * anat.sx, sy - 32.0, hz - 70.0)]
    lb = [carina, (25.0, sy - 34.0, hz - 80.0), (50.0 * anat.sx, sy - 30.0, hz - 66.0)]
    for path, radii in ((trachea, [9.0, 9.0, 8.0]), (rb, [7.0, 6.5, 5.5]), (lb, [6.0, 5.8, 5.0])):
        cv.tube(path, [r + 2.0 for r in radii], 40.0, SOFT)
    for path, radii in ((trachea, [9.0, 9.0, 8.0]), (rb, [7.0, 6.5, 5.5]), (lb, [6.0, 5.8, 5.0])):
        cv.tube(path, radii, -1000.0, AIR)
    for end, dirs in ((rb[-1], [(-0.4, 0.1, -0.9), (-0.6, 0.3, 0.7)]), (lb[-1], [(0.4, 0.1, -0.9), (0.6, 0.3, 0.7)])):
        for dvec in dirs:
            tip = tuple(e + 22.0 * c for e, c in zip(end, _unit(dvec)))
            cv.tube([end, tip], [5.5, 4.0], 40.0, SOFT, min_radius=0.5 * min_r)
            cv.tube([end, tip], [3.5, 2.5], -1000.0, AIR, min_radius=min_r)

    # spine: vertebral bodies (cortex + cancellous), discs, arches, spinous and transverse processes
    level = anat.vert_h + anat.disc_h
    zc = anat.spine_top
    k = 0
    while zc < bottom + level:
        growth = min(1.0, max(0.0, (zc + 160.0) / 320.0))
        rx, ry = 15.0 + 8.0 * growth, 12.0 + 6.0 * growth
        ys = sy + 6.0 * math.cos(math.pi * zc / 320.0)
        sl = cv.box([-rx - 40, ys - ry - 5, zc - level / 2 - 2], [rx + 40, ys + ry + 70, zc + level / 2 + 2])
        if sl is not None:
            bx, by, bz = cv.coords(sl)
            body = torch.maximum(_ellipse_sd(bx, by - ys, rx, ry).expand(bz.shape[0], -1, -1),
                                 (bz - zc).abs() - anat.vert_h / 2)
            cv.paint(cv.cover(body), 1050.0, BONE, sl)
            cv.paint(cv.cover(body + 2.2), 240.0, BONE, sl)
            disc = torch.maximum(_ellipse_sd(bx, by - ys, rx - 0.5, ry - 0.5).expand(bz.shape[0], -1, -1),
                                 (bz - zc - level / 2).abs() - anat.disc_h / 2)
            cv.paint(cv.cover(disc), 90.0, SOFT, sl)
            canal_y = ys + ry + 9.0
            rho = ((bx**2 + (by - canal_y) ** 2).sqrt()).expand(bz.shape[0], -1, -1)
            ring = torch.maximum(torch.maximum(rho - 14.5, 8.0 - rho), (ys + ry - 3.0) - by)
            ring = torch.maximum(ring, (bz - zc + 1.0).abs() - (anat.vert_h / 2 - 2.0))
            cv.paint(cv.cover(ring), 700.0, BONE, sl)
            cv.paint(cv.cover(torch.maximum(rho - 7.5, (bz - zc).abs() - level / 2)), 15.0, SOFT, sl)
        canal_y = ys + ry + 9.0
        cv.tube([(0.0, canal_y + 12.0, zc), (0.0, canal_y + 40.0, zc + 16.0)], [5.0, 3.0], 650.0, BONE)
        for side in (-1.0, 1.0):
            tip = (side * 34.0, canal_y + 4.0, zc - 3.0)
            cv.tube([(side * 10.0, canal_y - 2.0, zc - 2.0), tip], [5.0, 4.0], 650.0, BONE)
            if 0 <= k < 12 and zc > anat.apex - 25.0:
                _rib(cv, anat, k, tip, zc, side)
        zc += level
        k += 1

    # sternum (manubrium, body, xiphoid) and clavicles
    st_top = anat.sternum_top
    st_bot = st_top + 165.0
    ssl = cv.box([-40, -anat.ay_ant - 10, st_top - 5], [40, anat.yb - anat.ay_ant + 60, st_bot + 25])
    if ssl is not None:
        sx_, sy_, sz_ = cv.coords(ssl)
        front = anat.yb - anat.ay_ant + anat.fat + 9.0
        width = (18.0 + 9.0 * (1 - _smoothstep(st_top + 35.0, st_top + 55.0, sz_))
                 - 9.0 * _smoothstep(st_bot - 10, st_bot + 10, sz_))
        thick = 6.0 - 2.0 * _smoothstep(st_bot - 10, st_bot + 10, sz_)
        st = torch.maximum(_ellipse_sd(sx_, sy_ - front, width, thick),
                           torch.maximum(st_top - sz_, sz_ - st_bot - 20.0))
        cv.paint(cv.cover(st), 1000.0, BONE, ssl)
        cv.paint(cv.cover(st + 1.8), 260.0, BONE, ssl)
    front = anat.yb - anat.ay_ant + anat.fat + 9.0
    for side in (-1.0, 1.0):
        clav = [(side * 22.0, front, st_top + 4.0), (side * 60.0, front - 2.0, st_top - 8.0),
                (side * 100.0 * anat.sx, front + 25.0, st_top - 14.0),
                (side * 125.0 * anat.sx, front + 60.0, st_top - 10.0)]
        cv.tube(clav, [7.0, 6.5, 6.5, 7.0], 900.0, BONE)
        cv.tube(clav, [4.0, 3.5, 3.5, 4.0], 300.0, BONE, min_radius=0.5 * min_r)
    # scapulae: thin plates on the posterior chest wall, from near the spine out and forward
    for side in (-1.0, 1.0):
        medial = (side * 45.0 * anat.sx, anat.yb + anat.ay_post * 0.95 - anat.fat - 12.0)
        lateral = (side * 125.0 * anat.sx, anat.yb + anat.ay_post * 0.5 - anat.fat - 8.0)
        cxs, cys, czs = (medial[0] + lateral[0]) / 2, (medial[1] + lateral[1]) / 2, anat.apex + 75.0
        ex, ey = _unit((lateral[0] - medial[0], lateral[1] - medial[1], 0.0))[:2]
        half = math.hypot(lateral[0] - medial[0], lateral[1] - medial[1]) / 2
        ssl = cv.box([cxs - half - 10, cys - half - 10, czs - 85], [cxs + half + 10, cys + half + 10, czs + 85])
        if ssl is None:
            continue
        px, py, pz = cv.coords(ssl)
        u_ = ex * (px - cxs) + ey * (py - cys)
        v_ = -ey * (px - cxs) + ex * (py - cys)
        bend = side * 0.004 * (u_**2 - half**2)  # bowed to follow the ribs
        plate = _ellipsoid_sd(u_, v_ + bend, pz - czs, half, 3.5, 75.0)
        cv.paint(cv.cover(plate), 800.0, BONE, ssl)

    # scanner table under the back
    if table:
        back = anat.yb + anat.ay_post * 1.0 + 3.0
        tx = cv.wx[None, None, :] - cv.shift[0]  # the table is level in the scanner, not turned with the patient
        ty = cv.wy[None, :, None] - cv.shift[1]
        plate = torch.maximum((ty - back - 12.0).abs() - 12.0, tx.abs() - 230.0)
        cv.paint(cv.cover(plate), -950.0, TABLE)
        cv.paint(cv.cover(torch.maximum(plate, 9.0 - (ty - back - 12.0).abs())), 220.0, TABLE)

    if noise_hu > 0:
        noise = torch.randn(cv.shape, generator=rng_noise) * noise_hu
        cv.hu += noise * (cv.labels > 0)


def _rib(cv: _Canvas, anat: _Anatomy, k: int, tip, zc: float, side: float) -> None:
    """Rib k (0 = first) from the transverse process around the chest wall; costal cartilage to the sternum."""
    true_rib = k < 7
    end = math.radians(150.0 if true_rib else (125.0 if k < 10 else 95.0))
    start = math.radians(22.0)
    drop = anat.rib_drop * (0.6 if k == 0 else 1.0)
    pts, radii = [tip], [4.5]
    n = int(min(16, max(5, 200.0 / (2.5 * cv.vmean))))  # segments about 2.5 voxels long, 5 to 16
    for i in range(1, n + 1):
        phi = start + (end - start) * i / n
        t = i / n
        zz = zc - 6.0 * math.sin(math.pi * min(t * 3, 1.0)) + drop * t**1.6
        cx, cay_a, cay_p = anat.cavity_axes(zz)
        ay = cay_p if math.cos(phi) > 0 else cay_a
        pts.append((side * (cx + 7.0) * math.sin(phi), anat.yb + (ay + 7.0) * math.cos(phi), zz))
        radii.append(5.2 - 1.2 * t)
    cv.tube(pts, radii, 1000.0, BONE)
    cv.tube(pts, [max(r - 2.0, 0.5) for r in radii], 300.0, BONE)
    if true_rib:
        front = anat.yb - anat.ay_ant + anat.fat + 9.0
        st_z = anat.sternum_top + 12.0 + 22.0 * k
        cv.tube([pts[-1], (side * 20.0, front + 4.0, st_z)], [4.2, 4.0], 160.0, SOFT)


def chest_phantom(resolution: int | Sequence[int] = 64, seed: int = 0, *, volume_mm: float | Sequence[float] = 320.0,
                  table: bool = True, noise_hu: float = 8.0, cache_dir: str | Path | None = None,
                  version: int = PHANTOM_VERSION, arms: bool = False, parts: bool = False, emboli: bool = False):
    """One synthetic CTPA chest: ``(hu [D, H, W] float32, labels [D, H, W] uint8)``.

    ``resolution`` is R (an R^3 grid) or (D, H, W); ``volume_mm`` the field of view, one size or
    (x, y, z). HU values are rounded to integers as a scanner stores them. With ``cache_dir`` the
    case is written there once (int16 HU + uint8 labels) and read back on later calls.

    ``version`` picks the anatomy (:data:`PHANTOM_VERSIONS`; version 1 stays reproducible bit for bit,
    version 2 is described in :mod:`x2ct_framework.phantom_v2`). Version 2 only: ``arms`` adds the arms
    at the sides, ``emboli`` paints the case's pulmonary emboli (label 9; drawn from the seed, see
    :func:`pulmonary_embolism_study` for their annotations), and ``parts=True`` returns a third map of finer
    parts (``conventions.PART_NAMES``, grouped into the coarse codes by ``conventions.PART_TO_LABEL``).
    """
    if version not in PHANTOM_VERSIONS:
        raise ValueError(f"version: expected one of {PHANTOM_VERSIONS}, got {version!r}")
    if version == 1 and (arms or parts or emboli):
        raise ValueError("arms, parts and emboli need phantom version 2 (version=2); version 1 has none of them")
    shape = tuple(int(s) for s in _triple(resolution, "resolution"))
    if any(s < 2 for s in shape):
        raise ValueError(f"resolution: expected at least 2 voxels per axis, got {shape}")
    size = tuple(float(s) for s in _triple(volume_mm, "volume_mm"))  # (x, y, z)
    path = None
    if cache_dir is not None:
        ident = (1, seed, shape, size, table, noise_hu) if version == 1 else (version, seed, shape, size, table,
                                                                              noise_hu, arms, emboli)
        key = hashlib.sha1(repr(ident).encode()).hexdigest()[:12]
        path = Path(cache_dir) / f"chest_{seed}_{shape[0]}x{shape[1]}x{shape[2]}_{key}.pt"
        if path.is_file():
            try:
                data = torch.load(path, weights_only=True)
                hu, labels = data["hu"].float(), data["labels"]
                if not parts:
                    return hu, labels
                if "parts" in data:
                    return hu, labels, data["parts"]
            except Exception:
                path.unlink(missing_ok=True)  # a damaged cache file is rebuilt
    threads = torch.get_num_threads()
    if version == 1:
        rng = random.Random(f"x2ct-chest-{seed}")
        anat = _Anatomy(rng)
        pose = random.Random(f"x2ct-pose-{seed}")
        canvas = _Canvas(shape, size, rotation_deg=pose.uniform(-5.0, 5.0),
                         shift_mm=(pose.uniform(-8.0, 8.0), pose.uniform(-8.0, 6.0), pose.uniform(-10.0, 10.0)))
        noise = torch.Generator().manual_seed(int(hashlib.sha1(f"noise-{seed}-{shape}".encode()).hexdigest()[:8], 16))
        try:  # hundreds of medium-sized ops: one thread avoids the pool's synchronisation cost on a busy CPU
            torch.set_num_threads(1)
            _render(anat, canvas, noise, table, noise_hu)
        finally:
            torch.set_num_threads(threads)
        labels, part_map = canvas.labels, None
    else:
        from x2ct_framework import phantom_v2

        anat = phantom_v2._AnatomyV2(random.Random(f"x2ct-chest-v2-{seed}"))
        pose = random.Random(f"x2ct-pose-v2-{seed}")
        canvas = phantom_v2._PartCanvas(shape, size, rotation_deg=pose.uniform(-6.0, 6.0),
                                        shift_mm=(pose.uniform(-10.0, 10.0), pose.uniform(-10.0, 8.0),
                                                  pose.uniform(-6.0, 6.0)))
        noise = torch.Generator().manual_seed(
            int(hashlib.sha1(f"noise-v2-{seed}-{shape}".encode()).hexdigest()[:8], 16))
        try:
            torch.set_num_threads(1)
            clots = phantom_v2.draw_emboli(anat, seed) if emboli else None
            phantom_v2.render_v2(anat, canvas, noise, table, noise_hu, arms, clots)
        finally:
            torch.set_num_threads(threads)
        part_map = canvas.labels
        labels = canvas.coarse_labels()
    hu = canvas.hu.round().clamp(-1024, 3071)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # one temporary file per process and thread: parallel workers may make the same phantom at once
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp")
        data = {"hu": hu.to(torch.int16), "labels": labels}
        if part_map is not None:
            data["parts"] = part_map
        torch.save(data, tmp)
        tmp.replace(path)
    return (hu, labels, part_map) if parts else (hu, labels)


def pulmonary_embolism_study(seed: int, emboli: bool) -> dict:
    """The study labels of case ``seed`` rendered with or without ``emboli`` (version 2): ``pe_present``
    (0/1), ``pe_count``, ``pe_volume_ml`` (from the clots' geometry, the same at every resolution) and
    ``pe_location`` (the most proximal clot's level: saddle, main, lobar, segmental; none)."""
    from x2ct_framework import phantom_v2

    anat = phantom_v2._AnatomyV2(random.Random(f"x2ct-chest-v2-{seed}"))
    return phantom_v2.pe_study(anat, seed, emboli)


# ---- toy chests: nested ellipsoids with one HU value per class, for tests ------------------------
def ellipsoid(z, y, x, centre, radii) -> torch.Tensor:
    """Boolean mask of the ellipsoid with ``centre`` and ``radii`` (z, y, x) on the coordinate grids."""
    c, r = centre, radii
    return (((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2) <= 1.0


def _grid(resolution: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    ax = torch.linspace(-1, 1, resolution)
    z, y, x = torch.meshgrid(ax, ax, ax, indexing="ij")
    hu = torch.full((resolution,) * 3, -1000.0)
    labels = torch.zeros((resolution,) * 3, dtype=torch.uint8)
    return z, y, x, hu, labels


def toy_chest(resolution: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A piecewise-constant toy chest (HU [D, H, W], labels) with exactly one HU value per class.

    Soft tissue 40, lung -850, bone 700, vessel 350: for tests that need known class values (metric
    and loss checks). The realistic phantom is :func:`chest_phantom`.
    """
    g = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: float(lo + (hi - lo) * torch.rand((), generator=g))  # noqa: E731
    z, y, x, hu, labels = _grid(resolution)
    body = ellipsoid(z, y, x, (0, r(-0.05, 0.05), 0), (1.3, r(0.6, 0.7), r(0.8, 0.9)))
    hu[body], labels[body] = 40.0, SOFT
    for side in (-1, 1):
        lung = ellipsoid(z, y, x, (r(-0.1, 0.1), 0.0, side * r(0.35, 0.45)), (0.8, r(0.4, 0.5), r(0.25, 0.32)))
        hu[lung], labels[lung] = -850.0, LUNG
    spine = ((y - 0.45) ** 2 + x**2 <= r(0.08, 0.11) ** 2) & body
    hu[spine], labels[spine] = 700.0, BONE
    aorta = ((y - 0.2) ** 2 + (x + 0.08) ** 2 <= r(0.04, 0.06) ** 2) & body
    hu[aorta], labels[aorta] = 350.0, VESSEL
    return hu, labels


def kit_chest(resolution: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The contract kit's chest (``testing.make_case``): body, lungs, spine and a vessel as ellipsoids
    whose centres and radii jitter with ``seed``; HU [D, H, W] and labels, one HU value per class."""
    g = torch.Generator().manual_seed(seed)
    jitter = lambda: float(torch.empty(()).uniform_(-0.06, 0.06, generator=g))  # noqa: E731
    z, y, x, hu, labels = _grid(resolution)
    shapes = [  # (centre, radii, HU, label)
        ((0.0, jitter(), 0.0), (1.2, 0.65 + jitter(), 0.85 + jitter()), 40.0, SOFT),
        ((jitter(), 0.0, -0.4), (0.8, 0.45, 0.28 + jitter() / 2), -850.0, LUNG),
        ((jitter(), 0.0, 0.4), (0.8, 0.45, 0.28 + jitter() / 2), -850.0, LUNG),
        ((0.0, 0.45, 0.0), (1.2, 0.12, 0.12), 700.0, BONE),
        ((0.0, 0.15, -0.08 + jitter()), (1.0, 0.08, 0.08), 350.0, VESSEL),
    ]
    for centre, radii, value, label in shapes:
        inside = ellipsoid(z, y, x, centre, radii)
        hu[inside], labels[inside] = value, label
    return hu, labels


def save_figure(path: str | Path, resolution: int = 128, seed: int = 0, geometry: str = "x2ctgan",
                image_size: int = 256) -> Path:
    """A picture of one phantom: axial, coronal and sagittal slices, its label map, PA and lateral DRRs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from x2ct_framework.physics import drr, make_geometry
    from x2ct_framework.viz import save_figure as write_figure

    hu, labels = chest_phantom(resolution, seed)
    ct01 = hu_to_unit(hu)[None, None]
    g = make_geometry([0.0, 90.0], geometry, volume_mm=320.0)
    views = drr(ct01, g, det_shape=(image_size, image_size))[0, :, 0]
    d, h, w = hu.shape
    lo, hi = int(0.36 * d), int(0.46 * d)  # the axial slice through a vertebral body at mid-lung height
    spine = (labels[lo:hi, h // 2:, w // 2 - 2: w // 2 + 2] == BONE).flatten(1).sum(1)
    ax_i = lo + int(spine.argmax())
    cuts = {"axial": (hu[ax_i], labels[ax_i]),
            "coronal": (hu[:, int(0.45 * h)], labels[:, int(0.45 * h)]),
            "sagittal": (hu[:, :, int(0.36 * w)], labels[:, :, int(0.36 * w)])}
    fig, axes = plt.subplots(2, 4, figsize=(13, 6.6))
    cmap = matplotlib.colors.ListedColormap(["black", "#c8a078", "#4a90d9", "white", "#d33030", "#e07ab0",
                                             "#f0d050", "#40d0d0", "#808080"])
    for j, (name, (img, lab)) in enumerate(cuts.items()):
        axes[0, j].imshow(img, cmap="gray", vmin=-1000, vmax=500, interpolation="nearest")
        axes[0, j].set_title(f"{name} (HU -1000..500)", fontsize=9)
        axes[1, j].imshow(lab, cmap=cmap, vmin=-0.5, vmax=8.5, interpolation="nearest")
        axes[1, j].set_title(f"{name} labels", fontsize=9)
    axes[0, 3].imshow(views[0], cmap="gray", vmin=0, vmax=1)
    axes[0, 3].set_title(f"PA DRR ({geometry})", fontsize=9)
    axes[1, 3].imshow(views[1], cmap="gray", vmin=0, vmax=1)
    axes[1, 3].set_title(f"lateral DRR ({geometry})", fontsize=9)
    for ax in axes.flat:
        ax.axis("off")
    names = ", ".join(f"{k} {v}" for k, v in LABELS.items())
    return write_figure(fig, path, dpi=90,
                        title=f"synthetic CTPA chest phantom, seed {seed}, {resolution}^3 over 320 mm; labels: {names}")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Draw a phantom with its DRRs.")
    parser.add_argument("png", help="output picture")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--geometry", default="x2ctgan")
    args = parser.parse_args()
    print(save_figure(args.png, args.resolution, args.seed, args.geometry))
