"""bench/device_check.sh, the GPU machine's one command, in its CPU dry run.

The dry run runs the steps that need no CUDA (decoding and cropping the clips with OpenCV, one
frame of the shipped weights in a child process, validating the starting weights, fine-tuning
them for two steps through the real trainer and shipping its EMA) and reports every step, the
CUDA ones as skipped, with PyAV and MediaPipe blocked (the GPU machine has neither). Most
tests run it on a few clips made here, so they need neither the real clips nor MediaPipe:

- a step whose child process dies of SIGSEGV (`--inject-crash frame`) costs that step alone;
- a run killed mid-step (SIGTERM or SIGKILL) leaves a report of the steps that finished, the
  rest marked running or not run, and no child process behind;
- a bad `--finetune` path is one line and exit 2, before anything is spent; the report names
  the starting weights;
- the plugin's enqueue table keeps every case when one fails or the program crashes;
- the preflight refuses a tree and carry over the device tool's size limit.

With the real clips beside the checkout, `--prepare` then runs on 3 of them and the dry run
trains with issue 17's recipe.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import load_script

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "clips"
SCRIPT = REPO / "bench" / "device_check.sh"
STEPS = (
    "preflight",
    "build-op",
    "build-plugin",
    "clips",
    "correctness",
    "kernel-time",
    "plugin-enqueue",
    "frame",
    "tensorrt",
    "validate",
    "finetune",
)
CUDA_STEPS = ("build-op", "build-plugin", "correctness", "kernel-time", "plugin-enqueue")

BLOCKER = """
import sys


class _NotOnTheGpuMachine:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("av", "mediapipe"):
            raise ImportError(f"{name} is blocked: the GPU check machine does not have it")
        return None


sys.meta_path.insert(0, _NotOnTheGpuMachine())
"""


def _device_check():
    """bench/device_check.py as a module, for its functions."""
    return load_script(SCRIPT.with_suffix(".py"))


def _env(tmp_path: Path, out: Path) -> dict[str, str]:
    blocker = tmp_path / "blocker"
    blocker.mkdir(exist_ok=True)
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    pythonpath = os.pathsep.join(filter(None, [str(blocker), os.environ.get("PYTHONPATH")]))
    # TMPDIR: the run's scratch folder, which a killed run leaves behind, stays in tmp_path.
    return {
        **os.environ,
        "OUT": str(out),
        "PYTHON": sys.executable,
        "PYTHONPATH": pythonpath,
        "TMPDIR": str(tmp_path),
    }


def _dry_run(prepared: Path, tmp_path: Path, *options: str) -> subprocess.CompletedProcess:
    command = ["bash", str(SCRIPT), "--dry-run", "--prepared", str(prepared), *options]
    env = _env(tmp_path, tmp_path / "out")
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


def _statuses(out: Path) -> dict[str, str]:
    report = json.loads((out / "report.json").read_text())
    return {key: step["status"] for key, step in report["steps"].items()}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A folder as --prepare writes it, with three clips made here: slow pans over the shipped
    avatar photo, two for training and one for validation, each with its crop box."""
    cv2 = pytest.importorskip("cv2")
    folder = tmp_path_factory.mktemp("prepared")
    photo = cv2.resize(cv2.imread(str(REPO / "iwarp" / "assets" / "astronaut.jpg")), (160, 160))
    entries = []
    for split, name in (("train", "a.avi"), ("train", "b.avi"), ("val", "c.avi")):
        path = folder / "clips" / split / name
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (128, 128))
        for i in range(12):
            writer.write(photo[i : i + 128, 2 * i : 2 * i + 128])
        writer.release()
        entry = {"path": f"{split}/{name}", "split": split, "identity": name, "frames": 12}
        entries.append({**entry, "box": [64, 64, 120]})
    _device_check().write_clips_archive(folder, folder / "clips", entries, max_frames=12)
    return folder


