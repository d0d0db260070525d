"""The render stage's per-pixel loops, compiled (processors/render.py calls them): the warp
of the portrait's I420 planes, and the mouth interior's colours.

The warp upsamples the coarse sampling grid and samples the portrait in one pass, straight
into the output frame. Done with torch, the same work is four passes over the frame with a full-resolution grid
in between (``F.interpolate``, ``grid_sample`` for luma and for chroma, rounding into uint8).
Here each output pixel finds its source from the coarse grid, samples it and is written
once; the full-resolution grid never exists. The arithmetic is that of those torch calls
(bilinear, ``align_corners=False``, border padding), so the two differ by float rounding:
one level of 255 on about one pixel in 100,000.
"""
from __future__ import annotations

import numpy as np
from numba import njit
from numpy.typing import NDArray


def pad_source(plane: NDArray[np.float32]) -> NDArray[np.float32]:
    """A source plane with its last row and column repeated once, so a bilinear tap at the
    border reads a real value without a bounds check (the weight there is zero)."""
    return np.ascontiguousarray(np.pad(plane, ((0, 1), (0, 1)), mode="edge"), np.float32)


@njit(cache=True, nogil=True, boundscheck=False, fastmath=True, error_model="numpy")
def warp_i420(coarse_px: NDArray[np.float32], step: int, y0: int, y1: int, x0: int, x1: int,
              spans: NDArray[np.int32], patches: NDArray[np.int32], grid: NDArray[np.float32],
              skin_y: NDArray[np.float32], skin_u: NDArray[np.float32],
              skin_v: NDArray[np.float32], frames: NDArray[np.uint8]) -> None:  # pragma: no cover
    """Warp the box [y0, y1) x [x0, x1) of every frame (even y0 and x0); on row y, only
    columns x0 + spans[y - y0, 0] to x0 + spans[y - y0, 1] (even; the rest is still).

    coarse_px: (n, 2, P, P) source positions in portrait pixels (x, y) on the coarse grid,
    one padding cell each side; output pixel (Y, X) takes them by bilinear upsampling by
    ``step``, as ``F.interpolate(scale_factor=step, align_corners=False)`` does. Except in
    frame f's ``patches[f]`` (m, 4) boxes (a0, a1, b0, b1) relative to (y0, x0), where the
    positions are ``grid`` (n, 2, y1 - y0, x1 - x0), normalised as for ``grid_sample``.
    spans (n, y1 - y0, 2) and patches are each frame's own.
    skin_y (S + 1, S + 1), skin_u, skin_v (S / 2 + 1, S / 2 + 1): sources from
    :func:`pad_source`, chroma at half size.
    frames: (n, S * S * 3 // 2) I420 frames (Y, then U, then V), written in the box only;
    chroma is sampled at each 2x2 block's top-left pixel.
    """
    n = coarse_px.shape[0]
    sp = skin_y.shape[1]
    s = sp - 1
    sh = s >> 1
    inv = np.float32(1.0) / np.float32(step)
    half = np.float32(0.5)
    zero = np.float32(0.0)
    top = np.float32(s - 1)
    width = x1 - x0
    # Per output column: the coarse column to its left and the weight of the one after.
    cols = np.empty(width, np.int32)
    fracs = np.empty(width, np.float32)
    for j in range(width):
        src = (np.float32(x0 + j) + half) * inv + half
        c = int(np.floor(src))
        cols[j] = c
        fracs[j] = src - np.float32(c)
    c_lo = cols[0]
    nc = cols[width - 1] + 2 - c_lo
    for j in range(width):
        cols[j] -= c_lo
    # starts[k]: the first output column whose left coarse column is k (width past the end).
    starts = np.full(nc + 1, width, np.int32)
    for j in range(width - 1, -1, -1):
        starts[cols[j]] = j
    for k in range(nc - 1, -1, -1):
        starts[k] = min(starts[k], starts[k + 1])
    row_x = np.empty(nc, np.float32)
    row_y = np.empty(nc, np.float32)
    ixs = np.empty(width, np.float32)
    iys = np.empty(width, np.float32)
    fy_ = skin_y.ravel()
    fu = skin_u.ravel()
    fv = skin_v.ravel()
    cp = skin_u.shape[1]
    ctop = np.float32(cp - 2)
    scale = np.float32(s) * half
    shift = np.float32(s - 1) * half
    for f in range(n):
        frame = frames[f]
        u_plane = frames[f, s * s:]
        v_plane = frames[f, s * s + sh * sh:]
        for yy in range(y0, y1):
            row = yy - y0
            xa = spans[f, row, 0]
            xb = spans[f, row, 1]
            if xb <= xa:
                continue
            # This row's positions on the coarse columns, then at every output column.
            src = (np.float32(yy) + half) * inv + half
            r = int(np.floor(src))
            fy = src - np.float32(r)
            px_upper = coarse_px[f, 0, r]
            px_lower = coarse_px[f, 0, r + 1]
            py_upper = coarse_px[f, 1, r]
            py_lower = coarse_px[f, 1, r + 1]
            for c in range(cols[xa], cols[xb - 1] + 2):
                a = px_upper[c + c_lo]
                row_x[c] = a + fy * (px_lower[c + c_lo] - a)
                b = py_upper[c + c_lo]
                row_y[c] = b + fy * (py_lower[c + c_lo] - b)
            # Coarse cell by coarse cell: each output column's weight is fixed.
            for k in range(cols[xa], cols[xb - 1] + 1):
                ax = row_x[k]
                dx = row_x[k + 1] - ax
                ay = row_y[k]
                dy = row_y[k + 1] - ay
                for j in range(max(starts[k], xa), min(starts[k + 1], xb)):
                    ixs[j] = min(max(ax + fracs[j] * dx, zero), top)
                    iys[j] = min(max(ay + fracs[j] * dy, zero), top)
            for p in range(patches.shape[1]):
                if patches[f, p, 0] <= row < patches[f, p, 1]:
                    for j in range(max(patches[f, p, 2], xa), min(patches[f, p, 3], xb)):
                        ixs[j] = min(max(grid[f, 0, row, j] * scale + shift, zero), top)
                        iys[j] = min(max(grid[f, 1, row, j] * scale + shift, zero), top)
            # Sources lie in 0..255 and bilinear weights are convex: no clamp before
            # rounding.
            base = yy * s + x0
            for j in range(xa, xb):
                xi = np.int32(ixs[j])
                yi = np.int32(iys[j])
                frame[base + j] = np.uint8(_taps(fy_, yi * sp + xi, sp, ixs[j] - np.float32(xi),
                                                 iys[j] - np.float32(yi)) + half)
            if (yy & 1) == 0:
                # A 2x2 block's chroma: the half-size planes (each sample a block's mean) at
                # the block's top-left pixel's position, halved.
                cbase = (yy >> 1) * sh + (x0 >> 1)
                for j in range(xa >> 1, xb >> 1):
                    ix = min(ixs[2 * j] * half, ctop)
                    iy = min(iys[2 * j] * half, ctop)
                    xi = np.int32(ix)
                    yi = np.int32(iy)
                    wx = ix - np.float32(xi)
                    wy = iy - np.float32(yi)
                    i = yi * cp + xi
                    u_plane[cbase + j] = np.uint8(_taps(fu, i, cp, wx, wy) + half)
                    v_plane[cbase + j] = np.uint8(_taps(fv, i, cp, wx, wy) + half)


