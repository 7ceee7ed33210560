"""The driving side's expression (issue 28): the landmark ratios it is taught, the loss terms
that teach it, and a network that starts exactly as the one it grows from.

The ratios are checked on dlib's landmarks of real photos (the packaged portrait, and the same
face with its mouth pulled open by a warp), not only on numbers made up for the test.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from iwarp.checkpoint import load_network
from iwarp.config import get_config
from iwarp.errors import ConfigError
from iwarp.landmarks import (
    EXPRESSION_NAMES,
    MIRROR_68,
    expression_ratios,
    mirror_landmarks,
    standardised_expression,
)
from iwarp.media import read_image
from iwarp.model import ImplicitWarpingNetwork, Keypoints
from iwarp.model.expression import ExpressionEncoder
from iwarp.motion import relative_expression
from iwarp.paths import DEFAULT_AVATAR
from iwarp.train.losses import (
    expression_loss,
    output_expression_loss,
    region_l1_loss,
    region_mask,
)
from iwarp.train.trainer import TrainStep, load_compatible, seeded_generator
from tests.conftest import REPO_ROOT, load_script

# Where `expression_film` puts its gains: a weight and a bias in each.
FILM_MODULES = ["generator"] * 2 + ["key_encoder"] * 2 + ["query_encoder"] * 2


def face_68(mouth_gap: float = 0.02, eye_gap: float = 0.06) -> np.ndarray:
    """A schematic frontal face's 68 landmarks in [-1, 1] with the given lip and lid gaps."""
    p = np.zeros((68, 2), dtype=np.float32)
    p[:17] = np.stack(
        [np.linspace(-0.7, 0.7, 17), 0.4 - 0.3 * np.cos(np.linspace(0, np.pi, 17))], 1
    )
    p[17:27] = np.stack([np.linspace(-0.55, 0.55, 10), np.full(10, -0.45)], 1)
    p[27:36] = np.stack([np.zeros(9), np.linspace(-0.3, 0.05, 9)], 1)
    for first, cx in ((36, -0.3), (42, 0.3)):  # corners 0 and 3, upper lid 1-2, lower lid 4-5
        xs = cx + np.array([-0.12, -0.04, 0.04, 0.12, 0.04, -0.04])
        ys = -0.25 + np.array([0, -eye_gap / 2, -eye_gap / 2, 0, eye_gap / 2, eye_gap / 2])
        p[first : first + 6] = np.stack([xs, ys], 1)
    p[48:60] = np.stack(
        [
            0.25 * np.cos(np.linspace(np.pi, -np.pi, 12)),
            0.35 + 0.05 * np.sin(np.linspace(np.pi, -np.pi, 12)),
        ],
        1,
    )
    p[48], p[54] = (-0.25, 0.35), (0.25, 0.35)
    inner_x = np.array([-0.2, -0.1, 0.0, 0.1, 0.2, 0.1, 0.0, -0.1])
    inner_y = 0.35 + np.array([0, -1, -1, -1, 0, 1, 1, 1]) * mouth_gap / 2
    p[60:68] = np.stack([inner_x, inner_y], 1)
    return p


def test_ratios_measure_what_they_name() -> None:
    shut, open_ = face_68(mouth_gap=0.01), face_68(mouth_gap=0.2)
    closed_eyes = face_68(eye_gap=0.005)
    r_shut, r_open, r_closed = (expression_ratios(f) for f in (shut, open_, closed_eyes))
    names = dict(zip(EXPRESSION_NAMES, range(4), strict=True))
    assert r_open[names["mouth_open"]] == pytest.approx(0.2 / 0.5, rel=1e-3)
    assert r_shut[names["mouth_open"]] == pytest.approx(0.01 / 0.5, rel=1e-3)
    assert r_closed[names["right_eye"]] < 0.05 < r_shut[names["right_eye"]]
    assert r_shut[names["mouth_width"]] == pytest.approx(0.5 / 0.84, rel=1e-3)
    # Size and place do not change them; numpy and torch agree.
    moved = shut * 0.5 + 0.2
    np.testing.assert_allclose(expression_ratios(moved), r_shut, rtol=1e-5)
    np.testing.assert_allclose(expression_ratios(torch.from_numpy(shut)).numpy(), r_shut, rtol=1e-5)


