"""Augmentation policies: the ranges of the random affine each named policy draws views from.

Kept apart from `trainable.data.images` (which applies them, with torch) so that validating a
space file imports no torch.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AugmentPolicy:
    """Ranges of a random affine; each is the half-width of a uniform distribution."""

    shift: float = 0.0        # fraction of the side
    zoom: float = 0.0         # scale in [1 - zoom, 1 + zoom]
    rotation: float = 0.0     # degrees
    hflip: bool = False
    vflip: bool = False


AUGMENT_POLICIES: dict[str, AugmentPolicy] = {
    "none": AugmentPolicy(),
    "light": AugmentPolicy(shift=0.05, zoom=0.05, rotation=10.0),
    # Balvinsson et al.: 20% shifts, 10% zoom, rotation up to 50°, no flips
    "balvinsson": AugmentPolicy(shift=0.2, zoom=0.1, rotation=50.0),
    # Santos et al.: the same plus horizontal and vertical flips
    "santos": AugmentPolicy(shift=0.2, zoom=0.1, rotation=50.0, hflip=True, vflip=True),
}
