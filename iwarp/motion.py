"""A face's pose, and relative motion: the one rule by which a driver's movement moves an
avatar's keypoints (and expression).

`Pose` is what the keypoints graph gives and the other two graphs take: keypoints, strength and,
for a network with an expression (`ModelConfig.expression_dim` > 0), the expression. Backends,
the runtime's driving stream, the cluster's wire and calibration pass it as one value.

The live product (`iwarp.runtime.DrivingStream`, with the neutral pose the user set) and the
evaluation (`iwarp.evaluation.protocol`, with the driving clip's first frame) both call
`relative_motion` and `relative_expression` (`relative_pose` on whole poses), so what is
measured is what runs. It is plain arithmetic on numpy arrays or torch tensors alike (both have
`.clip`), so it imports neither and sits below `model` and `runtime`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

Array = TypeVar("Array")  # np.ndarray or torch.Tensor; all six arguments of one kind


@dataclass(frozen=True)
class Pose(Generic[Array]):
    """A batch of faces as the network sees them: `points` (B, K, 2) as (x, y) in [-1, 1],
    `strength` (B, K) in [0, 1], and `expression` (B, E) (standardised openness,
    `model.expression`) or None for a network without one. numpy arrays or torch tensors."""

    points: Array
    strength: Array
    expression: Array | None = None

    def map(self, fn: Callable[[Array], Any]) -> Pose:
        """`fn` applied to each array (a dtype, a device, a slice); None stays None."""
        expression = None if self.expression is None else fn(self.expression)
        return Pose(fn(self.points), fn(self.strength), expression)

    def select(self, index: int | slice) -> Pose:
        """The faces `index` of the batch; an int keeps the batch axis (one face, B = 1)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return self.map(lambda a: a[index])

    @staticmethod
    def join(parts: Sequence[Pose], concatenate: Callable[[list[Any]], Any]) -> Pose:
        """Batches joined along the batch axis by `concatenate` (np.concatenate, torch.cat)."""
        first = parts[0]
        expression = (
            None if first.expression is None else concatenate([p.expression for p in parts])
        )
        return Pose(
            concatenate([p.points for p in parts]),
            concatenate([p.strength for p in parts]),
            expression,
        )


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


def relative_expression(source: Array, driving: Array, reference: Array) -> Array:
    """The avatar's expression (B, E) moved by the driver's change from its reference: the
    avatar's mouth and eyes open and shut by as much as the driver's do, from where they are in
    its photo, and a driver who smiles at rest does not make every avatar smile."""
    return source + (driving - reference)


def relative_pose(source: Pose, driving: Pose, reference: Pose) -> Pose:
    """`relative_motion` and `relative_expression` on whole poses: the avatar's (source) pose
    moved by the driver's change from its reference (all three of one batch size, or the
    source and reference of B = 1). A network without an expression gives poses without one."""
    points, strength = relative_motion(
        source.points,
        source.strength,
        driving.points,
        driving.strength,
        reference.points,
        reference.strength,
    )
    expression = None
    if driving.expression is not None:
        if source.expression is None or reference.expression is None:
            raise ValueError("the driving pose has an expression, the source or reference not")
        expression = relative_expression(
            source.expression, driving.expression, reference.expression
        )
    return Pose(points, strength, expression)
