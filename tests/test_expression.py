"""Expression transfer (`iwarp.evaluation.expression`): the openness geometry, the scores, the
extreme-frame picker, and on a real talking clip that the measure can fail: the driver against
itself re-encoded scores near 1, against a frozen frame 0, against itself a few frames late
clearly less."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from iwarp.evaluation.expression import (
    MIN_FRAMES,
    FaceMeshOpenness,
    expression_positions,
    extreme_frames,
    openness,
    reencoded,
    summarise,
    transfer_scores,
)


def _face(mouth_gap: float, eye_gap: float) -> np.ndarray:
    """Mesh points of a drawn face: a 40-px-wide mouth open `mouth_gap` px and two 20-px-wide
    eyes whose lids are `eye_gap` px apart (every other point at the origin)."""
    p = np.zeros((478, 2))
    p[61], p[291] = (80, 150), (120, 150)  # mouth corners
    p[13], p[14] = (100, 150 - mouth_gap / 2), (100, 150 + mouth_gap / 2)
    for corners, upper, lower, x0 in (
        ((33, 133), (160, 158), (144, 153), 60),
        ((362, 263), (385, 387), (380, 373), 120),
    ):
        p[corners[0]], p[corners[1]] = (x0, 100), (x0 + 20, 100)
        for k, (u, lo) in enumerate(zip(upper, lower, strict=True)):
            x = x0 + 7 + 6 * k
            p[u], p[lo] = (x, 100 - eye_gap / 2), (x, 100 + eye_gap / 2)
    return p


def test_openness_is_gap_over_width() -> None:
    mouth, eyes = openness(_face(mouth_gap=10, eye_gap=6))
    assert mouth == pytest.approx(10 / 40)
    assert eyes == pytest.approx((6 + 6) / (2 * 20))
    shut_mouth, shut_eyes = openness(_face(mouth_gap=0, eye_gap=0))
    assert shut_mouth == 0.0 and shut_eyes == 0.0
    # Scale-free: the same face twice as large has the same openness.
    assert openness(2 * _face(10, 6)) == pytest.approx((mouth, eyes))


def test_transfer_scores() -> None:
    t = np.linspace(0, 6 * np.pi, 60)
    driver = 0.2 + 0.1 * np.sin(t)
    same = transfer_scores(driver, driver)
    assert same["r"] == pytest.approx(1.0) and same["spread"] == pytest.approx(1.0)
    half = transfer_scores(driver, 0.5 + 0.5 * (driver - 0.2))  # follows, with half the motion
    assert half["r"] == pytest.approx(1.0) and half["spread"] == pytest.approx(0.5)
    opposite = transfer_scores(driver, -driver)
    assert opposite["r"] == pytest.approx(-1.0)
    # A frozen output: correlation undefined, reported as 0, and no spread.
    frozen = transfer_scores(driver, np.full_like(driver, 0.3))
    assert (frozen["r"], frozen["spread"]) == (0.0, 0.0)
    # Frames without a face (NaN) are left out of both series.
    holes = driver.copy()
    holes[::3] = np.nan
    assert transfer_scores(driver, holes)["r"] == pytest.approx(1.0)
    assert transfer_scores(driver, holes)["frames"] == 40
    # No motion to follow, or too few frames: undefined.
    assert np.isnan(transfer_scores(np.full(60, 0.2), driver)["r"])
    few = transfer_scores(driver[: MIN_FRAMES - 1], driver[: MIN_FRAMES - 1])
    assert np.isnan(few["r"]) and np.isnan(few["spread"])


def test_extreme_frames_and_positions() -> None:
    mouth = np.array([0.1, 0.2, np.nan, 0.5, 0.0, 0.3, 0.2])
    eyes = np.array([0.3, 0.3, 0.3, 0.28, 0.31, np.nan, 0.05])
    assert extreme_frames(mouth, eyes) == {"mouth widest": 3, "mouth shut": 4, "eyes closed": 6}
    # No face at all in a series: that extreme is left out, not made up.
    assert extreme_frames(np.full(4, np.nan), np.array([0.3, 0.1, 0.2, 0.3])) == {"eyes closed": 1}
    assert expression_positions(100, 5) == [1, 26, 50, 74, 99]
    assert expression_positions(6, 96) == [1, 2, 3, 4, 5]  # short clip: every frame but 0
    assert expression_positions(1, 96) == []


def test_summarise_means_over_clips_where_defined() -> None:
    rows = [
        {
            "mode": "model",
            "mouth_r": 0.2,
            "mouth_spread": 0.5,
            "eyes_r": np.nan,
            "eyes_spread": np.nan,
        },
        {"mode": "model", "mouth_r": 0.4, "mouth_spread": 0.7, "eyes_r": 0.1, "eyes_spread": 0.3},
    ]
    (result,) = summarise(rows)
    assert result["mouth_r"] == pytest.approx(0.3) and result["mouth_spread"] == pytest.approx(0.6)
    assert result["eyes_r"] == pytest.approx(0.1) and result["eyes_clips"] == 1
    assert result["clips"] == 2 and result["mouth_clips"] == 2


@pytest.fixture(scope="module")
def talking(shared_data: Path) -> np.ndarray:
    """120 consecutive 256 px face crops of a val clip where she talks and blinks."""
    from iwarp.face import FaceDetector
    from iwarp.train.data import prepare_clip

    clip = shared_data / "clips" / "styletalk" / "nice_clip1.mp4"
    if not clip.is_file():
        pytest.skip(f"{clip} not found")
    with FaceDetector() as detector:
        return prepare_clip(clip, 256, detector, max_frames=120)


def test_the_measure_can_fail_on_a_real_clip(talking: np.ndarray) -> None:
    with FaceMeshOpenness() as mesh:
        driver = mesh.series(talking)
        measured_again = mesh.series(talking)
        through_codec = mesh.series(reencoded(talking))
        frozen = mesh.series([talking[0]] * len(talking))
    lag = 6  # a quarter of a second at 25 fps: the mouth moves on
    for m in ("mouth", "eyes"):
        assert np.isfinite(driver[m]).mean() > 0.9, f"the mesh misses the face ({m})"
        # Each image on its own: the same frames measure the same, nothing carried over.
        np.testing.assert_array_equal(driver[m], measured_again[m])
        # The driver against itself through the codec: the measure's own noise. The eyes'
        # is larger (a blink is a few pixels; frames 40-60 turn the head).
        ceiling = transfer_scores(driver[m], through_codec[m])
        assert ceiling["r"] > 0.75 and 0.8 < ceiling["spread"] < 1.25, (m, ceiling)
        # A face that does not move: 0, whatever the driver does.
        still = transfer_scores(driver[m], frozen[m])
        assert (still["r"], still["spread"]) == (0.0, 0.0), (m, still)
        # The same motion, late: the correlation drops well below the ceiling.
        late = transfer_scores(driver[m][lag:], driver[m][:-lag])
        assert late["r"] < ceiling["r"] - 0.3, (m, late, ceiling)
