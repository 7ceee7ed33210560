"""Tests for iwarp.checkpoint: real safetensors files in tmp_path, no mocks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_model import small_config as model_small_config

from iwarp.checkpoint import Checkpoint, file_sha256, load_network, save_checkpoint
from iwarp.config import Config, ModelConfig
from iwarp.errors import CheckpointError
from iwarp.model import ImplicitWarpingNetwork


def small_model_config(**overrides) -> ModelConfig:
    """test_model's small network at 32 px."""
    return model_small_config(**{"image_size": 32, **overrides})


def small_config(**overrides) -> Config:
    return Config(name="test", model=small_model_config(**overrides))


def make_net(config: Config, seed: int = 0) -> ImplicitWarpingNetwork:
    torch.manual_seed(seed)
    return ImplicitWarpingNetwork(config.model)


def train_a_little(net: ImplicitWarpingNetwork, opt: torch.optim.Optimizer, steps: int = 2):
    g = torch.Generator().manual_seed(5)
    size = net.config.image_size
    for _ in range(steps):
        src = torch.rand(2, 2, 3, size, size, generator=g)
        drv = torch.rand(2, 3, size, size, generator=g)
        loss = (net(src, drv)[0] - drv).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def assert_state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, Config, ImplicitWarpingNetwork]:
    config = small_config()
    net = make_net(config)
    # Non-trivial BatchNorm buffers, so the round trip covers buffers as well as parameters.
    net.train()(torch.rand(2, 1, 3, 32, 32), torch.rand(2, 3, 32, 32))
    path = save_checkpoint(tmp_path / "run" / "ckpt.safetensors", config, net, step=17)
    return path, config, net


def test_round_trip_weights_step_config(saved) -> None:
    path, config, net = saved
    assert path.is_file()
    assert not path.with_name(path.name + ".tmp").exists()  # the temp file was renamed away
    ckpt = Checkpoint(path)
    assert ckpt.step == 17
    assert ckpt.config == config
    assert ckpt.metadata["format"] == "iwarp/1"

    fresh = make_net(config, seed=1)
    assert not torch.equal(fresh.generator.out.weight, net.generator.out.weight)
    ckpt.load_module(fresh)
    assert_state_equal(fresh.state_dict(), net.state_dict())
    assert ckpt.sha256() == file_sha256(path) and len(ckpt.sha256()) == 64


def test_load_network_builds_from_stored_config(saved) -> None:
    path, config, net = saved
    loaded, _ = load_network(path)
    assert not loaded.training
    assert loaded.config == config.model
    src, drv = torch.rand(1, 2, 3, 32, 32), torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(src, drv)[0], net.eval()(src, drv)[0], rtol=0, atol=0)


def test_extra_and_modules_round_trip(tmp_path: Path) -> None:
    config = small_config()
    net = make_net(config)
    side = torch.nn.Linear(3, 2)
    path = save_checkpoint(
        tmp_path / "c.safetensors",
        config,
        net,
        modules={"side": side},
        extra={"best_val": 0.25, "note": "x"},
    )
    ckpt = Checkpoint(path)
    assert ckpt.extra == {"best_val": 0.25, "note": "x"}
    other = torch.nn.Linear(3, 2)
    ckpt.load_module(other, "side")
    assert_state_equal(other.state_dict(), side.state_dict())


def test_mismatched_config_raises_readable_error(saved) -> None:
    path, _, _ = saved
    other = ImplicitWarpingNetwork(small_model_config(attn_dim=32))  # saved: 16
    with pytest.raises(CheckpointError) as info:
        Checkpoint(path).load_module(other)
    message = str(info.value)
    assert "\n" not in message  # one line, not torch's multi-line dump
    assert str(path) in message and "does not match" in message
    assert len(message) < 600


def test_missing_keys_raise(saved) -> None:
    path, _, _ = saved
    with pytest.raises(CheckpointError, match="does not match"):
        Checkpoint(path).load_module(make_net(small_config(residual_branch=True)), "nothing")


def test_truncated_file_raises(saved) -> None:
    path, _, _ = saved
    data = path.read_bytes()
    for keep in (len(data) // 2, 7):
        path.write_bytes(data[:keep])
        with pytest.raises(CheckpointError, match="not a readable"):
            Checkpoint(path)


def test_garbage_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"this is not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError):
        Checkpoint(path)


def test_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        Checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        load_network(tmp_path / "nope.safetensors")


def test_file_without_config_raises(tmp_path: Path) -> None:
    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, str(path), metadata={"format": "other"})
    with pytest.raises(CheckpointError, match="no iwarp config"):
        Checkpoint(path)


def test_config_from_newer_iwarp_raises(tmp_path: Path) -> None:
    config = small_config()
    data = config.to_dict()
    data["model"]["future_option"] = 1
    path = tmp_path / "future.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata={"config": json.dumps(data)})
    with pytest.raises(CheckpointError, match="future_option"):
        Checkpoint(path)


def test_optimizer_state_round_trip(tmp_path: Path) -> None:
    config = small_config()
    net = make_net(config)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.5, 0.999))
    train_a_little(net, opt)
    path = save_checkpoint(tmp_path / "c.safetensors", config, net, 2, optimizers={"g": opt})

    net2 = make_net(config, seed=1)
    opt2 = torch.optim.Adam(net2.parameters(), lr=0.5, betas=(0.9, 0.9))
    ckpt = Checkpoint(path)
    ckpt.load_module(net2)
    ckpt.load_optimizer("g", opt2)

    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["state"].keys() == s2["state"].keys() and len(s1["state"]) > 0
    for idx in s1["state"]:
        for key, value in s1["state"][idx].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(s2["state"][idx][key])), (
                idx,
                key,
            )
    g1, g2 = s1["param_groups"][0], s2["param_groups"][0]
    assert g2["lr"] == 1e-3 and tuple(g2["betas"]) == (0.5, 0.999)
    assert g1["params"] == g2["params"]

    # The proof that matters: one more step on each gives identical weights.
    train_a_little(net, opt, steps=1)
    train_a_little(net2, opt2, steps=1)
    assert_state_equal(net.state_dict(), net2.state_dict())


def test_missing_optimizer_state_raises(saved) -> None:
    path, config, _ = saved
    net = make_net(config)
    with pytest.raises(CheckpointError, match="no optimiser state"):
        Checkpoint(path).load_optimizer("generator", torch.optim.Adam(net.parameters()))