@njit(inline="always", boundscheck=False, fastmath=True)
def _taps(flat: NDArray[np.float32], i: int, stride: int, wx: float,
          wy: float) -> float:  # pragma: no cover
    """Bilinear between flat[i], flat[i + 1] and the same two one row (stride) down."""
    a = flat[i] + wx * (flat[i + 1] - flat[i])
    b = flat[i + stride] + wx * (flat[i + stride + 1] - flat[i + stride])
    v: float = a + wy * (b - a)
    return v


@njit(cache=True, nogil=True, boundscheck=False, fastmath=True, error_model="numpy")
def mouth_interior(cx: NDArray[np.float64], ry: NDArray[np.float64], top: NDArray[np.float64],
                   bot: NDArray[np.float64], x_left: float, x_right: float, rows_per_px: float,
                   upper: NDArray[np.float32], lower: NDArray[np.float32],
                   dark: NDArray[np.float32], rim: NDArray[np.float32],
                   cover: NDArray[np.float32], inner: NDArray[np.float32]) -> None:  # pragma: no cover
    """Teeth over a lit cavity between the lips, for a box of pixels.

    cx (w,): the box's column centres, ry (h,): its row centres (output px); top, bot (w,):
    the upper and lower lip's inner edge per column. upper, lower (4, T, U): the teeth
    textures (premultiplied, alpha 0..255), hanging from the upper lip and standing on the
    lower one, ``rows_per_px`` texture rows per output pixel, their columns spread from
    corner to corner. dark, rim (3,): the cavity's colour deep inside and at its rim.
    Writes cover (h, w): how much of each pixel is between the lips, and inner (3, h, w).
    """
    h = ry.shape[0]
    w = cx.shape[0]
    width = x_right - x_left
    fade = max(0.05 * width, 1.0)
    t_rows = upper.shape[1]
    t_cols = upper.shape[2]
    low = np.empty(4)
    upp = np.empty(4)
    for j in range(w):
        x = cx[j]
        inside_x = min(max(min(x - x_left, x_right - x), 0.0), 1.0)
        u = min(max((x - x_left) / width, 0.0), 1.0)
        side = (2.0 * u - 1.0) ** 2
        tx = u * (t_cols - 1)
        for i in range(h):
            t = ry[i] - top[j]
            b = bot[j] - ry[i]
            cover[i, j] = (min(max(t + 0.5, 0.0), 1.0) * min(max(b + 0.5, 0.0), 1.0)
                           * inside_x)
            t = max(t, 0.0)
            b = max(b, 0.0)
            glow = min(max(np.exp(-min(t, b) / fade) * 0.8 + side * 0.5, 0.0), 1.0)
            _texels(lower, tx, b * rows_per_px, t_rows, t_cols, low)
            _texels(upper, tx, t * rows_per_px, t_rows, t_cols, upp)
            a_l = low[3] / 255.0
            a_u = upp[3] / 255.0
            for ch in range(3):
                cav = dark[ch] + (rim[ch] - dark[ch]) * glow
                inner[ch, i, j] = (cav * (1.0 - a_l) + low[ch]) * (1.0 - a_u) + upp[ch]


@njit(inline="always", boundscheck=False, fastmath=True)
def _texels(tex: NDArray[np.float32], x: float, y: float, rows: int, cols: int,
            out: NDArray[np.float64]) -> None:  # pragma: no cover
    """The 4 channels of a (4, rows, cols) texture, bilinear at (x, y) texel coordinates,
    zero outside (grid_sample's zeros padding)."""
    xi = int(np.floor(x))
    yi = int(np.floor(y))
    wx = x - xi
    wy = y - yi
    for ch in range(4):
        out[ch] = 0.0
    for dy in range(2):
        yy = yi + dy
        if yy < 0 or yy >= rows:
            continue
        fy = wy if dy else 1.0 - wy
        for dx in range(2):
            xx = xi + dx
            if 0 <= xx < cols:
                k = fy * (wx if dx else 1.0 - wx)
                for ch in range(4):
                    out[ch] += k * tex[ch, yy, xx]