@pytest.mark.slow
def test_dry_run_survives_a_crashed_step_and_ships_the_ema(prepared, tmp_path):
    """The frame step's child dies of SIGSEGV: that step is reported crashed, every other step
    still runs; the fine-tune ships the trainer's EMA, validated, from the named weights."""
    result = _dry_run(prepared, tmp_path, "--inject-crash", "frame")
    out = tmp_path / "out"
    log = result.stdout + result.stderr
    assert result.returncode == 1, log[-4000:]
    statuses = _statuses(out)
    assert statuses == {
        **dict.fromkeys(STEPS, "ok"),
        **dict.fromkeys(CUDA_STEPS, "skipped"),
        "tensorrt": "skipped",
        "frame": "crashed",
    }, log[-4000:]
    report = json.loads((out / "report.json").read_text())
    assert "SIGSEGV" in report["steps"]["frame"]["why"]
    assert report["failures"] == [f"frame: crashed: {report['steps']['frame']['why']}"]
    assert report["steps"]["preflight"]["data"]["carry"]["val_clips"] == 1

    tuned = report["steps"]["finetune"]["data"]
    assert tuned["steps"] == tuned["planned_steps"] == 2
    assert tuned["start"].startswith("the shipped weights (iwarp/assets/")
    assert tuned["shipped"] == "EMA (decay 0.999)"
    assert tuned["lr_first_last"][0] > tuned["lr_first_last"][1]  # the schedule decays
    assert tuned["val_after"]["psnr"] > 10.0  # a real image came out, not noise or NaN
    assert tuned["val_before"] == report["steps"]["validate"]["data"]["val"]

    from iwarp.checkpoint import Checkpoint, load_network

    shipped = Checkpoint(out / "finetuned.safetensors")
    tensors = shipped.state_dict()
    start, _ = load_network(None)
    moved = max(float((tensors[k] - p.detach()).abs().max()) for k, p in start.named_parameters())
    # Two Adam steps move the raw weights by at most ~4e-4 (twice the learning rate); the
    # EMA, warming up (decay 0.1 and 0.18 at steps 0 and 1, `EmaWeights.decay_at`), follows
    # them to ~90 % of that: weights two steps from the shipped ones, not new ones.
    assert shipped.step == 2 and 0 < moved < 1e-3, moved

    report_md = (out / "report.md").read_text()
    for step in report["steps"].values():
        assert f"| {step['title']} | {step['status']} |" in report_md
    assert "TensorRT is not installed on the lent GPU machine" in report_md
    assert "| PSNR dB |" in report_md and (out / "device_check.log").is_file()


