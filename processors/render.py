"""Motion frames (52 ARKit weights + head pose) to RGB frames of one portrait.

Runs in the render+encode process between the motion topic and the video topic: one
``grid_sample`` warp of the portrait per frame, then the eyeballs and the mouth interior
composited behind the lids and lips. See processors/portrait.py for the field conventions.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Final

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

from backbone.blendshapes import BLENDSHAPES, INDEX
from processors.portrait import (LIP_INNER_LOWER, LIP_INNER_UPPER, PortraitPack, default_pack,
                                 load_pack)

MAX_HEAD_RAD: Final = 0.35  # the warp is a small-angle model; past ~20 degrees it smears
FIXED_POINT_STEPS: Final = 8  # contraction ~0.6 per step where a smile pulls hardest
LIP_EDGE_INSET: Final = 1.0  # px at 512: clamp a little inside the lip, off the teeth
CAVITY_DARK: Final = (24.0, 8.0, 10.0)
CAVITY_RIM: Final = (92.0, 34.0, 38.0)

Tensor = torch.Tensor


class FaceRenderer:
    """Renders frames of one portrait pack. Not thread-safe; one per session/process.

    The constructor only records settings; :meth:`start` loads the pack (the default
    astronaut when none is given) and prepares tensors. By default ``start`` sets torch's
    intra-op threads to 1 (process-wide): a renderer per core scales better than one
    renderer on all cores, and it keeps latency flat. Pass ``torch_threads=None`` to leave
    the setting alone.
    """

    def __init__(self, pack: PortraitPack | None = None, *, size: int = 512,
                 pack_path: str | Path | None = None, torch_threads: int | None = 1) -> None:
        self._pack_arg = pack
        self._pack_path = Path(pack_path) if pack_path is not None else None
        self._size = pack.size if pack is not None else size
        self._threads = torch_threads
        self._ready = False

    @property
    def size(self) -> int:
        return self._size

    @property
    def pack(self) -> PortraitPack:
        self._require_started()
        return self._pack

    def start(self) -> None:
        if self._ready:
            return
        if self._threads is not None:
            torch.set_num_threads(self._threads)
        if self._pack_arg is not None:
            pack = self._pack_arg.resized(self._size)
        elif self._pack_path is not None:
            pack = load_pack(self._pack_path).resized(self._size)
        else:
            pack = default_pack(self._size)
        self._pack = pack
        self._prepare(pack)
        self._ready = True

    # -----------------------------------------------------------------------------------------

    def _prepare(self, pack: PortraitPack) -> None:
        s = pack.size
        res = pack.fields.shape[1]
        self._step = pack.step
        self._res = res
        names = pack.field_names
        head_names = ("yaw", "pitch", "roll")
        bs_names = [n for n in names if n not in head_names]
        self._bs_index = torch.tensor([INDEX[n] for n in bs_names], dtype=torch.long)
        self._bs_rows = [names.index(n) for n in bs_names]
        self._head_rows = [names.index(n) for n in head_names]
        self._jaw_col = bs_names.index("jawOpen") if "jawOpen" in bs_names else -1
        self._close_col = bs_names.index("mouthClose") if "mouthClose" in bs_names else -1
        fields = torch.from_numpy(np.ascontiguousarray(
            pack.fields.transpose(0, 3, 1, 2)))  # (K, 2, R, R)
        # One padding cell (replicate) lets any cell block be upsampled exactly.
        fields = F.pad(fields, (1, 1, 1, 1), mode="replicate")
        self._bs_fields = fields[self._bs_rows].reshape(len(self._bs_rows), -1).contiguous()
        self._head_fields = fields[self._head_rows].reshape(3, -1).contiguous()
        # Where anything can move: the warp only runs there, the rest is a copy.
        moving = (np.abs(pack.fields).max(axis=(0, 3)) > 1e-6)
        rows = np.flatnonzero(moving.any(axis=1))
        cols = np.flatnonzero(moving.any(axis=0))
        if len(rows) == 0:
            rows = cols = np.array([res // 2])
        self._roi_cells = (max(int(rows[0]) - 1, 0), min(int(rows[-1]) + 2, res),
                           max(int(cols[0]) - 1, 0), min(int(cols[-1]) + 2, res))
        r0, r1, c0, c1 = self._roi_cells
        st = self._step
        self._roi = (r0 * st, r1 * st, c0 * st, c1 * st)
        self._id_coarse = _identity_grid(res + 2, res + 2, res, -1, -1)  # padded coarse grid
        y0, y1, x0, x1 = self._roi
        self._id_roi = _identity_grid(y1 - y0, x1 - x0, s, y0, x0, pixel=True)
        img = torch.from_numpy(pack.image.astype(np.float32)).permute(2, 0, 1)
        alpha = torch.from_numpy(pack.skin_alpha)[None]
        self._skin = torch.cat([img * alpha, alpha], dim=0)[None].contiguous()  # premultiplied
        self._eye_back = torch.from_numpy(
            pack.eye_back.astype(np.float32)).permute(2, 0, 1)[None].contiguous()
        self._image_u8 = np.ascontiguousarray(pack.image)
        self._regions = []
        for region in pack.regions:
            rf = torch.from_numpy(np.ascontiguousarray(region.fields.transpose(0, 3, 1, 2)))
            bs = rf[self._bs_rows].reshape(len(self._bs_rows), -1).contiguous()
            ra0, ra1, rc0, rc1 = region.cells
            if region.name == "mouth":
                # The whole image, not just the box: a head turn can bring pixels in from
                # outside it, and the lip clamp must still know which side they are on.
                mask = torch.from_numpy(pack.mouth_side)[None, None].contiguous()
            else:
                mask = torch.zeros(1, 1, s, s)
                mask[0, 0, ra0 * st:ra1 * st, rc0 * st:rc1 * st] = torch.from_numpy(region.mask)
            self._regions.append(_Region(region.name, region.cells, bs,
                                         (ra1 - ra0 + 2, rc1 - rc0 + 2), mask))
        # Between the mouth corners the lips are cut apart: a pixel on one lip must never
        # sample the other lip or the photo's own teeth, so its source row is clamped to its
        # lip's inner edge (+inf/-inf: no clamp outside the corners).
        lm = pack.landmarks[:, :2].astype(np.float64)
        xs = np.arange(s, dtype=np.float64)
        inside = (xs > lm[LIP_INNER_UPPER[0], 0]) & (xs < lm[LIP_INNER_UPPER[-1], 0])
        edge_up = _contour_y(lm, LIP_INNER_UPPER, xs) - LIP_EDGE_INSET * s / 512
        edge_lo = _contour_y(lm, LIP_INNER_LOWER, xs) + LIP_EDGE_INSET * s / 512
        self._edge_up = torch.from_numpy(np.where(inside, edge_up, np.inf).astype(np.float32))
        self._edge_lo = torch.from_numpy(np.where(inside, edge_lo, -np.inf).astype(np.float32))
        lm32 = lm.astype(np.float32)
        self._lip_upper = torch.from_numpy(lm32[list(LIP_INNER_UPPER)])
        self._lip_lower = torch.from_numpy(lm32[list(LIP_INNER_LOWER)])
        mouth = pack.mouth
        self._tex_upper = torch.from_numpy(mouth.upper).permute(2, 0, 1)[None].contiguous()
        self._tex_lower = torch.from_numpy(mouth.lower).permute(2, 0, 1)[None].contiguous()
        self._tex_rows_per_px = mouth.px_size / s

    def _require_started(self) -> None:
        if not self._ready:
            raise RuntimeError("FaceRenderer.start() has not been called")

    # -----------------------------------------------------------------------------------------

    def render(self, weights: NDArray[np.floating], head: NDArray[np.floating]) -> NDArray[
            np.uint8]:
        """One frame (size, size, 3) RGB from 52 weights and (yaw, pitch, roll) radians.

        Weights are clamped to [0, 1] and NaN becomes 0 (the caller counts bad input).
        """
        w = np.asarray(weights, dtype=np.float32).reshape(1, -1)
        h = np.asarray(head, dtype=np.float32).reshape(1, -1)
        return self.render_batch(w, h)[0]

    def render_batch(self, weights: NDArray[np.floating], head: NDArray[np.floating]) -> NDArray[
            np.uint8]:
        """Frames (N, size, size, 3) from weights (N, 52) and head pose (N, 3)."""
        self._require_started()
        w = np.asarray(weights, dtype=np.float32)
        h = np.asarray(head, dtype=np.float32)
        if w.ndim != 2 or w.shape[1] != len(BLENDSHAPES):
            raise ValueError(f"weights must be (N, {len(BLENDSHAPES)}), got {w.shape}")
        if h.shape != (w.shape[0], 3):
            raise ValueError(f"head must be (N, 3), got {h.shape}")
        w = np.clip(np.nan_to_num(w, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
        h = np.clip(np.nan_to_num(h, nan=0.0, posinf=0.0, neginf=0.0), -MAX_HEAD_RAD,
                    MAX_HEAD_RAD)
        n = w.shape[0]
        out = np.empty((n, self._size, self._size, 3), dtype=np.uint8)
        chunk = 8  # bounds memory; batching beyond this buys nothing on CPU
        with torch.inference_mode():
            for start in range(0, n, chunk):
                stop = min(start + chunk, n)
                self._render_chunk(torch.from_numpy(w[start:stop]),
                                   torch.from_numpy(h[start:stop]), out[start:stop])
        return out

    def _render_chunk(self, w: Tensor, head: Tensor, out: NDArray[np.uint8]) -> None:
        n = w.shape[0]
        res, st, s = self._res, self._step, self._size
        coeff = w[:, self._bs_index]
        if self._close_col >= 0 and self._jaw_col >= 0:
            # ARKit's mouthClose only means "lips together while the jaw is open".
            coeff[:, self._close_col] = torch.minimum(coeff[:, self._close_col],
                                                      coeff[:, self._jaw_col])
        padded = res + 2
        bs = (coeff @ self._bs_fields).view(n, 2, padded, padded)
        hd = (head @ self._head_fields).view(n, 2, padded, padded)
        # Blendshapes act on the unrotated face, then the head turns: sample the blendshape
        # flow where the head motion comes from (all on the coarse grid, it is smooth).
        grid_c = self._id_coarse + hd.permute(0, 2, 3, 1)
        bs_at = _sample(bs, grid_c, padded, res)
        total = hd + bs_at
        r0, r1, c0, c1 = self._roi_cells
        flow = _upsample_block(total, (r0, r1, c0, c1), st)  # (n, 2, roi_h, roi_w)
        y0, _, x0, _ = self._roi
        head_roi: Tensor | None = None
        for region in self._regions:
            a0, a1, b0, b1 = region.cells
            ph, pw = region.padded_shape
            alt = (coeff @ region.fields).view(n, 2, ph, pw)
            # The alternative field lives on a sub-grid; sample it at the head-displaced cells.
            cell_grid = grid_c[:, a0:a1 + 2, b0:b1 + 2]
            alt_at = _sample_sub(alt, cell_grid, res, (a0 - 1, b0 - 1))
            delta = alt_at - bs_at[:, :, a0:a1 + 2, b0:b1 + 2]
            delta_full = _upsample_padded(delta, st)
            if head_roi is None:
                head_roi = _upsample_block(hd, (r0, r1, c0, c1), st)
            by0, bx0 = a0 * st - y0, b0 * st - x0
            by1, bx1 = by0 + delta_full.shape[2], bx0 + delta_full.shape[3]
            # Which side is a pixel on? The side its first-side source lies on: the first
            # side (lower lid, upper lip) stays in front wherever it really is, and the
            # second side shows through where the first has moved away.
            base_grid = (self._id_roi[:, by0:by1, bx0:bx1]
                         + flow[:, :, by0:by1, bx0:bx1].permute(0, 2, 3, 1))
            mask = F.grid_sample(region.mask.expand(n, -1, -1, -1), base_grid, mode="bilinear",
                                 padding_mode="zeros", align_corners=False)
            flow[:, :, by0:by1, bx0:bx1] += mask * delta_full
            region.last_grid = (self._id_roi[:, by0:by1, bx0:bx1]
                                + head_roi[:, :, by0:by1, bx0:bx1].permute(0, 2, 3, 1))
            region.last_box = (by0, by1, bx0, bx1)
            region.last_mask = mask
            region.last_alt = hd[:, :, a0:a1 + 2, b0:b1 + 2] + alt_at
        grid = self._id_roi + flow.permute(0, 2, 3, 1)
        mouth = next(r for r in self._regions if r.name == "mouth")
        self._clamp_to_lips(grid, mouth)
        skin = F.grid_sample(self._skin.expand(n, -1, -1, -1), grid, mode="bilinear",
                             padding_mode="border", align_corners=False)
        rgb = skin[:, :3]
        alpha = skin[:, 3:4]
        for region in self._regions:
            if not region.name.startswith("eye"):
                continue
            by0, by1, bx0, bx1 = region.last_box
            back = F.grid_sample(self._eye_back.expand(n, -1, -1, -1), region.last_grid,
                                 mode="bilinear", padding_mode="border", align_corners=False)
            a = alpha[:, :, by0:by1, bx0:bx1]
            rgb[:, :, by0:by1, bx0:bx1] += (1 - a) * back
        for i in range(n):
            self._mouth_interior(i, rgb[i], total[i], mouth)
        roi_u8 = rgb.clamp_(0, 255).round_().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        ry0, ry1, rx0, rx1 = self._roi
        out[:] = self._image_u8
        out[:, ry0:ry1, rx0:rx1] = roi_u8

    def _displaced(self, pts: Tensor, field: Tensor, origin: tuple[int, int] | None) -> Tensor:
        """Where the warp shows each source point: solve q + field(q) = p by iteration.

        ``field`` is one side's smooth coarse flow: the padded global grid when ``origin`` is
        None, else a region's sub-grid whose cell (0, 0) is coarse cell ``origin``. Using one
        side's field keeps the iteration off the discontinuity at the slit.
        """
        s, res = self._size, self._res
        scale = s / 2.0
        q = pts.clone()
        for _ in range(FIXED_POINT_STEPS):
            g = ((2 * q + 1) / s - 1).view(1, 1, -1, 2)
            if origin is None:
                f = _sample(field[None], g, res + 2, res)
            else:
                f = _sample_sub(field[None], g, res, origin)
            q = pts - f[0, :, 0].T * scale
        return q

    def _clamp_to_lips(self, grid: Tensor, mouth: _Region) -> None:
        """Keep each lip's pixels sampling that lip (in place on the ROI grid)."""
        by0, by1, bx0, bx1 = mouth.last_box
        s = self._size
        g = grid[:, by0:by1, bx0:bx1]
        sx = ((g[..., 0] + 1) * s - 1) / 2
        sy = ((g[..., 1] + 1) * s - 1) / 2
        col = sx.round().clamp_(0, s - 1).long()
        lower = mouth.last_mask[:, 0] > 0.5
        clamped = torch.where(lower, torch.maximum(sy, self._edge_lo[col]),
                              torch.minimum(sy, self._edge_up[col]))
        g[..., 1] = (2 * clamped + 1) / s - 1

    def _mouth_interior(self, i: int, rgb: Tensor, base: Tensor, mouth: _Region) -> None:
        """Draw teeth, cavity and tongue between the warped inner lips."""
        a0, _, b0, _ = mouth.cells
        up = self._displaced(self._lip_upper, base, None).numpy().astype(np.float64)
        lo = self._displaced(self._lip_lower, mouth.last_alt[i],
                             (a0 - 1, b0 - 1)).numpy().astype(np.float64)
        # The corners belong to both lips: meet halfway.
        for j in (0, -1):
            up[j] = lo[j] = 0.5 * (up[j] + lo[j])
        x_left, x_right = up[0, 0], up[-1, 0]
        if x_right - x_left < 2:
            return
        ou = np.argsort(up[:, 0], kind="stable")
        ol = np.argsort(lo[:, 0], kind="stable")
        y0, _, x0, _ = self._roi
        h, w = rgb.shape[1:]
        lx0 = max(int(math.floor(x_left)) - x0, 0)
        lx1 = min(int(math.ceil(x_right)) + 1 - x0, w)
        cx = np.arange(lx0 + x0, lx1 + x0, dtype=np.float64)
        top = np.interp(cx, up[ou, 0], up[ou, 1])
        bot = np.interp(cx, lo[ol, 0], lo[ol, 1])
        open_cols = (bot - top > 0.02) & (cx > x_left) & (cx < x_right)
        if not open_cols.any():
            return
        ly0 = max(int(math.floor(top[open_cols].min())) - 1 - y0, 0)
        ly1 = min(int(math.ceil(bot[open_cols].max())) + 2 - y0, h)
        if ly1 <= ly0 or lx1 <= lx0:
            return
        ry = np.arange(ly0 + y0, ly1 + y0, dtype=np.float64)[:, None]
        t = ry - top[None, :]
        s_ = bot[None, :] - ry
        # Horizontal anti-aliasing at the corners comes from the lips converging there.
        inside_x = np.clip(np.minimum(cx - x_left, x_right - cx), 0, 1)[None, :]
        cover = np.clip(t + 0.5, 0, 1) * np.clip(s_ + 0.5, 0, 1) * inside_x
        if float(cover.max()) <= 0.0:
            return
        t = np.maximum(t, 0)
        s_ = np.maximum(s_, 0)
        u = np.clip((cx - x_left) / (x_right - x_left), 0, 1)
        k = self._tex_rows_per_px
        tex_u = _sample_texture(self._tex_upper, u, t * k)
        tex_l = _sample_texture(self._tex_lower, u, s_ * k)
        width = x_right - x_left
        rim = np.exp(-np.minimum(t, s_) / max(0.05 * width, 1.0))
        side = np.abs(2 * u - 1)[None, :] ** 2
        glow = np.clip(rim * 0.8 + side * 0.5, 0, 1)
        dark = torch.tensor(CAVITY_DARK).view(3, 1, 1)
        lit = torch.tensor(CAVITY_RIM).view(3, 1, 1)
        g = torch.from_numpy(glow.astype(np.float32))[None]
        cav = dark + (lit - dark) * g
        a_l = tex_l[3:4] / 255.0
        inner = cav * (1 - a_l) + tex_l[:3]
        a_u = tex_u[3:4] / 255.0
        inner = inner * (1 - a_u) + tex_u[:3]
        c = torch.from_numpy(cover.astype(np.float32))[None]
        box = rgb[:, ly0:ly1, lx0:lx1]
        box.mul_(1 - c).add_(inner * c)