@njit(cache=True, nogil=True, boundscheck=False, fastmath=True, error_model="numpy")
def upsample_into(coarse: NDArray[np.float32], step: int, oy: int, ox: int, b0: int, b1: int,
                  c0: int, c1: int, buf: NDArray[np.float32]) -> None:  # pragma: no cover
    """buf[:, :, b0:b1, c0:c1] = the padded coarse grid (n, C, P, P) upsampled by ``step``
    (bilinear, as the warp does), where buf's pixel (0, 0) is output pixel (oy, ox)."""
    inv = np.float32(1.0) / np.float32(step)
    half = np.float32(0.5)
    w = c1 - c0
    ks = np.empty(w, np.int64)
    fxs = np.empty(w, np.float32)
    for q in range(w):
        srx = (np.float32(ox + c0 + q) + half) * inv + half
        ks[q] = int(np.floor(srx))
        fxs[q] = srx - np.float32(ks[q])
    k_lo = ks[0]
    nk = ks[w - 1] + 2 - k_lo
    line = np.empty(nk, np.float32)
    for f in range(buf.shape[0]):
        for ch in range(buf.shape[1]):
            plane = coarse[f, ch]
            out = buf[f, ch]
            for b in range(b0, b1):
                src = (np.float32(oy + b) + half) * inv + half
                r = int(np.floor(src))
                fy = src - np.float32(r)
                upper = plane[r]
                lower = plane[r + 1]
                for k in range(nk):
                    line[k] = upper[k_lo + k] + fy * (lower[k_lo + k] - upper[k_lo + k])
                row = out[b]
                for q in range(w):
                    k = ks[q] - k_lo
                    row[c0 + q] = line[k] + fxs[q] * (line[k + 1] - line[k])


@njit(cache=True, nogil=True, boundscheck=False, fastmath=True, error_model="numpy")
def clamp_to_lips(grid: NDArray[np.float32], boxes: NDArray[np.int64],
                  lower: NDArray[np.float32], ly: int, lx: int, edge_up: NDArray[np.float32],
                  edge_lo: NDArray[np.float32], s: int) -> None:  # pragma: no cover
    """In grid (n, 2, H, W) over frame f's box boxes[f] (y0, y1, x0, x1): a pixel of the
    lower lip (``lower`` (n, 1, h, w) > 0.5, its (0, 0) at (ly, lx)) samples no higher than
    the lower lip's inner edge in its source column, any other no lower than the upper
    lip's."""
    sf = np.float32(s)
    half = np.float32(0.5)
    one = np.float32(1.0)
    for f in range(grid.shape[0]):
        for yy in range(boxes[f, 0], boxes[f, 1]):
            for xx in range(boxes[f, 2], boxes[f, 3]):
                sx = ((grid[f, 0, yy, xx] + one) * sf - one) * half
                sy = ((grid[f, 1, yy, xx] + one) * sf - one) * half
                col = min(max(int(np.rint(sx)), 0), s - 1)
                if lower[f, 0, yy - ly, xx - lx] > half:
                    sy = max(sy, edge_lo[col])
                else:
                    sy = min(sy, edge_up[col])
                grid[f, 1, yy, xx] = (np.float32(2.0) * sy + one) / sf - one


@njit(cache=True, nogil=True, boundscheck=False, fastmath=True, error_model="numpy")
def below_upper_lip(upper: NDArray[np.float64], y0: int, x0: int,
                    out: NDArray[np.float32]) -> None:  # pragma: no cover
    """out (n, 1, h, w): 1 below the upper lip's inner edge (upper (n, k, 2), corner to
    corner), 0 above, ~1 px of anti-aliasing; fading to 0 well past the corners."""
    h = out.shape[2]
    w = out.shape[3]
    xs = np.arange(x0, x0 + w).astype(np.float64)
    for f in range(upper.shape[0]):
        pts = upper[f]
        order = np.argsort(pts[:, 0], kind="mergesort")
        top = np.interp(xs, pts[order, 0], pts[order, 1])
        left = pts[0, 0]
        right = pts[pts.shape[0] - 1, 0]
        span = max(right - left, 1.0)
        for c in range(w):
            beyond = max(left - xs[c], 0.0) + max(xs[c] - right, 0.0)
            k = 1.0 / (1.0 + 0.8 * beyond)
            window = min(max(1.5 - beyond / (0.25 * span), 0.0), 1.0)
            for r in range(h):
                out[f, 0, r, c] = np.float32(min(max((y0 + r - top[c]) * k + 0.5, 0.0), 1.0)
                                             * window)


@njit(cache=True, nogil=True, boundscheck=False, fastmath=True, error_model="numpy")
def displaced(pts: NDArray[np.float32], flows: NDArray[np.float32], pick: NDArray[np.int64],
              step: int, oy: int, ox: int, s: int, steps: int,
              out: NDArray[np.float32]) -> None:  # pragma: no cover
    """Solve q + flow(q) = p for points p (n, m, 2) (output px) by ``steps`` fixed-point
    steps; point i follows flow ``pick[i]`` of flows (n, 2 * F, h, w), a block of the padded
    coarse grid (in normalised units) whose cell (0, 0) is coarse cell (oy, ox)."""
    h = flows.shape[2]
    w = flows.shape[3]
    inv = 1.0 / step
    amp = s / 2.0
    for f in range(pts.shape[0]):
        for i in range(pts.shape[1]):
            px = pts[f, i, 0]
            py = pts[f, i, 1]
            ch = 2 * pick[i]
            qx = px
            qy = py
            for _ in range(steps):
                ix = min(max((qx + 0.5) * inv - 0.5 - ox, 0.0), w - 1.0)
                iy = min(max((qy + 0.5) * inv - 0.5 - oy, 0.0), h - 1.0)
                xi = int(ix)
                yi = int(iy)
                xj = min(xi + 1, w - 1)
                yj = min(yi + 1, h - 1)
                wx = ix - xi
                wy = iy - yi
                fx = ((1 - wy) * ((1 - wx) * flows[f, ch, yi, xi] + wx * flows[f, ch, yi, xj])
                      + wy * ((1 - wx) * flows[f, ch, yj, xi] + wx * flows[f, ch, yj, xj]))
                fy = ((1 - wy) * ((1 - wx) * flows[f, ch + 1, yi, xi]
                                  + wx * flows[f, ch + 1, yi, xj])
                      + wy * ((1 - wx) * flows[f, ch + 1, yj, xi]
                              + wx * flows[f, ch + 1, yj, xj]))
                qx = px - fx * amp
                qy = py - fy * amp
            out[f, i, 0] = qx
            out[f, i, 1] = qy



