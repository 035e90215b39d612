"""Version 2 of the synthetic chest phantom (``chest_phantom(..., version=2)``, the default).

Closer to an adult CTPA than version 1 (which :mod:`x2ct_framework.phantom` keeps bit for bit):

- bone in cortical and cancellous proportions: thin cortical shells (about 1100-1300 HU) around
  cancellous bone (about 220-320 HU) in vertebrae, ribs, sternum, clavicles, scapulae and humeri;
- adult lungs: about 250-270 mm from apex to the deepest recess, 3.5-4.5 L together;
- the CTPA phase: every blood pool enhanced (right heart and pulmonary arteries 300-450 HU, left
  heart and aorta 250-400 HU) against 40-60 HU myocardium, so chambers, septum and great vessels show;
- twelve pairs of ribs that descend from the spine and rise again to the sternum through their costal
  cartilages, so a mid-thoracic axial slice cuts about 18 of them;
- a pulmonary artery and vein tree per lung segment that branches and tapers down to the voxel size;
- lung parenchyma texture at two scales fixed in millimetres (the same at every resolution);
- upper abdomen: liver, spleen, stomach with gas, kidneys where the field reaches; optional arms;
- wider patient variability: size, body width and depth, fat, lung height, heart, pose.

Besides the coarse label map (``conventions.LABEL_NAMES``) the renderer writes a finer map of parts
(``conventions.PART_NAMES``; ``chest_phantom(..., parts=True)``); every part belongs to one coarse
code (``conventions.PART_TO_LABEL``), so metrics and losses that read the coarse codes see the same
groups as before (bone = spine + ribs + sternum + ..., vessel = every contrast-filled vessel).
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

from x2ct_framework import conventions as C
from x2ct_framework.phantom_base import (_Anatomy, _Canvas, _ellipse_sd, _ellipsoid_sd, _rotate, _smoothstep,
                                    _unit)


class _PartCanvas(_Canvas):
    """A canvas that paints part codes; the coarse labels follow from them (``PART_TO_LABEL``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.bones: dict[tuple, torch.Tensor] = {}
        self.stats = {"vessel_segments": 0, "vessel_min_radius_mm": math.inf, "vessel_max_depth": 0}

    def coarse_labels(self) -> torch.Tensor:
        lut = torch.zeros(256, dtype=torch.uint8)
        for part, label in C.PART_TO_LABEL.items():
            lut[part] = label
        return lut[self.labels.long()]

    def shell(self, sd: torch.Tensor, cortex_hu: float, core_hu: float, cortex_mm: float, part: int, sl) -> None:
        """A bone: a cortical shell ``cortex_mm`` thick around cancellous bone, with partial volume.

        The core replaces cortex, not the whole voxel: a voxel covered ``co`` by the bone and ``ci`` by
        its core holds ``co - ci`` of cortex and ``ci`` of core."""
        co, ci = self.cover(sd), self.cover(sd + cortex_mm)
        hu = self.hu[sl]
        hu += co * (cortex_hu - hu)
        hu += ci * (core_hu - cortex_hu)
        self.labels[sl][(co > 0.5).expand_as(hu)] = part

    def segments(self, segs, value: float, part: int, chunk: int = 1024) -> None:
        """Many short tapered tubes ``(a, b, r0, r1)`` (patient mm) painted at once: every segment's voxels in its
        bounding box are gathered into one tensor, their coverages merged by maximum, then painted in one step.
        Segments whose box is larger than 12 voxels along an axis are painted one by one."""
        small = []
        for a, b, r0, r1 in segs:
            wa, wb = self.world_point(a), self.world_point(b)
            pad = max(r0, r1) + self.vmean
            ext = max((abs(wa[i] - wb[i]) + 2 * pad) / self.vox[i] for i in range(3))
            if ext > 11.0:
                self._capsule(a, b, wa, wb, r0, r1, value, part)
            else:
                small.append((ext, (*wa, *wb, r0, r1, pad)))
        if not small:
            return
        d, h, w = self.shape
        cover = torch.zeros(d * h * w)
        small.sort(key=lambda e: e[0])  # chunks of similar size share one box size
        for k in range(0, len(small), chunk):
            part_ = small[k:k + chunk]
            ar = torch.arange(int(math.ceil(part_[-1][0])) + 2, dtype=torch.float64)
            t = torch.tensor([e[1] for e in part_], dtype=torch.float64)
            wa, wb, r0, r1, pad = t[:, 0:3], t[:, 3:6], t[:, 6], t[:, 7], t[:, 8]
            idx, pos = [], []
            for axis, n, grid in ((0, w, self.wx), (1, h, self.wy), (2, d, self.wz)):
                lo = torch.minimum(wa[:, axis], wb[:, axis]) - pad
                start = torch.floor((lo + self.size[axis] / 2) / self.vox[axis] - 0.5)
                i = start[:, None] + ar  # [N, 13]
                inside = (i >= 0) & (i < n)
                i = i.clamp(0, n - 1).long()
                idx.append((i, inside))
                pos.append(grid.double()[i] - wa[:, axis:axis + 1])
            (ix, okx), (iy, oky), (iz, okz) = idx
            px, py, pz = pos
            ab = wb - wa
            ll = (ab * ab).sum(1).clamp_min(1e-9)
            x, y, z = px.float()[:, None, None, :], py.float()[:, None, :, None], pz.float()[:, :, None, None]
            ab, ll, r0, r1 = ab.float(), ll.float(), r0.float(), r1.float()
            ux, uy, uz = [(ab[:, j] / ll)[:, None, None, None] for j in range(3)]
            tt = (x * ux + y * uy + z * uz).clamp(0.0, 1.0)
            dist = ((x - tt * ab[:, 0, None, None, None]) ** 2 + (y - tt * ab[:, 1, None, None, None]) ** 2
                    + (z - tt * ab[:, 2, None, None, None]) ** 2).sqrt()
            sd = dist - (r0[:, None, None, None] + tt * (r1 - r0)[:, None, None, None])
            cov = (0.5 - sd / self.vmean).clamp(0.0, 1.0)
            ok = okz[:, :, None, None] & oky[:, None, :, None] & okx[:, None, None, :]
            cov = cov * ok
            flat = (iz[:, :, None, None] * h + iy[:, None, :, None]) * w + ix[:, None, None, :]
            cover.scatter_reduce_(0, flat.reshape(-1), cov.reshape(-1), reduce="amax")
        cover = cover.view(d, h, w)
        touched = cover > 0
        self.hu[touched] += cover[touched] * (value - self.hu[touched])
        self.labels[cover > 0.5] = part

    def bone_tube(self, points, radii, cortex_hu: float, core_hu: float, cortex_mm: float, part: int) -> None:
        """A tapered bone tube along a polyline (patient mm). Its distance field is gathered over all
        segments (and all tubes of the same kind) first; :meth:`flush_bones` paints them, so joints
        are painted once."""
        key = (cortex_hu, core_hu, cortex_mm, part)
        if key not in self.bones:
            self.bones[key] = torch.full(self.shape, math.inf)
        field = self.bones[key]
        pts = [tuple(float(c) for c in p) for p in points]
        for i in range(len(pts) - 1):
            a, b = pts[i], pts[i + 1]
            wa, wb = self.world_point(a), self.world_point(b)
            r0, r1 = float(radii[i]), float(radii[i + 1])
            pad = max(r0, r1) + self.vmean
            sl = self.box([min(p, q) - pad for p, q in zip(a, b)], [max(p, q) + pad for p, q in zip(a, b)])
            if sl is None:
                continue
            abx, aby, abz = wb[0] - wa[0], wb[1] - wa[1], wb[2] - wa[2]
            ll = (abx * abx + aby * aby + abz * abz) or 1e-9
            x = self.wx[sl[2]][None, None, :] - wa[0]
            y = self.wy[sl[1]][None, :, None] - wa[1]
            z = self.wz[sl[0]][:, None, None] - wa[2]
            t = ((x * (abx / ll) + y * (aby / ll)) + z * (abz / ll)).clamp_(0.0, 1.0)
            dist = ((x - t * abx).square_() + (y - t * aby).square_() + (z - t * abz).square_()).sqrt_()
            view = field[sl]
            view.copy_(torch.minimum(view, dist - (r0 + t * (r1 - r0))))

    def flush_bones(self) -> None:
        for (cortex_hu, core_hu, cortex_mm, part), field in self.bones.items():
            self.shell(field, cortex_hu, core_hu, cortex_mm, part, (slice(None),) * 3)
        self.bones = {}


class _AnatomyV2(_Anatomy):
    """Version 2's patient in millimetres, drawn from ``rng`` (independent of the grid)."""

    def __init__(self, rng: random.Random):  # noqa: D107 - does not call the version 1 draws
        u = rng.uniform
        size = u(0.94, 1.07)
        self.sx = size * u(0.88, 1.12)
        self.sy = size * u(0.86, 1.14)
        self.sz = u(0.95, 1.04)  # lung height
        self.yb = 10.0
        # the thoracic cavity sets the lungs; the chest wall and the subcutaneous fat lie outside it
        self.fat = u(5.0, 20.0) * (0.7 + 0.3 * size)
        self.cax = 123.0 * self.sx
        self.cay_ant, self.cay_post = 80.0 * self.sy, 93.0 * self.sy
        self.ax = self.cax + self.fat + 9.0
        if self.ax > 157.0:  # the widest patients still fit a 320 mm field
            self.cax -= self.ax - 157.0
            self.ax = 157.0
        self.ay_ant, self.ay_post = self.cay_ant + self.fat + 7.0, self.cay_post + self.fat + 18.0
        self.apex = -148.0 * self.sz + u(-4.0, 4.0)
        self.dome_r = 36.0 * self.sz + u(-8.0, 8.0)
        self.dome_l = self.dome_r + u(6.0, 18.0)
        self.heart = (u(14.0, 28.0), u(-28.0, -12.0), self.dome_r + u(-34.0, -24.0))
        self.heart_scale = u(0.92, 1.1)
        self.heart_turn = math.radians(u(22.0, 38.0))
        self.pa_hu = u(330.0, 480.0)  # CTPA: right heart and pulmonary arteries
        self.sys_hu = max(self.pa_hu * u(0.78, 1.0), 260.0)  # left heart, aorta, pulmonary veins
        self.myo_hu = u(40.0, 60.0)
        self.spine_y = self.yb + self.cay_post - 20.0
        self.vert_h = u(17.0, 20.0) * self.sz
        self.disc_h = u(4.5, 6.0) * self.sz
        self.spine_top = self.apex + u(-8.0, 2.0)
        self.sternum_top = self.apex + u(22.0, 34.0)
        self.rib_drop = u(140.0, 165.0) * self.sz
        self.liver_hu = u(55.0, 75.0)
        self.spleen_hu = u(45.0, 60.0)
        self.kidney_hu = u(130.0, 180.0)  # cortex in the arterial-portal phase
        self.tree_seed = rng.getrandbits(32)
        self.texture_seed = rng.getrandbits(32)

    def body_sd(self, x, y, z):
        taper = 1.0 - 0.08 * _smoothstep(-110.0, -170.0, z)
        yy = y - self.yb
        ay = torch.where(yy < 0, torch.full_like(yy, self.ay_ant), torch.full_like(yy, self.ay_post))
        return _ellipse_sd(x, yy, self.ax * taper, ay * (0.96 + 0.04 * taper))

    def cavity_axes(self, z):
        tensor = isinstance(z, torch.Tensor)
        span = 75.0 * self.sz
        t = ((z - self.apex) / span).clamp(0, 1) if tensor else min(max((z - self.apex) / span, 0.0), 1.0)
        dome = (t * (2 - t)).sqrt() if tensor else (t * (2 - t)) ** 0.5
        widen = 0.92 + 0.08 * _smoothstep(self.apex + 60.0, self.dome_r + 20.0, z)
        return (self.cax * (0.22 + 0.78 * dome) * widen, self.cay_ant * (0.35 + 0.65 * dome),
                self.cay_post * (0.55 + 0.45 * dome))

    def dome(self, x, y, right: bool):
        top = self.dome_r if right else self.dome_l
        xc = -60.0 * self.sx if right else 65.0 * self.sx
        return top + ((x - xc) ** 2 + (0.8 * (y - self.yb)) ** 2) / 120.0 + 0.2 * (y - self.yb)

    def lung_sd(self, x, y, z, right: bool):
        cx, cay_a, cay_p = self.cavity_axes(z)
        yy = y - self.yb
        ay = torch.where(yy < 0, cay_a if isinstance(cay_a, torch.Tensor) else torch.full_like(yy, cay_a),
                         cay_p if isinstance(cay_p, torch.Tensor) else torch.full_like(yy, cay_p))
        sd = _ellipse_sd(x, yy, cx, ay)
        sd = torch.maximum(sd, self.apex - z)
        sd = torch.maximum(sd, z - self.dome(x, y, right))
        mid = 4.0
        side = (mid - x) if right else (x - mid)
        width = 10.0 + 6.0 * _smoothstep(-40.0, 0.0, z)
        sd = torch.maximum(sd, width - side)  # mediastinum
        spine = _ellipse_sd(x - 2.0, y - self.spine_y, 36.0, 30.0)
        sd = torch.maximum(sd, -spine)
        sd = torch.maximum(sd, -self.heart_sd(x, y, z, grow=5.0))
        return sd

    def pulmonary_plan(self) -> dict:
        """The pulmonary arteries and veins down to the segmental level, without the grid: ``central`` paths
        (trunk, right and left pulmonary arteries, with radii) and per lung the feeding branches
        ``(right, start, end, direction, tree seed)`` of the arterial and venous trees."""
        hx, hy, hz = self.heart
        valve = (hx - 2.0, hy - 28.0, hz - 40.0)
        bif = (hx - 10.0, hy + 2.0, hz - 72.0)
        r_hilum = (-60.0 * self.sx, hy + 22.0, hz - 62.0)
        l_hilum = (58.0 * self.sx, hy + 28.0, hz - 72.0)
        central = {"trunk": ([valve, (hx - 4.0, hy - 20.0, hz - 60.0), bif], [14.0, 14.5, 13.5]),
                   "right": ([bif, (bif[0] - 25.0, bif[1] + 10.0, bif[2] + 4.0), r_hilum], [11.5, 11.0, 9.5]),
                   "left": ([bif, (bif[0] + 22.0, bif[1] + 14.0, bif[2] - 8.0), l_hilum], [11.0, 10.5, 9.0])}
        rng = random.Random(self.tree_seed)
        lowest = max(self.dome(sgn * self.cax, self.yb + self.cay_post, sgn < 0) for sgn in (-1.0, 1.0))

        def targets(right: bool, n: int) -> list:
            """``n`` points spread through one lung, at least 12 mm deep: where the segmental trees go."""
            found = []
            while len(found) < n:
                p = (rng.uniform(-self.cax, 0.0) if right else rng.uniform(0.0, self.cax),
                     rng.uniform(self.yb - self.cay_ant, self.yb + self.cay_post), rng.uniform(self.apex, lowest))
                if -self.lung_sd_point(*p, right) > 12.0:
                    found.append(p)
            return found

        def feeder(start, target, right):
            d = _unit(tuple(t - o for t, o in zip(target, start)))
            reach = 0.5 * math.dist(target, start)
            return right, start, tuple(o + reach * c for o, c in zip(start, d)), d, rng.getrandbits(32)

        la = (hx - 2.0, hy + 42.0, hz - 30.0)
        arteries, veins = [], []
        for right, hilum in ((True, r_hilum), (False, l_hilum)):
            arteries += [feeder(hilum, target, right) for target in targets(right, 28)]
            sign = -1.0 if right else 1.0
            for target in targets(right, 18):
                ostium = (la[0] + sign * 26.0, la[1] + 4.0, la[2] + (-14.0 if target[2] < la[2] else 14.0))
                veins.append(feeder(ostium, target, right))
        return {"central": central, "arteries": arteries, "veins": veins}

    def lung_sd_point(self, x: float, y: float, z: float, right: bool) -> float:
        """:meth:`lung_sd` at one point, in plain floats (the vessel trees ask it thousands of times)."""

        def ell(px, py, ax, ay):
            q = max(math.sqrt((px / ax) ** 2 + (py / ay) ** 2), 1e-6)
            grad = math.sqrt((px / ax**2) ** 2 + (py / ay**2) ** 2) / q
            return (q - 1.0) / max(grad, 1e-6)

        cx, cay_a, cay_p = self.cavity_axes(z)
        yy = y - self.yb
        sd = ell(x, yy, cx, cay_a if yy < 0 else cay_p)
        sd = max(sd, self.apex - z, z - self.dome(x, y, right))
        side = (4.0 - x) if right else (x - 4.0)
        sd = max(sd, 10.0 + 6.0 * _smoothstep(-40.0, 0.0, z) - side)
        sd = max(sd, -ell(x - 2.0, y - self.spine_y, 36.0, 30.0))
        u, v, w = self.heart_frame(x, y, z)
        k = self.heart_scale
        ax, ay, az = 60.0 * k + 5.0, 45.0 * k + 5.0, 38.0 * k + 5.0
        q = max(math.sqrt((u / ax) ** 2 + (v / ay) ** 2 + (w / az) ** 2), 1e-6)
        grad = math.sqrt((u / ax**2) ** 2 + (v / ay**2) ** 2 + (w / az**2) ** 2) / q
        return max(sd, -(q - 1.0) / max(grad, 1e-6))


def _tree(cv: _PartCanvas, anat: _AnatomyV2, seed: int, start, direction, radius: float, right: bool,
          min_radius: float, out: list, max_depth: int = 24) -> None:
    """A branching vessel tree that stays inside its lung; its segments ``(a, b, r0, r1)`` go to ``out``.

    Children share the parent's flow by Murray's law (r^3 = r_a^3 + r_b^3) with asymmetric splits; a
    branch that would leave the lung turns back toward the lung's centre or gets shorter, and is dropped
    only when that fails. Every branch draws from its own seed, so a finer grid only adds thinner branches."""
    centre = (-70.0 * anat.sx if right else 72.0 * anat.sx, anat.yb + 10.0, (anat.apex + anat.dome_r) / 2 + 20.0)
    stack = [(start, _unit(direction), radius, 0, seed)]
    while stack:
        p, d, r, depth, s = stack.pop()
        if r < min_radius or depth > max_depth:
            continue
        local = random.Random(s)
        length = r * local.uniform(3.0, 4.5) + 2.0
        to_centre = _unit(tuple(ci - pi for ci, pi in zip(centre, p)))
        end = None
        for bend, scale in ((0.0, 1.0), (0.4, 0.85), (0.9, 0.7), (1.6, 0.5), (3.0, 0.4)):
            dd = _unit(tuple(di + bend * ci for di, ci in zip(d, to_centre)))
            cand = tuple(pi + scale * length * di for pi, di in zip(p, dd))
            if depth == 0 or -anat.lung_sd_point(*cand, right) > 0.5 * r + 0.5:
                d, end = dd, cand
                break
        if end is None:
            continue
        r_end = r * 0.97
        out.append((p, end, r, r_end))
        cv.stats["vessel_segments"] += 1
        cv.stats["vessel_min_radius_mm"] = min(cv.stats["vessel_min_radius_mm"], r_end)
        cv.stats["vessel_max_depth"] = max(cv.stats["vessel_max_depth"], depth)
        ref = (0.0, 0.0, 1.0) if abs(d[2]) < 0.9 else (1.0, 0.0, 0.0)
        n = _unit((d[1] * ref[2] - d[2] * ref[1], d[2] * ref[0] - d[0] * ref[2], d[0] * ref[1] - d[1] * ref[0]))
        n = _rotate(n, d, local.uniform(0, 2 * math.pi))
        split = local.uniform(0.55, 0.95)
        r_a = r_end * (1.0 / (1.0 + split**3)) ** (1 / 3)
        r_b = r_a * split
        ang_a, ang_b = math.radians(local.uniform(10, 28)), -math.radians(local.uniform(28, 55))
        stack.append((end, _rotate(d, n, ang_a), r_a, depth + 1, local.getrandbits(32)))
        stack.append((end, _rotate(d, n, ang_b), r_b, depth + 1, local.getrandbits(32)))


PE_LEVELS = ("saddle", "main", "lobar", "segmental")  # most proximal first


def draw_emboli(anat: _AnatomyV2, seed: int) -> list[dict]:
    """The case's pulmonary emboli, drawn from ``seed`` (independent of the grid): 1-4 clots, each a
    filling defect of 20-80 HU in a contrast-filled pulmonary artery.

    Levels: ``saddle`` (astride the bifurcation of the trunk, partial), ``main`` (right or left pulmonary
    artery), ``lobar`` (its distal part at the hilum), ``segmental`` (a feeding branch of a segmental tree).
    A clot is occlusive (it fills the lumen) or partial (a central or mural defect with contrast beside it).
    Each clot: ``level``, ``side``, ``occlusive``, ``hu``, ``volume_ml`` (from its geometry: the lumen's
    or the clot's cross-section times its length) and ``pieces``, the vessel segments it sits in
    ``(a, b, r_a, r_b, t0, t1, fraction, offset)`` for :func:`_paint_clot`.
    """
    rng = random.Random(f"x2ct-pe-{seed}")
    plan = anat.pulmonary_plan()
    clots = []
    n = rng.randint(1, 4)
    for k in range(n):
        level = "saddle" if k == 0 and rng.random() < 0.12 else rng.choices(PE_LEVELS[1:], (0.15, 0.3, 0.55))[0]
        side = rng.choice(("right", "left"))
        occlusive = level != "saddle" and rng.random() < (0.5 if level == "segmental" else 0.3)
        fraction = 1.0 if occlusive else rng.uniform(0.45, 0.75)
        mural = not occlusive and rng.random() < 0.5
        pieces = []
        if level == "saddle":
            length = rng.uniform(18.0, 35.0)
            for name in ("right", "left"):
                path, radii = plan["central"][name]
                seg_len = math.dist(path[0], path[1])
                pieces.append((path[0], path[1], radii[0], radii[1], 0.0, min(length / seg_len, 0.95), fraction, 0.0))
            side = "both"
        elif level in ("main", "lobar"):
            path, radii = plan["central"][side]
            i = 0 if level == "main" else 1
            seg_len = math.dist(path[i], path[i + 1])
            length = rng.uniform(12.0, 30.0)
            t0 = rng.uniform(0.1 if level == "main" else 0.0, max(0.1, 1.0 - length / seg_len))
            pieces.append((path[i], path[i + 1], radii[i], radii[i + 1], t0, min(t0 + length / seg_len, 1.0),
                           fraction, 0.0))
        else:
            feeders = [f for f in plan["arteries"] if f[0] == (side == "right")]
            _, a, b, _, _ = feeders[rng.randrange(len(feeders))]
            seg_len = math.dist(a, b)
            length = rng.uniform(8.0, 20.0)
            t0 = rng.uniform(0.3, max(0.3, 0.95 - length / seg_len))
            pieces.append((a, b, 5.0, 3.6, t0, min(t0 + length / seg_len, 1.0), fraction, 0.0))
        turn = rng.uniform(0.0, 2.0 * math.pi)
        if mural:  # the defect leans against one wall
            pieces = [(*pc[:7], turn) for pc in pieces]
        volume = 0.0
        for a, b, ra, rb, t0, t1, frac, _ in pieces:
            r = ra + 0.5 * (t0 + t1) * (rb - ra)
            volume += math.pi * (frac * r) ** 2 * (t1 - t0) * math.dist(a, b) / 1000.0
        clots.append({"level": level, "side": side, "occlusive": occlusive, "mural": mural,
                      "hu": rng.uniform(20.0, 80.0), "volume_ml": volume, "pieces": pieces})
    return clots


def pe_study(anat: _AnatomyV2, seed: int, present: bool) -> dict:
    """Per-case annotations: ``pe_present``, ``pe_count``, ``pe_volume_ml`` and ``pe_location`` (the most
    proximal level, ``none`` without emboli)."""
    if not present:
        return {"pe_present": 0, "pe_count": 0, "pe_volume_ml": 0.0, "pe_location": "none"}
    clots = draw_emboli(anat, seed)
    level = min((c["level"] for c in clots), key=PE_LEVELS.index)
    return {"pe_present": 1, "pe_count": len(clots), "pe_volume_ml": round(sum(c["volume_ml"] for c in clots), 4),
            "pe_location": level}


def _paint_clot(cv: _PartCanvas, a, b, ra: float, rb: float, t0: float, t1: float, fraction: float, offset: float,
                hu: float) -> None:
    """A filling defect inside the vessel segment a-b (radii ra, rb) between t0 and t1 along it: a tube of
    ``fraction`` of the lumen's radius, on the axis or (``offset`` = an angle, radians) against the wall,
    clipped to the lumen."""
    wa, wb = cv.world_point(a), cv.world_point(b)
    pad = max(ra, rb) + cv.vmean
    sl = cv.box([min(p, q) - pad for p, q in zip(a, b)], [max(p, q) + pad for p, q in zip(a, b)])
    if sl is None:
        return
    ab = tuple(q - p for p, q in zip(wa, wb))
    ll = sum(c * c for c in ab) or 1e-9
    x = cv.wx[sl[2]][None, None, :] - wa[0]
    y = cv.wy[sl[1]][None, :, None] - wa[1]
    z = cv.wz[sl[0]][:, None, None] - wa[2]
    t = ((x * ab[0] + y * ab[1] + z * ab[2]) / ll).clamp(0.0, 1.0)
    radius = ra + t * (rb - ra)
    lumen = ((x - t * ab[0]) ** 2 + (y - t * ab[1]) ** 2 + (z - t * ab[2]) ** 2).sqrt() - radius
    # the clot's axis: the vessel's, shifted toward the wall for a mural defect
    d = _unit(ab)
    ref = (0.0, 0.0, 1.0) if abs(d[2]) < 0.9 else (1.0, 0.0, 0.0)
    n = _unit((d[1] * ref[2] - d[2] * ref[1], d[2] * ref[0] - d[0] * ref[2], d[0] * ref[1] - d[1] * ref[0]))
    n = _rotate(n, d, offset)
    shift = (1.0 - fraction) * 0.9 if offset else 0.0
    cx = x - shift * radius * n[0]
    cy = y - shift * radius * n[1]
    cz = z - shift * radius * n[2]
    radial = ((cx - t * ab[0]) ** 2 + (cy - t * ab[1]) ** 2 + (cz - t * ab[2]) ** 2).sqrt()
    ends = torch.maximum(t0 - t, t - t1) * math.sqrt(ll)  # flat ends at t0 and t1 (negative between them)
    core = torch.maximum(radial - fraction * radius - (0.5 if fraction >= 1 else 0.0), ends)
    cv.paint(cv.cover(torch.maximum(core, lumen)), hu, C.P_EMBOLUS, sl)


def _texture(cv: _Canvas, seed: int, cell_mm: float, sl) -> torch.Tensor:
    """Smooth noise on a lattice fixed in patient millimetres (the same at every resolution), in a box."""
    g = torch.Generator().manual_seed(seed)
    n = int(math.ceil(400.0 / cell_mm)) + 3
    lattice = torch.randn((1, 1, n, n, n), generator=g)
    x, y, z = cv.coords(sl)
    x, y, z = torch.broadcast_tensors(x, y, z)
    half = (n - 1) * cell_mm / 2
    grid = torch.stack([x / half, y / half, z / half], dim=-1)[None]
    return F.grid_sample(lattice, grid, mode="bilinear", align_corners=True)[0, 0]


def render_v2(anat: _AnatomyV2, cv: _PartCanvas, rng_noise: torch.Generator, table: bool, noise_hu: float,
              arms: bool, emboli: list | None = None) -> None:
    P = C
    x, y, z = cv.coords()
    min_r = 0.4 * min(cv.vox)

    # body: subcutaneous fat, muscle and mediastinal soft tissue
    body = anat.body_sd(x, y, z)
    cv.paint(cv.cover(body), -100.0, P.P_FAT)
    cv.paint(cv.cover(body + anat.fat), 50.0, P.P_SOFT)
    # a layer of intermuscular / retroperitoneal fat below the diaphragm
    bottom_z = cv.size[2] / 2 + 20.0
    hx, hy, hz = anat.heart
    sy = anat.spine_y
    top = -cv.size[2] / 2 - 10.0
    bottom = cv.size[2] / 2 + 10.0

    # arms at the sides: fat, muscle and the humerus (cortex and marrow)
    if arms:
        for side in (-1.0, 1.0):
            ax_ = side * (anat.ax + 38.0 * anat.sx)
            shoulder = (ax_ - side * 12.0, anat.yb + 5.0, anat.apex - 5.0)
            elbow = (ax_ + side * 6.0, anat.yb + 25.0, anat.apex + 300.0)
            cv.tube([shoulder, elbow], [46.0 * anat.sx, 40.0 * anat.sx], -100.0, P.P_FAT)
            cv.tube([shoulder, elbow], [38.0 * anat.sx, 32.0 * anat.sx], 50.0, P.P_SOFT)
            cv.bone_tube([shoulder, elbow], [13.0, 10.5], 1250.0, 10.0, 4.0, P.P_ARM_BONE)
            cv.flush_bones()  # inside the arm's soft tissue, before anything else is painted

    # upper abdomen under the domes: liver (right), spleen (left posterior), stomach (left anterior)
    sl = cv.box([-anat.ax - 10, -anat.ay_ant - 20, anat.dome_r - 20], [anat.ax + 10, anat.ay_post + 20, bottom_z])
    if sl is not None:
        bx, by, bz = cv.coords(sl)
        bsd = anat.body_sd(bx, by, bz)
        below_r = bz - anat.dome(bx, by, True) - 5.0
        below_l = bz - anat.dome(bx, by, False) - 5.0
        # the abdominal cavity: bowel and mesenteric fat, a mixture about -20 HU, under the organs
        cavity = torch.maximum(torch.maximum(bsd + anat.fat + 14.0, -torch.minimum(below_r, below_l)),
                               -_ellipse_sd(bx - 2.0, by - anat.spine_y, 40.0, 34.0))
        cv.paint(cv.cover(cavity), -20.0 + 10.0 * _texture(cv, anat.texture_seed + 2, 15.0, sl), P.P_SOFT, sl)
        liver = torch.maximum(torch.maximum(bsd + anat.fat + 9.0, -below_r),
                              bx - (45.0 * anat.sx - 0.9 * (bz - anat.dome_r).clamp_min(0)))
        liver = torch.maximum(liver, (by - anat.spine_y + 5.0) - 0.4 * (bx + 60.0).clamp_min(0))
        cv.paint(cv.cover(liver), anat.liver_hu, P.P_LIVER, sl)
        spl_c = (85.0 * anat.sx, anat.yb + 55.0 * anat.sy, anat.dome_l + 45.0)
        spleen = torch.maximum(_ellipsoid_sd(bx - spl_c[0], by - spl_c[1], bz - spl_c[2], 28.0, 45.0, 55.0),
                               -below_l)
        cv.paint(cv.cover(spleen), anat.spleen_hu, P.P_SPLEEN, sl)
        st_c = (55.0 * anat.sx, anat.yb - 30.0 * anat.sy, anat.dome_l + 45.0)
        stomach = torch.maximum(_ellipsoid_sd(bx - st_c[0], by - st_c[1], bz - st_c[2], 45.0, 40.0, 55.0), -below_l)
        cv.paint(cv.cover(stomach), 30.0, P.P_STOMACH, sl)
        cv.paint(cv.cover(torch.maximum(stomach + 5.0, bz - (st_c[2] - 18.0))), -1000.0, P.P_AIR, sl)
        for side in (-1.0, 1.0):
            kz = anat.dome_r + (95.0 if side < 0 else 85.0)
            kc = (side * 62.0 * anat.sx, anat.spine_y + 5.0, kz)
            kid = _ellipsoid_sd(bx - kc[0], by - kc[1], bz - kc[2], 28.0, 22.0, 55.0)
            cv.paint(cv.cover(kid - 8.0), -90.0, P.P_FAT, sl)  # perirenal fat
            cv.paint(cv.cover(kid), anat.kidney_hu, P.P_KIDNEY, sl)
            cv.paint(cv.cover(kid + 14.0), 30.0, P.P_KIDNEY, sl)  # medulla / sinus
    # mediastinal fat in front of the great vessels
    sl = cv.box([-35, -80, -135], [40, 0, 15])
    if sl is not None:
        bx, by, bz = cv.coords(sl)
        cv.paint(cv.cover(_ellipsoid_sd(bx - 2.0, by + 38.0, bz + 60.0, 28.0, 22.0, 60.0)), -95.0, P.P_FAT, sl)

    # lungs with parenchymal texture at two scales (fixed in millimetres)
    lowest = max(anat.dome(sgn * anat.cax, anat.yb + anat.cay_post, sgn < 0) for sgn in (-1.0, 1.0)) + 10.0
    for right in (True, False):
        xr = (-anat.cax - 10.0, 10.0) if right else (-10.0, anat.cax + 10.0)
        sl = cv.box([xr[0], anat.yb - anat.cay_ant - 10, anat.apex - 5], [xr[1], anat.yb + anat.cay_post + 10, lowest])
        if sl is None:
            continue
        bx, by, bz = cv.coords(sl)
        tex = (30.0 * _texture(cv, anat.texture_seed, 24.0, sl) + 18.0 * _texture(cv, anat.texture_seed + 1, 7.0, sl))
        gravity = 45.0 * _smoothstep(-60.0, 90.0, by - anat.yb)  # dependent (posterior) lung is denser
        cv.paint(cv.cover(anat.lung_sd(bx, by, bz, right)), -870.0 + tex + gravity, P.P_LUNG, sl)

    # heart: epicardial fat, myocardium, right (anterior) and left chambers, atria above the AV plane
    hsl = cv.box([hx - 95, hy - 95, hz - 95], [hx + 95, hy + 95, hz + 95])
    if hsl is not None:
        bx, by, bz = cv.coords(hsl)
        cv.paint(cv.cover(anat.heart_sd(bx, by, bz, grow=4.0)), -95.0, P.P_FAT, hsl)
        cv.paint(cv.cover(anat.heart_sd(bx, by, bz)), anat.myo_hu, P.P_MYOCARDIUM, hsl)
        k = anat.heart_scale
        uu, vv, ww = anat.heart_frame(bx, by, bz)
        rv = torch.maximum(anat.heart_sd(bx, by, bz, grow=-4.0 * k), vv + 5.0)  # right: anterior of the septum
        cv.paint(cv.cover(rv), anat.pa_hu * 0.95, P.P_BLOOD_RIGHT, hsl)
        lv = _ellipsoid_sd(uu - 4.0, vv - 20.0 * k, ww, 44.0 * k, 24.0 * k, 26.0 * k)
        lv = torch.maximum(lv, 5.0 - vv)  # septum about 10 mm
        cv.paint(cv.cover(lv), anat.sys_hu, P.P_BLOOD_LEFT, hsl)
        # atrioventricular groove: a myocardial/fat band across both sides near the base
        groove = torch.maximum((uu + 26.0 * k).abs() - 3.0, anat.heart_sd(bx, by, bz, grow=-4.0 * k))
        cv.paint(cv.cover(groove), anat.myo_hu, P.P_MYOCARDIUM, hsl)

    # great vessels (CTPA: the pulmonary side brightest)
    root = (hx - 12.0, hy + 5.0, hz - 28.0)
    aorta = [root, (hx - 30.0, hy - 8.0, hz - 62.0), (hx - 26.0, hy - 6.0, hz - 95.0), (2.0, hy + 12.0, hz - 120.0),
             (18.0, sy - 30.0, hz - 114.0), (22.0, sy - 14.0, hz - 85.0), (20.0, sy - 12.0, hz - 20.0),
             (12.0, sy - 14.0, bottom)]
    cv.tube(aorta, [14.0, 15.0, 14.0, 13.0, 12.0, 11.5, 11.0, 10.5], anat.sys_hu, P.P_AORTA)
    arch_top = (2.0, hy + 12.0, hz - 120.0)
    for dx, r in ((-14.0, 6.5), (0.0, 4.5), (12.0, 5.0)):
        cv.tube([(arch_top[0] + dx, arch_top[1], arch_top[2] + 4.0), (arch_top[0] + 1.8 * dx, arch_top[1] - 4.0, top)],
                [r, r * 0.9], anat.sys_hu, P.P_AORTA)
    cv.tube([(hx - 52.0, hy - 2.0, top), (hx - 50.0, hy + 2.0, hz - 60.0), (hx - 45.0, hy + 6.0, hz - 25.0)],
            [10.0, 10.5, 11.0], min(anat.pa_hu * 1.4, 650.0), P.P_CAVA)  # SVC: undiluted contrast
    cv.tube([(hx - 40.0, hy + 25.0, hz + 30.0), (hx - 35.0, sy - 25.0, hz + 60.0), (-20.0, sy - 25.0, bottom)],
            [12.0, 12.0, 11.0], 120.0, P.P_CAVA)  # IVC: unenhanced blood mixing in
    plan = anat.pulmonary_plan()
    for path, radii in plan["central"].values():
        cv.tube(path, radii, anat.pa_hu, P.P_PULM_ARTERY)
    # pulmonary arteries: from each hilum a feeding branch halfway to a target spread through the lung, then a
    # tree toward it; veins the same way from the left atrium's ostia
    arteries, veins = [], []
    for right, a, b, d, seed in plan["arteries"]:
        arteries.append((a, b, 5.0, 3.6))
        _tree(cv, anat, seed, b, d, 3.8, right, min_r, arteries)
    for right, a, b, d, seed in plan["veins"]:
        veins.append((a, b, 5.5, 3.6))
        _tree(cv, anat, seed, b, d, 3.5, right, 1.2 * min_r, veins)
    cv.segments(veins, anat.sys_hu, P.P_LUNG_VEIN)
    cv.segments(arteries, anat.pa_hu, P.P_LUNG_ARTERY)
    for clot in emboli or ():
        for piece in clot["pieces"]:
            _paint_clot(cv, *piece, clot["hu"])

    # airways: trachea, main and lobar bronchi (wall, then lumen)
    carina = (2.0, sy - 38.0, hz - 90.0)
    trachea = [(0.0, sy - 45.0, top), (1.0, sy - 42.0, hz - 132.0), carina]
    rb = [carina, (-22.0, sy - 36.0, hz - 80.0), (-45.0 * anat.sx, sy - 32.0, hz - 72.0)]
    lb = [carina, (25.0, sy - 34.0, hz - 82.0), (50.0 * anat.sx, sy - 30.0, hz - 68.0)]
    for path, radii in ((trachea, [9.0, 9.0, 8.0]), (rb, [7.0, 6.5, 5.5]), (lb, [6.0, 5.8, 5.0])):
        cv.tube(path, [r + 2.0 for r in radii], 40.0, P.P_AIRWAY_WALL)
    for path, radii in ((trachea, [9.0, 9.0, 8.0]), (rb, [7.0, 6.5, 5.5]), (lb, [6.0, 5.8, 5.0])):
        cv.tube(path, radii, -1000.0, P.P_AIR)
    for end, dirs in ((rb[-1], [(-0.4, 0.1, -0.9), (-0.6, 0.3, 0.7), (-0.7, -0.4, 0.3)]),
                      (lb[-1], [(0.4, 0.1, -0.9), (0.6, 0.3, 0.7)])):
        for dvec in dirs:
            tip = tuple(e + 28.0 * c for e, c in zip(end, _unit(dvec)))
            cv.tube([end, tip], [5.0, 3.5], 40.0, P.P_AIRWAY_WALL, min_radius=0.5 * min_r)
            cv.tube([end, tip], [3.5, 2.2], -1000.0, P.P_AIR, min_radius=min_r)

    # spine: vertebral bodies (thin cortex over cancellous bone), discs, arches and processes
    level = anat.vert_h + anat.disc_h
    zc = anat.spine_top
    k = 0
    while zc < bottom + level:
        growth = min(1.0, max(0.0, (zc + 160.0) / 320.0))
        rx, ry = 16.0 + 8.0 * growth, 13.0 + 6.0 * growth
        ys = sy + 6.0 * math.cos(math.pi * zc / 320.0)
        sl = cv.box([-rx - 40, ys - ry - 5, zc - level / 2 - 2], [rx + 40, ys + ry + 70, zc + level / 2 + 2])
        if sl is not None:
            bx, by, bz = cv.coords(sl)
            vb = torch.maximum(_ellipse_sd(bx, by - ys, rx, ry).expand(bz.shape[0], -1, -1),
                               (bz - zc).abs() - anat.vert_h / 2)
            cv.shell(vb, 1150.0, 230.0, 1.0, P.P_SPINE, sl)
            disc = torch.maximum(_ellipse_sd(bx, by - ys, rx - 0.5, ry - 0.5).expand(bz.shape[0], -1, -1),
                                 (bz - zc - level / 2).abs() - anat.disc_h / 2)
            cv.paint(cv.cover(disc), 85.0, P.P_SOFT, sl)
            canal_y = ys + ry + 9.0
            rho = ((bx**2 + (by - canal_y) ** 2).sqrt()).expand(bz.shape[0], -1, -1)
            ring = torch.maximum(torch.maximum(rho - 15.0, 8.0 - rho), (ys + ry - 3.0) - by)
            ring = torch.maximum(ring, (bz - zc + 1.0).abs() - (anat.vert_h / 2 - 2.0))
            cv.shell(ring, 1100.0, 260.0, 1.0, P.P_SPINE, sl)
            cv.paint(cv.cover(torch.maximum(rho - 7.5, (bz - zc).abs() - level / 2)), 15.0, P.P_SOFT, sl)
        canal_y = ys + ry + 9.0
        cv.bone_tube([(0.0, canal_y + 12.0, zc), (0.0, canal_y + 40.0, zc + 16.0)], [5.5, 3.5], 1100.0, 260.0, 1.0,
                     P.P_SPINE)
        for side in (-1.0, 1.0):
            tip = (side * 34.0, canal_y + 4.0, zc - 3.0)
            cv.bone_tube([(side * 10.0, canal_y - 2.0, zc - 2.0), tip], [5.5, 4.5], 1100.0, 260.0, 1.0, P.P_SPINE)
            if 0 <= k < 12:
                _rib_v2(cv, anat, k, tip, zc, side)
        zc += level
        k += 1

    # sternum and clavicles
    st_top = anat.sternum_top
    st_bot = st_top + 170.0
    front = anat.yb - anat.ay_ant + anat.fat + 9.0
    ssl = cv.box([-40, -anat.ay_ant - 10, st_top - 5], [40, anat.yb - anat.ay_ant + 60, st_bot + 25])
    if ssl is not None:
        sx_, sy_, sz_ = cv.coords(ssl)
        width = (18.0 + 9.0 * (1 - _smoothstep(st_top + 35.0, st_top + 55.0, sz_))
                 - 9.0 * _smoothstep(st_bot - 10, st_bot + 10, sz_))
        thick = 6.5 - 2.0 * _smoothstep(st_bot - 10, st_bot + 10, sz_)
        st = torch.maximum(_ellipse_sd(sx_, sy_ - front, width, thick),
                           torch.maximum(st_top - sz_, sz_ - st_bot - 20.0))
        cv.shell(st, 1100.0, 260.0, 1.2, P.P_STERNUM, ssl)
    for side in (-1.0, 1.0):
        clav = [(side * 22.0, front, st_top + 4.0), (side * 60.0, front - 2.0, st_top - 8.0),
                (side * 100.0 * anat.sx, front + 25.0, st_top - 14.0),
                (side * 125.0 * anat.sx, front + 60.0, st_top - 10.0)]
        cv.bone_tube(clav, [7.0, 6.5, 6.5, 7.0], 1150.0, 260.0, 1.2, P.P_CLAVICLE)
    # scapulae: plates on the posterior chest wall, thin cortex around a thin cancellous core
    for side in (-1.0, 1.0):
        medial = (side * 48.0 * anat.sx, anat.yb + anat.ay_post * 0.97 - anat.fat - 5.0)
        lateral = (side * 128.0 * anat.sx, anat.yb + anat.ay_post * 0.52 - anat.fat - 2.0)
        cxs, cys, czs = (medial[0] + lateral[0]) / 2, (medial[1] + lateral[1]) / 2, anat.apex + 80.0
        ex, ey = _unit((lateral[0] - medial[0], lateral[1] - medial[1], 0.0))[:2]
        half = math.hypot(lateral[0] - medial[0], lateral[1] - medial[1]) / 2
        ssl = cv.box([cxs - half - 10, cys - half - 10, czs - 85], [cxs + half + 10, cys + half + 10, czs + 85])
        if ssl is None:
            continue
        px, py, pz = cv.coords(ssl)
        u_ = ex * (px - cxs) + ey * (py - cys)
        v_ = -ey * (px - cxs) + ex * (py - cys)
        bend = side * 0.004 * (u_**2 - half**2)
        plate = _ellipsoid_sd(u_, v_ + bend, pz - czs, half, 4.0, 75.0)
        cv.shell(plate, 1000.0, 300.0, 1.2, P.P_SCAPULA, ssl)

    cv.flush_bones()

    if table:
        back = anat.yb + anat.ay_post * 1.0 + 3.0
        tx = cv.wx[None, None, :] - cv.shift[0]
        ty = cv.wy[None, :, None] - cv.shift[1]
        plate = torch.maximum((ty - back - 12.0).abs() - 12.0, tx.abs() - 230.0)
        cv.paint(cv.cover(plate), -950.0, P.P_TABLE)
        cv.paint(cv.cover(torch.maximum(plate, 9.0 - (ty - back - 12.0).abs())), 220.0, P.P_TABLE)

    if noise_hu > 0:
        noise = torch.randn(cv.shape, generator=rng_noise) * noise_hu
        cv.hu += noise * (cv.labels > 0)


def _rib_v2(cv: _PartCanvas, anat: _AnatomyV2, k: int, tip, zc: float, side: float) -> None:
    """Rib k (0 = first): back and down from the transverse process around the chest wall, its lowest point
    anterolateral, then up again through its costal cartilage to the sternum (ribs 1-7) or the costal margin."""
    true_rib = k < 7
    end = math.radians(150.0 if true_rib else (128.0 if k < 10 else 95.0))
    start = math.radians(18.0)
    drop = anat.rib_drop * (0.45 if k == 0 else (0.75 if k == 1 else 1.0))
    pts, radii = [tip], [5.0]
    n = int(min(20, max(6, 220.0 / (2.5 * cv.vmean))))
    lowest = 0.78
    for i in range(1, n + 1):
        phi = start + (end - start) * i / n
        t = i / n
        rise = 0.18 * drop * _smoothstep(lowest, 1.0, t) if true_rib else 0.0
        zz = zc - 5.0 * math.sin(math.pi * min(t * 4, 1.0)) + drop * min(t / lowest, 1.0) ** 1.3 - rise
        cx, cay_a, cay_p = anat.cavity_axes(zz)
        ay = cay_p if math.cos(phi) > 0 else cay_a
        pts.append((side * (cx + 6.0) * math.sin(phi), anat.yb + (ay + 6.0) * math.cos(phi), zz))
        radii.append(5.6 - 1.2 * t)
    cv.bone_tube(pts, radii, 1100.0, 210.0, 0.6, C.P_RIB)
    if true_rib:
        front = anat.yb - anat.ay_ant + anat.fat + 9.0
        st_z = anat.sternum_top + 10.0 + 24.0 * k * anat.sz
        mid = ((pts[-1][0] + side * 20.0) / 2, (pts[-1][1] + front) / 2 - 4.0, (pts[-1][2] + st_z) / 2 + 4.0)
        cv.tube([pts[-1], mid, (side * 20.0, front + 4.0, st_z)], [4.0, 4.0, 3.8], 150.0, C.P_CARTILAGE)