class _Region:
    """A split region's tensors, plus scratch from the current frame."""

    def __init__(self, name: str, cells: tuple[int, int, int, int], fields: Tensor,
                 padded_shape: tuple[int, int], mask: Tensor) -> None:
        self.name = name
        self.cells = cells
        self.fields = fields
        self.padded_shape = padded_shape
        self.mask = mask
        self.last_grid = torch.zeros(0)
        self.last_box = (0, 0, 0, 0)
        self.last_mask = torch.zeros(0)
        self.last_alt = torch.zeros(0)


def _contour_y(p: NDArray[np.float64], idx: tuple[int, ...],
               xs: NDArray[np.float64]) -> NDArray[np.float64]:
    order = np.argsort(p[list(idx), 0], kind="stable")
    return np.interp(xs, p[list(idx), 0][order], p[list(idx), 1][order])


def _identity_grid(h: int, w: int, full: int, row0: int, col0: int,
                   pixel: bool = False) -> Tensor:
    """Normalised sampling positions (1, h, w, 2) of a block of a ``full``-sized grid.

    ``row0``/``col0`` are the block's first row/column in that grid (may be -1 for the
    padding cell). ``pixel`` only documents that ``full`` counts pixels, not coarse cells.
    """
    del pixel
    ys = (2 * (torch.arange(h, dtype=torch.float32) + row0) + 1) / full - 1
    xs = (2 * (torch.arange(w, dtype=torch.float32) + col0) + 1) / full - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], dim=-1)[None].contiguous()