@njit(inline="always", boundscheck=False, fastmath=True)
def _bilinear(plane: NDArray[np.float32], x: float, y: float) -> float:  # pragma: no cover
    """A :func:`pad_source` plane at (x, y) px, clamped to the image (border padding)."""
    top = plane.shape[0] - 2
    x = min(max(x, 0.0), top)
    y = min(max(y, 0.0), top)
    xi = int(x)
    yi = int(y)
    wx = x - xi
    wy = y - yi
    a = plane[yi, xi] + wx * (plane[yi, xi + 1] - plane[yi, xi])
    b = plane[yi + 1, xi] + wx * (plane[yi + 1, xi + 1] - plane[yi + 1, xi])
    v: float = a + wy * (b - a)
    return v


@njit(cache=True, nogil=True, boundscheck=False, fastmath=True, error_model="numpy")
def eyes_i420(grid: NDArray[np.float32], eye_grid: NDArray[np.float32], ey0: int, ex0: int,
              boxes: NDArray[np.int32], ry0: int, rx0: int, alpha: NDArray[np.float32],
              alpha_box: NDArray[np.float32], back_y: NDArray[np.float32],
              back_u: NDArray[np.float32], back_v: NDArray[np.float32],
              frames: NDArray[np.uint8]) -> None:  # pragma: no cover
    """The eyeballs, behind the skin where it is see-through, onto warped I420 frames.

    grid (n, 2, H, W): the skin's sampling positions over the ROI (top-left (ry0, rx0));
    eye_grid (n, 2, h, w): the eye layer's, over the eye box (top-left (ey0, ex0) in the
    ROI); both normalised as for grid_sample. boxes (m, 4): where to look, eye-box
    coordinates (even top-left). alpha: the skin's opacity, back_y: the eye layer's luma;
    alpha_box, back_u, back_v: the same for chroma, at half size (all from
    :func:`pad_source`).
    """
    s = alpha.shape[0] - 1
    sh = s >> 1
    scale = s * 0.5
    shift = (s - 1) * 0.5
    for f in range(grid.shape[0]):
        frame = frames[f]
        u_plane = frames[f, s * s:]
        v_plane = frames[f, s * s + sh * sh:]
        for b in range(boxes.shape[0]):
            for r in range(boxes[b, 0], boxes[b, 1]):
                gr = ey0 + r
                yy = ry0 + gr
                for c in range(boxes[b, 2], boxes[b, 3]):
                    gc = ex0 + c
                    sx = grid[f, 0, gr, gc] * scale + shift
                    sy = grid[f, 1, gr, gc] * scale + shift
                    a = _bilinear(alpha, sx, sy)
                    chroma = (r & 1) == 0 and (c & 1) == 0
                    if a >= 1.0 and not chroma:
                        continue
                    ex = eye_grid[f, 0, r, c] * scale + shift
                    ey = eye_grid[f, 1, r, c] * scale + shift
                    xx = rx0 + gc
                    if a < 1.0:
                        i = yy * s + xx
                        v = frame[i] + (1.0 - a) * _bilinear(back_y, ex, ey) + 0.5
                        frame[i] = np.uint8(min(max(v, 0.0), 255.0))
                    if chroma:  # half-size planes, as the warp's chroma
                        ac = _bilinear(alpha_box, 0.5 * sx, 0.5 * sy)
                        if ac < 1.0:
                            i = (yy >> 1) * sh + (xx >> 1)
                            v = (u_plane[i] + (1.0 - ac) * _bilinear(back_u, 0.5 * ex, 0.5 * ey)
                                 + 0.5)
                            u_plane[i] = np.uint8(min(max(v, 0.0), 255.0))
                            v = (v_plane[i] + (1.0 - ac) * _bilinear(back_v, 0.5 * ex, 0.5 * ey)
                                 + 0.5)
                            v_plane[i] = np.uint8(min(max(v, 0.0), 255.0))


@njit(cache=True, nogil=True, boundscheck=False, fastmath=True, error_model="numpy")
def blend_fields(coeff: NDArray[np.float32], data: NDArray[np.float32],
                 boxes: NDArray[np.int64], offsets: NDArray[np.int64],
                 out: NDArray[np.float32]) -> NDArray[np.int64]:  # pragma: no cover
    """out (n, 2, P, P), zeroed: sum over k of coeff[:, k] x field k, where field k is
    nonzero only in boxes[k] (r0, r1, c0, c1) and stored there, (2, h, w) flattened, at
    data[offsets[k]:]. Returns the box (r0, r1, c0, c1) holding every nonzero value
    (empty when all weights are zero)."""
    union = np.array([out.shape[2], 0, out.shape[3], 0], np.int64)
    for f in range(coeff.shape[0]):
        for k in range(coeff.shape[1]):
            c = coeff[f, k]
            if c == 0.0:
                continue
            r0, r1, c0, c1 = boxes[k, 0], boxes[k, 1], boxes[k, 2], boxes[k, 3]
            union[0] = min(union[0], r0)
            union[1] = max(union[1], r1)
            union[2] = min(union[2], c0)
            union[3] = max(union[3], c1)
            h = r1 - r0
            w = c1 - c0
            at = offsets[k]
            for ch in range(2):
                plane = out[f, ch]
                for r in range(h):
                    src = data[at + (ch * h + r) * w:at + (ch * h + r + 1) * w]
                    dst = plane[r0 + r, c0:c1]
                    for q in range(w):
                        dst[q] += c * src[q]
    return union


