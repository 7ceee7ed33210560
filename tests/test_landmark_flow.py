"""The landmark flow loss (issue 28): each source's flow, read at the driving frame's
landmarks, must point at the same landmarks in that source, so that a lid or a lip moves in
the warp and not only in the generator's paint. Checked on exact flows, on a real training
step (where its gradient goes), and on the training data that feeds it the sources' landmarks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from iwarp.checkpoint import load_network
from iwarp.config import get_config
from iwarp.landmarks import mirror_landmarks
from iwarp.model.blocks import make_coordinate_grid
from iwarp.train.losses import FLOW_LANDMARKS, landmark_flow_loss
from iwarp.train.trainer import TrainStep, load_compatible, seeded_generator
from tests.test_expression_model import face_68

SIZE = 64


def identity_flow(batch: int, sources: int) -> torch.Tensor:
    """(B, N, 2, S, S): every pixel comes from its own place in every source."""
    grid = make_coordinate_grid(SIZE, SIZE, torch.device("cpu"), torch.float32)
    return grid.permute(2, 0, 1).expand(batch, sources, -1, -1, -1).clone()


def full_mass(batch: int, sources: int) -> torch.Tensor:
    return torch.full((batch, sources, 1, SIZE, SIZE), 1.0 / sources)


def test_the_identity_flow_costs_exactly_the_landmarks_motion() -> None:
    """Same landmarks on both sides: nothing to pay. A driver who shuts the eyes and opens the
    mouth over a still warp pays the mean L1 of the inner-face points' motion."""
    still = torch.from_numpy(face_68())[None]
    moved = torch.from_numpy(face_68(mouth_gap=0.3, eye_gap=0.0))[None]
    flow, mass = identity_flow(1, 1), full_mass(1, 1)
    same = landmark_flow_loss(flow, mass, still, still[:, None])
    assert float(same) < 1e-5
    paid = landmark_flow_loss(flow, mass, moved, still[:, None])
    motion = (moved - still)[0, list(FLOW_LANDMARKS)].abs().sum(-1).mean()
    assert float(motion) > 0.01
    assert float(paid) == pytest.approx(float(motion), rel=1e-3)
    # A flow that does the motion (read at the driver's landmarks, it gives the source's) pays
    # nothing: a uniform shift of the whole face.
    shift = torch.tensor([0.1, -0.05])
    shifted = landmark_flow_loss(flow + shift[:, None, None], mass, still - shift, still[:, None])
    assert float(shifted) < 1e-4


def test_a_source_is_asked_only_where_it_claims_the_place_and_unknown_points_drop_out() -> None:
    still = torch.from_numpy(face_68())[None]
    flow, mass = identity_flow(1, 2), full_mass(1, 2)
    # The second source's landmarks are far off, but it has no share of the attention.
    wrong = torch.stack([still, still + 0.3], dim=1)
    mass[:, 1] = 0.0
    assert float(landmark_flow_loss(flow, mass, still, wrong)) < 1e-5
    mass[:, 1] = 0.5
    assert float(landmark_flow_loss(flow, mass, still, wrong)) > 0.1
    # Points unknown on either side are left out; nothing known gives 0, still differentiable.
    unknown = wrong.clone()
    unknown[:, 1] = float("nan")
    assert float(landmark_flow_loss(flow, mass, still, unknown)) < 1e-5
    flow.requires_grad_(True)
    nothing = landmark_flow_loss(flow, mass, still * float("nan"), unknown)
    nothing.backward()
    assert float(nothing.detach()) == 0.0 and flow.grad is not None


def test_in_a_step_it_trains_the_warp_and_its_expression_input_not_the_generator() -> None:
    """Its gradient reaches the query encoder, the expression planes' weights included (the
    way for a blink into the warp), and never the generator, which only paints over the flow."""
    config = get_config("tiny_expression")
    config.train.loss.perceptual = 0.0
    config.train.loss.landmark_flow = 1.0
    step = TrainStep(config)
    # Trained weights grown an expression (a new network's zeroed encoder outputs pass no
    # gradient back): the expression planes start at zero, as in a fine-tune.
    load_compatible(step.net, load_network()[0].state_dict())
    torch.manual_seed(0)
    sources, driving = torch.rand(2, 1, 3, 128, 128), torch.rand(2, 3, 128, 128)
    landmarks = torch.from_numpy(np.stack([face_68(mouth_gap=0.2), face_68()]))
    source_landmarks = torch.from_numpy(np.stack([face_68(), face_68(eye_gap=0.0)]))[:, None]
    _, losses = step(sources, driving, seeded_generator(0, 3, 0), landmarks, source_landmarks)
    assert float(losses["landmark_flow"].detach()) > 0
    losses["landmark_flow"].backward()
    reached = {
        name.split(".")[0]
        for name, p in step.net.named_parameters()
        if p.grad is not None and float(p.grad.abs().sum()) > 0
    }
    assert "query_encoder" in reached and "generator" not in reached
    planes = step.net.query_encoder.unet.stem[0].weight.grad[:, -config.model.expression_dim :]
    assert float(planes.abs().sum()) > 0
    # Without the sources' landmarks the term is not computed.
    _, without = step(sources, driving, seeded_generator(0, 3, 0), landmarks)
    assert "landmark_flow" not in without


def test_batches_carry_the_sources_own_landmarks_flipped_with_them_never_moved() -> None:
    """Frames carry their index in their pixels and their landmarks a matching offset: each
    source's landmarks are its own frame's. With augmentation, a flip mirrors sources' and
    driving landmarks alike, and the driving frame's move leaves the sources' alone."""
    from iwarp.train.data import ClipDataset

    frames = np.stack([np.full((32, 32, 3), (i, 0, 0), np.uint8) for i in range(40)])
    face = face_68()
    face[:, 0] += 0.05  # not symmetric: a mirror is told from the original
    landmarks = np.stack([face + np.float32([0, i / 1000]) for i in range(40)])
    data = ClipDataset.__new__(ClipDataset)
    data.clips, data.size, data.clip_weights = [frames], 32, np.ones(1)
    data.landmarks = [landmarks]

    batch = data.batch_with_landmarks(0, 0, 6, 3, augment=False)
    assert batch.source_landmarks.shape == (6, 3, 68, 2)
    drawn = np.round(batch.sources[:, :, 0, 0, 0].numpy() * 255).astype(int)  # (B, N)
    np.testing.assert_allclose(batch.source_landmarks.numpy(), landmarks[drawn])

    data.landmarks = [np.stack([face] * 40)]
    mirrored, moved = 0, 0
    for step in range(24):
        batch = data.batch_with_landmarks(0, step, 2, 2, temporal_gap=2)
        for sample in range(2):
            first = batch.source_landmarks[sample, 0].numpy()
            flipped = np.allclose(first, mirror_landmarks(face))
            assert flipped or np.allclose(first, face)
            mirrored += flipped
            reference = mirror_landmarks(face) if flipped else face
            assert np.allclose(batch.source_landmarks[sample].numpy(), reference)
            moved += not np.allclose(batch.landmarks[sample].numpy(), reference, atol=1e-4)
    assert 0 < mirrored < 48 and moved > 0
