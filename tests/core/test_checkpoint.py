"""Part checkpoints: exact round trips, clear CheckpointErrors, atomic writes."""

import dataclasses
import json

import pytest
import torch
from torch import nn

from voicelm.core.checkpoint import (
    CONFIG_NAME,
    FORMAT_VERSION,
    WEIGHTS_NAME,
    CheckpointError,
    atomic_write_dir,
    atomic_write_file,
    config_from_dict,
    load_part,
    load_state_strict,
    read_part_config,
    save_part,
)


@dataclasses.dataclass
class TinyConfig:
    width: int = 8
    depth: int = 2
    kernel: tuple[int, int] = (3, 5)


def tiny_model(config: TinyConfig) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(config.width, config.width) for _ in range(config.depth)]
    model = nn.Sequential(*layers)
    model.register_buffer("steps", torch.tensor([7, 8], dtype=torch.int64))
    return model


def test_round_trip_is_identical(tmp_path):
    config = TinyConfig()
    model = tiny_model(config)
    save_part(tmp_path / "part", "toy", config, model.state_dict(), extra_files={"vocab.txt": "a\nb\n"})
    loaded_config, state = load_part(tmp_path / "part", "toy")
    assert config_from_dict(TinyConfig, loaded_config) == config  # tuples come back as tuples
    assert state.keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(state[name], tensor) and state[name].dtype == tensor.dtype
    assert (tmp_path / "part" / "vocab.txt").read_text() == "a\nb\n"
    meta = json.loads((tmp_path / "part" / CONFIG_NAME).read_text())
    assert meta["format_version"] == FORMAT_VERSION and meta["kind"] == "toy"

    fresh = tiny_model(TinyConfig())
    for p in fresh.parameters():
        nn.init.zeros_(p)
    load_state_strict(fresh, state)
    x = torch.randn(3, config.width)
    assert torch.equal(fresh(x), model(x))


def test_half_precision_save_keeps_integer_buffers_and_loads_into_float32(tmp_path):
    model = tiny_model(TinyConfig())
    save_part(tmp_path / "half", "toy", TinyConfig(), model.state_dict(), dtype=torch.float16)
    _, state = load_part(tmp_path / "half", "toy")
    assert state["0.weight"].dtype == torch.float16 and state["steps"].dtype == torch.int64
    fresh = tiny_model(TinyConfig())
    load_state_strict(fresh, state)
    assert fresh[0].weight.dtype == torch.float32
    assert torch.allclose(fresh[0].weight, model[0].weight, atol=1e-3)


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_part(tmp_path / "nowhere", "toy")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=f"no {CONFIG_NAME}.*convert"):
        load_part(tmp_path / "empty", "toy")
    save_part(tmp_path / "part", "toy", TinyConfig(), tiny_model(TinyConfig()).state_dict())
    (tmp_path / "part" / WEIGHTS_NAME).unlink()
    with pytest.raises(CheckpointError, match=f"no {WEIGHTS_NAME}.*incomplete"):
        load_part(tmp_path / "part", "toy")


def test_damaged_files(tmp_path):
    save_part(tmp_path / "part", "toy", TinyConfig(), tiny_model(TinyConfig()).state_dict())
    (tmp_path / "part" / WEIGHTS_NAME).write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="damaged"):
        load_part(tmp_path / "part", "toy")
    (tmp_path / "part" / CONFIG_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_part_config(tmp_path / "part", "toy")


def test_wrong_kind(tmp_path):
    save_part(tmp_path / "part", "decoder", TinyConfig(), tiny_model(TinyConfig()).state_dict())
    with pytest.raises(CheckpointError, match="holds a 'decoder' checkpoint, expected a 'tokenizer'"):
        load_part(tmp_path / "part", "tokenizer")


def test_newer_format_version(tmp_path):
    save_part(tmp_path / "part", "toy", TinyConfig(), tiny_model(TinyConfig()).state_dict())
    path = tmp_path / "part" / CONFIG_NAME
    meta = json.loads(path.read_text())
    meta["format_version"] = FORMAT_VERSION + 1
    path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="Upgrade voicelm"):
        load_part(tmp_path / "part", "toy")


def test_unknown_config_keys():
    with pytest.raises(CheckpointError, match="does not know"):
        config_from_dict(TinyConfig, {"width": 4, "heads": 2})


def test_mismatched_shapes_and_keys(tmp_path):
    save_part(tmp_path / "part", "toy", TinyConfig(width=8), tiny_model(TinyConfig(width=8)).state_dict())
    _, state = load_part(tmp_path / "part", "toy")
    with pytest.raises(CheckpointError, match="shape mismatches.*file \\(8, 8\\) vs model \\(4, 4\\)"):
        load_state_strict(tiny_model(TinyConfig(width=4)), state, where="toy checkpoint")
    with pytest.raises(CheckpointError, match="missing 2 tensors"):
        load_state_strict(tiny_model(TinyConfig(depth=3)), state)
    with pytest.raises(CheckpointError, match="unexpected tensors"):
        load_state_strict(tiny_model(TinyConfig(depth=1)), state)


def test_failed_save_leaves_no_directory(tmp_path):
    state = {"weight": torch.zeros(2)}
    with pytest.raises(TypeError):
        save_part(tmp_path / "part", "toy", object(), state)  # config is not serialisable
    with pytest.raises(Exception):
        save_part(tmp_path / "part", "toy", TinyConfig(), {"weight": "not a tensor"})
    with pytest.raises(TypeError):
        save_part(tmp_path / "part", "toy", TinyConfig(), state, extra_files={"notes.txt": 42})
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_previous_checkpoint(tmp_path):
    model = tiny_model(TinyConfig())
    save_part(tmp_path / "part", "toy", TinyConfig(), model.state_dict())
    with pytest.raises(TypeError):
        save_part(tmp_path / "part", "toy", TinyConfig(), model.state_dict(), extra_files={"x": 1})
    _, state = load_part(tmp_path / "part", "toy")
    assert torch.equal(state["0.weight"], model.state_dict()["0.weight"])
    assert [p.name for p in tmp_path.iterdir()] == ["part"]


def test_atomic_dir_and_file_helpers(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_write_dir(tmp_path / "d") as tmp:
            (tmp / "half.bin").write_bytes(b"12")
            raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []

    def failing(path):
        open(path, "w").write("partial")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write_file(tmp_path / "f.txt", failing)
    assert list(tmp_path.iterdir()) == []
    atomic_write_file(tmp_path / "f.txt", lambda p: open(p, "w").write("done"))
    assert (tmp_path / "f.txt").read_text() == "done"


def test_same_safetensors_compares_tensors_and_metadata_not_bytes(tmp_path):
    from safetensors.torch import save_file

    from voicelm.core.checkpoint import same_safetensors

    tensors = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3, dtype=torch.float16)}
    meta = {"kind": "lm", "format_version": "1"}
    save_file(tensors, str(tmp_path / "a.safetensors"), metadata=meta)
    save_file(dict(reversed(list(tensors.items()))), str(tmp_path / "b.safetensors"), metadata=dict(reversed(list(meta.items()))))
    assert same_safetensors(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    changed = {**tensors, "w": tensors["w"].clone().index_fill_(1, torch.tensor([2]), 7.0)}
    for other, extra in ((changed, meta), ({**tensors, "b": tensors["b"].float()}, meta),
                         ({"w": tensors["w"]}, meta), (tensors, {"kind": "decoder", "format_version": "1"})):
        save_file(other, str(tmp_path / "c.safetensors"), metadata=extra)
        assert not same_safetensors(tmp_path / "a.safetensors", tmp_path / "c.safetensors")