def test_a_mirrored_face_swaps_its_eyes() -> None:
    face = face_68()
    face[36:42, 1] = -0.25 + (face[36:42, 1] + 0.25) * 0.3  # the right eye half shut
    ratios = expression_ratios(face)
    mirrored = expression_ratios(mirror_landmarks(face[None])[0])
    assert ratios[2] < ratios[3]
    assert mirrored[2] == pytest.approx(ratios[3], rel=1e-4)
    assert mirrored[3] == pytest.approx(ratios[2], rel=1e-4)
    assert MIRROR_68[36] == 45


def test_expression_loss_leaves_out_frames_without_landmarks() -> None:
    landmarks = torch.from_numpy(np.stack([face_68(), face_68()]))
    landmarks[1] = float("nan")
    target = standardised_expression(landmarks[:1])
    exact = torch.cat([target, torch.full((1, 4), 99.0)])
    assert float(expression_loss(exact, landmarks)) == pytest.approx(0.0, abs=1e-8)
    off = exact.clone()
    off[0] += 1.0
    assert float(expression_loss(off, landmarks)) == pytest.approx(1.0, rel=1e-5)
    assert float(expression_loss(off, torch.full_like(landmarks, float("nan")))) == 0.0


def test_region_l1_sees_only_eyes_and_mouth() -> None:
    size = 64
    landmarks = torch.from_numpy(face_68())[None]
    mask = region_mask(landmarks, size)
    assert 0.05 < float(mask.mean()) < 0.4

    # The mouth's centre and an eye's centre are in, the forehead and the cheek are out.
    def at(x: float, y: float) -> float:
        return float(mask[0, 0, int((y + 1) / 2 * size), int((x + 1) / 2 * size)])

    assert at(0.0, 0.35) == at(-0.3, -0.25) == 1.0
    assert at(0.0, -0.8) == at(-0.6, 0.1) == 0.0
    target = torch.zeros(1, 3, size, size)
    output = target.clone()
    output[..., :8, :] = 1.0  # wrong only at the top: no region there
    assert float(region_l1_loss(output, target, landmarks)) == 0.0
    output[..., 40:48, 28:36] = 1.0  # the mouth
    assert float(region_l1_loss(output, target, landmarks)) > 0.1
    unknown = torch.full_like(landmarks, float("nan"))
    assert float(region_l1_loss(output, target, unknown)) == 0.0


def test_output_expression_judges_the_output_not_the_judge() -> None:
    """The term is zero for an output that reads like the driver and grows as it reads
    otherwise; its gradient reaches the output only, and the judge's running statistics stay
    as they were."""
    config = get_config("tiny_expression").model
    torch.manual_seed(0)
    encoder = ExpressionEncoder(config).train()
    driving = torch.rand(2, 3, 128, 128)
    stats = [b.clone() for b in encoder.buffers()]
    same = output_expression_loss(encoder, driving.clone(), driving)
    assert float(same) < 1e-10
    output = (1 - driving).requires_grad_()
    loss = output_expression_loss(encoder, output, driving)
    assert float(loss) > 1e-4
    loss.backward()
    assert output.grad is not None and float(output.grad.abs().sum()) > 0
    assert all(p.grad is None for p in encoder.parameters())
    assert all(torch.equal(a, b) for a, b in zip(stats, encoder.buffers(), strict=True))


def test_encoder_reads_a_multiple_of_its_size() -> None:
    config = get_config("tiny_expression").model
    encoder = ExpressionEncoder(config).eval()
    with torch.no_grad():
        assert encoder(torch.rand(2, 3, 256, 256)).shape == (2, config.expression_dim)
        assert encoder(torch.rand(1, 3, 128, 128)).shape == (1, config.expression_dim)
        with pytest.raises(ValueError, match="multiple of 128"):
            encoder(torch.rand(1, 3, 192, 192))


@pytest.fixture(scope="module")
def grown() -> tuple[ImplicitWarpingNetwork, ImplicitWarpingNetwork]:
    """The shipped network, and the same weights grown an expression."""
    shipped = load_network()[0].eval()
    net = ImplicitWarpingNetwork(get_config("tiny_expression").model)
    adapted = load_compatible(net, shipped.state_dict())
    assert any("query_encoder.unet.stem.0.weight" in a for a in adapted)
    return shipped, net.eval()


