"""Portrait packs: one photo, its face landmarks and one motion field per driven blendshape.

A pack is built once per portrait (offline, or when an integrator uploads a photo); the
render stage (processors/render.py) loads it at start-up and warps it once per motion frame.

Conventions every field follows, so the renderer can stay a dumb linear combiner:

- Fields are *backward* offsets for ``torch.nn.functional.grid_sample`` with
  ``align_corners=False``: the output pixel at normalised position ``g`` samples the portrait
  at ``g + sum_i w_i * field_i(g)``. Channel order is (x, y), one unit is half the image width.
- Fields are stored on a coarse grid (``FIELD_RES`` cells a side) and bilinearly upsampled;
  being in normalised units they serve any output size.
- Lips and eyelids slide past each other, which a smooth field cannot express. Each such
  slit (the mouth, each eye) is a *split region*: a full-resolution mask says on which side of
  the slit a pixel lies, and pixels on the second side use an alternative smooth field.
- The eye openings are holes in the skin (``skin_alpha``): behind them sits the eyeball
  layer (``eye_back``), which only follows the head, so an eyelid slides over a still eye.
- The mouth interior (teeth, cavity, tongue) is two small textures hung from the inner lips,
  drawn by the renderer wherever the lips part.
- Left/Right follow ARKit: the subject's left, which is the image's right in a photo.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Final

import numpy as np
from numpy.typing import NDArray

from backbone.blendshapes import HEAD_POSE, INDEX

F32 = NDArray[np.float32]
F64 = NDArray[np.float64]
U8 = NDArray[np.uint8]
I64 = NDArray[np.int64]
BoolA = NDArray[np.bool_]

PACK_VERSION: Final = 1
FIELD_RES: Final = 128  # coarse grid: 31 fields x 128^2 x 2 stay ~1.2 MB compressed
DEFAULT_SIZE: Final = 512
MIN_FACE_PX: Final = 96  # below this the upscaled face is mush; ask for a better photo
PORTRAITS_DIR: Final = Path(__file__).resolve().parent / "portraits"
DEFAULT_PACK_PATH: Final = PORTRAITS_DIR / "astronaut.npz"

DRIVEN: Final[tuple[str, ...]] = (
    "jawOpen", "mouthClose", "mouthPressLeft", "mouthPressRight", "mouthFunnel", "mouthPucker",
    "mouthSmileLeft", "mouthSmileRight", "mouthStretchLeft", "mouthStretchRight",
    "mouthRollLower", "mouthRollUpper", "mouthUpperUpLeft", "mouthUpperUpRight",
    "mouthLowerDownLeft", "mouthLowerDownRight", "mouthFrownLeft", "mouthFrownRight",
    "eyeBlinkLeft", "eyeBlinkRight", "eyeSquintLeft", "eyeSquintRight", "eyeWideLeft",
    "eyeWideRight",
    "browInnerUp", "browDownLeft", "browDownRight", "browOuterUpLeft", "browOuterUpRight",
    "cheekSquintLeft", "cheekSquintRight",
)
FIELD_NAMES: Final[tuple[str, ...]] = DRIVEN + HEAD_POSE
assert all(name in INDEX for name in DRIVEN)

# MediaPipe face mesh topology (478 points with refine_landmarks). "Right" is the subject's
# right eye, i.e. the image's left.
FACE_OVAL: Final = (10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379,
                    378, 400, 377, 152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127,
                    162, 21, 54, 103, 67, 109)
LIP_OUTER_UPPER: Final = (61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291)
LIP_OUTER_LOWER: Final = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291)
LIP_INNER_UPPER: Final = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308)
LIP_INNER_LOWER: Final = (78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308)
MOUTH_CORNERS: Final = (61, 78, 291, 308)
EYE_UPPER: Final = {"Right": (33, 246, 161, 160, 159, 158, 157, 173, 133),
                    "Left": (263, 466, 388, 387, 386, 385, 384, 398, 362)}
EYE_LOWER: Final = {"Right": (33, 7, 163, 144, 145, 153, 154, 155, 133),
                    "Left": (263, 249, 390, 373, 374, 380, 381, 382, 362)}
BROW_UPPER: Final = {"Right": (70, 63, 105, 66, 107), "Left": (300, 293, 334, 296, 336)}
BROW_LOWER: Final = {"Right": (46, 53, 52, 65, 55), "Left": (276, 283, 282, 295, 285)}
IRISES: Final = tuple(range(468, 478))
EARS: Final = (234, 454)
CHIN: Final = 152
FOREHEAD: Final = 10

# Split regions: the first side uses the base field, the second side the alternative.
REGIONS: Final = ("mouth", "eyeRight", "eyeLeft")


class PortraitError(ValueError):
    """The photo cannot become a portrait pack (no face, several faces, face too small...)."""


# ---------------------------------------------------------------------------------------------
# The pack


@dataclass(frozen=True, eq=False)
class SplitRegion:
    """Where one slit (mouth or eyelids) splits the face into two independently moving sides."""

    name: str
    cells: tuple[int, int, int, int]  # coarse-grid box (row0, row1, col0, col1), unpadded
    fields: F32  # (K, rows + 2, cols + 2, 2) alternative fields, one coarse cell of padding
    mask: F32  # (rows * step, cols * step) at pack size: 1 where the alternative applies


@dataclass(frozen=True, eq=False)
class MouthLayer:
    """The mouth interior as textures hung from the inner lips (premultiplied RGBA, 0..255).

    ``upper`` row i is i texture rows below the upper inner lip, ``lower`` row i is i rows
    above the lower inner lip; columns run from the image-left inner corner to the right one.
    One texture row is ``S / px_size`` output pixels for an output of size S.
    """

    upper: F32  # (T, U, 4)
    lower: F32  # (T, U, 4)
    px_size: int  # the pack size the rows were measured at
    # (K, 22, 2): each field's forward motion of the inner-lip landmarks (upper contour, then
    # lower), normalised units, exactly as designed: the renderer cuts the mouth open along
    # it, which keeps sharp mouth corners that the smooth fields round off.
    lip_motion: F32


@dataclass(frozen=True, eq=False)
class PortraitPack:
    """Everything the renderer needs to animate one portrait. Arrays are read-only by habit."""

    name: str
    image: U8  # (S, S, 3) RGB working portrait
    landmarks: F32  # (478, 3): x, y in pixels; z in pixels, larger is farther from camera
    field_names: tuple[str, ...]
    fields: F32  # (K, FIELD_RES, FIELD_RES, 2) base fields, coarse
    regions: tuple[SplitRegion, ...]
    mouth: MouthLayer
    skin_alpha: F32  # (S, S): 0 in the eye openings, where the eyeball layer shows
    eye_back: U8  # (S, S, 3): the portrait with eye openings grown outwards

    @property
    def size(self) -> int:
        return int(self.image.shape[0])

    @property
    def step(self) -> int:
        return self.size // int(self.fields.shape[1])

    def field_index(self, name: str) -> int:
        return self.field_names.index(name)

    def dense_field(self, name: str) -> F32:
        """One field at full resolution (H, W, 2), split regions applied, for inspection."""
        k = self.field_index(name)
        full = _upsample(self.fields[k], self.step)
        for region in self.regions:
            r0, r1, c0, c1 = region.cells
            alt = _upsample(region.fields[k], self.step)[self.step:-self.step,
                                                         self.step:-self.step]
            s = self.step
            box = full[r0 * s:r1 * s, c0 * s:c1 * s]
            box += region.mask[..., None] * (alt - box)
        return full

    def save(self, path: str | Path) -> None:
        """Write a compressed .npz; derived arrays (masks, alpha, eye layer) are not stored."""
        arrays: dict[str, NDArray[np.generic]] = {
            "version": np.array(PACK_VERSION, dtype=np.int32),
            "name": np.array(self.name),
            "image": self.image,
            "landmarks": self.landmarks.astype(np.float32),
            "field_names": np.array(self.field_names),
            "fields": _quantise(self.fields),
            "mouth_upper": np.round(self.mouth.upper).astype(np.uint8),
            "mouth_lower": np.round(self.mouth.lower).astype(np.uint8),
            "mouth_px_size": np.array(self.mouth.px_size, dtype=np.int32),
            "mouth_lip_motion": self.mouth.lip_motion.astype(np.float32),
        }
        for region in self.regions:
            arrays[f"region_{region.name}_cells"] = np.array(region.cells, dtype=np.int32)
            arrays[f"region_{region.name}_fields"] = _quantise(region.fields)
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("wb") as fh:
            np.savez_compressed(fh, **arrays)  # type: ignore[arg-type]

    def resized(self, size: int) -> PortraitPack:
        """The same pack for another output size (fields are resolution-free)."""
        if size == self.size:
            return self
        _check_size(size)
        from skimage.transform import resize  # heavy import, only when resizing

        image = resize(self.image, (size, size, 3),  # type: ignore[no-untyped-call]
                       order=3, anti_aliasing=size < self.size, preserve_range=True)
        scale = size / self.size
        landmarks = (self.landmarks * np.float32(scale)).astype(np.float32)
        return _assemble(self.name, np.clip(np.round(image), 0, 255).astype(np.uint8),
                         landmarks, self.field_names, self.fields,
                         [(r.name, r.cells, r.fields) for r in self.regions], self.mouth)


def _quantise(fields: F32) -> NDArray[np.float16]:
    # float16 keeps these offsets to ~0.03 px at 512 and halves the file.
    return fields.astype(np.float16)


def load_pack(path: str | Path) -> PortraitPack:
    """Read a pack written by :meth:`PortraitPack.save`."""
    p = Path(path)
    with np.load(p, allow_pickle=False) as data:
        version = int(data["version"])
        if version != PACK_VERSION:
            raise PortraitError(f"{p}: pack version {version}, this code reads {PACK_VERSION}")
        names = tuple(str(n) for n in data["field_names"])
        regions = []
        for rname in REGIONS:
            cells_arr = data[f"region_{rname}_cells"]
            cells = (int(cells_arr[0]), int(cells_arr[1]), int(cells_arr[2]), int(cells_arr[3]))
            regions.append((rname, cells, data[f"region_{rname}_fields"].astype(np.float32)))
        mouth = MouthLayer(upper=data["mouth_upper"].astype(np.float32),
                           lower=data["mouth_lower"].astype(np.float32),
                           px_size=int(data["mouth_px_size"]),
                           lip_motion=data["mouth_lip_motion"].astype(np.float32))
        return _assemble(str(data["name"]), data["image"].astype(np.uint8),
                         data["landmarks"].astype(np.float32), names,
                         data["fields"].astype(np.float32), regions, mouth)


def default_pack(size: int = DEFAULT_SIZE) -> PortraitPack:
    """The shipped astronaut pack (scikit-image's public-domain portrait), at ``size`` px.

    If the file is missing it is rebuilt from ``skimage.data.astronaut()`` and written back,
    which needs mediapipe and takes a few seconds.
    """
    if DEFAULT_PACK_PATH.exists():
        return load_pack(DEFAULT_PACK_PATH).resized(size)
    import warnings

    from skimage.data import astronaut

    warnings.warn(f"{DEFAULT_PACK_PATH} is missing: rebuilding it from "
                  "skimage.data.astronaut() (a few seconds; commit the file)", stacklevel=2)
    photo = np.asarray(astronaut(), dtype=np.uint8)  # type: ignore[no-untyped-call]
    pack = build_pack(photo, DEFAULT_SIZE, name="astronaut")
    try:
        pack.save(DEFAULT_PACK_PATH)
    except OSError as exc:  # a read-only install still renders, it just rebuilds next time
        warnings.warn(f"could not write {DEFAULT_PACK_PATH}: {exc}", stacklevel=2)
    return pack.resized(size)


# ---------------------------------------------------------------------------------------------
# Named portraits: the shipped default, and packs added with `avatar portrait add`

DEFAULT_PORTRAIT: Final = "astronaut"
PORTRAIT_DIR_ENV: Final = "AVATAR_PORTRAIT_DIR"
DEFAULT_PORTRAIT_DIR: Final = "avatar-data/portraits"
# A name becomes a file name: no separators, no dot-dot, nothing a shell would mangle.
PORTRAIT_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def portrait_dir() -> Path:
    """Where added portrait packs live (``$AVATAR_PORTRAIT_DIR``, read on every call)."""
    return Path(os.environ.get(PORTRAIT_DIR_ENV) or DEFAULT_PORTRAIT_DIR)


def check_portrait_name(name: str) -> str:
    if not PORTRAIT_NAME.fullmatch(name):
        raise PortraitError(f"portrait name {name!r} must be 1-64 letters, digits, '_' or '-', "
                            "starting with a letter or digit")
    return name


def portrait_path(name: str) -> Path | None:
    """The pack file of an added portrait, or None if there is none by that name.

    The default portrait has no entry here: it ships inside the package (``default_pack``).
    """
    if not PORTRAIT_NAME.fullmatch(name):
        return None
    path = portrait_dir() / f"{name}.npz"
    return path if path.is_file() else None


def portrait_names() -> list[str]:
    """The default portrait, then every added one, sorted."""
    found = sorted(p.stem for p in portrait_dir().glob("*.npz")
                   if PORTRAIT_NAME.fullmatch(p.stem) and p.stem != DEFAULT_PORTRAIT)
    return [DEFAULT_PORTRAIT, *found]


# ---------------------------------------------------------------------------------------------
# Building: landmarks and the working crop


def _check_size(size: int) -> None:
    if not 128 <= size <= 2048 or size % FIELD_RES:
        raise ValueError(f"portrait size must be a multiple of {FIELD_RES} in 128..2048, "
                         f"not {size}")


def detect_landmarks(image: U8) -> F64:
    """The 478 MediaPipe face-mesh landmarks of the single face in ``image``, in pixels.

    Columns are x, y, z; z uses the x scale and grows away from the camera.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise PortraitError(f"expected an RGB uint8 image (H, W, 3), got {image.dtype} "
                            f"{image.shape}")
    import mediapipe as mp  # heavy (TensorFlow Lite, jax): only builders need it

    height, width = image.shape[:2]
    with mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=3,
                                         refine_landmarks=True,
                                         min_detection_confidence=0.5) as mesh:
        result = mesh.process(np.ascontiguousarray(image))
    faces = result.multi_face_landmarks or []
    if not faces:
        raise PortraitError("no face found in the photo: use a frontal, well-lit portrait")
    if len(faces) > 1:
        raise PortraitError(f"{len(faces)} faces found in the photo: a portrait needs exactly "
                            "one face")
    pts = np.array([[p.x * width, p.y * height, p.z * width] for p in faces[0].landmark],
                   dtype=np.float64)
    if pts.shape != (478, 3):
        raise PortraitError(f"face mesh returned {pts.shape[0]} landmarks, expected 478")
    return pts


