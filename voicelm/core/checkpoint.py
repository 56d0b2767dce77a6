"""Checkpoint format shared by every part.

A part checkpoint is a directory holding
- `config.json`: `{"format_version": 1, "kind": "<part>", "config": {...model config...}}`
- `model.safetensors`: the weights, nothing else.
Training state (optimizer, step, RNG, EMA) is written apart, by the training harness, and
is only needed to resume. Writes are atomic: a directory or file is either complete or absent.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, TypeVar

import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

T = TypeVar("T")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says what is wrong and what to do."""


def atomic_write_dir(final: Path):
    """Context manager giving a temporary directory that replaces `final` on success."""
    return _AtomicDir(Path(final))


class _AtomicDir:
    def __init__(self, final: Path):
        self.final = final

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=self.final.parent, prefix=f".{self.final.name}.", suffix=".tmp"))
        os.chmod(self.tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = None
        if self.final.exists():
            old = self.final.with_name(f".{self.final.name}.old-{os.getpid()}")
            os.replace(self.final, old)
        os.replace(self.tmp, self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def atomic_write_file(path: str | os.PathLike, write) -> Path:
    """Call `write(tmp_path)` and move the result to `path` only if it succeeded."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give it a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def config_to_dict(config: Any) -> dict:
    if dataclasses.is_dataclass(config):
        return dataclasses.asdict(config)
    if isinstance(config, Mapping):
        return dict(config)
    raise TypeError(f"model config must be a dataclass or a mapping, got {type(config).__name__}")


def config_from_dict(cls: type[T], values: Mapping[str, Any], *, where: str = "config") -> T:
    """Build dataclass `cls` from a mapping, refusing unknown keys with a clear message."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise CheckpointError(
            f"{where} has keys {unknown} that {cls.__name__} does not know; it was written by a "
            f"different version or for a different part. Known keys: {sorted(names)}"
        )
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            value = values[f.name]
            # JSON has no tuples; dataclass fields declared as tuples get them back.
            if isinstance(value, list) and "tuple" in str(f.type):
                value = tuple(value)
            kwargs[f.name] = value
    return cls(**kwargs)


def save_part(
    directory: str | os.PathLike,
    kind: str,
    config: Any,
    state_dict: Mapping[str, torch.Tensor],
    *,
    dtype: torch.dtype | None = None,
    extra_files: Mapping[str, bytes | str] | None = None,
) -> Path:
    """Write a part checkpoint directory atomically.

    `dtype` casts floating-point tensors (e.g. torch.float16 for a shipped model); integer
    buffers keep their type. `extra_files` are written beside the weights (e.g. a text tokenizer).
    """
    directory = Path(directory)
    tensors = {}
    for name, tensor in state_dict.items():
        tensor = tensor.detach().cpu()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors[name] = tensor.contiguous()
    meta = {"format_version": FORMAT_VERSION, "kind": kind, "config": config_to_dict(config)}
    with atomic_write_dir(directory) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"kind": kind, "format_version": str(FORMAT_VERSION)})
        for name, content in (extra_files or {}).items():
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, str):
                target.write_text(content)
            else:
                target.write_bytes(content)
    return directory


def same_safetensors(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when two safetensors files hold the same tensors (names, dtypes, values) and metadata.

    Their bytes may still differ: the format's writer orders the metadata entries arbitrarily.
    A re-export keeps an unchanged file byte for byte with this (no new copy in git history)."""
    from safetensors import safe_open

    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        if fa.metadata() != fb.metadata() or set(fa.keys()) != set(fb.keys()):
            return False
        for name in fa.keys():
            x, y = fa.get_tensor(name), fb.get_tensor(name)
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
                return False
    return True


def read_part_config(directory: str | os.PathLike, kind: str) -> dict:
    """Return the model config stored in a part checkpoint, checking its kind and version."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a checkpoint directory (it does not exist or is a file)")
    config_path = directory / CONFIG_NAME
    if not config_path.exists():
        raise CheckpointError(
            f"{directory} has no {CONFIG_NAME}: it is not a voicelm {kind} checkpoint. Official "
            f"checkpoints must be converted first (voicelm convert ...)."
        )
    try:
        meta = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path} is not valid JSON ({exc}); the checkpoint is damaged") from None
    if not isinstance(meta, dict) or "config" not in meta or "kind" not in meta:
        raise CheckpointError(f"{config_path} lacks 'kind'/'config': not a voicelm checkpoint")
    if meta["kind"] != kind:
        raise CheckpointError(f"{directory} holds a {meta['kind']!r} checkpoint, expected a {kind!r} one")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{directory} has format_version {version!r}; this voicelm reads up to {FORMAT_VERSION}. "
            f"Upgrade voicelm."
        )
    return meta["config"]


def load_part(directory: str | os.PathLike, kind: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a part checkpoint: (model config dict, state dict)."""
    directory = Path(directory)
    config = read_part_config(directory, kind)
    weights = directory / WEIGHTS_NAME
    if not weights.exists():
        raise CheckpointError(f"{directory} has no {WEIGHTS_NAME}; the checkpoint is incomplete")
    try:
        state = load_file(str(weights))
    except Exception as exc:
        raise CheckpointError(f"{weights} cannot be read as safetensors ({exc}); the file is damaged") from None
    return config, state


def check_state_matches(expected: Mapping[str, Any], state: Mapping[str, torch.Tensor], *, where: str = "checkpoint") -> None:
    """Raise one CheckpointError explaining every key or shape mismatch between `state` and `expected`
    (a state dict, or any mapping of name -> object with `.shape`, e.g. meta tensors)."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    bad_shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or bad_shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[:3]})")
        if bad_shapes:
            parts.append(f"{len(bad_shapes)} shape mismatches (e.g. {bad_shapes[:3]})")
        raise CheckpointError(
            f"{where}: the weights do not match the model its config describes: " + "; ".join(parts)
            + ". The config and weights come from different models, or the file is damaged."
        )


def load_state_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], *, where: str = "checkpoint") -> None:
    """Load `state` into `module`, explaining any key or shape mismatch in one message.

    Tensors are cast to the module's dtype, so half-precision checkpoints load into float32 models.
    """
    expected = module.state_dict()
    check_state_matches(expected, state, where=where)
    cast = {k: v.to(expected[k].dtype) if v.is_floating_point() else v for k, v in state.items()}
    module.load_state_dict(cast, strict=True)