def test_grown_network_starts_as_the_one_it_grows_from(grown) -> None:
    shipped, net = grown
    torch.manual_seed(0)
    sources, driving = torch.rand(1, 2, 3, 256, 256), torch.rand(2, 3, 256, 256)
    with torch.no_grad():
        before = shipped(sources.expand(2, -1, -1, -1, -1), driving)[0]
        after, kp, source = net(sources.expand(2, -1, -1, -1, -1), driving)
    assert kp.expression.shape == (2, 4)
    assert source.keypoints.expression.shape == (2, 2, 4)
    torch.testing.assert_close(after, before)


def test_expression_moves_the_output_once_trained_weights_use_it(grown) -> None:
    _, net = grown
    net = ImplicitWarpingNetwork(net.config).eval().requires_grad_(False)
    net.load_state_dict(grown[1].state_dict())
    torch.manual_seed(1)
    net.query_encoder.unet.stem[0].weight[:, -4:].normal_(0, 0.5)
    sources, driving = torch.rand(1, 1, 3, 256, 256), torch.rand(1, 3, 256, 256)
    source = net.encode_sources(sources)
    kp = net.detect(driving)
    wide = Keypoints(kp.points, kp.strength, kp.expression + 2.0)
    assert float((net.animate(source, kp) - net.animate(source, wide)).abs().mean()) > 1e-3


def test_film_starts_as_the_network_it_grows_from_and_then_gains(grown) -> None:
    """`expression_film`: grown from weights without it, the network is unchanged; once its
    gains are trained, another expression gives another warp (queries and keys) and paint."""
    _, plain = grown
    config = replace(plain.config, expression_film=True)
    net = ImplicitWarpingNetwork(config).eval().requires_grad_(False)
    adapted = load_compatible(net, plain.state_dict())
    assert sorted(a.split(".")[0] for a in adapted) == FILM_MODULES
    torch.manual_seed(2)
    sources, driving = torch.rand(1, 1, 3, 256, 256), torch.rand(1, 3, 256, 256)
    kp = plain.detect(driving)
    wide = Keypoints(kp.points, kp.strength, kp.expression + 2.0)
    with torch.no_grad():
        torch.testing.assert_close(
            net.animate(net.encode_sources(sources), wide),
            plain.animate(plain.encode_sources(sources), wide),
        )
    # The planes' own weights stay at zero: only the gains can move the warp.
    for encoder in (net.query_encoder, net.key_encoder):
        encoder.unet.stem[0].weight[:, -4:].zero_()
    net.query_encoder.film.to_gain_shift.weight.normal_(0, 0.5)
    source = net.encode_sources(sources)
    warps = [net.warp_to_driving(source, k).flow.blended for k in (kp, wide)]
    assert float((warps[0] - warps[1]).abs().mean()) > 1e-3
    net.query_encoder.film.to_gain_shift.weight.zero_()
    net.generator.film.to_gain_shift.weight.normal_(0, 0.5)
    assert float((net.animate(source, kp) - net.animate(source, wide)).abs().mean()) > 1e-3


def test_generator_parts_recombine_to_its_output(grown) -> None:
    """`bench/expression_sweep.py --parts` shows the warp's and the paint's shares apart:
    blended as the generator blends them they are the output."""
    _, net = grown
    torch.manual_seed(4)
    sources, driving = torch.rand(1, 1, 3, 256, 256), torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        source, kp = net.encode_sources(sources), net.detect(driving)
        inputs = net.warp_to_driving(source, kp)
        flow = torch.cat([inputs.flow.blended, inputs.flow.unmatched], dim=1)
        colours, keep = net.generator.blend_parts(net.generator.decode(inputs.features), flow)
        assert float(keep.min()) >= 0 and float(keep.max()) <= 1
        torch.testing.assert_close(
            keep * inputs.flow.blended + (1 - keep) * colours, net.animate(source, kp)
        )