def _face_extent(pts: F64) -> float:
    span = pts[:, :2].max(axis=0) - pts[:, :2].min(axis=0)
    return float(span.max())


def _crop(image: U8, pts: F64, size: int) -> U8:
    """A square crop around the face: face height ~42% of the side, a little headroom."""
    from skimage.transform import AffineTransform, warp

    face_h = float(np.linalg.norm(pts[CHIN, :2] - pts[FOREHEAD, :2]))
    centre = pts[[FOREHEAD, CHIN, *EARS], :2].mean(axis=0)
    side = 2.4 * face_h
    top_left = centre - side / 2 + np.array([0.0, 0.08 * side])
    scale = side / size
    transform = AffineTransform(  # type: ignore[no-untyped-call]
        scale=scale, translation=(float(top_left[0]), float(top_left[1])))
    # Edge mode: a face near the photo border gets smeared edge pixels, not black bars.
    out = np.asarray(warp(image, transform,  # type: ignore[no-untyped-call]
                          output_shape=(size, size), order=3, mode="edge",
                          preserve_range=True), dtype=np.float64)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def build_pack(image: NDArray[np.uint8], size: int = DEFAULT_SIZE,
               name: str = "portrait") -> PortraitPack:
    """Make a portrait pack from an RGB photo of one face (uint8, H x W x 3).

    Raises PortraitError when the photo has no face, several faces or a face smaller than
    ``MIN_FACE_PX`` pixels across.
    """
    _check_size(size)
    photo = np.asarray(image)
    if photo.ndim == 2:
        photo = np.stack([photo] * 3, axis=-1)
    if photo.ndim == 3 and photo.shape[2] == 4:
        photo = photo[..., :3]
    first = detect_landmarks(np.ascontiguousarray(photo))
    extent = _face_extent(first)
    if extent < MIN_FACE_PX:
        raise PortraitError(f"the face is {extent:.0f} px across; at least {MIN_FACE_PX} px "
                            "is needed for a usable portrait")
    work = _crop(photo, first, size)
    # Landmarks again on the crop: the face is larger there, so they are more precise.
    pts = _refine_inner_lips(work, detect_landmarks(work))
    face = _Face.from_landmarks(pts, size)
    controls = _controls(face)
    base, alts = _blendshape_fields(face, controls)
    head_base, head_alts = _head_fields(face, alts)
    fields = np.concatenate([base, head_base], axis=0)
    region_fields = [(rname, cells, np.concatenate([alt, head_alts[i]], axis=0))
                     for i, (rname, cells, alt) in enumerate(alts)]
    mouth = _mouth_layer(work, face)
    return _assemble(name, work, pts.astype(np.float32), FIELD_NAMES, fields.astype(np.float32),
                     region_fields, mouth)


def _toothy(rgb: F64) -> BoolA:
    """Bright, nearly grey pixels: teeth. Lips and skin are far more saturated (~0.25+)."""
    vmax = rgb.max(axis=-1)
    sat = (vmax - rgb.min(axis=-1)) / np.maximum(vmax, 1.0)
    return np.asarray((vmax > 140) & (sat < 0.2), dtype=np.bool_)


