"""`iwarp train-expression`: the expression encoder trained alone (issue 28).

The reader is trained here on drawn faces whose mouth and lids open by the landmarks' own
numbers, so what it must learn is known; the scores are checked on an encoder that reads the
answer exactly; the network it is put back into keeps everything else.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from iwarp.checkpoint import load_network, save_checkpoint
from iwarp.config import get_config
from iwarp.errors import ConfigError
from iwarp.landmarks import EXPRESSION_NAMES, standardised_expression
from iwarp.model import ImplicitWarpingNetwork
from iwarp.model.expression import ExpressionEncoder
from iwarp.paths import DEFAULT_CHECKPOINT
from iwarp.train.expression_reader import (
    ReaderBatches,
    ReaderOptions,
    ReaderSettings,
    reading_scores,
    run_train_expression,
    squeezed_encoder,
    train_reader,
    with_expression_encoder,
)
from tests.test_expression_model import face_68

SIZE = 64


def small_config():
    config = get_config("tiny_expression")
    config.model.image_size = 128
    config.model.expression_size = 64
    return config


def _px(v: float) -> int:
    return round((v + 1) / 2 * SIZE)


def _dark_box(img: np.ndarray, cx: float, cy: float, half_w: float, half_h: float) -> None:
    """A dark box at the centre and half sizes given in [-1, 1] units, at least 1 px tall."""
    y0 = _px(cy - half_h)
    img[y0 : max(_px(cy + half_h), y0 + 1), _px(cx - half_w) : _px(cx + half_w)] = 20


def drawn_clip(seed: int, frames: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """A grey face on a random background: dark eyes and mouth whose heights follow the
    lid and lip gaps of each frame's landmarks (`face_68`), drawn at SIZE px."""
    rng = np.random.default_rng(seed)
    images = np.empty((frames, SIZE, SIZE, 3), np.uint8)
    points = np.empty((frames, 68, 2), np.float32)
    for i in range(frames):
        mouth, eyes = rng.uniform(0.005, 0.3), rng.uniform(0.005, 0.1)
        img = np.full((SIZE, SIZE, 3), rng.integers(40, 90), np.uint8)
        img[6:-4, 8:-8] = 180  # the face
        _dark_box(img, 0.0, 0.35, 0.2, mouth / 2)
        _dark_box(img, -0.3, -0.25, 0.1, eyes / 2)
        _dark_box(img, 0.3, -0.25, 0.1, eyes / 2)
        images[i], points[i] = img, face_68(mouth_gap=mouth, eye_gap=eyes)
    return images, points