def _run_processes_of(out: Path) -> list[int]:
    """The processes (the script's children included) whose environment names this OUT."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and f"OUT={out}\0".encode() in (proc / "environ").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_kill_mid_run_leaves_the_finished_steps(prepared, tmp_path, sig):
    """Killed while the frame step runs, as at the device tool's time limit: the report holds
    the finished steps' tables, says where the run stopped, and no child process survives."""
    out = tmp_path / "out"
    command = ["bash", str(SCRIPT), "--dry-run", "--prepared", str(prepared)]
    proc = subprocess.Popen(
        command,
        env=_env(tmp_path, out),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 180
    while not ((out / "report.json").is_file() and _statuses(out)["frame"] == "running"):
        assert proc.poll() is None and time.monotonic() < deadline, "the frame step never ran"
        time.sleep(0.05)
    os.killpg(proc.pid, sig)
    proc.wait(timeout=60)
    deadline = time.monotonic() + 30  # the last report is written, the child has ended
    while _run_processes_of(out) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _run_processes_of(out) == []

    statuses = _statuses(out)
    assert statuses["preflight"] == statuses["clips"] == "ok"
    assert statuses["frame"] == ("killed" if sig == signal.SIGTERM else "running")
    assert statuses["validate"] == statuses["finetune"] == "not run"
    report_md = (out / "report.md").read_text()
    assert "## Decode the clips (OpenCV, prepared crop boxes)" in report_md
    assert "| Fine-tuning | not run |" in report_md


def test_a_bad_finetune_path_is_a_one_line_error(prepared, tmp_path):
    missing = tmp_path / "nowhere.safetensors"
    result = _dry_run(prepared, tmp_path, "--finetune", str(missing))
    log = result.stdout + result.stderr
    assert result.returncode == 2, log[-3000:]
    errors = [line for line in log.splitlines() if line.startswith("device_check: ")]
    assert len(errors) == 1 and str(missing) in errors[0] and "not found" in errors[0], errors
    assert "Traceback" not in log
    statuses = _statuses(tmp_path / "out")
    assert statuses == {**dict.fromkeys(STEPS, "not run"), "preflight": "failed"}


def test_missing_preparation_is_a_clear_error(tmp_path):
    result = _dry_run(tmp_path / "nothing", tmp_path)
    assert result.returncode == 2
    assert "--prepare" in result.stdout and "Traceback" not in result.stdout


def test_plugin_table_keeps_every_case():
    """One failed enqueue case, a crash or the time limit: every case run stays in the table."""
    device_check = _device_check()
    stdout = "\n".join(
        [
            "ok   one creator",
            "FAIL a 3-D mask refused",
            "ok   enqueue fp32 B=2 Nq=100 Nk=90 d=64 dv=320 masked: rel. error 1.0e-06 (tol 1e-04)",
            "FAIL enqueue fp16 B=1 Nq=1024 Nk=1056 d=64 dv=134: rel. error 2.0e-01 (tol 5e-03), "
            "0.0123 ms/enqueue",
            "ok   enqueue fp32 B=1 Nq=1024 Nk=1056 d=64 dv=134: rel. error 1.0e-06 (tol 1e-04), "
            "0.0456 ms/enqueue",
        ]
    )
    status, why, outcome = device_check.enqueue_outcome(stdout + "\n3 passed, 2 failed", 1)
    assert (status, why) == ("failed", "2 check(s) failed (exit 1)")
    assert [c["ok"] for c in outcome.data["cases"]] == [True, False, True]
    assert outcome.data["cases"][2]["ms"] == 0.0456
    assert "| enqueue fp16 B=1 Nq=1024 Nk=1056 d=64 dv=134 | FAIL | 2.0e-01 | 0.0123 |" in (
        outcome.rows
    )
    assert outcome.data["interface_failures"] == ["a 3-D mask refused"]
    status, why, outcome = device_check.enqueue_outcome(stdout, -signal.SIGSEGV)
    assert (status, why) == ("crashed", "killed by SIGSEGV after 3 case(s)")
    assert len(outcome.data["cases"]) == 3
    assert device_check.enqueue_outcome(stdout, None)[0] == "timed out"


def test_preflight_refuses_a_tree_and_carry_over_the_limit(prepared, tmp_path, monkeypatch):
    device_check = _device_check()
    monkeypatch.setattr(device_check, "CARRY_LIMIT_BYTES", 1000)
    argv = ["--dry-run", "--prepared", str(prepared), "--out", str(tmp_path)]
    facts, problems = device_check.preflight(device_check.parse_args(argv), cuda=False)
    sizes = facts["tree_and_carry_bytes"]
    if sizes is None:
        pytest.skip("git cannot list the tree here")
    assert sizes["carry"] == sum(p.stat().st_size for p in prepared.rglob("*") if p.is_file())
    assert sizes["tree"] > 1_000_000 and sizes["total"] == sizes["tree"] + sizes["carry"]
    over = [p for p in problems if "over the device tool's" in p]
    assert len(over) == 1 and f"{sizes['total'] / 2**20:.1f} MiB" in over[0], problems


def test_the_report_names_the_starting_weights(tmp_path):
    device_check = _device_check()
    start = tmp_path / "phase3.safetensors"
    shutil.copy(REPO / "iwarp" / "assets" / "tiny.safetensors", start)
    shipped = device_check.parse_args(["--dry-run"])
    assert device_check.starting_weights(shipped).startswith(
        "the shipped weights (iwarp/assets/tiny.safetensors, step "
    )
    named = device_check.parse_args(["--dry-run", "--finetune", str(start)])
    assert device_check.starting_weights(named).startswith(f"--finetune {start} ({start}, step ")


@pytest.mark.slow
@pytest.mark.skipif(
    not (DATA / "manifest.csv").is_file(),
    reason="the real clips (../shared/data/clips beside the checkout) are not here",
)
def test_prepare_then_dry_run_with_the_gpu_recipe(tmp_path):
    """--prepare on 3 real clips (OpenCV decode, MediaPipe boxes), then the dry run with the
    recipe a GPU session is to try (temporal and stillness losses on frame pairs, keypoint
    noise, frozen ImageNet source features)."""
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

    recipe = ["--loss", "temporal=20", "--loss", "stillness=100", "--source-features"]
    result = _dry_run(prepared, tmp_path, *recipe, "--keypoint-noise", "0.01")
    out = tmp_path / "out"
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert set(_statuses(out).values()) == {"ok", "skipped"}
    tuned = json.loads((out / "report.json").read_text())["steps"]["finetune"]["data"]
    assert tuned["steps"] == 2 and tuned["train_clips"] >= 1 and tuned["val_clips"] >= 1
    assert tuned["batch_size"] == 2  # one temporal pair
    assert (tuned["loss_weights"]["temporal"], tuned["loss_weights"]["stillness"]) == (20, 100)
    assert {"temporal", "stillness"} <= tuned["last_losses"].keys()
    assert tuned["source_features"] is True and tuned["keypoint_noise"] == 0.01
    from iwarp.checkpoint import Checkpoint

    tensors = Checkpoint(out / "finetuned.safetensors").state_dict()
    assert "source_features.stem.1.weight" in tensors and "source_key_proj.weight" in tensors
    assert (
        "temporal 20, stillness 100; frozen ImageNet source features; keypoint noise 0.01"
        in (out / "report.md").read_text()
    )