def test_parts_measure_the_warps_own_motion_of_lids_and_lips(grown) -> None:
    """`bench/expression_sweep.py --parts`' numbers: a network whose expression never reaches
    the queries (the grown one: zero weights) has a warp that does not move at all; once the
    query encoder reads it, the warp moves at the eyes and mouth."""
    sweep = load_script(REPO_ROOT / "bench" / "expression_sweep.py")
    photo = read_image(DEFAULT_AVATAR)
    _, still = sweep.parts(grown[1], photo, 256)
    assert set(still) == {"mouth -2", "mouth +3", "eyes -2", "eyes +3"}
    assert max(still.values()) == 0.0
    net = ImplicitWarpingNetwork(grown[1].config).eval().requires_grad_(False)
    net.load_state_dict(grown[1].state_dict())
    torch.manual_seed(1)
    net.query_encoder.unet.stem[0].weight[:, -4:].normal_(0, 0.5)
    picture, moving = sweep.parts(net, photo, 256)
    assert picture.shape == (3 * 256, 6 * 256, 3)
    assert min(moving.values()) > 0.01


def test_film_gains_act_where_a_channel_is_active() -> None:
    """A gain, unlike a plane into a convolution, leaves a channel's silent places silent: the
    expression can change an eye's features without painting over the cheek."""
    from iwarp.model.expression import ExpressionFiLM, expression_planes

    film = ExpressionFiLM(4, 2)
    with torch.no_grad():
        film.to_gain_shift.weight[:2].fill_(0.5)  # gains only, no shift
    features = torch.zeros(1, 2, 4, 4)
    features[:, :, 1, 1] = 1.0  # one active place
    expression = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    out = film(features, expression_planes(expression, features))
    torch.testing.assert_close(out[:, :, 1, 1], torch.full((1, 2), 1.5))
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[1, 1] = False
    assert float(out[:, :, mask].abs().max()) == 0.0


def test_film_gains_learn_faster_and_keep_their_rate_across_a_resume(tmp_path) -> None:
    """The gains start at zero beside trained layers: their group runs at `film_lr_scale`
    times the schedule's rate in a real step, and a checkpoint brings the group back."""
    from iwarp.checkpoint import Checkpoint, save_checkpoint
    from iwarp.train.trainer import Batch, Trainer, learning_rate, train_step

    config = get_config("tiny_expression")
    config.train.loss.perceptual = 0.0
    assert len(Trainer.create(config, torch.device("cpu")).optimizer.param_groups) == 1
    config.model.expression_film = True
    trainer = Trainer.create(config, torch.device("cpu"))
    rest, film = trainer.optimizer.param_groups
    names = {id(p): name for name, p in trainer.net.named_parameters()}
    assert sorted(names[id(p)].split(".")[0] for p in film["params"]) == FILM_MODULES
    assert not any(".film." in names[id(p)] for p in rest["params"])
    torch.manual_seed(0)
    batch = Batch(torch.rand(1, 1, 3, 128, 128), torch.rand(1, 3, 128, 128), None)
    train_step(trainer, batch, step=3, steps=10)
    expected = learning_rate(config.train, 3, 10)
    assert rest["lr"] == pytest.approx(expected)
    assert film["lr"] == pytest.approx(expected * config.train.film_lr_scale)
    path = save_checkpoint(
        tmp_path / "c.safetensors", config, trainer.net, optimizers={"generator": trainer.optimizer}
    )
    again = Trainer.create(config, torch.device("cpu"))
    again.optimizer.param_groups[1]["lr_scale"] = 1.0
    Checkpoint(path).load_optimizer("generator", again.optimizer)
    assert again.optimizer.param_groups[1]["lr_scale"] == config.train.film_lr_scale


def test_film_needs_an_expression() -> None:
    from iwarp.train.trainer import TrainOptions

    options = TrainOptions(config="tiny_expression", data="d", out="o", expression_film=True)
    assert options.to_config().model.expression_film
    config = get_config("tiny_flow").model
    config.expression_film = True
    with pytest.raises(ValueError, match="needs expression_dim"):
        ImplicitWarpingNetwork(config)


def test_relative_expression_returns_the_avatars_own_at_the_reference() -> None:
    avatar, reference = torch.tensor([[0.5, -1.0]]), torch.tensor([[2.0, 0.0]])
    torch.testing.assert_close(relative_expression(avatar, reference, reference), avatar)
    wider = relative_expression(avatar, reference + torch.tensor([[1.0, 0.0]]), reference)
    torch.testing.assert_close(wider, torch.tensor([[1.5, -1.0]]))


