"""Motion frames (52 ARKit weights + head pose) to frames of one portrait, then to H.264.

Runs in the render+encode process between the motion topic and the video topic: one
``grid_sample`` warp of the portrait per frame, then the eyeballs and the mouth interior
composited behind the lids and lips. The stage renders I420 (the encoder's own format)
straight from a YUV copy of the portrait; RGB output is the reference for inspection.
See processors/portrait.py for the field conventions.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Final, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from prometheus_client import Counter

from backbone.blendshapes import BLENDSHAPES, INDEX
from backbone.records import MotionFrames, SessionControl, VideoChunk
from backbone.stage import (BaseStage, Inbound, Outbound, RecordRejected, SessionState,
                            remember_control, session_config)
from processors.encode import EncodedPacket, H264Encoder
from processors.render_kernels import (add_upsampled, apart_box, below_upper_lip, blend_i420,
                                       clamp_to_lips, coarse_flows, compile_now, eyes_i420,
                                       lip_contour, mouth_layer, pad_source, row_spans,
                                       sample_coarse, sample_plane, upsample_into, warp_i420,
                                       weighted_sum)
from processors.portrait import (DEFAULT_PORTRAIT, LIP_INNER_LOWER, LIP_INNER_UPPER, PortraitError,
                                 PortraitPack, default_pack, portrait_names, portrait_path,
                                 load_pack)

MAX_HEAD_RAD: Final = 0.35  # the warp is a small-angle model; past ~20 degrees it smears
# Output pixels whose source moves less than this (px) this frame show the portrait as is:
# a twentieth of a pixel is invisible even on a sharp edge (a level or two), and speech
# moves the head far less than MAX_HEAD_RAD, so the warp covers ~2/3 of the ROI sized for
# the largest pose (the moving part of each row, not the box around them).
STILL_PX: Final = 0.05
FIXED_POINT_STEPS: Final = 5  # contraction is ~0.3 per step on these fields
LIP_EDGE_INSET: Final = 1.25  # px at 512: clamp inside the lip, clear of the blurred teeth edge
LIP_CLAMP_PAD: Final = 10.0  # px at 512 around the lip cut where sources may cross it
CAVITY_DARK: Final = (28.0, 10.0, 9.0)
CAVITY_RIM: Final = (104.0, 42.0, 36.0)
TONGUE_TIP_RGB: Final = (196.0, 104.0, 98.0)  # lit from the front, lighter than the back

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
        compile_now()
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
        head_rows = [names.index(n) for n in head_names]
        self._jaw_col = bs_names.index("jawOpen") if "jawOpen" in bs_names else -1
        self._close_col = bs_names.index("mouthClose") if "mouthClose" in bs_names else -1
        fields = torch.from_numpy(np.ascontiguousarray(
            pack.fields.transpose(0, 3, 1, 2)))  # (K, 2, R, R)
        # One padding cell (replicate) lets any cell block be upsampled exactly.
        fields = F.pad(fields, (1, 1, 1, 1), mode="replicate")
        self._bs_sparse = _sparse_fields(fields[self._bs_rows].numpy())
        self._head_fields = fields[head_rows].contiguous().numpy()  # (3, 2, P, P)
        # Where anything moves by more than a twentieth of a pixel (head at its limit): the
        # warp only runs there, the rest of the frame is a copy of the portrait.
        reach = np.array([MAX_HEAD_RAD if n in head_names else 1.0 for n in names])
        motion = (np.abs(pack.fields).max(axis=3) * reach[:, None, None]).max(axis=0) * s / 2
        moving = motion > 0.05
        for region in pack.regions:
            ra0, ra1, rc0, rc1 = region.cells
            moving[ra0:ra1, rc0:rc1] = True
        rows = np.flatnonzero(moving.any(axis=1))
        cols = np.flatnonzero(moving.any(axis=0))
        self._roi_cells = (int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1)
        st = self._step
        id_coarse = _identity_grid(res + 2, res + 2, res, -1, -1)  # padded coarse grid
        self._id_coarse_ch = id_coarse.permute(0, 3, 1, 2).contiguous()
        img = torch.from_numpy(pack.image.astype(np.float32)).permute(2, 0, 1)
        alpha = torch.from_numpy(pack.skin_alpha)[None]
        # Premultiplied RGB, channels-last (grid_sample gathers a pixel's values at once); the
        # alpha only matters around the eyes and is sampled there alone.
        self._skin = (img * alpha)[None].contiguous(memory_format=torch.channels_last)
        self._skin_alpha = alpha[None].contiguous()
        eye_back = torch.from_numpy(pack.eye_back.astype(np.float32)).permute(2, 0, 1)
        self._image_u8 = np.ascontiguousarray(pack.image)
        self._regions = []
        for region in pack.regions:
            rf = torch.from_numpy(np.ascontiguousarray(region.fields.transpose(0, 3, 1, 2)))
            bs = rf[self._bs_rows].reshape(len(self._bs_rows), -1).contiguous()
            ra0, ra1, rc0, rc1 = region.cells
            mask = torch.zeros(1, 1, s, s)
            mask[0, 0, ra0 * st:ra1 * st, rc0 * st:rc1 * st] = torch.from_numpy(region.mask)
            # Which blendshapes move this region's two sides apart (by half a pixel or more).
            base_box = pack.fields[self._bs_rows][:, ra0 - 1:ra1 + 1, rc0 - 1:rc1 + 1]
            split = np.abs(region.fields[self._bs_rows] - base_box).max(axis=(1, 2, 3)) * s / 2
            active = torch.from_numpy(np.flatnonzero(split > 0.5))
            self._regions.append(_Region(region.name, region.cells, bs,
                                         (ra1 - ra0 + 2, rc1 - rc0 + 2), mask, active))
        self._mouth = next(r for r in self._regions if r.name == "mouth")
        eyes = [r.cells for r in self._regions if r.name.startswith("eye")]
        self._eye_cells = (min(b[0] for b in eyes), max(b[1] for b in eyes),
                           min(b[2] for b in eyes), max(b[3] for b in eyes))
        self._eye_regions = [r for r in self._regions if r.name.startswith("eye")]
        # Rendered every frame whatever moves: the mouth and eye boxes (cuts, interior,
        # eyeballs); the rest of the ROI only where it moves this frame.
        mc = self._mouth.cells
        self._core_cells = (min(mc[0], self._eye_cells[0]), max(mc[1], self._eye_cells[1]),
                            min(mc[2], self._eye_cells[2]), max(mc[3], self._eye_cells[3]))
        self._still = STILL_PX * 2.0 / s
        self._core_np = np.array(self._core_cells, dtype=np.int64)
        self._ident_np = self._id_coarse_ch[0].contiguous().numpy()
        self._roi_np = np.array(self._roi_cells, dtype=np.int64)
        self._eye_back = eye_back[None].contiguous(memory_format=torch.channels_last)
        self._eye_masks_pad = [pad_source(r.mask[0, 0].numpy()) for r in self._eye_regions]
        # The eyeballs are composited eye by eye, in the part of each half of the eye box
        # where the skin is see-through this frame (a few hundred pixels, not the box).
        centres = [(r.cells[2] + r.cells[3]) * st / 2 for r in self._eye_regions]
        mid = int(round(sum(centres) / len(centres) - self._eye_cells[2] * st)) & ~1
        ew = (self._eye_cells[3] - self._eye_cells[2]) * st
        self._eye_halves = ((0, mid), (mid, ew)) if 0 < mid < ew else ((0, ew),)
        # Each half's see-through pixels at rest (eye-box coordinates): only the head moves
        # them unless a lid moves, so a frame searches a margin around them, not the box.
        e0, e1, f0, f1 = (c * st for c in self._eye_cells)
        see = pack.skin_alpha[e0:e1, f0:f1] < 0.999
        self._eye_holes = []
        for h0, h1 in self._eye_halves:
            part = see[:, h0:h1]
            rr = np.flatnonzero(part.any(axis=1))
            cc = np.flatnonzero(part.any(axis=0))
            self._eye_holes.append((int(rr[0]), int(rr[-1]) + 1, int(cc[0]), int(cc[-1]) + 1)
                                   if len(rr) else None)
        # Between the mouth corners the lips are cut apart: a pixel on one lip must never
        # sample the other lip or the photo's own teeth, so its source row is clamped to its
        # lip's inner edge (+inf/-inf: no clamp outside the corners).
        lm = pack.landmarks[:, :2].astype(np.float64)
        xs = np.arange(s, dtype=np.float64)
        inside = (xs > lm[LIP_INNER_UPPER[0], 0]) & (xs < lm[LIP_INNER_UPPER[-1], 0])
        edge_up = _contour_y(lm, LIP_INNER_UPPER, xs) - LIP_EDGE_INSET * s / 512
        edge_lo = _contour_y(lm, LIP_INNER_LOWER, xs) + LIP_EDGE_INSET * s / 512
        self._edge_up = np.where(inside, edge_up, np.inf).astype(np.float32)
        self._edge_lo = np.where(inside, edge_lo, -np.inf).astype(np.float32)
        lm32 = lm.astype(np.float32)
        # The contour at rest, upper lip then lower (corner to corner each).
        self._lip_rest = np.concatenate([lm32[list(LIP_INNER_UPPER)],
                                         lm32[list(LIP_INNER_LOWER)]])
        mouth = pack.mouth
        tex_upper = torch.from_numpy(mouth.upper).permute(2, 0, 1)[None].contiguous()
        tex_lower = torch.from_numpy(mouth.lower).permute(2, 0, 1)[None].contiguous()
        dark = torch.tensor(CAVITY_DARK).view(3, 1, 1)
        rim = torch.tensor(CAVITY_RIM).view(3, 1, 1)
        tongue = torch.tensor(TONGUE_TIP_RGB).view(3, 1, 1)
        self._interior_rgb = _Interior(tex_upper, tex_lower, dark, rim, tongue)
        self._interior_yuv = _Interior(_premultiplied_yuv(tex_upper),
                                       _premultiplied_yuv(tex_lower), _rgb_to_yuv(dark),
                                       _rgb_to_yuv(rim), _rgb_to_yuv(tongue))
        # How far the upper teeth reach below the upper lip at the middle (output px): the
        # tongue tip of "th" shows just under their edge.
        centre_col = mouth.upper[:, mouth.upper.shape[1] // 2, 3]
        self._teeth_px = float((centre_col > 127).sum()) * s / mouth.px_size
        self._tongue_col = INDEX["tongueOut"]
        # The I420 path's sources: luma premultiplied like the RGB skin; chroma (and the
        # alpha it is premultiplied with) box-averaged over each pixel's 2x2 block to the
        # bottom right, so one chroma sample per block is the block's average (see
        # _shade_i420); the still portrait as I420 for everything outside the ROI.
        yuv = _rgb_to_yuv(img)
        skin_uv = _box2(yuv[1:] * alpha).numpy()
        eye_yuv = _rgb_to_yuv(eye_back)
        eye_uv = _box2(eye_yuv[1:]).numpy()
        bg = torch.cat([yuv[:1].flatten(), F.avg_pool2d(yuv[1:2][None], 2).flatten(),
                        F.avg_pool2d(yuv[2:3][None], 2).flatten()])
        self._bg_i420 = bg.add_(0.5).clamp_(0, 255).to(torch.uint8).numpy().reshape(
            s * 3 // 2, s)
        self._bg_i420.flags.writeable = False
        # The kernels' sources, padded for their border taps; chroma (each sample a 2x2
        # block's mean) at half size.
        self._skin_y_pad = pad_source((yuv[0] * alpha[0]).numpy())
        self._skin_u_pad = pad_source(skin_uv[0, ::2, ::2])
        self._skin_v_pad = pad_source(skin_uv[1, ::2, ::2])
        self._alpha_pad = pad_source(pack.skin_alpha)
        self._alpha_box_pad = pad_source(_box2(alpha).numpy()[0, ::2, ::2])
        self._eye_back_pad = (pad_source(eye_yuv[0].numpy()), pad_source(eye_uv[0, ::2, ::2]),
                              pad_source(eye_uv[1, ::2, ::2]))
        self._tex_rows_per_px = mouth.px_size / s
        # How each blendshape moves the contour (K, 44); the corners keep their design; the
        # designed contour follows the head's flow (0), each lip's resting point its own
        # side's (1: upper, the whole flow; 2: lower, the mouth region's).
        self._lip_motion = np.ascontiguousarray(
            mouth.lip_motion[self._bs_rows].reshape(len(self._bs_rows), -1), np.float32)
        half = len(LIP_INNER_UPPER)
        self._lip_designed = np.zeros(2 * half, np.bool_)
        self._lip_designed[[0, half - 1, half, 2 * half - 1]] = True
        self._lip_pick = np.array([0] * (2 * half) + [1] * half + [2] * half, np.int64)

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
        frame: NDArray[np.uint8] = self.render_batch(w, h)[0]
        return frame

    def render_batch(self, weights: NDArray[np.floating], head: NDArray[np.floating]) -> NDArray[
            np.uint8]:
        """Frames (N, size, size, 3) RGB from weights (N, 52) and head pose (N, 3).

        The reference output, for inspection and tests; the render stage uses
        :meth:`render_batch_i420`, which skips RGB altogether. Weights are clamped to [0, 1],
        head angles to +-MAX_HEAD_RAD; NaN becomes 0.
        """
        w, h = self._checked(weights, head)
        out = np.empty((w.shape[0], self._size, self._size, 3), dtype=np.uint8)
        self._in_chunks(w, h, out, self._shade_rgb, full=True)
        return out

    def render_i420(self, weights: NDArray[np.floating], head: NDArray[np.floating]) -> NDArray[
            np.uint8]:
        """One frame as I420 (see :meth:`render_batch_i420`)."""
        w = np.asarray(weights, dtype=np.float32).reshape(1, -1)
        h = np.asarray(head, dtype=np.float32).reshape(1, -1)
        frame: NDArray[np.uint8] = self.render_batch_i420(w, h)[0]
        return frame

    def render_batch_i420(self, weights: NDArray[np.floating], head: NDArray[np.floating],
                          out: NDArray[np.uint8] | None = None) -> NDArray[np.uint8]:
        """Frames as I420 (yuv420p, BT.601 limited range, as the encoder takes them):
        (N, size * 3 // 2, size) uint8, each frame the Y plane then the U and V planes.

        The warp samples luma at every pixel and chroma at every fourth, straight from a
        YUV copy of the portrait, so no RGB frame and no colour conversion exist per frame.
        """
        w, h = self._checked(weights, head)
        s = self._size
        if out is None:
            out = np.empty((w.shape[0], s * 3 // 2, s), dtype=np.uint8)
        elif out.shape != (w.shape[0], s * 3 // 2, s) or out.dtype != np.uint8:
            raise ValueError(f"out must be uint8 ({w.shape[0]}, {s * 3 // 2}, {s})")
        self._in_chunks(w, h, out, self._shade_i420)
        return out

    @property
    def portrait_i420(self) -> NDArray[np.uint8]:
        """The still portrait as one I420 frame (size * 3 // 2, size); read-only."""
        self._require_started()
        return self._bg_i420

    def _checked(self, weights: NDArray[np.floating], head: NDArray[np.floating]) -> tuple[
            NDArray[np.float32], NDArray[np.float32]]:
        self._require_started()
        w = np.asarray(weights, dtype=np.float32)
        h = np.asarray(head, dtype=np.float32)
        if w.ndim != 2 or w.shape[1] != len(BLENDSHAPES):
            raise ValueError(f"weights must be (N, {len(BLENDSHAPES)}), got {w.shape}")
        if h.shape != (w.shape[0], 3):
            raise ValueError(f"head must be (N, 3), got {h.shape}")
        if not np.isfinite(w).all():
            w = np.nan_to_num(w, nan=0.0, posinf=1.0, neginf=0.0)
        if not np.isfinite(h).all():
            h = np.nan_to_num(h, nan=0.0, posinf=0.0, neginf=0.0)
        w = np.clip(w, 0.0, 1.0)
        h = np.clip(h, -MAX_HEAD_RAD, MAX_HEAD_RAD)
        return w, h

    def _in_chunks(self, w: NDArray[np.float32], h: NDArray[np.float32],
                   out: NDArray[np.uint8], shade: Any, full: bool = False) -> None:
        chunk = 8  # bounds memory; batching beyond this buys nothing on CPU
        with torch.inference_mode():
            for start in range(0, w.shape[0], chunk):
                stop = min(start + chunk, w.shape[0])
                geo = self._geometry(torch.from_numpy(w[start:stop]),
                                     torch.from_numpy(h[start:stop]), full)
                shade(geo, out[start:stop])

    def _geometry(self, w: Tensor, head: Tensor, full: bool = False) -> _Geometry:
        """Where output pixels sample the portrait: the coarse grid everywhere and, at full
        resolution, where layers are drawn (everywhere with ``full``); the lips' cut and
        the eye layer."""
        n = w.shape[0]
        res, st, s = self._res, self._step, self._size
        coeff = w[:, self._bs_index]
        if self._close_col >= 0 and self._jaw_col >= 0:
            # ARKit's mouthClose only means "lips together while the jaw is open".
            coeff[:, self._close_col] = torch.minimum(coeff[:, self._close_col],
                                                      coeff[:, self._jaw_col])
        # Each blendshape's field is nonzero over a part of the face only (a fifth of the
        # grid on average): summed over those parts, live fields only. Then the cells that
        # move this chunk (the ROI), in the same pass.
        *flows_np, box, moving = coarse_flows(
            coeff.contiguous().numpy(), head.contiguous().numpy(), *self._bs_sparse,
            self._head_fields, self._ident_np, s, self._still, self._core_np, self._roi_np)
        hd, bs_at, total, coarse, head_pos, coarse_px = (torch.from_numpy(a) for a in flows_np)
        roi_cells = (int(box[0]), int(box[1]), int(box[2]), int(box[3]))
        roi = (roi_cells[0] * st, roi_cells[1] * st, roi_cells[2] * st, roi_cells[3] * st)
        y0, y1, x0, x1 = roi
        # The full-resolution grid only where something is drawn over the plain warp (the
        # lips' cut, the eyes' layer, the mouth interior): the rest of the ROI is warped
        # from the coarse grid directly (processors/render_kernels.py). Filled below.
        grid = torch.empty(n, 2, y1 - y0, x1 - x0)
        # The cut between the lips: each lip where its own field puts it (so the cut matches
        # the warped lips exactly), the corners as designed (carried along by the head):
        # the smooth fields round a corner off, the design keeps it sharp.
        mouth = self._mouth
        m0, m1, n0, n1 = mouth.cells
        ph, pw = mouth.padded_shape
        lips_np, alt_np = lip_contour(
            coeff.contiguous().numpy(), self._lip_rest, self._lip_motion,
            self._mouth.fields_np, flows_np[0], flows_np[2], m0, n0, ph, pw, s, st,
            self._lip_pick, self._lip_designed, FIXED_POINT_STEPS)
        lips, alt_m = torch.from_numpy(lips_np), torch.from_numpy(alt_np)
        # The eye layer (eyeballs, and each eye's side mask) only follows the head: its
        # sampling grid over a box holding both eyes.
        eye_box = (self._eye_cells[0] * st - y0, self._eye_cells[1] * st - y0,
                   self._eye_cells[2] * st - x0, self._eye_cells[3] * st - x0)
        ey0, ey1, ex0, ex1 = eye_box
        eye_buf = torch.empty(n, 2, ey1 - ey0, ex1 - ex0)
        eye_grid = eye_buf.permute(0, 2, 3, 1)
        if full:
            self._fill(eye_buf, head_pos, (ey0 + y0, ex0 + x0), (0, ey1 - ey0, 0, ex1 - ex0))
        # Each region's offset (its second side, where its mask says), frame by frame: what
        # a frame shows never depends on the frames it is rendered with (a batch of
        # sessions, or one record re-rendered by the auditor). Boxes are per frame (cells
        # of the region); the block and mask cover their union.
        offsets: list[tuple[tuple[int, int, int, int], Tensor, Tensor, NDArray[np.int64]]] = []
        own: list[list[tuple[int, int, int, int]]] = [[] for _ in range(n)]  # ROI px
        lid_reach = 0.0  # how far a moving lid pulls the skin off the head's flow
        lips_np64 = lips.numpy().astype(np.float64)
        lips_lo, lips_hi = lips_np64.min(axis=1), lips_np64.max(axis=1)  # (n, 2): x, y
        pad = LIP_CLAMP_PAD * s / 512 + st
        for region in self._regions:
            live = (coeff[:, region.active] > 0).any(dim=1).tolist()
            if region is not mouth and not any(live):
                continue  # only fields that split this region can open a gap in it
            a0, a1, b0, b1 = region.cells
            ph, pw = region.padded_shape
            alt = alt_m - hd[:, :, a0:a1 + 2, b0:b1 + 2] if region is mouth else _moved(
                torch.from_numpy(weighted_sum(coeff.contiguous().numpy(), region.fields_np))
                .view(n, 2, ph, pw), hd[:, :, a0:a1 + 2, b0:b1 + 2], res)
            delta = alt - bs_at[:, :, a0:a1 + 2, b0:b1 + 2]
            # Only where the two sides differ visibly (the box is sized for the widest jaw
            # drop, most frames need a fraction of it).
            differs, apart = apart_box(delta.numpy(), 0.02 * 2 / s)
            boxes = np.zeros((n, 4), np.int64)
            for f in range(n):
                d0, d1, e0, e1 = differs[f].tolist()
                if region is mouth:
                    # The lip cut needs the lips' surroundings (the clamp reaches
                    # LIP_CLAMP_PAD around them) and wherever the two sides differ.
                    i0 = int(math.floor((lips_lo[f, 1] - pad) / st)) - a0
                    i1 = int(math.ceil((lips_hi[f, 1] + pad) / st)) - a0
                    j0 = int(math.floor((lips_lo[f, 0] - pad) / st)) - b0
                    j1 = int(math.ceil((lips_hi[f, 0] + pad) / st)) - b0
                    if d1 > d0:
                        i0, i1, j0, j1 = min(i0, d0), max(i1, d1), min(j0, e0), max(j1, e1)
                    i0, i1 = max(i0, 0), min(i1, a1 - a0)
                    j0, j1 = max(j0, 0), min(j1, b1 - b0)
                    if i1 <= i0 or j1 <= j0:  # lips outside their region: never, but whole
                        i0, i1, j0, j1 = 0, a1 - a0, 0, b1 - b0
                elif live[f] and d1 > d0:
                    i0, i1, j0, j1 = d0, d1, e0, e1
                else:
                    continue
                boxes[f] = (i0, i1, j0, j1)
            used = boxes[:, 1] > boxes[:, 0]
            if not used.any():
                continue
            i0, i1 = int(boxes[used, 0].min()), int(boxes[used, 1].max())
            j0, j1 = int(boxes[used, 2].min()), int(boxes[used, 3].max())
            block = delta[:, :, i0:i1 + 2, j0:j1 + 2].contiguous()
            by0, bx0 = (a0 + i0) * st - y0, (b0 + j0) * st - x0
            by1, bx1 = by0 + (i1 - i0) * st, bx0 + (j1 - j0) * st
            if region is mouth:
                mask = self._below_upper_lip(lips, by0 + y0, by1 + y0, bx0 + x0, bx1 + x0)
            else:
                ch = self._eye_regions.index(region)
                self._fill(eye_buf, head_pos, (ey0 + y0, ex0 + x0),
                           (by0 - ey0, by1 - ey0, bx0 - ex0, bx1 - ex0))
                mask = torch.empty(n, 1, by1 - by0, bx1 - bx0)
                sample_plane(self._eye_masks_pad[ch], eye_buf.numpy(), by0 - ey0, bx0 - ex0,
                             mask.numpy())
                lid_reach = max(lid_reach, apart)
            # Each frame's own box, px relative to the block's first pixel.
            limits = np.zeros((n, 4), np.int64)
            for f in np.flatnonzero(used).tolist():
                fi0, fi1, fj0, fj1 = boxes[f].tolist()
                limits[f] = ((fi0 - i0) * st, (fi1 - i0) * st, (fj0 - j0) * st, (fj1 - j0) * st)
                own[f].append((by0 + int(limits[f, 0]), by0 + int(limits[f, 1]),
                               bx0 + int(limits[f, 2]), bx0 + int(limits[f, 3])))
            offsets.append(((by0, by1, bx0, bx1), mask, block, limits))
            if region is mouth:
                mouth_box, mouth_mask, mouth_limits = (by0, by1, bx0, bx1), mask, limits
        # How far the skin around the eyes moves this frame (px, the head's flow and the
        # lids' offsets at most); so where each eye may show its eyeball (eye-box
        # coordinates): no further than that from where it shows at rest.
        a0, a1, b0, b1 = self._eye_cells
        eye_reach = int(math.ceil((float(
            total[:, :, a0 + 1:a1 + 1, b0 + 1:b1 + 1].abs().amax()) + lid_reach) * s / 2))
        eye_search = self._eye_search(eye_reach, ey1 - ey0)
        # Where the full-resolution grid is read: the regions' offsets (the lip clamp lies
        # in the mouth's), the eyes' openings. (The mouth interior needs only the lips.)
        if full:
            patches = [(0, y1 - y0, 0, x1 - x0)]
        else:
            needed = [box for box, _, _, _ in offsets] + [
                (ey0 + b[0], ey0 + b[1], ex0 + b[2], ex0 + b[3]) for b in eye_search if b]
            patches = _merged([_aligned(b, st, y1 - y0, x1 - x0) for b in needed])
        # Per frame and output row of the ROI, the columns to warp (between its first and
        # last moving cells; the rest of the row is still): the head is round, its box is
        # not. (The regions' boxes lie in the mouth and eye boxes, which always move.)
        spans = row_spans(moving, st)
        for patch in patches:
            self._fill(grid, coarse, (y0, x0), patch)
        for b in eye_search:
            if b and not full:
                self._fill(eye_buf, head_pos, (ey0 + y0, ex0 + x0), b)
        for (by0, _, bx0, _), mask, block, limits in offsets:
            # the region's side where the mask says, its offset upsampled on the way
            add_upsampled(grid.numpy(), by0, bx0, mask.numpy(), block.numpy(), st, limits)
        # grid_sample reads the (n, H, W, 2) view as it is: no copy into that layout.
        grid_hw = grid.permute(0, 2, 3, 1)
        clamps = self._clamp_to_lips(grid_hw, lips_lo, lips_hi, mouth_box, mouth_mask,
                                     mouth_limits, roi)
        # Where the warp reads the full grid, per frame: its own offsets and lip clamp.
        most = max(len(b) for b in own) + 1
        frame_patches = np.zeros((n, most, 4), np.int32)
        for f in range(n):
            for k, b in enumerate(own[f] + [tuple(clamps[f].tolist())]):
                frame_patches[f, k] = b
        if full:
            spans[:] = (0, x1 - x0)
        return _Geometry(n, roi, spans, grid_hw, frame_patches, coarse_px, eye_box, eye_grid,
                         eye_search,
                         lips, w[:, self._tongue_col].tolist())

    def _fill(self, buf: Tensor, coarse: Tensor, origin: tuple[int, int],
              box: tuple[int, int, int, int]) -> None:
        """Upsample the coarse cells covering ``box`` of ``buf`` (whose top-left pixel is
        output pixel ``origin``, on a cell corner) into ``buf``."""
        st = self._step
        oy, ox = origin
        h, w = buf.shape[2:]
        b0, b1 = max(box[0], 0) // st, min(-(-box[1] // st), h // st)
        c0, c1 = max(box[2], 0) // st, min(-(-box[3] // st), w // st)
        if b1 <= b0 or c1 <= c0:
            return
        upsample_into(coarse.numpy(), st, oy, ox, b0 * st, b1 * st, c0 * st, c1 * st,
                      buf.numpy())

    def _eye_search(self, eye_reach: int, box_h: int) -> list[
            tuple[int, int, int, int] | None]:
        """Per half of the eye box, where its eyeball may show this frame (eye-box
        coordinates, even top-left): around the resting hole by this frame's reach; None
        when it never shows."""
        out: list[tuple[int, int, int, int] | None] = []
        m = eye_reach + 2
        for (h0, h1), rest in zip(self._eye_halves, self._eye_holes):
            if rest is None:
                out.append(None)
                continue
            s0, s1 = max(rest[0] - m, 0) & ~1, min(rest[1] + m + 1, box_h)
            t0, t1 = max(rest[2] - m, 0) & ~1, min(rest[3] + m + 1, h1 - h0)
            out.append((s0, s1, h0 + t0, h0 + t1))
        return out

    def _shade_rgb(self, geo: _Geometry, out: NDArray[np.uint8]) -> None:
        n, grid_hw = geo.n, geo.grid
        rgb = F.grid_sample(self._skin.expand(n, -1, -1, -1), grid_hw, mode="bilinear",
                            padding_mode="border", align_corners=False)
        # The eyeballs show through the lids' openings.
        for (y0, y1, x0, x1), alpha, back in self._eye_openings(geo, self._eye_back):
            rgb[:, :, y0:y1, x0:x1] += (1 - alpha) * back
        for i in range(n):
            found = self._mouth_interior(geo.lips[i], geo.roi, self._interior_rgb,
                                         tongue=geo.tongue[i])
            if found is not None:
                (ly0, ly1, lx0, lx1), c, inner = found
                rgb[i, :, ly0:ly1, lx0:lx1].mul_(1 - c).add_(inner * c)
        ry0, ry1, rx0, rx1 = geo.roi
        out[:] = self._image_u8
        # +0.5 then truncation is rounding for non-negative values; one pass into the frame.
        torch.from_numpy(out)[:, ry0:ry1, rx0:rx1].copy_(
            rgb.add_(0.5).clamp_(0, 255).permute(0, 2, 3, 1))

    def _shade_i420(self, geo: _Geometry, out: NDArray[np.uint8]) -> None:
        n, grid_hw, s = geo.n, geo.grid, self._size
        ry0, ry1, rx0, rx1 = geo.roi
        out[:] = self._bg_i420
        # The warp over the ROI in one pass, straight into the frames: positions from the
        # coarse grid, or from the full one in each frame's patches (lip cut, lids).
        frames = out.reshape(n, -1)
        warp_i420(geo.coarse_px.numpy(), self._step, ry0, ry1, rx0, rx1, geo.spans, geo.patches,
                  grid_hw.permute(0, 3, 1, 2).numpy(), self._skin_y_pad, self._skin_u_pad,
                  self._skin_v_pad, frames)
        # The layers go over the warped (rounded) skin: rounding twice costs half a level.
        # The eyeballs show where the skin is see-through...
        boxes = np.array([b for b in geo.eye_search if b], dtype=np.int32).reshape(-1, 4)
        ey0, _, ex0, _ = geo.eye_box
        eyes_i420(grid_hw.permute(0, 3, 1, 2).numpy(), geo.eye_grid.permute(0, 3, 1, 2).numpy(),
                  ey0, ex0, boxes, ry0, rx0, self._alpha_pad, self._alpha_box_pad,
                  *self._eye_back_pad, frames)
        # ...and the mouth between the lips.
        for i in range(n):
            found = self._mouth_interior(geo.lips[i], geo.roi, self._interior_yuv,
                                         even=True, tongue=geo.tongue[i])
            if found is not None:
                (ly0, ly1, lx0, lx1), c, inner = found
                blend_i420(frames[i], s, ry0 + ly0, rx0 + lx0, c[0].contiguous().numpy(),
                           inner.contiguous().numpy())

    def _eye_openings(self, geo: _Geometry, eye_back: Tensor) -> list[tuple[
            tuple[int, int, int, int], Tensor, Tensor]]:
        """Per eye: the box (ROI coordinates, even edges) where the skin is see-through this
        frame, the skin's alpha there and the eyeball layer (which follows the head only)."""
        n = geo.n
        ey0, ey1, ex0, ex1 = geo.eye_box
        out = []
        for (h0, _), search in zip(self._eye_halves, geo.eye_search):
            if search is None:
                continue
            s0, s1, t0, t1 = search[0], search[1], search[2] - h0, search[3] - h0
            alpha = F.grid_sample(self._skin_alpha.expand(n, -1, -1, -1),
                                  geo.grid[:, ey0 + s0:ey0 + s1, ex0 + h0 + t0:ex0 + h0 + t1],
                                  mode="bilinear", padding_mode="border", align_corners=False)
            hole = (alpha < 0.999).any(dim=0)[0]
            rows = torch.nonzero(hole.any(dim=1)).flatten()
            if len(rows) == 0:
                continue  # the lid is shut (or the eye left the box)
            cols = torch.nonzero(hole.any(dim=0)).flatten()
            r0, r1 = int(rows[0]) & ~1, min((int(rows[-1]) + 2) & ~1, s1 - s0)
            c0, c1 = int(cols[0]) & ~1, min((int(cols[-1]) + 2) & ~1, t1 - t0)
            r0, r1, c0, c1 = r0 + s0, r1 + s0, c0 + t0, c1 + t0
            back = F.grid_sample(eye_back.expand(n, -1, -1, -1),
                                 geo.eye_grid[:, r0:r1, h0 + c0:h0 + c1], mode="bilinear",
                                 padding_mode="border", align_corners=False)
            out.append(((ey0 + r0, ey0 + r1, ex0 + h0 + c0, ex0 + h0 + c1),
                        alpha[:, :, r0 - s0:r1 - s0, c0 - t0:c1 - t0], back))
        return out

    def _below_upper_lip(self, lips: Tensor, y0: int, y1: int, x0: int, x1: int) -> Tensor:
        """The mouth's second side for output pixels in a box: below the upper lip's edge.

        The upper lip stays in front: whatever passes above its inner edge (a lip rolled in,
        pressed lips overlapping) is hidden behind it. Past the mouth corners the cut fades
        into a soft blend, where both sides' fields agree.
        """
        half = len(LIP_INNER_UPPER)
        out = torch.empty(lips.shape[0], 1, y1 - y0, x1 - x0)
        below_upper_lip(lips[:, :half].numpy().astype(np.float64), y0, x0, out.numpy())
        return out

    def _clamp_to_lips(self, grid: Tensor, lips_lo: NDArray[np.float64],
                       lips_hi: NDArray[np.float64], mouth_box: tuple[int, int, int, int],
                       mask: Tensor,
                       limits: NDArray[np.int64], roi: tuple[int, int, int, int]) -> NDArray[
            np.int64]:
        """Keep each lip's pixels sampling that lip (in place on the ROI grid); returns each
        frame's clamped box (ROI px).

        A source past a point a little inside the lip's edge (the blurred edge shows teeth
        through it) is moved onto that point, the lip's dark inner line. Only pixels near
        the lips can reach across, so only a box around them is checked, each frame's own
        (within its part of the mouth's box, where the lower lip's mask is).
        """
        by0, _, bx0, _ = mouth_box
        s = self._size
        y0, _, x0, _ = roi
        pad = LIP_CLAMP_PAD * s / 512
        boxes = np.zeros((len(lips_lo), 4), np.int64)
        for f, ((lx, ly), (hx, hy)) in enumerate(zip(lips_lo.tolist(), lips_hi.tolist())):
            lim = limits[f].tolist()
            cy0 = max(int(ly - pad) - y0, by0 + lim[0])
            cy1 = min(int(hy + pad) + 1 - y0, by0 + lim[1])
            cx0 = max(int(lx - pad) - x0, bx0 + lim[2])
            cx1 = min(int(hx + pad) + 1 - x0, bx0 + lim[3])
            if cy1 > cy0 and cx1 > cx0:
                boxes[f] = (cy0, cy1, cx0, cx1)
        clamp_to_lips(grid.permute(0, 3, 1, 2).numpy(), boxes, mask.numpy(), by0, bx0,
                      self._edge_up, self._edge_lo, s)
        return boxes

    def _mouth_interior(self, lips: Tensor, roi: tuple[int, int, int, int], colours: _Interior,
                        even: bool = False, tongue: float = 0.0) -> tuple[
            tuple[int, int, int, int], Tensor, Tensor] | None:
        """Teeth, cavity and tongue between the inner lips (22 points, output px).

        Returns the box (ROI coordinates; even edges if ``even``, for 2x2 chroma), the
        coverage (1, h, w) and the interior's colour (3, h, w), or None when the lips touch.
        """
        half = len(LIP_INNER_UPPER)
        pts = lips.numpy().astype(np.float64)
        box, top, bot, cover, colour = mouth_layer(
            pts, half, *roi, even, self._tex_rows_per_px, colours.upper_np, colours.lower_np,
            colours.dark_np, colours.rim_np)
        ly0, ly1, lx0, lx1 = box.tolist()
        if ly1 <= ly0:
            return None
        inner = torch.from_numpy(colour)
        if tongue > 0.01:
            y0, _, x0, _ = roi
            cx = np.arange(lx0 + x0, lx1 + x0, dtype=np.float64)
            ry = np.arange(ly0 + y0, ly1 + y0, dtype=np.float64)[:, None]
            inner = self._tongue_tip(inner, cx, ry, top, bot, float(pts[0, 0]),
                                     float(pts[half - 1, 0]), tongue, colours.tongue,
                                     colours is self._interior_yuv)
        c = torch.from_numpy(cover)[None]
        return (ly0, ly1, lx0, lx1), c, inner

    def _tongue_tip(self, inner: Tensor, cx: NDArray[np.float64], ry: NDArray[np.float64],
                    top: NDArray[np.float64], bot: NDArray[np.float64], x_left: float,
                    x_right: float, amount: float, colour: Tensor, yuv: bool) -> Tensor:
        """tongueOut: the tip between the teeth, in front of the upper teeth's edge and
        resting on the lower lip (which hides its lower half)."""
        mid = 0.5 * (x_left + x_right)
        j = int(np.argmin(np.abs(cx - mid)))
        gap = max(bot[j] - top[j], 1.0)
        # Its top edge rises over the teeth's lower part as the tongue comes out.
        y_top = top[j] + min(self._teeth_px, gap) * (1.0 - 0.6 * amount)
        y_c = bot[j] + 0.15 * gap
        rad_y = max(y_c - y_top, 1.0)
        rad_x = (0.17 + 0.08 * amount) * (x_right - x_left)
        dx = (cx[None, :] - mid) / rad_x
        dy = (ry - y_c) / rad_y
        q = np.sqrt(dx * dx + dy * dy)
        alpha = np.clip((1 - q) * min(rad_x, rad_y) + 0.5, 0, 1) * min(amount * 3.0, 1.0)
        if float(alpha.max()) <= 0.0:
            return inner
        # Lighter on its upper surface, darker to the sides (a rounded tip).
        shade = np.clip(1.08 - 0.35 * dx * dx - 0.25 * np.clip(dy + 0.3, 0, None), 0.6, 1.1)
        a = torch.from_numpy(alpha.astype(np.float32))[None]
        sh = torch.from_numpy(shade.astype(np.float32))[None]
        if yuv:  # shading scales luma and leaves the hue alone
            tip = torch.cat([colour[:1] * sh, colour[1:].expand(2, *sh.shape[1:])])
        else:
            tip = colour * sh
        return inner * (1 - a) + tip * a


class _Geometry:
    """One chunk's ROI, the coarse grid, the sampling grid at full resolution where it is
    needed (n, H, W, 2), the eye layer's grid and the lip contours."""

    __slots__ = ("n", "roi", "spans", "grid", "patches", "coarse_px", "eye_box", "eye_grid",
                 "eye_search", "lips", "tongue")

    def __init__(self, n: int, roi: tuple[int, int, int, int], spans: NDArray[np.int32],
                 grid: Tensor,
                 patches: NDArray[np.int32], coarse_px: Tensor,
                 eye_box: tuple[int, int, int, int], eye_grid: Tensor,
                 eye_search: list[tuple[int, int, int, int] | None], lips: Tensor,
                 tongue: list[float]) -> None:
        self.n = n
        self.roi = roi  # (y0, y1, x0, x1) output px: what this chunk renders
        self.spans = spans  # (n, H, 2): per frame and ROI row, the columns that move
        self.grid = grid  # over the ROI, filled only where something reads it
        self.patches = patches  # (n, m, 4): where each frame's warp reads the grid (ROI px)
        self.coarse_px = coarse_px  # (n, 2, P, P) source positions in portrait px
        self.eye_box = eye_box  # ROI coordinates
        self.eye_grid = eye_grid  # (n, h, w, 2) head-only positions, filled where searched
        self.eye_search = eye_search  # per half of the eye box: where the eyeball may show
        self.lips = lips
        self.tongue = tongue  # tongueOut per frame


class _Interior:
    """The mouth interior's textures (premultiplied, alpha 0..255) and cavity colours, in
    the colour space of one output (RGB, or YUV for I420)."""

    __slots__ = ("upper_np", "lower_np", "dark_np", "rim_np", "tongue")

    def __init__(self, upper: Tensor, lower: Tensor, dark: Tensor, rim: Tensor,
                 tongue: Tensor) -> None:
        # As the compiled interior takes them: (4, T, U) and (3,) float32 arrays.
        self.upper_np = np.ascontiguousarray(upper[0].numpy(), np.float32)
        self.lower_np = np.ascontiguousarray(lower[0].numpy(), np.float32)
        self.dark_np = np.ascontiguousarray(dark.reshape(3).numpy(), np.float32)
        self.rim_np = np.ascontiguousarray(rim.reshape(3).numpy(), np.float32)
        self.tongue = tongue


# BT.601, limited range: what FFmpeg's swscale makes of rgb24 -> yuv420p by default, and what
# decoders (browsers included) assume for untagged H.264.
_RGB_TO_YUV: Final = torch.tensor([[0.256788, 0.504129, 0.097906],
                                   [-0.148223, -0.290993, 0.439216],
                                   [0.439216, -0.367788, -0.071427]])
_YUV_OFFSET: Final = torch.tensor([16.0, 128.0, 128.0])


def _rgb_to_yuv(rgb: Tensor) -> Tensor:
    """(3, ...) RGB 0..255 to (3, ...) YUV."""
    flat = rgb.reshape(3, -1)
    out = _RGB_TO_YUV @ flat + _YUV_OFFSET[:, None]
    return out.reshape(rgb.shape)


def _premultiplied_yuv(tex: Tensor) -> Tensor:
    """A premultiplied RGBA texture (1, 4, T, U), alpha 0..255, as premultiplied YUVA."""
    a = tex[0, 3:4] / 255.0
    yuv = (_RGB_TO_YUV @ tex[0, :3].reshape(3, -1)).reshape(3, *tex.shape[2:])
    yuv = yuv + _YUV_OFFSET.view(3, 1, 1) * a
    return torch.cat([yuv, tex[0, 3:4]])[None].contiguous()


def _box2(x: Tensor) -> Tensor:
    """(C, H, W): each pixel the mean of its 2x2 block towards the bottom right."""
    padded = F.pad(x[None], (0, 1, 0, 1), mode="replicate")
    return F.avg_pool2d(padded, 2, stride=1)[0]


class _Region:
    """A split region's tensors."""

    def __init__(self, name: str, cells: tuple[int, int, int, int], fields: Tensor,
                 padded_shape: tuple[int, int], mask: Tensor, active: Tensor) -> None:
        self.name = name
        self.active = active
        self.cells = cells
        self.fields = fields
        self.fields_np = fields.numpy().copy()
        self.padded_shape = padded_shape
        self.mask = mask


def _sparse_fields(fields: NDArray[np.float32]) -> tuple[
        NDArray[np.float32], NDArray[np.int64], NDArray[np.int64]]:
    """Fields (K, 2, P, P) as blend_fields takes them: each field's box of nonzero cells
    (K, 4), the boxes' values flattened one after another, and where each starts."""
    parts, boxes, offsets, at = [], [], [], 0
    for field in fields:
        live = (field != 0).any(axis=0)
        rows, cols = np.flatnonzero(live.any(axis=1)), np.flatnonzero(live.any(axis=0))
        if len(rows) == 0:
            rows = cols = np.array([0])  # all zero: a one-cell box of zeros
        box = (int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1)
        part = np.ascontiguousarray(field[:, box[0]:box[1], box[2]:box[3]]).ravel()
        parts.append(part)
        boxes.append(box)
        offsets.append(at)
        at += part.size
    return (np.concatenate(parts).astype(np.float32), np.array(boxes, dtype=np.int64),
            np.array(offsets, dtype=np.int64))


def _aligned(box: tuple[int, int, int, int], step: int, h: int, w: int) -> tuple[
        int, int, int, int]:
    """A box grown to whole cells of ``step`` px and clipped to (h, w)."""
    y0, y1, x0, x1 = box
    return (max(y0 // step * step, 0), min(-(-y1 // step) * step, h),
            max(x0 // step * step, 0), min(-(-x1 // step) * step, w))


def _merged(boxes: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
    """Boxes with any that overlap replaced by their bounding box, until none overlap."""
    out = [b for b in boxes if b[1] > b[0] and b[3] > b[2]]
    merging = True
    while merging:
        merging = False
        for i in range(len(out)):
            for j in range(i + 1, len(out)):
                a, b = out[i], out[j]
                if a[0] < b[1] and b[0] < a[1] and a[2] < b[3] and b[2] < a[3]:
                    out[i] = (min(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]),
                              max(a[3], b[3]))
                    del out[j]
                    merging = True
                    break
            if merging:
                break
    return out


def _contour_y(p: NDArray[np.float64], idx: tuple[int, ...],
               xs: NDArray[np.float64]) -> NDArray[np.float64]:
    order = np.argsort(p[list(idx), 0], kind="stable")
    return np.interp(xs, p[list(idx), 0][order], p[list(idx), 1][order])


def _identity_grid(h: int, w: int, full: int, row0: int, col0: int) -> Tensor:
    """Normalised sampling positions (1, h, w, 2) of a block of a ``full``-sized grid.

    ``row0``/``col0`` are the block's first row/column in that grid (-1: the padding cell).
    """
    ys = (2 * (torch.arange(h, dtype=torch.float32) + row0) + 1) / full - 1
    xs = (2 * (torch.arange(w, dtype=torch.float32) + col0) + 1) / full - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], dim=-1)[None].contiguous()


def _moved(field: Tensor, shift: Tensor, res: int) -> Tensor:
    """A block of the coarse grid (n, 2, h, w), each cell sampled where ``shift`` (the same
    block of the head's flow, normalised units) says it comes from (border padding)."""
    out = torch.empty(field.shape)
    h, w = field.shape[2:]
    sample_coarse(field.contiguous().numpy(), shift.contiguous().numpy(), 0, h, 0, w,
                  res / 2, out.numpy())
    return out


# ---- the render stage: motion -> rendered frames -> H.264 -> video topic ----------------

REPLACED_FRAMES = Counter("avatar_render_replaced_frames_total",
                          "Frames that failed to render and were replaced by the previous one",
                          ["reason"])
REPAIRED_LATENTS = Counter("avatar_render_repaired_latents_total",
                           "Motion frames with NaN or out-of-range weights, clamped")
ENCODER_RESTARTS = Counter("avatar_render_encoder_restarts_total",
                           "Encoder failures recovered by a new encoder starting on a keyframe")
KEYFRAME_INTERVAL_S: Final = 2.0  # a new viewer waits at most this long for a picture
RESOLUTIONS: Final = (256, 512, 768)
MAX_FPS: Final = 120


class _Job:
    """One motion record's frames on their way through render and encode."""

    __slots__ = ("value", "state", "renderer", "size", "frames", "weights", "head")

    def __init__(self, value: MotionFrames, state: SessionState, renderer: FaceRenderer,
                 size: int, frames: NDArray[np.int64], weights: NDArray[np.float32],
                 head: NDArray[np.float32]) -> None:
        self.value = value
        self.state = state
        self.renderer = renderer
        self.size = size
        self.frames = frames
        self.weights = weights
        self.head = head


class RenderStage(BaseStage):
    """Renders and encodes in one process: raw frames never leave it, only H.264 does.

    Failures stay inside one frame: bad latents are clamped (REPAIRED_LATENTS), a frame the
    renderer cannot draw is replaced by the previous one (REPLACED_FRAMES), and a broken
    encoder is replaced by a new one starting on a keyframe (ENCODER_RESTARTS). Input that
    can never render (unknown portrait, impossible fps or shapes) is rejected, i.e. dead-lettered.
    """

    name = "render"
    inputs: tuple[str, ...] = ("session.control", "motion")
    # Records the runtime may hand over at once (see process_batch): a poll's worth of
    # motion from several sessions, warped together.
    batch_max = 8

    def __init__(self) -> None:
        self.model_version = "warp-1"
        self._renderers: dict[tuple[str, int], FaceRenderer] = {}

    def start(self) -> None:
        self.renderer(DEFAULT_PORTRAIT, 512)  # warm the default so the first frame is on time

    def renderer(self, portrait: str, size: int) -> FaceRenderer:
        """The renderer of a portrait name: the shipped default, or an added pack."""
        key = (portrait, size)
        if key not in self._renderers:
            if portrait == DEFAULT_PORTRAIT:
                r = FaceRenderer(size=size)
            else:
                path = portrait_path(portrait)
                if path is None:
                    known = ", ".join(portrait_names())
                    raise RecordRejected(f"unknown portrait {portrait!r}; known: {known}")
                r = FaceRenderer(size=size, pack_path=path)
            try:
                r.start()
            except (PortraitError, OSError, KeyError, ValueError) as exc:
                raise RecordRejected(f"portrait {portrait!r} cannot be loaded: {exc}") from exc
            self._renderers[key] = r
        return self._renderers[key]

    def process(self, record: Inbound, state: SessionState) -> Iterable[Outbound]:
        job = self._job(record, state)
        if job is None:
            return []
        return self._finish(job, self._render(job.renderer, job.weights, job.head, state))

    def resume(self, state: SessionState, logged: dict[str, Any]) -> None:
        """After a fail-over: frames up to the last one the dead instance logged are out
        already; the fresh encoder starts after them (on a keyframe, as a new one does)."""
        last = logged.get("video")
        if isinstance(last, VideoChunk):
            state.data["next_pts"] = max(int(state.data.get("next_pts", 0)), last.pts + 1)
            state.scratch.pop("encoder", None)

    def process_batch(self, items: Sequence[tuple[Inbound, SessionState]]) -> list[
            list[Outbound] | RecordRejected]:
        """Several records at once (e.g. one consumer poll), each with its session's state:
        the motion frames of every session on the same portrait and size are warped in one
        ``render_batch_i420`` call, which shares the per-call costs (one call of 4 frames
        costs ~4/5 of two calls of 2 on one core). Per item, in order: its outputs, or the
        RecordRejected that ``process`` would have raised (dead-letter it). Records of one
        session must come in their order; a session's records may repeat (their frames are
        rendered in turn). The runtime calls it with the records already fetched behind the
        one it polled (backbone/runtime.py, BatchStage).
        """
        results: list[list[Outbound] | RecordRejected] = [[] for _ in items]
        jobs: list[tuple[int, _Job]] = []
        claimed: dict[int, int] = {}  # per state: the next frame after those already batched
        for i, (record, state) in enumerate(items):
            try:
                job = self._job(record, state, claimed.get(id(state)))
            except RecordRejected as exc:
                results[i] = exc
                continue
            if job is not None:
                jobs.append((i, job))
                claimed[id(state)] = int(job.frames[-1]) + 1
        groups: dict[int, list[tuple[int, _Job]]] = {}
        for i, job in jobs:
            groups.setdefault(id(job.renderer), []).append((i, job))
        for group in groups.values():
            # A session with two records in this batch: the second one's frames follow the
            # first's, so batching stays per record order within the group.
            renderer = group[0][1].renderer
            try:
                images = renderer.render_batch_i420(
                    np.concatenate([job.weights for _, job in group]),
                    np.concatenate([job.head for _, job in group]))
            except Exception:
                images = None  # each record on its own, with its frame-by-frame fallback
            at = 0
            for i, job in group:
                n = len(job.frames)
                mine = images[at:at + n] if images is not None else self._render(
                    job.renderer, job.weights, job.head, job.state)
                at += n
                results[i] = self._finish(job, mine)
        return results

    def _job(self, record: Inbound, state: SessionState,
             next_pts: int | None = None) -> _Job | None:
        """Check a record and pick its frames to render (from ``next_pts``, by default the
        session's next unrendered frame); None when there is nothing to draw."""
        value = record.value
        if isinstance(value, SessionControl):
            remember_control(value, state)
            if value.action == "END":
                state.scratch.pop("encoder", None)
            return None
        if not isinstance(value, MotionFrames):
            raise RecordRejected(f"render cannot use a {type(value).__name__}")
        if value.fps <= 0 or value.fps > MAX_FPS:
            raise RecordRejected(f"fps {value.fps} outside 1..{MAX_FPS}")
        n = len(value.frames)
        if np.shape(value.weights) != (n, len(BLENDSHAPES)) or np.shape(value.head) != (n, 3):
            raise RecordRejected(f"motion shapes do not match {n} frames: weights "
                                 f"{np.shape(value.weights)}, head {np.shape(value.head)}")
        cfg = session_config(state)
        size = cfg.resolution if cfg.resolution in RESOLUTIONS else 512
        renderer = self.renderer(cfg.portrait, size)
        if next_pts is None:
            next_pts = int(state.data.get("next_pts", 0))
        keep = value.frames >= next_pts  # frames already rendered (a replay) are skipped
        if not keep.any():
            return None
        frames = value.frames[keep]
        weights = np.asarray(value.weights[keep], dtype=np.float32)
        head = np.asarray(value.head[keep], dtype=np.float32)
        bad = (~np.isfinite(weights).all(axis=1) | (weights < 0).any(axis=1)
               | (weights > 1).any(axis=1) | ~np.isfinite(head).all(axis=1))
        if bad.any():
            REPAIRED_LATENTS.inc(int(bad.sum()))
        # Non-finite head angles mean "no rotation" (render_batch clamps the finite ones).
        head = np.nan_to_num(head, nan=0.0, posinf=0.0, neginf=0.0)
        return _Job(value, state, renderer, size, frames, weights, head)

    def _render(self, renderer: FaceRenderer, weights: NDArray[np.float32],
                head: NDArray[np.float32], state: SessionState) -> NDArray[np.uint8]:
        try:
            # I420 straight from the warp: the encoder takes it without a colour conversion.
            return renderer.render_batch_i420(weights, head)
        except Exception:
            # One frame at a time, so only the frames that really fail are replaced.
            return np.stack([self._one(renderer, w, h, state) for w, h in zip(weights, head)])

    def _finish(self, job: _Job, images: NDArray[np.uint8]) -> list[Outbound]:
        """Encode one record's rendered frames into its session's stream."""
        value, state, size = job.value, job.state, job.size
        state.scratch["last_frame"] = images[-1]
        encoder = self._encoder(state, size, value.fps)
        out: list[Outbound] = []
        for img, pts in zip(images, job.frames.tolist()):
            for pkt in self._encode(state, encoder, img, pts, size, value.fps):
                out.append(Outbound("video", VideoChunk(
                    value.session_id, size, size, value.fps, pkt.pts, pkt.dts, pkt.keyframe,
                    pkt.data, "h264", encoder.extradata if pkt.keyframe else None)))
            encoder = state.scratch["encoder"]
        state.data["next_pts"] = int(job.frames[-1]) + 1
        if value.is_last and out:
            last = out[-1].value
            assert isinstance(last, VideoChunk)
            out[-1] = Outbound("video", VideoChunk(**{**last.__dict__, "is_last": True}))
        return out

    def _one(self, renderer: FaceRenderer, w: NDArray[Any], h: NDArray[Any],
             state: SessionState) -> NDArray[np.uint8]:
        """One frame on its own; if even that fails, hold the previous frame."""
        try:
            frame = renderer.render_i420(w, h)
        except Exception as exc:
            REPLACED_FRAMES.labels(type(exc).__name__).inc()
            last = state.scratch.get("last_frame")
            if last is None or last.shape != (renderer.size * 3 // 2, renderer.size):
                # Nothing shown yet: the still portrait (not a render, which may fail too).
                last = renderer.portrait_i420
            return np.array(last, dtype=np.uint8)
        state.scratch["last_frame"] = frame
        return frame

    def _encoder(self, state: SessionState, size: int, fps: int) -> H264Encoder:
        enc = state.scratch.get("encoder")
        if enc is None or enc.width != size or enc.fps != fps:
            enc = H264Encoder(size, size, fps,
                              keyframe_interval=max(1, int(KEYFRAME_INTERVAL_S * fps)))
            enc.start()
            state.scratch["encoder"] = enc
        return enc

    def _encode(self, state: SessionState, encoder: H264Encoder, img: NDArray[np.uint8],
                pts: int, size: int, fps: int) -> list[EncodedPacket]:
        try:
            return encoder.encode_i420(img, pts)
        except Exception:
            # A broken encoder is replaced; the new one starts on a keyframe, so viewers
            # recover at this frame and the session goes on.
            ENCODER_RESTARTS.inc()
            state.scratch.pop("encoder", None)
            fresh = self._encoder(state, size, fps)
            fresh.force_keyframe()
            return fresh.encode_i420(img, pts)
