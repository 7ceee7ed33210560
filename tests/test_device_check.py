"""bench/device_check.sh, the GPU machine's one command, in its CPU dry run.

`--prepare` packs a few real clips with their crop boxes (OpenCV decode, MediaPipe boxes) into
a folder; `--dry-run` then decodes them with OpenCV and crops with the prepared boxes, times
one frame of the shipped weights on the CPU and fine-tunes them for two steps through the real
trainer with the recipe a GPU session is to try (temporal and stillness losses on frame pairs,
frozen ImageNet source features), writing report.json/report.md and a checkpoint, all with PyAV
and MediaPipe blocked (the GPU machine has neither).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "clips"
SCRIPT = REPO / "bench" / "device_check.sh"

BLOCKER = """
import sys


class _NotOnTheGpuMachine:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("av", "mediapipe"):
            raise ImportError(f"{name} is blocked: the GPU check machine does not have it")
        return None


sys.meta_path.insert(0, _NotOnTheGpuMachine())
"""


@pytest.mark.skipif(
    not (DATA / "manifest.csv").is_file(),
    reason="the real clips (../shared/data/clips beside the checkout) are not here",
)
def test_prepare_then_dry_run(tmp_path):
    pytest.importorskip("cv2")
    pytest.importorskip("mediapipe", reason="--prepare finds the crop boxes with MediaPipe")
    prepared = tmp_path / "prepared"
    env = {**os.environ, "OUT": str(tmp_path / "prep_log"), "PYTHON": sys.executable}
    cmd = ["bash", str(SCRIPT), "--prepare", "--prepared", str(prepared), "--data", str(DATA)]
    result = subprocess.run(
        [*cmd, "--max-clips", "3", "--max-frames", "24"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert (prepared / "clips.tar").is_file()

    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    out = tmp_path / "out"
    env = {
        **os.environ,
        "OUT": str(out),
        "PYTHON": sys.executable,
        "PYTHONPATH": os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")]),
    }
    recipe = ["--loss", "temporal=20", "--loss", "stillness=100", "--source-features"]
    recipe += ["--keypoint-noise", "0.01"]
    result = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "--prepared", str(prepared), *recipe],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "finished in" in log and "fine-tune the shipped weights done" in log
    report = json.loads((out / "report.json").read_text())
    assert report["mode"].startswith("dry-run") and report["failures"] == []
    tuned = report["finetune"]
    assert tuned["steps"] == 2 and tuned["train_clips"] >= 1 and tuned["val_clips"] >= 1
    assert tuned["val_after"]["psnr"] > 10.0  # a real image came out, not noise or NaN
    assert tuned["batch_size"] == 2  # one temporal pair
    assert (tuned["loss_weights"]["temporal"], tuned["loss_weights"]["stillness"]) == (20, 100)
    assert {"temporal", "stillness"} <= tuned["last_losses"].keys()
    assert tuned["source_features"] is True
    assert tuned["keypoint_noise"] == 0.01
    from iwarp.checkpoint import Checkpoint

    tensors = Checkpoint(out / "finetuned.safetensors").state_dict()
    assert "source_features.stem.1.weight" in tensors and "source_key_proj.weight" in tensors
    assert (out / "finetuned.safetensors").stat().st_size > 1_000_000
    report_md = (out / "report.md").read_text()
    assert "Fine-tuning the shipped weights" in report_md
    assert (
        "temporal 20, stillness 100; frozen ImageNet source features; keypoint noise 0.01"
        in report_md
    )
    assert (out / "device_check.log").is_file()


def test_missing_preparation_is_a_clear_error(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "--prepared", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 2
    assert "--prepare" in result.stdout and "Traceback" not in result.stdout