def test_training_step_teaches_and_uses_the_expression(grown) -> None:
    """A step's losses include the expression and the eye-and-mouth L1; with the teacher's
    share at 1 the animator gets the landmarks' expression, at 0 the encoder's."""
    config = get_config("tiny_expression")
    config.train.loss.perceptual = 0.0
    config.train.source_dropout = 0.0
    step = TrainStep(config)
    step.net.load_state_dict(grown[1].state_dict())
    step.net.query_encoder.unet.stem[0].weight.data[:, -4:].normal_(0, 0.5)
    torch.manual_seed(0)
    sources, driving = torch.rand(2, 1, 3, 128, 128), torch.rand(2, 3, 128, 128)
    landmarks = torch.from_numpy(np.stack([face_68(mouth_gap=0.2), face_68()]))

    def run(share: float):
        config.train.expression_teacher = share
        with torch.no_grad():
            return step(sources, driving, seeded_generator(0, 3, 0), landmarks)

    taught, losses = run(1.0)
    own, _ = run(0.0)
    assert {"expression", "region_l1"} <= set(losses)
    assert "output_expression" not in losses  # off in the preset, and then not computed
    assert float(losses["expression"]) > 0
    assert float((taught - own).abs().mean()) > 1e-4


def test_output_expression_in_a_step_trains_the_generator_alone(grown) -> None:
    """The step's output_expression term is painted again from detached inputs: its
    gradient reaches the generator and nothing upstream (keypoints, attention, encoders)."""
    config = get_config("tiny_expression")
    config.train.loss.perceptual = 0.0
    config.train.loss.output_expression = 0.1
    step = TrainStep(config)
    step.net.load_state_dict(grown[1].state_dict())
    torch.manual_seed(0)
    sources, driving = torch.rand(2, 1, 3, 128, 128), torch.rand(2, 3, 128, 128)
    landmarks = torch.from_numpy(np.stack([face_68(mouth_gap=0.2), face_68()]))
    _, losses = step(sources, driving, seeded_generator(0, 3, 0), landmarks)
    losses["output_expression"].backward()
    reached = {
        name.split(".")[0]
        for name, p in step.net.named_parameters()
        if p.grad is not None and float(p.grad.abs().sum()) > 0
    }
    assert reached == {"generator"}


def test_output_expression_needs_a_network_that_reads_expression() -> None:
    config = get_config("tiny_flow")
    config.train.loss.output_expression = 0.1
    with pytest.raises(ConfigError, match="no judge"):
        TrainStep(config)


def test_a_frozen_reader_keeps_its_weights_while_the_renderer_learns(grown) -> None:
    """`--freeze-expression-encoder`: a step's gradient reaches the renderer but not the
    expression encoder, which stays in eval mode (no dropout) and drops its own loss."""
    from iwarp.train.trainer import TrainOptions

    options = TrainOptions(
        config="tiny_expression", data="d", out="o", freeze_expression_encoder=True
    )
    config = options.to_config()
    config.train.loss.perceptual = 0.0
    config.model.expression_head_channels = 8  # a head with dropout, as the reader's
    step = TrainStep(config).train()
    assert not step.net.expression_encoder.training
    assert step.net.keypoint_detector.training
    torch.manual_seed(0)
    sources, driving = torch.rand(2, 1, 3, 128, 128), torch.rand(2, 3, 128, 128)
    landmarks = torch.from_numpy(np.stack([face_68(mouth_gap=0.2), face_68()]))
    _, losses = step(sources, driving, seeded_generator(0, 3, 0), landmarks)
    assert "expression" not in losses and "region_l1" in losses
    sum(losses.values()).backward()
    reached = {
        name.split(".")[0]
        for name, p in step.net.named_parameters()
        if p.grad is not None and float(p.grad.abs().sum()) > 0
    }
    assert "expression_encoder" not in reached
    assert {"generator", "keypoint_detector"} <= reached
    with torch.no_grad():  # eval mode: the same frame reads the same twice
        torch.testing.assert_close(
            step.net.expression_encoder(driving), step.net.expression_encoder(driving)
        )


def test_freezing_needs_an_expression_encoder() -> None:
    config = get_config("tiny_flow")
    config.train.freeze_expression_encoder = True
    with pytest.raises(ConfigError, match="no expression encoder to freeze"):
        TrainStep(config)