class ReadsTheAnswer(torch.nn.Module):
    """An 'encoder' that reads the standardised numbers written into a frame's first pixels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x[:, 0, 0, :4] - 0.5) * 8


def test_scores_are_one_for_an_encoder_that_reads_the_answer() -> None:
    clips, landmarks = [], []
    for seed in range(3):
        images, points = drawn_clip(seed, frames=12)
        target = standardised_expression(points)
        images[:, 0, :4, 0] = np.clip(np.round((target / 8 + 0.5) * 255), 0, 255)
        points[5] = np.nan  # a frame without a face: left out
        clips.append(images)
        landmarks.append(points)
    scores = reading_scores(ReadsTheAnswer(), clips, landmarks)
    assert scores["clips"] == 3 and scores["frames"] == 33
    for name in ("mouth_open", "right_eye", "left_eye"):
        assert scores["per_clip"][name] > 0.99
        assert scores["pooled"][name] > 0.99
    # The drawn mouth never widens: a number that does not move has no r, and is left out.
    assert np.isnan(scores["per_clip"]["mouth_width"])
    assert set(scores["per_clip"]) == set(EXPRESSION_NAMES)
    # Read backwards, the scores say so.
    flipped = [c.copy() for c in clips]
    for c in flipped:
        c[:, 0, :4, 0] = 255 - c[:, 0, :4, 0]
    assert reading_scores(ReadsTheAnswer(), flipped, landmarks)["per_clip"]["mouth_open"] < -0.99


def test_squeezed_encoder_keeps_the_body_and_shrinks_the_head() -> None:
    config = small_config().model
    wide = ExpressionEncoder(config).eval()
    narrow = squeezed_encoder(wide, 8).eval()
    assert narrow.config.expression_head_channels == 8
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(narrow.body(x[..., ::2, ::2]), wide.body(x[..., ::2, ::2]))
        assert narrow(x).shape == (2, 4)
        same = squeezed_encoder(wide, 0).eval()
        torch.testing.assert_close(same(x), wide(x))

    def head_size(m: ExpressionEncoder) -> int:
        return sum(p.numel() for p in m.head.parameters())

    assert head_size(narrow) * 4 < head_size(wide)


def test_the_reader_learns_drawn_mouths_and_lids() -> None:
    """Trained on drawn faces, the reader follows the mouth and the lids of drawn faces it has
    not seen, far better than before it was trained."""
    train = [drawn_clip(seed) for seed in range(4)]
    held_out = [drawn_clip(100 + seed, frames=24) for seed in range(2)]
    select = ([c for c, _ in held_out], [p for _, p in held_out])
    torch.manual_seed(0)
    encoder = squeezed_encoder(ExpressionEncoder(small_config().model), 8)
    before = reading_scores(encoder, *select)["per_clip"]
    settings = ReaderSettings(steps=150, batch_size=16, lr=2e-3, select_every=75)
    batches = ReaderBatches([c for c, _ in train], [p for _, p in train])
    encoder, history = train_reader(encoder, batches, select, settings, show_progress=False)
    after = reading_scores(encoder, *select)["per_clip"]
    assert [h["step"] for h in history] == [0, 75, 150]
    assert after["mouth_open"] > 0.6 > before["mouth_open"]
    assert (after["right_eye"] + after["left_eye"]) / 2 > 0.5


def test_a_new_reader_changes_nothing_else(tmp_path) -> None:
    config = small_config()
    net = ImplicitWarpingNetwork(config.model).eval()
    torch.manual_seed(0)
    sources, driving = torch.rand(1, 1, 3, 128, 128), torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        kp = net.detect(driving)
        source = net.encode_sources(sources)
        before = net.animate(source, kp)
    reader = squeezed_encoder(net.expression_encoder, 8).eval()
    saved = with_expression_encoder(net, config, reader)
    assert config.model.expression_head_channels == 0  # the caller's config is not changed
    save_checkpoint(tmp_path / "reader.safetensors", saved, net)
    loaded, ckpt = load_network(tmp_path / "reader.safetensors")
    assert ckpt.config.model.expression_head_channels == 8
    with torch.no_grad():
        torch.testing.assert_close(loaded.detect(driving).expression, reader(driving))
        # Given the same expression, the rest of the network paints what it painted before.
        torch.testing.assert_close(loaded.animate(loaded.encode_sources(sources), kp), before)


def test_a_network_without_expression_is_refused_before_any_data_is_read(tmp_path) -> None:
    with pytest.raises(ConfigError, match="no expression encoder"):
        run_train_expression(options_without_data(tmp_path, str(DEFAULT_CHECKPOINT)))
    assert not (tmp_path / "reader.safetensors").exists()


def test_training_can_go_on_from_a_squeezed_reader() -> None:
    """`iwarp train --expression-head-channels 8 --init READER` builds the network the reader's
    weights fit."""
    from iwarp.train.trainer import TrainOptions

    options = TrainOptions(config="tiny_expression", data="", out="", expression_head_channels=8)
    config = options.to_config()
    assert config.model.expression_head_channels == 8
    reader = squeezed_encoder(ExpressionEncoder(get_config("tiny_expression").model), 8)
    ExpressionEncoder(config.model).load_state_dict(reader.state_dict())  # strict: same keys


def saved(path, config) -> str:
    """A fresh network of `config` saved at `path`, for options that name weights."""
    save_checkpoint(path, config, ImplicitWarpingNetwork(config.model))
    return str(path)


def options_without_data(tmp_path, checkpoint: str, **kwargs) -> ReaderOptions:
    """Options whose data folder does not exist: a refusal must come before it is read."""
    return ReaderOptions(
        checkpoint=checkpoint,
        data=str(tmp_path / "no-such-folder"),
        out=str(tmp_path / "reader.safetensors"),
        **kwargs,
    )


def wide_128():
    config = get_config("tiny_expression")
    config.model.image_size = 128
    return config


def test_a_reader_of_another_design_is_refused(tmp_path) -> None:
    """--reader-from weights whose encoder gives other numbers: said before any data is read."""
    other = saved(tmp_path / "other.safetensors", small_config())
    mine = saved(tmp_path / "mine.safetensors", wide_128())
    with pytest.raises(ConfigError, match="does not fit"):
        run_train_expression(options_without_data(tmp_path, mine, reader_from=other))


def test_steps_0_never_puts_in_an_untrained_head(tmp_path) -> None:
    wide = saved(tmp_path / "wide.safetensors", wide_128())
    settings = ReaderSettings(steps=0, head_channels=8)
    with pytest.raises(ConfigError, match="untrained head"):
        run_train_expression(options_without_data(tmp_path, wide, settings=settings))