def _refine_inner_lips(image: U8, pts: F64) -> F64:
    """Snap the inner-lip landmarks to the lips' edge where teeth show.

    MediaPipe's inner contour can sit a few pixels off the visible edge (into the lip or
    over the teeth). The renderer cuts the mouth open along this contour, so it should run
    exactly where lip meets teeth.
    """
    from scipy.ndimage import map_coordinates

    out = pts.copy()
    reach = 5.0 * image.shape[0] / 512
    offsets = np.arange(-reach, reach + 0.01, 0.5)
    channels = [image[..., ch].astype(np.float64) for ch in range(3)]
    for contour, down in ((LIP_INNER_LOWER, True), (LIP_INNER_UPPER, False)):
        inner = contour[1:-1]
        found = np.full(len(inner), np.nan)
        for j, k in enumerate(inner):
            x, y = pts[k, 0], pts[k, 1]
            ys = y + offsets
            rgb = np.stack([map_coordinates(c, [ys, np.full_like(ys, x)], order=1,
                                            mode="nearest") for c in channels], axis=-1)
            teeth = _toothy(rgb)
            lip = ~teeth & (rgb.max(axis=-1) > 110)  # not the dark mouth corner either
            # A lower-lip edge has teeth above and lip below; an upper-lip edge the reverse.
            edges = (np.flatnonzero(teeth[:-1] & lip[1:]) if down
                     else np.flatnonzero(lip[:-1] & teeth[1:]))
            if len(edges) == 0:
                continue
            e = int(edges[np.argmin(np.abs(offsets[edges] + 0.25))])
            # The edge is blurred over a few pixels: put the cut halfway between the lip's
            # dark inner line and the teeth, so neither side keeps a sliver of the other.
            darkness = rgb.min(axis=-1)
            span = int(round(4.0 * image.shape[0] / 512 / 0.5))
            if down:
                tooth_v = darkness[max(e - 1, 0):e + 1].mean()
                lip_seg = darkness[e + 1:e + 1 + span]
            else:
                tooth_v = darkness[e + 1:e + 3].mean()
                lip_seg = darkness[max(e + 1 - span, 0):e + 1][::-1]
            if len(lip_seg) == 0:
                continue
            shadow = int(np.argmin(lip_seg))
            mid = 0.5 * (tooth_v + lip_seg[shadow])
            cross = np.flatnonzero(lip_seg[:shadow + 1] < mid)
            steps = int(cross[0]) if len(cross) else shadow
            found[j] = offsets[e] + 0.25 + (0.5 * steps if down else -0.5 * steps)
        ok = np.flatnonzero(np.isfinite(found))
        if len(ok) == 0:
            continue
        # Landmarks where no edge showed follow their neighbours, fading to 0 at the corners,
        # so the contour stays smooth.
        idx = np.concatenate([[-1], ok, [len(inner)]])
        val = np.concatenate([[0.0], found[ok], [0.0]])
        shift = np.interp(np.arange(len(inner)), idx, val)
        out[list(inner), 1] += shift
    return out


# ---------------------------------------------------------------------------------------------
# Face geometry


def _sorted_curve(p: F64, idx: tuple[int, ...]) -> tuple[F64, F64]:
    xy = p[list(idx)]
    order = np.argsort(xy[:, 0], kind="stable")
    return xy[order, 0], xy[order, 1]


def _curve_y(p: F64, idx: tuple[int, ...], x: F64) -> F64:
    xs, ys = _sorted_curve(p, idx)
    return np.interp(x, xs, ys)


@dataclass(frozen=True)
class _Face:
    """Landmark geometry at the working size, with the unit lengths designs are scaled by."""

    p: F64  # (478, 2) pixels
    z: F64  # (478,) pixels, larger is farther
    size: int
    face_h: float
    mouth_w: float  # outer corner to outer corner
    inner_w: float
    mouth_cx: float
    side: NDArray[np.int64]  # (478,) split-side label, see _side_labels

    @staticmethod
    def from_landmarks(pts: F64, size: int) -> _Face:
        p = pts[:, :2].astype(np.float64)
        z = pts[:, 2].astype(np.float64)
        face_h = float(np.linalg.norm(p[CHIN] - p[FOREHEAD]))
        mouth_w = float(np.linalg.norm(p[291] - p[61]))
        inner_w = float(np.linalg.norm(p[308] - p[78]))
        mouth_cx = float((p[13, 0] + p[14, 0]) / 2)
        face = _Face(p, z, size, face_h, mouth_w, inner_w, mouth_cx,
                     np.zeros(len(p), dtype=np.int64))
        return replace(face, side=_side_labels(face))

    @property
    def unit(self) -> float:
        """Pixels per 1/512 of the working image: small absolute margins scale with it."""
        return self.size / 512.0

    def lip_profile(self, x: F64) -> F64:
        """1 at the mouth centre, 0 at and beyond the inner corners."""
        half = max(self.inner_w / 2, 1.0)
        return np.clip(1 - ((x - self.mouth_cx) / half) ** 2, 0, 1)

    def gap(self, x: F64) -> F64:
        """The parted-lips height at x (the source image's open mouth)."""
        return np.maximum(_curve_y(self.p, LIP_INNER_LOWER, x)
                          - _curve_y(self.p, LIP_INNER_UPPER, x), 0)

    def slit_y(self, x: F64) -> F64:
        return 0.5 * (_curve_y(self.p, LIP_INNER_LOWER, x) + _curve_y(self.p, LIP_INNER_UPPER, x))

    def eye_x_range(self, eye: str) -> tuple[float, float]:
        xs = self.p[list(EYE_UPPER[eye]), 0]
        return float(xs.min()), float(xs.max())

    def eye_opening(self, eye: str, x: F64) -> F64:
        return np.maximum(_curve_y(self.p, EYE_LOWER[eye], x)
                          - _curve_y(self.p, EYE_UPPER[eye], x), 0)

    def eye_height(self, eye: str) -> float:
        lo, hi = self.eye_x_range(eye)
        return float(self.eye_opening(eye, np.linspace(lo, hi, 25)).max())


# Split-side labels: 0 shared; 2r + 0 the first (base) side of region r; 2r + 1 the second
# (alternative) side. Region 1 is the mouth (first side: upper lip), regions 2 and 3 the
# right and left eye (first side: lower lid; second: upper lid and the opening).
def _region_id(name: str) -> int:
    return REGIONS.index(name) + 1


def _side_labels(face: _Face) -> NDArray[np.int64]:
    p = face.p
    side = np.zeros(len(p), dtype=np.int64)
    # Mouth: everything inside the outer lip outline, strictly between the inner corners.
    x_lo, x_hi = p[78, 0], p[308, 0]
    outer_up = _curve_y(p, LIP_OUTER_UPPER, p[:, 0])
    outer_lo = _curve_y(p, LIP_OUTER_LOWER, p[:, 0])
    slit = face.slit_y(p[:, 0])
    pad = 1.5 * face.unit
    inside = (p[:, 0] > x_lo + 0.5) & (p[:, 0] < x_hi - 0.5)
    inside &= (p[:, 1] > outer_up - pad) & (p[:, 1] < outer_lo + pad)
    mouth = _region_id("mouth")
    side[inside & (p[:, 1] < slit)] = 2 * mouth
    side[inside & (p[:, 1] >= slit)] = 2 * mouth + 1
    for idx, label in ((LIP_OUTER_UPPER, 2 * mouth), (LIP_INNER_UPPER, 2 * mouth),
                       (LIP_OUTER_LOWER, 2 * mouth + 1), (LIP_INNER_LOWER, 2 * mouth + 1)):
        side[list(idx)] = label
    side[list(MOUTH_CORNERS)] = 0
    # Eyes: the lid (from the brow down to the upper lid margin) against the lower lid.
    for eye in ("Right", "Left"):
        rid = _region_id(f"eye{eye}")
        lo, hi = face.eye_x_range(eye)
        within = (p[:, 0] > lo + 0.5) & (p[:, 0] < hi - 0.5)
        brow = _curve_y(p, BROW_LOWER[eye], p[:, 0])
        lower = _curve_y(p, EYE_LOWER[eye], p[:, 0])
        eye_h = face.eye_height(eye)
        upper_zone = within & (p[:, 1] > brow + 0.5) & (p[:, 1] < lower - 0.5)
        lower_zone = within & (p[:, 1] >= lower - 0.5) & (p[:, 1] < lower + 1.2 * eye_h)
        side[upper_zone] = 2 * rid + 1
        side[lower_zone] = 2 * rid
        side[list(EYE_UPPER[eye][1:-1])] = 2 * rid + 1
        side[list(EYE_LOWER[eye][1:-1])] = 2 * rid
        side[[EYE_UPPER[eye][0], EYE_UPPER[eye][-1]]] = 0
    side[list(IRISES)] = -1  # never a control point: the iris sits in the opening
    return side


# ---------------------------------------------------------------------------------------------
# Blendshape designs: forward displacement (pixels, +y down) of each landmark at weight 1.

Design = Callable[["_Face"], F64]


