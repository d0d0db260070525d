"""The motion vocabulary: Apple ARKit's 52 blendshape names plus head pose.

Every motion record, the animate stage and the renderer index blendshapes by this order.
"""
from __future__ import annotations

from typing import Final

EYES: Final = (
    "eyeBlinkLeft", "eyeLookDownLeft", "eyeLookInLeft", "eyeLookOutLeft", "eyeLookUpLeft",
    "eyeSquintLeft", "eyeWideLeft", "eyeBlinkRight", "eyeLookDownRight", "eyeLookInRight",
    "eyeLookOutRight", "eyeLookUpRight", "eyeSquintRight", "eyeWideRight",
)
JAW: Final = ("jawForward", "jawLeft", "jawRight", "jawOpen")
MOUTH: Final = (
    "mouthClose", "mouthFunnel", "mouthPucker", "mouthLeft", "mouthRight", "mouthSmileLeft",
    "mouthSmileRight", "mouthFrownLeft", "mouthFrownRight", "mouthDimpleLeft",
    "mouthDimpleRight", "mouthStretchLeft", "mouthStretchRight", "mouthRollLower",
    "mouthRollUpper", "mouthShrugLower", "mouthShrugUpper", "mouthPressLeft",
    "mouthPressRight", "mouthLowerDownLeft", "mouthLowerDownRight", "mouthUpperUpLeft",
    "mouthUpperUpRight",
)
BROWS: Final = ("browDownLeft", "browDownRight", "browInnerUp", "browOuterUpLeft", "browOuterUpRight")
CHEEKS: Final = ("cheekPuff", "cheekSquintLeft", "cheekSquintRight")
NOSE: Final = ("noseSneerLeft", "noseSneerRight")
TONGUE: Final = ("tongueOut",)

BLENDSHAPES: Final[tuple[str, ...]] = EYES + JAW + MOUTH + BROWS + CHEEKS + NOSE + TONGUE
INDEX: Final[dict[str, int]] = {name: i for i, name in enumerate(BLENDSHAPES)}
HEAD_POSE: Final = ("yaw", "pitch", "roll")  # radians, right-handed, camera looking at the face

assert len(BLENDSHAPES) == 52, len(BLENDSHAPES)