@njit(cache=True, nogil=True, boundscheck=False, fastmath=True, error_model="numpy")
def sample_coarse(field: NDArray[np.float32], shift: NDArray[np.float32], r0: int, r1: int,
                  c0: int, c1: int, amp: float, out: NDArray[np.float32]) -> None:  # pragma: no cover
    """out[:, :, r, c] = field (n, 2, P, P) at cell (r, c) moved by amp x shift[:, :, r, c]
    (bilinear, border), for r0 <= r < r1, c0 <= c < c1 (out is left alone elsewhere)."""
    h = field.shape[2]
    w = field.shape[3]
    xmax = np.float32(w - 1)
    ymax = np.float32(h - 1)
    a32 = np.float32(amp)
    zero = np.float32(0.0)
    for f in range(field.shape[0]):
        fx_plane = field[f, 0].ravel()
        fy_plane = field[f, 1].ravel()
        for r in range(r0, r1):
            sx_row = shift[f, 0, r]
            sy_row = shift[f, 1, r]
            ox_row = out[f, 0, r]
            oy_row = out[f, 1, r]
            for c in range(c0, c1):
                x = min(max(np.float32(c) + sx_row[c] * a32, zero), xmax)
                y = min(max(np.float32(r) + sy_row[c] * a32, zero), ymax)
                xi = np.int32(x)
                yi = np.int32(y)
                xj = min(xi + 1, w - 1)
                yj = min(yi + 1, h - 1)
                wx = x - np.float32(xi)
                wy = y - np.float32(yi)
                i00 = yi * w + xi
                i01 = yi * w + xj
                i10 = yj * w + xi
                i11 = yj * w + xj
                a = fx_plane[i00] + wx * (fx_plane[i01] - fx_plane[i00])
                b = fx_plane[i10] + wx * (fx_plane[i11] - fx_plane[i10])
                ox_row[c] = a + wy * (b - a)
                a = fy_plane[i00] + wx * (fy_plane[i01] - fy_plane[i00])
                b = fy_plane[i10] + wx * (fy_plane[i11] - fy_plane[i10])
                oy_row[c] = a + wy * (b - a)


@njit(cache=True, nogil=True, boundscheck=False, fastmath=True, error_model="numpy")
def blend_i420(frame: NDArray[np.uint8], s: int, y0: int, x0: int, cover: NDArray[np.float32],
               colour: NDArray[np.float32]) -> None:  # pragma: no cover
    """Blend a layer (coverage (h, w), YUV colour (3, h, w); even h, w, y0, x0) over one
    I420 frame (S * S * 3 // 2,) at output pixel (y0, x0); chroma by 2x2 block averages."""
    sh = s >> 1
    h = cover.shape[0]
    w = cover.shape[1]
    for r in range(h):
        for c in range(w):
            i = (y0 + r) * s + x0 + c
            v = frame[i] * (1.0 - cover[r, c]) + colour[0, r, c] * cover[r, c] + 0.5
            frame[i] = np.uint8(min(max(v, 0.0), 255.0))
    for r in range(0, h, 2):
        for c in range(0, w, 2):
            k = 0.25 * (cover[r, c] + cover[r, c + 1] + cover[r + 1, c] + cover[r + 1, c + 1])
            i = ((y0 + r) >> 1) * sh + ((x0 + c) >> 1)
            for p in range(2):
                m = 0.25 * (colour[1 + p, r, c] * cover[r, c]
                            + colour[1 + p, r, c + 1] * cover[r, c + 1]
                            + colour[1 + p, r + 1, c] * cover[r + 1, c]
                            + colour[1 + p, r + 1, c + 1] * cover[r + 1, c + 1])
                at = s * s + p * sh * sh + i
                v = frame[at] * (1.0 - k) + m + 0.5
                frame[at] = np.uint8(min(max(v, 0.0), 255.0))


@njit(cache=True, nogil=True, boundscheck=False, fastmath=True, error_model="numpy")
def moving_cells(total: NDArray[np.float32], still: float, core: NDArray[np.int64],
                 bounds: NDArray[np.int64]) -> tuple[NDArray[np.int64],
                                                     NDArray[np.bool_]]:  # pragma: no cover
    """Which coarse cells to warp, frame by frame: those whose flow (total (n, 2, P, P),
    padded) or a neighbour's exceeds ``still``, and the ``core`` box (r0, r1, c0, c1);
    within ``bounds`` (a box of the unpadded grid). Returns the box holding every frame's
    and the (n, h, w) masks cropped to it (each frame's own: what a frame shows never
    depends on the frames it is rendered with)."""
    n = total.shape[0]
    p = total.shape[2]
    res = p - 2
    moving = np.zeros((n, res, res), np.bool_)
    live = np.zeros((p, p), np.bool_)
    b0, b1, c0, c1 = bounds[0], bounds[1], bounds[2], bounds[3]
    for f in range(n):
        # only within bounds (and its padded neighbours): nothing outside is ever warped
        for r in range(b0, b1 + 2):
            for c in range(c0, c1 + 2):
                live[r, c] = max(abs(total[f, 0, r, c]), abs(total[f, 1, r, c])) > still
        for r in range(b0, b1):
            for c in range(c0, c1):
                # unpadded (r, c) is padded (r + 1, c + 1): its neighbours are padded r..r + 2
                moving[f, r, c] = (live[r, c] or live[r, c + 1] or live[r, c + 2]
                                   or live[r + 1, c] or live[r + 1, c + 1] or live[r + 1, c + 2]
                                   or live[r + 2, c] or live[r + 2, c + 1] or live[r + 2, c + 2])
        moving[f, core[0]:core[1], core[2]:core[3]] = True
    box = np.array([bounds[1], bounds[0], bounds[3], bounds[2]], np.int64)
    for f in range(n):
        for r in range(bounds[0], bounds[1]):
            for c in range(bounds[2], bounds[3]):
                if moving[f, r, c]:
                    box[0] = min(box[0], r)
                    box[1] = max(box[1], r + 1)
                    box[2] = min(box[2], c)
                    box[3] = max(box[3], c + 1)
    return box, moving[:, box[0]:box[1], box[2]:box[3]].copy()


@njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def mouth_box(pts: NDArray[np.float64], half: int, y0: int, y1: int, x0: int, x1: int,
              even: bool) -> tuple[NDArray[np.int64], NDArray[np.float64],
                                   NDArray[np.float64]]:  # pragma: no cover
    """Where the mouth is open: the box (ly0, ly1, lx0, lx1) relative to the ROI
    [y0, y1) x [x0, x1) (empty when the lips touch; even edges with ``even``), and the
    upper and lower lip's inner edge at each of its columns. pts (2 * half, 2): the upper
    lip's inner contour then the lower's, corner to corner (output px)."""
    none = np.zeros(4, np.int64)
    empty = np.zeros(0)
    up = pts[:half]
    lo = pts[half:]
    x_left = up[0, 0]
    x_right = up[half - 1, 0]
    if x_right - x_left < 2:
        return none, empty, empty
    h = y1 - y0
    w = x1 - x0
    lx0, lx1 = _span(int(np.floor(x_left)) - x0, int(np.ceil(x_right)) + 1 - x0, w, even)
    if lx1 <= lx0:
        return none, empty, empty
    cx = np.arange(lx0 + x0, lx1 + x0).astype(np.float64)
    ou = np.argsort(up[:, 0], kind="mergesort")
    ol = np.argsort(lo[:, 0], kind="mergesort")
    top = np.interp(cx, up[ou, 0], up[ou, 1])
    bot = np.interp(cx, lo[ol, 0], lo[ol, 1])
    lo_y = np.inf
    hi_y = -np.inf
    for j in range(cx.shape[0]):
        if bot[j] - top[j] > 0.02 and x_left < cx[j] < x_right:
            lo_y = min(lo_y, top[j])
            hi_y = max(hi_y, bot[j])
    if hi_y < lo_y:
        return none, empty, empty
    ly0, ly1 = _span(int(np.floor(lo_y)) - 1 - y0, int(np.ceil(hi_y)) + 2 - y0, h, even)
    if ly1 <= ly0:
        return none, empty, empty
    box = np.array([ly0, ly1, lx0, lx1], np.int64)
    return box, top, bot


@njit(inline="always")
def _span(a0: int, a1: int, limit: int, even: bool) -> tuple[int, int]:  # pragma: no cover
    """[a0, a1) clipped to [0, limit), grown to even ends with ``even``."""
    a0 = max(a0, 0)
    a1 = min(a1, limit)
    if even:
        a0 = a0 & ~1
        a1 = min(a1 + (a1 & 1), limit)
    return a0, a1


@njit(cache=True, nogil=True, boundscheck=False, fastmath=True, error_model="numpy")
def coarse_flows(coeff: NDArray[np.float32], head: NDArray[np.float32],
                 data: NDArray[np.float32], boxes: NDArray[np.int64], offsets: NDArray[np.int64],
                 head_fields: NDArray[np.float32], ident: NDArray[np.float32], size: int,
                 still: float, core: NDArray[np.int64], bounds: NDArray[np.int64]) -> tuple[
        NDArray[np.float32], NDArray[np.float32], NDArray[np.float32], NDArray[np.float32],
        NDArray[np.float32], NDArray[np.float32], NDArray[np.int64],
        NDArray[np.bool_]]:  # pragma: no cover
    """A chunk's motion on the coarse grid (all (n, 2, P, P), normalised units).

    coeff (n, K): blendshape weights for :func:`blend_fields`; head (n, 3): yaw, pitch,
    roll for head_fields (3, 2, P, P); ident (2, P, P): the grid's own positions.
    Blendshapes act on the unrotated face, then the head turns: the blendshapes' flow is
    sampled where the head's flow comes from. Returns the head's flow, the blendshapes'
    flow so moved, the total, the sampling positions (normalised, then the head's alone,
    then in portrait pixels), and the cells to warp (:func:`moving_cells`: box, mask).
    """
    n = coeff.shape[0]
    p = ident.shape[1]
    res = p - 2
    bs = np.zeros((n, 2, p, p), np.float32)
    union = blend_fields(coeff, data, boxes, offsets, bs)
    hd = np.empty((n, 2, p, p), np.float32)
    reach = 0.0
    for f in range(n):
        for ch in range(2):
            for r in range(p):
                for c in range(p):
                    v = (head[f, 0] * head_fields[0, ch, r, c] + head[f, 1] * head_fields[1, ch, r, c]
                         + head[f, 2] * head_fields[2, ch, r, c])
                    hd[f, ch, r, c] = v
                    reach = max(reach, abs(v))
    bs_at = np.zeros((n, 2, p, p), np.float32)
    if union[1] > union[0]:
        m = int(np.ceil(reach * res / 2)) + 1
        sample_coarse(bs, hd, max(union[0] - m, 0), min(union[1] + m, p), max(union[2] - m, 0),
                      min(union[3] + m, p), res / 2, bs_at)
    total = hd + bs_at
    scale = size / 2.0
    shift = (size - 1) / 2.0
    coarse = np.empty((n, 2, p, p), np.float32)
    head_pos = np.empty((n, 2, p, p), np.float32)
    coarse_px = np.empty((n, 2, p, p), np.float32)
    for f in range(n):
        for ch in range(2):
            for r in range(p):
                for c in range(p):
                    g = ident[ch, r, c] + total[f, ch, r, c]
                    coarse[f, ch, r, c] = g
                    head_pos[f, ch, r, c] = ident[ch, r, c] + hd[f, ch, r, c]
                    coarse_px[f, ch, r, c] = g * scale + shift
    box, moving = moving_cells(total, still, core, bounds)
    return hd, bs_at, total, coarse, head_pos, coarse_px, box, moving


@njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def apart_box(delta: NDArray[np.float32], threshold: float) -> tuple[
        NDArray[np.int64], float]:  # pragma: no cover
    """Where a region's two sides differ (delta (n, 2, h, w), one padding cell each side),
    frame by frame: the boxes (n, 4) (r0, r1, c0, c1) of interior cells (padding excluded,
    so cell (0, 0) is delta's (1, 1)) where |delta| exceeds ``threshold`` (empty: r1 <= r0),
    and the largest |delta| anywhere."""
    n = delta.shape[0]
    h = delta.shape[2]
    w = delta.shape[3]
    boxes = np.empty((n, 4), np.int64)
    peak = 0.0
    for f in range(n):
        boxes[f, 0] = h
        boxes[f, 1] = 0
        boxes[f, 2] = w
        boxes[f, 3] = 0
        for ch in range(2):
            plane = delta[f, ch]
            for r in range(h):
                row = plane[r]
                for c in range(w):
                    v = abs(row[c])
                    peak = max(peak, v)
                    if v > threshold and 0 < r < h - 1 and 0 < c < w - 1:
                        boxes[f, 0] = min(boxes[f, 0], r - 1)
                        boxes[f, 1] = max(boxes[f, 1], r)
                        boxes[f, 2] = min(boxes[f, 2], c - 1)
                        boxes[f, 3] = max(boxes[f, 3], c)
    return boxes, peak


@njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def row_spans(moving: NDArray[np.bool_], step: int) -> NDArray[np.int32]:  # pragma: no cover
    """Per frame and output row (step per cell row; moving (n, h, w)), the columns (px)
    from the row's first moving cell to past its last; (0, 0) for a row with none."""
    n, h, w = moving.shape
    spans = np.zeros((n, h * step, 2), np.int32)
    for f in range(n):
        for r in range(h):
            first = -1
            last = -1
            for c in range(w):
                if moving[f, r, c]:
                    if first < 0:
                        first = c
                    last = c
            if first >= 0:
                for k in range(step):
                    spans[f, r * step + k, 0] = first * step
                    spans[f, r * step + k, 1] = (last + 1) * step
    return spans


@njit(cache=True, nogil=True, boundscheck=False, fastmath=True, error_model="numpy")
def add_upsampled(buf: NDArray[np.float32], b0: int, c0: int, mask: NDArray[np.float32],
                  block: NDArray[np.float32], step: int,
                  limits: NDArray[np.int64]) -> None:  # pragma: no cover
    """buf[:, :, b0:b0 + h, c0:c0 + w] += mask (n, 1, h, w) x block (n, C, H, W) upsampled
    by ``step`` (bilinear; block's first and last rows and columns are padding cells, so
    output pixel (0, 0) lies in its cell (1, 1), as in :func:`upsample_into`); for frame f
    only over its own box limits[f] (r0, r1, c0, c1), relative to (b0, c0)."""
    inv = np.float32(1.0) / np.float32(step)
    half = np.float32(0.5)
    h = mask.shape[2]
    w = mask.shape[3]
    ks = np.empty(w, np.int64)
    fxs = np.empty(w, np.float32)
    for q in range(w):
        src = (np.float32(q) + half) * inv + half
        ks[q] = int(np.floor(src))
        fxs[q] = src - np.float32(ks[q])
    line = np.empty(block.shape[3], np.float32)
    for f in range(buf.shape[0]):
        weight = mask[f, 0]
        for ch in range(buf.shape[1]):
            plane = block[f, ch]
            out = buf[f, ch]
            for b in range(max(limits[f, 0], 0), min(limits[f, 1], h)):
                src = (np.float32(b) + half) * inv + half
                r = int(np.floor(src))
                fy = src - np.float32(r)
                upper = plane[r]
                lower = plane[r + 1]
                for k in range(line.shape[0]):
                    line[k] = upper[k] + fy * (lower[k] - upper[k])
                row = out[b0 + b]
                wrow = weight[b]
                for q in range(max(limits[f, 2], 0), min(limits[f, 3], w)):
                    k = ks[q]
                    row[c0 + q] += wrow[q] * (line[k] + fxs[q] * (line[k + 1] - line[k]))


@njit(cache=True, nogil=True, boundscheck=False, fastmath=True, error_model="numpy")
def sample_plane(plane: NDArray[np.float32], grid: NDArray[np.float32], r0: int, c0: int,
                 out: NDArray[np.float32]) -> None:  # pragma: no cover
    """out (n, 1, h, w) = a :func:`pad_source` plane sampled (bilinear, border) at the
    normalised positions grid[:, :, r0:r0 + h, c0:c0 + w] (grid (n, 2, H, W))."""
    s = plane.shape[0] - 1
    scale = s * 0.5
    shift = (s - 1) * 0.5
    for f in range(out.shape[0]):
        for b in range(out.shape[2]):
            gx = grid[f, 0, r0 + b]
            gy = grid[f, 1, r0 + b]
            row = out[f, 0, b]
            for c in range(out.shape[3]):
                row[c] = _bilinear(plane, gx[c0 + c] * scale + shift, gy[c0 + c] * scale + shift)


@njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def mouth_layer(pts: NDArray[np.float64], half: int, y0: int, y1: int, x0: int, x1: int,
                even: bool, rows_per_px: float, upper: NDArray[np.float32],
                lower: NDArray[np.float32], dark: NDArray[np.float32],
                rim: NDArray[np.float32]) -> tuple[
        NDArray[np.int64], NDArray[np.float64], NDArray[np.float64], NDArray[np.float32],
        NDArray[np.float32]]:  # pragma: no cover
    """:func:`mouth_box` then :func:`mouth_interior` over it: the box, the lips' edges per
    column, the coverage and the colour; an empty box when nothing shows."""
    box, top, bot = mouth_box(pts, half, y0, y1, x0, x1, even)
    h = box[1] - box[0]
    w = box[3] - box[2]
    cover = np.zeros((max(h, 0), max(w, 0)), np.float32)
    colour = np.zeros((3, max(h, 0), max(w, 0)), np.float32)
    if h <= 0:
        return box, top, bot, cover, colour
    cx = np.arange(box[2] + x0, box[3] + x0).astype(np.float64)
    ry = np.arange(box[0] + y0, box[1] + y0).astype(np.float64)
    mouth_interior(cx, ry, top, bot, pts[0, 0], pts[half - 1, 0], rows_per_px, upper, lower,
                   dark, rim, cover, colour)
    if cover.max() <= 0.0:
        box[:] = 0
    return box, top, bot, cover, colour