def _extend(face: _Face, drivers: BoolA, disp: F64, radius: float,
            sigma: float | None = None) -> F64:
    """Give every non-driver landmark a displacement that fades with distance from drivers.

    Nearby drivers are averaged (Gaussian weights relative to the nearest one, so it never
    underflows) and the result decays with distance to the nearest driver; a landmark never
    borrows from a driver on the other side of a slit.
    """
    p, side = face.p, face.side
    sig = sigma if sigma is not None else 0.04 * face.face_h
    out = disp.copy()
    targets = np.flatnonzero(~drivers & (side >= 0))
    src = np.flatnonzero(drivers & (side >= 0))
    if len(src) == 0:
        return out
    d2 = ((p[targets, None, :] - p[None, src, :]) ** 2).sum(-1)
    ts, ss = side[targets][:, None], side[src][None, :]
    opposite = (ts > 0) & (ss > 0) & (ts // 2 == ss // 2) & (ts != ss)
    d2 = np.where(opposite, np.inf, d2)
    dmin = d2.min(axis=1, keepdims=True)
    w = np.exp(-(d2 - dmin) / (2 * sig**2))
    avg = (w @ disp[src]) / np.maximum(w.sum(axis=1, keepdims=True), 1e-12)
    fade = np.exp(-dmin / (2 * radius**2))
    out[targets] = np.where(np.isfinite(dmin), avg * fade, 0.0)
    return out


def _lip_rho(face: _Face, k: I64) -> F64:
    """0 at the inner lip line, 1 at the outer lip line, per landmark (by its side)."""
    p = face.p
    x = p[k, 0]
    iu, il = _curve_y(p, LIP_INNER_UPPER, x), _curve_y(p, LIP_INNER_LOWER, x)
    ou, ol = _curve_y(p, LIP_OUTER_UPPER, x), _curve_y(p, LIP_OUTER_LOWER, x)
    upper = face.side[k] == 2 * _region_id("mouth")
    rho_u = (iu - p[k, 1]) / np.maximum(iu - ou, 1.0)
    rho_l = (p[k, 1] - il) / np.maximum(ol - il, 1.0)
    return np.asarray(np.clip(np.where(upper, rho_u, rho_l), 0, 1), dtype=np.float64)


def _mouth_sets(face: _Face) -> tuple[I64, I64, I64]:
    mouth = _region_id("mouth")
    upper = np.flatnonzero(face.side == 2 * mouth)
    lower = np.flatnonzero(face.side == 2 * mouth + 1)
    return upper, lower, np.array(MOUTH_CORNERS)


def _pins(*groups: tuple[int, ...]) -> list[int]:
    return [i for g in groups for i in g]


def _jaw_open(face: _Face) -> F64:
    p = face.p
    d = np.zeros_like(p)
    chin_drop = 0.17 * face.face_h
    lip_drop = 0.88 * chin_drop
    # The jaw hinges near the ears, so a point drops in proportion to how far in front of
    # the hinge it sits (depth), and only below the mouth-to-ear line.
    z_ear = face.z[list(EARS)].mean()
    reach = max(z_ear - face.z[CHIN], 1.0)
    depth = np.clip((z_ear - face.z) / reach, 0, 1) ** 0.8
    x = p[:, 0]
    left, right = p[61], p[291]
    ear_l, ear_r = p[EARS[0]], p[EARS[1]]
    line = face.slit_y(np.clip(x, p[78, 0], p[308, 0]))
    t_l = np.clip((left[0] - x) / max(left[0] - ear_l[0], 1.0), 0, 1)
    t_r = np.clip((x - right[0]) / max(ear_r[0] - right[0], 1.0), 0, 1)
    line = np.where(x < left[0], left[1] + t_l * (ear_l[1] - left[1]), line)
    line = np.where(x > right[0], right[1] + t_r * (ear_r[1] - right[1]), line)
    below = np.clip((p[:, 1] - line) / (0.1 * face.face_h), 0, 1)
    below = below * below * (3 - 2 * below)
    d[:, 1] = chin_drop * below * depth
    d[:, 0] = -0.05 * (x - face.mouth_cx) * below * depth
    upper, lower, corners = _mouth_sets(face)
    c = np.sqrt(face.lip_profile(x))
    d[lower, 1] = lip_drop * (0.12 + 0.88 * c[lower] ** 1.3)
    d[lower, 0] = -0.04 * (x[lower] - face.mouth_cx)
    d[upper, 1] = lip_drop * 0.12 * (1 - c[upper] ** 1.3)
    d[upper, 0] = 0.0
    d[corners, 1] = lip_drop * 0.12
    d[corners, 0] = -0.04 * (x[corners] - face.mouth_cx)
    return d


def _jaw_gap(face: _Face, x: F64) -> F64:
    """How far jawOpen=1 parts the lips at x: mouthClose undoes exactly this."""
    return 0.88 * 0.17 * face.face_h * face.lip_profile(x) ** 0.65


def _mouth_close(face: _Face) -> F64:
    upper, lower, corners = _mouth_sets(face)
    d = np.zeros_like(face.p)
    g = _jaw_gap(face, face.p[:, 0])
    d[upper, 1] = g[upper] / 2
    d[lower, 1] = -g[lower] / 2
    drivers = np.zeros(len(d), bool)
    drivers[np.concatenate([upper, lower, corners])] = True
    return _extend(face, drivers, d, 0.06 * face.face_h)


def _closing(face: _Face, k: I64) -> F64:
    """Per landmark: how far its lip must move to meet the other lip at the slit."""
    return face.gap(face.p[k, 0]) / 2 + 2.0 * face.unit


def _press(face: _Face, side_sign: float) -> F64:
    upper, lower, corners = _mouth_sets(face)
    p = face.p
    d = np.zeros_like(p)
    share = 1 / (1 + np.exp(-side_sign * (p[:, 0] - face.mouth_cx) / (0.1 * face.mouth_w)))
    rho = _lip_rho(face, np.arange(len(p)))
    lip_u = _curve_y(p, LIP_INNER_UPPER, p[:, 0]) - _curve_y(p, LIP_OUTER_UPPER, p[:, 0])
    lip_l = _curve_y(p, LIP_OUTER_LOWER, p[:, 0]) - _curve_y(p, LIP_INNER_LOWER, p[:, 0])
    d[upper, 1] = (_closing(face, upper) + 0.18 * lip_u[upper] * rho[upper]) * share[upper]
    d[lower, 1] = -(_closing(face, lower) + 0.18 * lip_l[lower] * rho[lower]) * share[lower]
    drivers = np.zeros(len(p), bool)
    drivers[np.concatenate([upper, lower, corners])] = True
    return _extend(face, drivers, d, 0.05 * face.face_h)


def _round_lips(face: _Face, narrow: float, inner_open: float, outer_open: float,
                close: bool, level: float = 0.0, flare: float = 0.0) -> F64:
    """Funnel and pucker: corners drawn in; lips opened into an O or pushed together.

    Rounded lips also level the corners with the mouth's middle (``level``: a smiling
    photo's raised corners come down, or a rounded mouth still reads as a grin) and push
    forwards, which from the front shows as fuller lips (``flare``, mouth widths).
    """
    upper, lower, corners = _mouth_sets(face)
    p = face.p
    d = np.zeros_like(p)
    lips = np.concatenate([upper, lower, corners])
    d[lips, 0] = -narrow * (p[lips, 0] - face.mouth_cx)
    middle = float(face.slit_y(np.array([face.mouth_cx]))[0])
    slit = face.slit_y(np.clip(p[:, 0], p[78, 0], p[308, 0]))
    towards_corner = np.clip(np.abs(p[:, 0] - face.mouth_cx) / (face.mouth_w / 2), 0, 1)
    d[lips, 1] = level * (middle - slit[lips]) * towards_corner[lips] ** 1.5
    c = np.sqrt(face.lip_profile(p[:, 0]))
    rho = _lip_rho(face, np.arange(len(p)))
    w = face.mouth_w
    opening = (inner_open + (outer_open - inner_open) * rho) * w * c
    opening = opening + flare * w * rho * np.sqrt(c)
    if close:
        shut = _closing(face, np.arange(len(p))) * (1 - rho) * (c > 0)
        opening = opening - shut
    d[upper, 1] -= opening[upper]
    d[lower, 1] += opening[lower]
    drivers = np.zeros(len(p), bool)
    drivers[lips] = True
    eyes = _pins(*EYE_LOWER.values(), *EYE_UPPER.values())
    drivers[eyes] = True
    d[eyes] = 0
    return _extend(face, drivers, d, 0.14 * face.face_h)


def _corner_pull(face: _Face, left: bool, vec: tuple[float, float], upper_lift: float,
                 lower_drop: float, radius: float, close: float = 0.0) -> F64:
    """Smile, stretch, frown: one mouth corner pulled along ``vec`` (mouth widths).

    ``close`` brings that half's lips together by that fraction of their gap (a frown
    hides the teeth a grin shows)."""
    upper, lower, corners = _mouth_sets(face)
    p = face.p
    corner = p[291] if left else p[61]
    outward = 1.0 if left else -1.0
    w = face.mouth_w
    lips = np.concatenate([upper, lower, corners])
    along = np.exp(-((p[:, 0] - corner[0]) ** 2) / (2 * (0.32 * w) ** 2))
    d = np.zeros_like(p)
    d[lips, 0] = along[lips] * vec[0] * w * outward
    d[lips, 1] = along[lips] * vec[1] * w
    c = np.sqrt(face.lip_profile(p[:, 0]))
    d[upper, 1] -= upper_lift * w * c[upper]
    d[lower, 1] += lower_drop * w * c[lower] * along[lower]
    if close:
        half = 1 / (1 + np.exp(-outward * (p[:, 0] - face.mouth_cx) / (0.08 * w)))
        shut = close * _closing(face, np.arange(len(p))) * half * (c > 0)
        d[upper, 1] += shut[upper]
        d[lower, 1] -= shut[lower]
    drivers = np.zeros(len(p), bool)
    drivers[lips] = True
    pins = _pins(*EYE_LOWER.values(), *EYE_UPPER.values(), (4, 1, 5, 195))  # eyes, nose
    drivers[pins] = True
    d[pins] = 0
    return _extend(face, drivers, d, radius * face.face_h)


def _roll(face: _Face, lower_lip: bool) -> F64:
    """Roll a lip in. The lower lip slides up behind the upper one (the renderer keeps the
    upper lip in front), leaving a thin red line; the upper lip thins and closes down."""
    upper, lower, corners = _mouth_sets(face)
    p = face.p
    d = np.zeros_like(p)
    c = np.sqrt(face.lip_profile(p[:, 0]))
    moving = lower if lower_lip else upper
    if lower_lip:
        thick = _curve_y(p, LIP_OUTER_LOWER, p[:, 0]) - _curve_y(p, LIP_INNER_LOWER, p[:, 0])
    else:
        thick = _curve_y(p, LIP_INNER_UPPER, p[:, 0]) - _curve_y(p, LIP_OUTER_UPPER, p[:, 0])
    if lower_lip:
        shift = (face.gap(p[:, 0]) / 2 + 0.55 * thick) * c + 0.5 * face.unit
        d[moving, 1] = -shift[moving]
    else:
        rho = _lip_rho(face, np.arange(len(p)))
        close = face.gap(p[:, 0]) / 2 + 1.0 * face.unit
        d[moving, 1] = (close + 0.5 * thick * rho)[moving] * c[moving]
        d[lower, 1] = -close[lower] * c[lower]
    drivers = np.zeros(len(p), bool)
    drivers[np.concatenate([upper, lower, corners])] = True
    return _extend(face, drivers, d, 0.06 * face.face_h)


def _lip_side_raise(face: _Face, left: bool, upper_lip: bool, amount: float) -> F64:
    """mouthUpperUp / mouthLowerDown: one side of one lip pulled away from the other."""
    upper, lower, corners = _mouth_sets(face)
    p = face.p
    w = face.mouth_w
    centre = face.mouth_cx + (0.22 if left else -0.22) * w
    along = np.exp(-((p[:, 0] - centre) ** 2) / (2 * (0.22 * w) ** 2))
    d = np.zeros_like(p)
    moving = upper if upper_lip else lower
    d[moving, 1] = (-amount if upper_lip else amount) * w * along[moving]
    d[corners, 1] = (-0.25 if upper_lip else 0.25) * amount * w * along[corners]
    drivers = np.zeros(len(p), bool)
    drivers[np.concatenate([upper, lower, corners])] = True
    return _extend(face, drivers, d, 0.1 * face.face_h)


def _blink(face: _Face, eye: str) -> F64:
    """The upper lid comes down past the lower lid margin; the lid skin unfolds."""
    p = face.p
    d = np.zeros_like(p)
    up = np.array(EYE_UPPER[eye])
    lo = np.array(EYE_LOWER[eye])
    overshoot = 0.1 * face.eye_height(eye) + 2.0 * face.unit
    d[up, 1] = face.eye_opening(eye, p[up, 0]) + overshoot
    d[up[[0, -1]], 1] = 0.4 * overshoot
    d[lo[1:-1], 1] = -0.08 * face.eye_opening(eye, p[lo[1:-1], 0])
    drivers = np.zeros(len(p), bool)
    brow = _pins(BROW_LOWER[eye], BROW_UPPER[eye])
    drivers[np.concatenate([up, lo, brow])] = True
    return _extend(face, drivers, d, 0.08 * face.face_h, sigma=0.03 * face.face_h)


def _wide(face: _Face, eye: str) -> F64:
    """eyeWide: the upper lid goes up into its fold (more white above the iris), the lower
    lid drops a little; the brow stays (browOuterUp/InnerUp move it)."""
    p = face.p
    d = np.zeros_like(p)
    up = np.array(EYE_UPPER[eye])
    lo = np.array(EYE_LOWER[eye])
    d[up[1:-1], 1] = -0.35 * face.eye_opening(eye, p[up[1:-1], 0])
    d[lo[1:-1], 1] = 0.08 * face.eye_opening(eye, p[lo[1:-1], 0])
    drivers = np.zeros(len(p), bool)
    brow = _pins(BROW_LOWER[eye], BROW_UPPER[eye])
    drivers[np.concatenate([up, lo, brow])] = True
    return _extend(face, drivers, d, 0.06 * face.face_h, sigma=0.03 * face.face_h)


def _squint(face: _Face, eye: str, lid_up: float, cheek_up: float) -> F64:
    """eyeSquint / cheekSquint: the lower lid and cheek rise and cover the eye from below."""
    p = face.p
    d = np.zeros_like(p)
    up = np.array(EYE_UPPER[eye])
    lo = np.array(EYE_LOWER[eye])
    d[lo[1:-1], 1] = -lid_up * face.eye_opening(eye, p[lo[1:-1], 0])
    lo_x, hi_x = face.eye_x_range(eye)
    cx, width = (lo_x + hi_x) / 2, hi_x - lo_x
    lower_y = _curve_y(p, EYE_LOWER[eye], p[:, 0])
    below = p[:, 1] - lower_y
    cheek = ((below > 0.04 * face.face_h) & (below < 0.22 * face.face_h)
             & (np.abs(p[:, 0] - cx) < 0.8 * width))
    d[cheek, 1] = -cheek_up * face.face_h * np.exp(-((p[cheek, 0] - cx) / width) ** 2)
    drivers = cheek.copy()
    drivers[np.concatenate([up, lo])] = True
    pins = _pins(BROW_LOWER[eye], MOUTH_CORNERS, LIP_OUTER_UPPER)
    drivers[pins] = True
    d[pins] = 0
    return _extend(face, drivers, d, 0.1 * face.face_h)


def _brow(face: _Face, eyes: tuple[str, ...], lift: float, inner_weight: float,
          outer_weight: float, inward: float = 0.0) -> F64:
    """Brows up (lift > 0) or down, weighted from the inner end to the outer end."""
    p = face.p
    d = np.zeros_like(p)
    drivers = np.zeros(len(p), bool)
    for eye in eyes:
        for row in (BROW_UPPER[eye], BROW_LOWER[eye]):
            idx = np.array(row)  # ordered outer -> inner
            t = np.linspace(0.0, 1.0, len(idx))
            weight = outer_weight + (inner_weight - outer_weight) * t
            d[idx, 1] = -lift * face.face_h * weight
            d[idx, 0] = inward * face.face_h * t * np.sign(face.mouth_cx - p[idx, 0])
            drivers[idx] = True
        pins = _pins(EYE_UPPER[eye], EYE_LOWER[eye])
        drivers[pins] = True
        d[pins] = 0
    return _extend(face, drivers, d, 0.13 * face.face_h)


DESIGNS: Final[dict[str, Design]] = {
    "jawOpen": _jaw_open,
    "mouthClose": _mouth_close,
    "mouthPressLeft": lambda f: _press(f, 1.0),
    "mouthPressRight": lambda f: _press(f, -1.0),
    "mouthFunnel": lambda f: _round_lips(f, 0.3, 0.05, 0.075, close=False, level=0.6,
                                         flare=0.01),
    "mouthPucker": lambda f: _round_lips(f, 0.42, 0.0, 0.015, close=True, level=0.8,
                                         flare=0.02),
    "mouthSmileLeft": lambda f: _corner_pull(f, True, (0.07, -0.1), 0.012, 0.0, 0.2),
    "mouthSmileRight": lambda f: _corner_pull(f, False, (0.07, -0.1), 0.012, 0.0, 0.2),
    "mouthStretchLeft": lambda f: _corner_pull(f, True, (0.08, 0.035), 0.0, 0.025, 0.15),
    "mouthStretchRight": lambda f: _corner_pull(f, False, (0.08, 0.035), 0.0, 0.025, 0.15),
    # Strong enough to turn a smiling photo's corners down at the weights emotions use.
    "mouthFrownLeft": lambda f: _corner_pull(f, True, (-0.05, 0.3), 0.0, 0.0, 0.15,
                                                   close=0.8),
    "mouthFrownRight": lambda f: _corner_pull(f, False, (-0.05, 0.3), 0.0, 0.0,
                                                    0.15, close=0.8),
    "mouthRollLower": lambda f: _roll(f, lower_lip=True),
    "mouthRollUpper": lambda f: _roll(f, lower_lip=False),
    "mouthUpperUpLeft": lambda f: _lip_side_raise(f, True, True, 0.07),
    "mouthUpperUpRight": lambda f: _lip_side_raise(f, False, True, 0.07),
    "mouthLowerDownLeft": lambda f: _lip_side_raise(f, True, False, 0.07),
    "mouthLowerDownRight": lambda f: _lip_side_raise(f, False, False, 0.07),
    "eyeBlinkLeft": lambda f: _blink(f, "Left"),
    "eyeBlinkRight": lambda f: _blink(f, "Right"),
    "eyeWideLeft": lambda f: _wide(f, "Left"),
    "eyeWideRight": lambda f: _wide(f, "Right"),
    "eyeSquintLeft": lambda f: _squint(f, "Left", 0.3, 0.01),
    "eyeSquintRight": lambda f: _squint(f, "Right", 0.3, 0.01),
    "browInnerUp": lambda f: _brow(f, ("Right", "Left"), 0.085, 1.0, 0.15),
    "browDownLeft": lambda f: _brow(f, ("Left",), -0.08, 1.0, 0.4, inward=0.03),
    "browDownRight": lambda f: _brow(f, ("Right",), -0.08, 1.0, 0.4, inward=0.03),
    "browOuterUpLeft": lambda f: _brow(f, ("Left",), 0.055, 0.15, 1.0),
    "browOuterUpRight": lambda f: _brow(f, ("Right",), 0.055, 0.15, 1.0),
    "cheekSquintLeft": lambda f: _squint(f, "Left", 0.25, 0.035),
    "cheekSquintRight": lambda f: _squint(f, "Right", 0.25, 0.035),
}
assert set(DESIGNS) == set(DRIVEN)


# ---------------------------------------------------------------------------------------------
# Control points: landmarks plus virtual points inside the openings and rings around the face


@dataclass(frozen=True)
class _Controls:
    points: F64  # (M, 2)
    side: NDArray[np.int64]  # (M,) split-side label
    # How each control point's displacement derives from landmark displacements:
    mix: F64  # (M, 478) linear map, for landmark-attached and ring points
    hole: tuple[tuple[str, F64, F64], ...]  # (eye, x, phi) virtual points in eye openings
    hole_start: int  # index of the first eye-hole point (they are last)


def _oval_dense(p: F64) -> tuple[F64, F64]:
    """The face oval with midpoints inserted, and the landmark weights making each point."""
    idx = list(FACE_OVAL)
    n = len(idx)
    pts, mix = [], []
    for i in range(n):
        a, b = idx[i], idx[(i + 1) % n]
        for t in (0.0, 0.5):
            pts.append((1 - t) * p[a] + t * p[b])
            row = np.zeros(len(p))
            row[a] += 1 - t
            row[b] += t
            mix.append(row)
    return np.array(pts), np.array(mix)


def _rings(face: _Face, scales: tuple[float, ...], decays: tuple[float, ...],
           neck_stretch: float) -> tuple[F64, F64]:
    """Rings of points around the face oval whose displacement is a decayed oval copy."""
    oval, omix = _oval_dense(face.p)
    centre = face.p[list(FACE_OVAL)].mean(axis=0)
    pts, mix = [], []
    for s, decay in zip(scales, decays):
        rel = oval - centre
        stretch = np.where(rel[:, 1] > 0, 1 + (s - 1) * neck_stretch, s)
        ring = centre + rel * np.stack([np.full(len(rel), s), stretch], axis=1)
        pts.append(ring)
        mix.append(omix * decay)
    return np.concatenate(pts), np.concatenate(mix)


def _controls(face: _Face) -> _Controls:
    p = face.p
    n = len(p)
    usable = np.flatnonzero(face.side >= 0)
    pts: list[F64] = [p[usable]]
    sides: list[NDArray[np.int64]] = [face.side[usable]]
    mix: list[F64] = [np.eye(n)[usable]]
    # The parted lips: points in the gap follow their own lip, so each side's field stays
    # smooth right up to the slit.
    mouth = _region_id("mouth")
    xs = np.linspace(p[78, 0], p[308, 0], 11)[1:-1]
    gap = face.gap(xs)
    # Past the slit too: where pressed lips overlap, each lip shows beyond its old edge.
    for contour, label, fracs in ((LIP_INNER_UPPER, 2 * mouth, (0.3, 0.6, 0.9, 1.2)),
                                  (LIP_INNER_LOWER, 2 * mouth + 1, (-0.3, -0.6, -0.9, -1.2))):
        cx, _ = _sorted_curve(p, contour)
        order = np.argsort(p[list(contour), 0], kind="stable")
        ordered = np.array(contour)[order]
        y0 = _curve_y(p, contour, xs)
        for x, g, y in zip(xs, gap, y0):
            if g < 3 * face.unit:
                continue
            row = np.zeros(n)
            j = int(np.clip(np.searchsorted(cx, x), 1, len(cx) - 1))
            t = (x - cx[j - 1]) / max(cx[j] - cx[j - 1], 1e-6)
            row[ordered[j - 1]] += 1 - t
            row[ordered[j]] += t
            for f in fracs:
                pts.append(np.array([[x, y + f * g]]))
                sides.append(np.array([label]))
                mix.append(row[None])
    # Rings fade every blendshape to zero beyond the face; the neck gets a longer fade so an
    # open jaw stretches the neck instead of tearing at the chin.
    ring_pts, ring_mix = _rings(face, (1.1, 1.22, 1.36, 1.52), (0.7, 0.4, 0.15, 0.0), 1.8)
    pts.append(ring_pts)
    sides.append(np.zeros(len(ring_pts), dtype=np.int64))
    mix.append(ring_mix)
    hole_start = sum(len(a) for a in pts)
    holes: list[tuple[str, F64, F64]] = []
    for eye in ("Right", "Left"):
        rid = _region_id(f"eye{eye}")
        lo, hi = face.eye_x_range(eye)
        hx = np.linspace(lo, hi, 9)[1:-1]
        phis = np.array([0.2, 0.45, 0.7, 0.95])
        gx, gphi = np.meshgrid(hx, phis)
        gx, gphi = gx.ravel(), gphi.ravel()
        top = _curve_y(p, EYE_UPPER[eye], gx)
        opening = face.eye_opening(eye, gx)
        pts.append(np.stack([gx, top + gphi * opening], axis=1))
        sides.append(np.full(len(gx), 2 * rid + 1, dtype=np.int64))
        mix.append(np.zeros((len(gx), n)))
        holes.append((eye, gx, gphi))
    return _Controls(np.concatenate(pts), np.concatenate(sides), np.concatenate(mix),
                     tuple(holes), hole_start)


def _control_disp(face: _Face, controls: _Controls, d: F64) -> F64:
    """Displacements of every control point given the landmark displacements ``d``."""
    out = controls.mix @ d
    start = controls.hole_start
    p = face.p
    for eye, gx, phi in controls.hole:
        # An opening point is covered by whichever lid passes it; otherwise it keeps between
        # the lids. Only "covered or not" matters, since the skin there is transparent.
        d_up = np.stack([np.interp(gx, *_xs_sorted(p, EYE_UPPER[eye], d[:, k]))
                         for k in range(2)], axis=1)
        d_lo = np.stack([np.interp(gx, *_xs_sorted(p, EYE_LOWER[eye], d[:, k]))
                         for k in range(2)], axis=1)
        opening = face.eye_opening(eye, gx)
        y_rel = phi * opening
        by_upper = y_rel <= d_up[:, 1] + 1e-6
        by_lower = opening - y_rel <= -d_lo[:, 1] + 1e-6
        between = (1 - phi)[:, None] * d_up + phi[:, None] * d_lo
        val = np.where(by_upper[:, None], d_up, np.where(by_lower[:, None], d_lo, between))
        out[start:start + len(gx)] = val
        start += len(gx)
    return out


def _xs_sorted(p: F64, idx: tuple[int, ...], values: F64) -> tuple[F64, F64]:
    xy = p[list(idx), 0]
    order = np.argsort(xy, kind="stable")
    return xy[order], values[list(idx)][order]


# ---------------------------------------------------------------------------------------------
# Dense fields


def _cell_centres(size: int) -> F64:
    """Pixel coordinate of each coarse cell centre (align_corners=False convention)."""
    step = size // FIELD_RES
    return np.asarray((np.arange(FIELD_RES) + 0.5) * step - 0.5, dtype=np.float64)


def _spread(cells_xy: F64, points: F64, values: F64, sigma: float) -> F64:
    """Gaussian-weighted (Nadaraya-Watson) interpolation of point values onto cells.

    The denominator is floored so the field fades to zero a couple of sigmas away from
    the nearest point instead of extrapolating into the background.
    """
    out = np.zeros((len(cells_xy), values.shape[1]))
    for start in range(0, len(cells_xy), 4096):
        c = cells_xy[start:start + 4096]
        d2 = ((c[:, None, :] - points[None, :, :]) ** 2).sum(-1)
        w = np.exp(-d2 / (2 * sigma**2))
        den = np.maximum(w.sum(axis=1, keepdims=True), math.exp(-2.0))
        out[start:start + 4096] = (w @ values) / den
    return out


def _border_taper(size: int) -> F64:
    """0 on the outer coarse cells, rising smoothly to 1: nothing moves at the frame edge."""
    c = _cell_centres(size)
    step = size // FIELD_RES
    margin = 0.06 * size
    t = np.clip((np.minimum(c, size - 1 - c) - step) / margin, 0, 1)
    t = t * t * (3 - 2 * t)
    return np.outer(t, t)


def _region_cells(face: _Face, controls: _Controls, region: str, sigma: float) -> tuple[
        int, int, int, int]:
    rid = _region_id(region)
    mine = (controls.side // 2 == rid) & (controls.side > 0)
    pts = controls.points[mine]
    # Wide enough that both sides' fields agree at the edge even after inversion, which
    # looks up to one displacement (~0.2 face heights for the jaw) away.
    reach = 0.2 if region == "mouth" else 0.08
    margin = 3.0 * sigma + reach * face.face_h
    step = face.size // FIELD_RES
    lo = np.floor((pts.min(axis=0) - margin) / step).astype(int)
    hi = np.ceil((pts.max(axis=0) + margin) / step).astype(int)
    lo = np.clip(lo, 1, FIELD_RES - 1)
    hi = np.clip(hi, lo + 1, FIELD_RES - 1)
    return int(lo[1]), int(hi[1]), int(lo[0]), int(hi[0])


def _blendshape_fields(face: _Face, controls: _Controls) -> tuple[
        F64, list[tuple[str, tuple[int, int, int, int], F64]]]:
    """Base fields on the whole coarse grid, and each region's alternative fields."""
    size = face.size
    sigma = 0.035 * face.face_h
    disp = np.stack([_control_disp(face, controls, DESIGNS[n](face)) for n in DRIVEN], axis=1)
    flat = disp.reshape(len(controls.points), -1)  # (M, K*2)
    c = _cell_centres(size)
    gx, gy = np.meshgrid(c, c)
    cells = np.stack([gx.ravel(), gy.ravel()], axis=1)
    side = controls.side
    base_set = (side == 0) | (side % 2 == 0)
    taper = _border_taper(size)
    step = size // FIELD_RES
    base = _spread(cells, controls.points[base_set], flat[base_set], sigma)
    base = base.reshape(FIELD_RES, FIELD_RES, len(DRIVEN), 2).transpose(2, 0, 1, 3)
    base = base * taper[None, :, :, None]
    alts = []
    for region in REGIONS:
        rid = _region_id(region)
        r0, r1, c0, c1 = _region_cells(face, controls, region, sigma)
        rows = np.arange(r0 - 1, r1 + 1)
        cols = np.arange(c0 - 1, c1 + 1)
        ax, ay = np.meshgrid(c[cols], c[rows])
        acells = np.stack([ax.ravel(), ay.ravel()], axis=1)
        alt_set = ((side == 0) | (side % 2 == 0) | (side == 2 * rid + 1)) & (side != 2 * rid)
        alt = _spread(acells, controls.points[alt_set], flat[alt_set], sigma)
        alt = alt.reshape(len(rows), len(cols), len(DRIVEN), 2).transpose(2, 0, 1, 3)
        alt = alt * taper[np.ix_(rows, cols)][None, :, :, None]
        # Invert with this side's field pasted into the base: sources can leave the box.
        reach = int(math.ceil((0.2 if region == "mouth" else 0.08) * face.face_h / step)) + 2
        y_lo, y_hi = max(r0 - 1 - reach, 0), min(r1 + 1 + reach, FIELD_RES)
        x_lo, x_hi = max(c0 - 1 - reach, 0), min(c1 + 1 + reach, FIELD_RES)
        pasted = base[:, y_lo:y_hi, x_lo:x_hi].copy()
        pasted[:, r0 - 1 - y_lo:r1 + 1 - y_lo, c0 - 1 - x_lo:c1 + 1 - x_lo] = alt
        inverse = _invert(pasted, step)[:, r0 - 1 - y_lo:r1 + 1 - y_lo,
                                        c0 - 1 - x_lo:c1 + 1 - x_lo]
        alts.append((region, (r0, r1, c0, c1), inverse * (2.0 / size)))
    return _invert(base, step) * (2.0 / size), alts


def _invert(forward: F64, step: int, iterations: int = 30) -> F64:
    """Backward offsets (pixels) of forward displacements (K, R, R, 2) on the coarse grid.

    Solves b(p) = -d(p + b(p)) by damped fixed-point iteration. Exact at weight 1 (the
    renderer scales the result linearly, which is off by at most a pixel or two midway).
    """
    k, rows, cols, _ = forward.shape
    back = -forward.copy()
    gy, gx = np.meshgrid(np.arange(rows, dtype=np.float64), np.arange(cols, dtype=np.float64),
                         indexing="ij")
    kk = np.arange(k)[:, None, None]
    for _ in range(iterations):
        sx = np.clip(gx[None] + back[..., 0] / step, 0, cols - 1)
        sy = np.clip(gy[None] + back[..., 1] / step, 0, rows - 1)
        x0 = np.minimum(np.floor(sx).astype(np.int64), cols - 2)
        y0 = np.minimum(np.floor(sy).astype(np.int64), rows - 2)
        fx = (sx - x0)[..., None]
        fy = (sy - y0)[..., None]
        d = ((forward[kk, y0, x0] * (1 - fx) + forward[kk, y0, x0 + 1] * fx) * (1 - fy)
             + (forward[kk, y0 + 1, x0] * (1 - fx) + forward[kk, y0 + 1, x0 + 1] * fx) * fy)
        back = 0.5 * back - 0.5 * d
    return back


def _head_fields(face: _Face, alts: list[tuple[str, tuple[int, int, int, int], F64]]) -> tuple[
        F64, list[F64]]:
    """Yaw, pitch and roll per radian, small-angle, as backward normalised offsets.

    Right-handed with x to the image right, y up and z towards the camera: positive yaw
    moves the nose to the image right, positive pitch moves it down, positive roll turns
    the head counter-clockwise on screen. Points move in proportion to their depth in
    front of the ears (yaw, pitch) or rotate about the neck (roll), fading to zero across
    the hair so the background never moves.
    """
    p, size = face.p, face.size
    z_ear = face.z[list(EARS)].mean()
    depth = np.clip(z_ear - face.z, 0, None)
    pivot = np.array([face.p[list(FACE_OVAL), 0].mean(), p[CHIN, 1] + 0.15 * face.face_h])
    ring_pts, ring_mix = _rings(face, (1.12, 1.25, 1.4, 1.55, 1.72),
                                (0.85, 0.62, 0.36, 0.12, 0.0), 0.6)
    decay = ring_mix.sum(axis=1)
    usable = np.flatnonzero(face.side >= 0)
    pts = np.concatenate([p[usable], ring_pts])
    dep = np.concatenate([depth[usable], ring_mix @ depth])
    weight = np.concatenate([np.ones(len(usable)), decay])
    rel = pts - pivot
    values = np.zeros((len(pts), 3, 2))
    values[:, 0, 0] = dep  # yaw
    values[:, 1, 1] = dep  # pitch
    values[:, 2, 0] = rel[:, 1] * weight  # roll: (dx, dy) = (y, -x) about the pivot
    values[:, 2, 1] = -rel[:, 0] * weight
    sigma = 0.06 * face.face_h
    c = _cell_centres(size)
    gx, gy = np.meshgrid(c, c)
    cells = np.stack([gx.ravel(), gy.ravel()], axis=1)
    field = _spread(cells, pts, values.reshape(len(pts), 6), sigma)
    field = field.reshape(FIELD_RES, FIELD_RES, 3, 2).transpose(2, 0, 1, 3)
    field = field * _border_taper(size)[None, :, :, None] * (-2.0 / size)
    region_parts = []
    for _, (r0, r1, c0, c1), _ in alts:
        region_parts.append(field[:, r0 - 1:r1 + 1, c0 - 1:c1 + 1].copy())
    return field, region_parts


# ---------------------------------------------------------------------------------------------
# Mouth interior


TOOTH_RGB: Final = np.array([228.0, 221.0, 204.0])
TONGUE_RGB: Final = np.array([176.0, 86.0, 80.0])


def _mouth_layer(image: U8, face: _Face) -> MouthLayer:
    """Teeth hung from the upper lip, tongue and lower teeth rising from the lower lip.

    Whatever the photo shows between the lips (usually the upper teeth) becomes the top of
    the upper texture, so the neutral face renders exactly as photographed; the rest is
    procedural: teeth continue down to a plausible length, shaded darker to the corners.
    """
    from scipy.ndimage import map_coordinates

    p = face.p
    x0, x1 = p[78, 0], p[308, 0]
    cols = max(int(math.ceil(x1 - x0)) + 1, 8)
    rows = max(int(math.ceil(0.5 * face.inner_w)) + 2, 8)
    u = np.linspace(0.0, 1.0, cols)
    xs = x0 + u * (x1 - x0)
    top = _curve_y(p, LIP_INNER_UPPER, xs)
    gap = face.gap(xs)
    t = np.arange(rows, dtype=np.float64)
    yy = top[None, :] + t[:, None]
    xx = np.broadcast_to(xs[None, :], yy.shape)
    photo = np.stack([map_coordinates(image[..., ch].astype(np.float64), [yy, xx], order=1,
                                      mode="nearest") for ch in range(3)], axis=-1)
    in_gap = t[:, None] < gap[None, :]
    toothy = in_gap & _toothy(photo)
    tooth = np.median(photo[toothy], axis=0) if toothy.sum() >= 6 else TOOTH_RGB
    profile = np.sqrt(np.clip(1 - (2 * u - 1) ** 2, 0, 1))
    shade = 0.5 + 0.5 * profile  # the dental arch turns away into shadow at the corners
    length = 0.12 * face.inner_w * (0.45 + 0.55 * profile)
    upper = np.zeros((rows, cols, 4))
    photo_teeth = toothy.sum() >= 6
    for j in range(cols):
        n_photo = int(math.floor(gap[j]))
        upper[:n_photo, j, :3] = photo[:n_photo, j]
        upper[:n_photo, j, 3] = 1.0
        if n_photo > 0:
            # The last photographed row carries on past the lip line, so the anti-aliased
            # edge of the opening never mixes in cavity at rest.
            colour = photo[n_photo - 1, j]
            solid = gap[j] + 1.0
            tooth_col = bool(toothy[n_photo - 1, j])
            # Teeth carry on a little further (their edges hide behind the lower lip); the
            # dark mouth corners just stop.
            end = gap[j] + 1.5 * face.unit if tooth_col else solid
        elif photo_teeth:
            continue
        else:
            colour = tooth * shade[j]
            solid = end = length[j]
        for i in range(n_photo, rows):
            if i >= end + 1.5:
                break
            darken = 1.0 - 0.3 * np.clip((i - gap[j]) / max(length[j], 1.0), 0, 1)
            upper[i, j, :3] = colour * darken
            upper[i, j, 3] = 1.0 if i <= solid else float(np.clip((end + 1.5 - i) / 1.5, 0, 1))
    if not photo_teeth:
        _tooth_gaps(upper, u)
    # The tongue: a low dome in the middle, darker towards its back (top) edge.
    lower = np.zeros((rows, cols, 4))
    dome = np.clip(1 - ((2 * u - 1) / 0.75) ** 2, 0, 1) ** 0.5
    tongue_h = 0.14 * face.inner_w * dome
    for i in range(rows):
        s = float(i)
        depth = np.clip(s / np.maximum(tongue_h, 1.0), 0, 1)
        lower[i, :, :3] = TONGUE_RGB * (0.95 - 0.5 * depth)[:, None] * (0.55 + 0.45 * dome)[:, None]
        lower[i, :, 3] = np.clip(tongue_h - s, 0, 1.5) / 1.5
    for tex in (upper, lower):
        tex[..., :3] *= tex[..., 3:4]  # premultiplied: bilinear sampling stays clean
        tex[..., 3] *= 255.0
    contour = list(LIP_INNER_UPPER) + list(LIP_INNER_LOWER)
    motion = np.zeros((len(FIELD_NAMES), len(contour), 2))
    for k, name in enumerate(DRIVEN):
        motion[k] = DESIGNS[name](face)[contour] * (2.0 / face.size)
    return MouthLayer(upper=upper.astype(np.float32), lower=lower.astype(np.float32),
                      px_size=face.size, lip_motion=motion.astype(np.float32))


def _tooth_gaps(upper: F64, u: F64) -> None:
    """Thin shadows between procedural teeth (only when the photo shows no teeth)."""
    edges = 0.5 + np.array([0.0, 0.11, -0.11, 0.2, -0.2, 0.28, -0.28, 0.35, -0.35])
    for e in edges:
        j = int(np.argmin(np.abs(u - e)))
        upper[:, j, :3] *= 0.72


# ---------------------------------------------------------------------------------------------
# Derived arrays (computed at build and at load, at the pack's size)


def _assemble(name: str, image: U8, landmarks: F32, field_names: tuple[str, ...], fields: F32,
              regions: list[tuple[str, tuple[int, int, int, int], F32]] | list[
                  tuple[str, tuple[int, int, int, int], F64]],
              mouth: MouthLayer) -> PortraitPack:
    size = int(image.shape[0])
    _check_size(size)
    if fields.shape[1:] != (FIELD_RES, FIELD_RES, 2) or fields.shape[0] != len(field_names):
        raise PortraitError(f"fields have shape {fields.shape}, expected "
                            f"({len(field_names)}, {FIELD_RES}, {FIELD_RES}, 2)")
    p = landmarks[:, :2].astype(np.float64)
    step = size // FIELD_RES
    unit = size / 512.0
    built = []
    for rname, cells, rfields in regions:
        r0, r1, c0, c1 = cells
        ys = np.arange(r0 * step, r1 * step, dtype=np.float64)
        xs = np.arange(c0 * step, c1 * step, dtype=np.float64)
        mask = _split_mask(rname, p, xs, ys, unit)
        built.append(SplitRegion(rname, cells, np.asarray(rfields, dtype=np.float32),
                                 mask.astype(np.float32)))
    alpha = np.ones((size, size), dtype=np.float32)
    eye_back = image.copy()
    for eye in ("Right", "Left"):
        _eye_hole(alpha, eye_back, image, p, eye, unit)
    return PortraitPack(name=name, image=image, landmarks=landmarks,
                        field_names=tuple(field_names), fields=fields.astype(np.float32),
                        regions=tuple(built), mouth=mouth, skin_alpha=alpha, eye_back=eye_back)


def _upsample(coarse: F32, step: int) -> F32:
    """Bilinear upsampling by ``step`` matching torch's align_corners=False interpolate."""
    h, w = coarse.shape[:2]
    ys = (np.arange(h * step) + 0.5) / step - 0.5
    xs = (np.arange(w * step) + 0.5) / step - 0.5
    y0 = np.clip(np.floor(ys).astype(int), 0, h - 1)
    x0 = np.clip(np.floor(xs).astype(int), 0, w - 1)
    y1 = np.clip(y0 + 1, 0, h - 1)
    x1 = np.clip(x0 + 1, 0, w - 1)
    fy = np.clip(ys - y0, 0, 1)[:, None, None]
    fx = np.clip(xs - x0, 0, 1)[None, :, None]
    top = coarse[y0][:, x0] * (1 - fx) + coarse[y0][:, x1] * fx
    bot = coarse[y1][:, x0] * (1 - fx) + coarse[y1][:, x1] * fx
    return np.asarray(top * (1 - fy) + bot * fy, dtype=np.float32)


def _split_mask(region: str, p: F64, xs: F64, ys: F64, unit: float) -> F64:
    """Which pixels of a region box lie on its second side: hard along the slit, softening
    beyond its ends where both sides' fields agree anyway."""
    if region == "mouth":
        lo, hi = p[78, 0], p[308, 0]
        line = 0.5 * (_curve_y(p, LIP_INNER_UPPER, xs) + _curve_y(p, LIP_INNER_LOWER, xs))
        sign = 1.0  # second side is below the slit (the lower lip)
    else:
        eye = "Right" if region == "eyeRight" else "Left"
        lo, hi = float(p[list(EYE_UPPER[eye]), 0].min()), float(p[list(EYE_UPPER[eye]), 0].max())
        # The line sits just inside the lower lid, so a closing lid covers the whole opening.
        line = _curve_y(p, EYE_LOWER[eye], xs) + 1.5 * unit
        sign = -1.0  # second side is above (the upper lid and the opening)
    beyond = np.maximum(lo - xs, 0) + np.maximum(xs - hi, 0)
    width = 0.5 + 0.8 * beyond
    rel = (ys[:, None] - line[None, :]) * sign / width[None, :]
    # Well past the slit's ends both sides' fields agree, so the split fades out there and
    # never reaches a neighbouring region.
    sigma = 0.035 * float(np.linalg.norm(p[CHIN] - p[FOREHEAD]))
    window = np.clip(3.0 - beyond / sigma, 0, 1)
    return np.asarray(np.clip(0.5 + rel, 0, 1) * window[None, :], dtype=np.float64)


def _polygon_distance(poly: F64, xs: F64, ys: F64) -> F64:
    """Signed distance to a closed polygon (negative inside), on a pixel grid."""
    px, py = np.meshgrid(xs, ys)
    q = np.stack([px, py], axis=-1)
    a = poly
    b = np.roll(poly, -1, axis=0)
    ab = b - a
    t = np.clip((((q[..., None, :] - a) * ab).sum(-1)) / np.maximum((ab * ab).sum(-1), 1e-9),
                0, 1)
    closest = a + t[..., None] * ab
    dist = np.sqrt(((q[..., None, :] - closest) ** 2).sum(-1)).min(axis=-1)
    # Even-odd rule for inside.
    inside = np.zeros(px.shape, dtype=bool)
    for (x_a, y_a), (x_b, y_b) in zip(a, b):
        crosses = (y_a > py) != (y_b > py)
        x_at = x_a + (py - y_a) * (x_b - x_a) / np.where(y_b == y_a, 1e-9, y_b - y_a)
        inside ^= crosses & (px < x_at)
    return np.asarray(np.where(inside, -dist, dist), dtype=np.float64)


def _eye_hole(alpha: F32, eye_back: U8, image: U8, p: F64, eye: str, unit: float) -> None:
    """Cut the eye opening out of the skin and grow the eyeball outwards behind it."""
    from scipy.ndimage import distance_transform_edt

    poly = np.concatenate([p[list(EYE_UPPER[eye])], p[list(EYE_LOWER[eye][::-1])][1:-1]])
    size = alpha.shape[0]
    pad = int(math.ceil(12 * unit))
    x0 = max(int(poly[:, 0].min()) - pad, 0)
    x1 = min(int(poly[:, 0].max()) + pad + 1, size)
    y0 = max(int(poly[:, 1].min()) - pad, 0)
    y1 = min(int(poly[:, 1].max()) + pad + 1, size)
    xs = np.arange(x0, x1, dtype=np.float64)
    ys = np.arange(y0, y1, dtype=np.float64)
    dist = _polygon_distance(poly, xs, ys)
    # Grown by ~1 px: MediaPipe's lid line sits a touch inside the visible white of the eye.
    hole = np.clip(dist - 1.0 * unit + 0.5, 0, 1)
    alpha[y0:y1, x0:x1] = np.minimum(alpha[y0:y1, x0:x1], hole.astype(np.float32))
    see_through = alpha[y0:y1, x0:x1] < 1
    if not see_through.any():
        return
    _, (iy, ix) = distance_transform_edt(~see_through, return_indices=True)
    box = image[y0:y1, x0:x1]
    eye_back[y0:y1, x0:x1] = box[iy, ix]