def test_expression_focus_draws_the_clips_extreme_frames() -> None:
    """Frames carry their index in their pixels; one frame of 40 opens the mouth wide. With the
    focus on, it is the driving frame of far more than 1/40 of the focused samples; off, the
    batches are those of a dataset that never heard of it."""
    from iwarp.train.data import ClipDataset

    frames = np.stack([np.full((16, 16, 3), (i, 0, 0), np.uint8) for i in range(40)])
    landmarks = np.stack([face_68(mouth_gap=0.3 if i == 17 else 0.02) for i in range(40)])

    def dataset() -> ClipDataset:
        data = ClipDataset.__new__(ClipDataset)
        data.clips, data.size, data.clip_weights = [frames], 16, np.ones(1)
        data.landmarks = [landmarks]
        return data

    plain, focused = dataset(), dataset()
    focused.focus_on_expression(1.0)
    driving = focused.batch_with_landmarks(0, 0, 400, 1, augment=False)[1]
    drawn = np.round(driving[:, 0, 0, 0].numpy() * 255).astype(int)
    assert (drawn == 17).mean() > 0.3
    # Temporal pairs (stillness, temporal losses) too: the pair starts at the open mouth.
    pairs = focused.batch_with_landmarks(0, 0, 400, 1, augment=False, temporal_gap=2)[1]
    firsts = np.round(pairs[0::2, 0, 0, 0].numpy() * 255).astype(int)
    assert (firsts == 17).mean() > 0.3
    focused.focus_on_expression(0.0)
    for gap in (0, 2):
        a, b = (
            d.batch_with_landmarks(0, 3, 8, 2, augment=False, temporal_gap=gap)
            for d in (plain, focused)
        )
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    with pytest.raises(ValueError, match="load_landmarks"):
        data = dataset()
        data.landmarks = None
        data.focus_on_expression(0.5)


def test_matched_sources_bring_the_open_mouth_from_another_frame() -> None:
    """Frames carry their index in their pixels; frames 10 and 30 of 40 open the mouth wide.
    With matching on, a sample driven by one of them gets the other among its sources (the
    only open mouth at least MATCH_MIN_GAP frames away), single and paired; off, or with one
    source, the batches are those of a dataset that never heard of it."""
    from iwarp.train.data import ClipDataset

    frames = np.stack([np.full((16, 16, 3), (i, 0, 0), np.uint8) for i in range(40)])
    landmarks = np.stack([face_68(mouth_gap=0.3 if i in (10, 30) else 0.02) for i in range(40)])

    def dataset(share: float) -> ClipDataset:
        data = ClipDataset.__new__(ClipDataset)
        data.clips, data.size, data.clip_weights = [frames], 16, np.ones(1)
        data.landmarks = [landmarks]
        data.focus_on_expression(1.0)
        data.match_sources(share)
        return data

    def index(x: torch.Tensor) -> np.ndarray:
        return np.round(x[..., 0, 0, 0].numpy() * 255).astype(int)

    matched = dataset(1.0)
    for gap in (0, 2):
        batch = matched.batch_with_landmarks(0, 0, 200, 2, augment=False, temporal_gap=gap)
        driving, sources = index(batch.driving), index(batch.sources)
        if gap:  # a pair's sources match its first frame
            driving, sources = driving[0::2], sources[0::2]
        open_driven = np.isin(driving, (10, 30))
        assert open_driven.sum() > 10
        for d, s in zip(driving[open_driven], sources[open_driven], strict=True):
            assert (40 - d) in s  # 10 <-> 30
    plain, off = dataset(0.0), ClipDataset.__new__(ClipDataset)
    off.clips, off.size, off.clip_weights, off.landmarks = [frames], 16, np.ones(1), [landmarks]
    off.focus_on_expression(1.0)
    for data_pair, num_sources in (((plain, off), 2), ((matched, off), 1)):
        a, b = (d.batch_with_landmarks(0, 3, 8, num_sources, augment=False) for d in data_pair)
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    with pytest.raises(ValueError, match="load_landmarks"):
        off.landmarks = None
        off.match_sources(0.5)
    config = get_config("tiny_expression")
    config.train.matched_source_share = 1.5
    with pytest.raises(ConfigError, match="matched source share"):
        config.train.validate()