@njit(cache=True, nogil=True, boundscheck=False, fastmath=True, error_model="numpy")
def lip_contour(coeff: NDArray[np.float32], lip_rest: NDArray[np.float32],
                lip_motion: NDArray[np.float32], mouth_fields: NDArray[np.float32],
                hd: NDArray[np.float32], total: NDArray[np.float32], m0: int, n0: int, ph: int,
                pw: int, size: int, step: int, pick: NDArray[np.int64],
                designed: NDArray[np.bool_], steps: int) -> tuple[
        NDArray[np.float32], NDArray[np.float32]]:  # pragma: no cover
    """Where the warp shows the lips' inner contour this chunk, and the mouth region's
    lower-lip-side flow.

    coeff (n, K) weights; lip_rest (m, 2) the contour at rest and lip_motion (K, 2m) how
    each blendshape moves it (normalised); mouth_fields (K, 2 * ph * pw): the lower lip's
    side of the mouth region, a block of the padded coarse grid at (m0, n0); hd, total
    (n, 2, P, P) the head's and the whole flow. The designed contour follows the head only;
    the resting one each lip's own side (upper: the whole flow; lower: the region's), and
    the corners (``designed``) keep the design. Returns (n, m, 2) px and (n, 2, ph, pw).
    """
    n = coeff.shape[0]
    k_count = coeff.shape[1]
    m = lip_rest.shape[0]
    amp = size / 2.0
    res = hd.shape[2] - 2
    raw = np.zeros((n, 2 * ph * pw), np.float32)
    moves = np.zeros((n, 2 * m), np.float32)
    for f in range(n):
        for k in range(k_count):
            c = coeff[f, k]
            if c == 0.0:
                continue
            for q in range(2 * ph * pw):
                raw[f, q] += c * mouth_fields[k, q]
            for q in range(2 * m):
                moves[f, q] += c * lip_motion[k, q]
    head = np.ascontiguousarray(hd[:, :, m0:m0 + ph, n0:n0 + pw])
    moved = np.empty((n, 2, ph, pw), np.float32)
    sample_coarse(raw.reshape(n, 2, ph, pw), head, 0, ph, 0, pw, res / 2, moved)
    flows = np.empty((n, 6, ph, pw), np.float32)
    flows[:, 0:2] = head
    flows[:, 2:4] = total[:, :, m0:m0 + ph, n0:n0 + pw]
    flows[:, 4:6] = head + moved
    start = np.empty((n, 2 * m, 2), np.float32)
    for f in range(n):
        for i in range(m):
            start[f, i, 0] = lip_rest[i, 0] + moves[f, 2 * i] * amp
            start[f, i, 1] = lip_rest[i, 1] + moves[f, 2 * i + 1] * amp
            start[f, m + i, 0] = lip_rest[i, 0]
            start[f, m + i, 1] = lip_rest[i, 1]
    solved = np.empty((n, 2 * m, 2), np.float32)
    displaced(start, flows, pick, step, m0 - 1, n0 - 1, size, steps, solved)
    lips = np.empty((n, m, 2), np.float32)
    for f in range(n):
        for i in range(m):
            src = i if designed[i] else m + i
            lips[f, i, 0] = solved[f, src, 0]
            lips[f, i, 1] = solved[f, src, 1]
    return lips, np.ascontiguousarray(flows[:, 4:6])


@njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def weighted_sum(coeff: NDArray[np.float32], rows: NDArray[np.float32]) -> NDArray[
        np.float32]:  # pragma: no cover
    """coeff (n, K) @ rows (K, F), frame by frame in a fixed order (a BLAS product may
    round differently with the number of frames, and a frame must render the same in
    any batch)."""
    out = np.zeros((coeff.shape[0], rows.shape[1]), np.float32)
    for f in range(coeff.shape[0]):
        for k in range(coeff.shape[1]):
            c = coeff[f, k]
            if c != 0.0:
                for q in range(rows.shape[1]):
                    out[f, q] += c * rows[k, q]
    return out

def compile_now() -> None:
    """Compile (or load from numba's cache) every kernel called from Python on tiny inputs
    (the ones they call compile with them), so the first real frame does not wait for the
    compiler (about 30 s cold on 2 cores, 0.4 s from the cache)."""
    f32 = np.float32
    coarse = np.zeros((1, 2, 4, 4), f32)
    src = pad_source(np.zeros((4, 4), f32))
    frames = np.zeros((1, 24), np.uint8)
    small = pad_source(np.zeros((2, 2), f32))
    warp_i420(coarse, 2, 0, 2, 0, 2, np.zeros((1, 2, 2), np.int32),
              np.zeros((1, 1, 4), np.int32), np.zeros((1, 2, 2, 2), f32), src, small, small, frames)
    tex = np.zeros((4, 2, 2), f32)
    warm = np.zeros(3, f32)
    buf = np.zeros((1, 2, 2, 2), f32)
    upsample_into(coarse, 2, 0, 0, 0, 2, 0, 2, buf)
    clamp_to_lips(buf, np.zeros((1, 4), np.int64), np.zeros((1, 1, 2, 2), f32), 0, 0,
                  np.zeros(4, f32), np.zeros(4, f32), 4)
    below_upper_lip(np.zeros((1, 2, 2)), 0, 0, np.zeros((1, 1, 2, 2), f32))
    eyes_i420(buf, buf, 0, 0, np.zeros((1, 4), np.int32), 0, 0, src, small, src, small, small,
              frames)
    field = np.zeros((1, 2, 2, 2), f32)
    sample_coarse(field, field, 0, 2, 0, 2, 1.0, buf)
    blend_i420(frames[0], 4, 0, 0, np.zeros((2, 2), f32), np.zeros((3, 2, 2), f32))
    mouth_layer(np.zeros((4, 2)), 2, 0, 2, 0, 2, True, 1.0, tex, tex, warm, warm)
    apart_box(buf, 0.1)
    lip_contour(np.zeros((1, 1), f32), np.zeros((2, 2), f32), np.zeros((1, 4), f32),
                np.zeros((1, 8), f32), coarse, coarse, 0, 0, 2, 2, 8, 2, np.zeros(4, np.int64),
                np.zeros(2, np.bool_), 1)
    sample_plane(src, buf, 0, 0, np.zeros((1, 1, 2, 2), f32))
    add_upsampled(buf, 0, 0, np.zeros((1, 1, 2, 2), f32), np.zeros((1, 2, 3, 3), f32), 2,
                  np.zeros((1, 4), np.int64))
    weighted_sum(np.zeros((1, 1), f32), np.zeros((1, 4), f32))
    row_spans(np.zeros((1, 2, 2), np.bool_), 2)
    coarse_flows(np.zeros((1, 1), f32), np.zeros((1, 3), f32), np.zeros(8, f32),
                 np.array([[0, 2, 0, 2]]), np.zeros(1, np.int64), np.zeros((3, 2, 4, 4), f32),
                 np.zeros((2, 4, 4), f32), 8, 0.1, np.array([0, 1, 0, 1]), np.array([0, 1, 0, 1]))
