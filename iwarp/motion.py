"""Relative motion: the one rule by which a driver's movement moves an avatar's keypoints.

The live product (`iwarp.runtime.DrivingStream`, with the neutral pose the user set) and the
evaluation (`iwarp.evaluation.protocol`, with the driving clip's first frame) both call
`relative_motion`, so what is measured is what runs. It is plain arithmetic on numpy arrays or
torch tensors alike (both have `.clip`), so it imports neither and sits below `model` and
`runtime`.
"""

from __future__ import annotations

from typing import TypeVar

Array = TypeVar("Array")  # np.ndarray or torch.Tensor; all six arguments of one kind


def relative_motion(
    source_points: Array,
    source_strength: Array,
    driving_points: Array,
    driving_strength: Array,
    reference_points: Array,
    reference_strength: Array,
) -> tuple[Array, Array]:
    """The avatar's (source) keypoints moved by the driver's displacement from its reference.

    Points (B, K, 2) in [-1, 1]: source + (driving - reference), so a driver whose neutral
    face sits elsewhere in the frame, or is shaped otherwise, does not drag the avatar there.
    Strength (B, K): source + (driving - reference), clipped to [0, 1]: it carries expression
    (an open mouth), so it changes as the driver's does. Driving == reference gives the source
    keypoints back.
    """
    points = source_points + (driving_points - reference_points)
    strength = (source_strength + (driving_strength - reference_strength)).clip(0.0, 1.0)
    return points, strength