def _sample(field: Tensor, grid: Tensor, padded: int, res: int) -> Tensor:
    """Sample a padded coarse field (n, 2, res+2, res+2) at normalised positions."""
    # Positions are in the unpadded grid's normalised frame; shift into the padded tensor.
    scale = res / padded
    g = grid * scale
    return F.grid_sample(field, g, mode="bilinear", padding_mode="border", align_corners=False)


def _sample_sub(field: Tensor, grid: Tensor, res: int, origin: tuple[int, int]) -> Tensor:
    """Sample a sub-grid field whose cell (0, 0) is coarse cell ``origin`` (row, col)."""
    h, w = field.shape[2:]
    cx = ((grid[..., 0] + 1) * res - 1) / 2 - origin[1]
    cy = ((grid[..., 1] + 1) * res - 1) / 2 - origin[0]
    g = torch.stack([(2 * cx + 1) / w - 1, (2 * cy + 1) / h - 1], dim=-1)
    return F.grid_sample(field, g, mode="bilinear", padding_mode="border", align_corners=False)


def _upsample_padded(block: Tensor, step: int) -> Tensor:
    """Upsample a block with one padding cell each side, returning the unpadded interior."""
    up = F.interpolate(block, scale_factor=step, mode="bilinear", align_corners=False)
    return up[:, :, step:-step, step:-step]


def _upsample_block(coarse_padded: Tensor, cells: tuple[int, int, int, int],
                    step: int) -> Tensor:
    """Full-resolution values of coarse cells [r0, r1) x [c0, c1) of a padded coarse grid."""
    r0, r1, c0, c1 = cells
    block = coarse_padded[:, :, r0:r1 + 2, c0:c1 + 2]
    return _upsample_padded(block, step)


def _sample_texture(tex: Tensor, u: NDArray[np.float64], rows: NDArray[np.float64]) -> Tensor:
    """Bilinear lookup of a (1, 4, T, U) texture at column fraction u and row index rows."""
    t_rows, t_cols = tex.shape[2:]
    gx = np.broadcast_to(2 * u[None, :] - 1, rows.shape)
    gy = 2 * rows / max(t_rows - 1, 1) - 1
    g = torch.from_numpy(np.stack([gx, gy], axis=-1).astype(np.float32))[None]
    del t_cols
    return F.grid_sample(tex, g, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
