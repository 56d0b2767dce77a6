"""`voicelm convert glm4voice-decoder SRC OUT`: the released glm-4-voice-decoder -> a voicelm decoder.

SRC holds `config.yaml` (HyperPyYAML: `!new:` class tags, `!ref` links), `flow.pt` and `hift.pt`
(pickled state dicts, read with `torch.load(weights_only=True)`: no code from the file runs).
OUT becomes a `decoder` part directory (SpeechDecoder.from_pretrained), written atomically.

Flow weights keep their names except one prefix (`FLOW_RENAMES`): our modules are named after the
official ones on purpose. Sizes are read from the weights' shapes; what shapes cannot tell (heads,
block size, flow-matching constants) comes from config.yaml. HiFT weights go through the vocoder's
own `decoder.hift.convert_official_hift_state_dict`.

Differences from the official runtime, by design: frame i of the upsampled encoder output takes
the token that owns it under exact 441/64 arithmetic (the official `F.interpolate` nearest rounds
through the float ratio of the two lengths: at most one frame of difference at token edges).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml

from decoder.flow import FlowConfig
from decoder.model import SpeechDecoder
from voicelm.core.checkpoint import CheckpointError

# official prefix -> ours, applied in order to every key of flow.pt
FLOW_RENAMES: tuple[tuple[str, str], ...] = (
    ("module.", ""),  # a file saved from a DDP-wrapped model
    ("decoder.estimator.", "estimator."),
)


# --- config.yaml ------------------------------------------------------------------------------
class _HyperPyYamlLoader(yaml.SafeLoader):
    """Reads HyperPyYAML as plain data: `!new:pkg.Class` mappings get a `__class__` key,
    `!ref <name>` becomes the referenced top-level value (resolved afterwards), other tags strings."""


def _construct_tagged(loader: yaml.SafeLoader, tag_suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        value = loader.construct_mapping(node, deep=True)
        value["__class__"] = tag_suffix
        return value
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    scalar = loader.construct_scalar(node)
    if tag_suffix.startswith("ref"):
        return {"__ref__": scalar}
    return scalar


_HyperPyYamlLoader.add_multi_constructor("!", _construct_tagged)


def _resolve_refs(value: Any, top: Mapping[str, Any]) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__ref__"}:
            name = str(value["__ref__"]).strip().strip("<>")
            return _resolve_refs(top.get(name), top)
        return {k: _resolve_refs(v, top) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_refs(v, top) for v in value]
    return value


def read_official_config(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(), Loader=_HyperPyYamlLoader)
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{path} is not readable YAML ({exc}); is this the decoder's config.yaml?") from None
    if not isinstance(raw, dict) or "flow" not in raw:
        raise CheckpointError(f"{path} has no `flow` section: not a glm-4-voice-decoder config.yaml")
    return _resolve_refs(raw, raw)


# --- weights ----------------------------------------------------------------------------------
def load_official_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise CheckpointError(f"{path} not found: SRC must hold config.yaml, flow.pt and hift.pt "
                              f"(the THUDM/glm-4-voice-decoder files)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors of every kind: unsafe globals, truncated files, ...
        raise CheckpointError(f"{path} cannot be read as a plain PyTorch state dict ({exc})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return state


def convert_official_flow_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    converted = {}
    for key, value in state.items():
        for old, new in FLOW_RENAMES:
            if key.startswith(old):
                key = new + key[len(old):]
        converted[key] = value
    if "input_embedding.weight" not in converted or "encoder_proj.weight" not in converted:
        raise CheckpointError("flow.pt has no input_embedding/encoder_proj weights: not a MaskedDiffWithXvec flow")
    return converted


def infer_flow_config(state: Mapping[str, torch.Tensor], official: Mapping[str, Any] | None) -> FlowConfig:
    """FlowConfig from (converted) weight shapes, plus config.yaml for what shapes do not show."""
    def count(prefix: str) -> int:
        return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})

    flow_yaml = dict((official or {}).get("flow") or {})
    encoder_yaml = dict(flow_yaml.get("encoder") or {})
    cfm_yaml = dict(flow_yaml.get("decoder") or {})
    cfm_params = dict(cfm_yaml.get("cfm_params") or {})
    cfm_params = dict(cfm_params.get("content", cfm_params))  # !new:omegaconf.DictConfig {content: {...}}
    estimator_yaml = dict(cfm_yaml.get("estimator") or {})
    regulator_yaml = dict(flow_yaml.get("length_regulator") or {})
    defaults = FlowConfig()

    vocab_size, input_size = state["input_embedding.weight"].shape
    n_mels, spk_dim = state["spk_embed_affine_layer.weight"].shape
    encoder_dim = state["encoder.after_norm.weight"].shape[0]
    heads = int(encoder_yaml.get("attention_heads", state["encoder.encoders.0.self_attn.pos_bias_u"].shape[0]))
    down_levels = count("estimator.down_blocks.")
    channels = tuple(int(state[f"estimator.down_blocks.{i}.0.res_conv.weight"].shape[0]) for i in range(down_levels))
    head_dim = int(estimator_yaml.get("attention_head_dim", defaults.unet_head_dim))
    inner = state["estimator.down_blocks.0.1.0.attn1.to_q.weight"].shape[0]
    unet_heads = int(estimator_yaml.get("num_heads", inner // head_dim))
    if unet_heads * head_dim != inner:
        raise CheckpointError(f"estimator attention is {inner} wide, config.yaml says {unet_heads} heads x {head_dim}")
    regulator_groups = regulator_yaml.get("groups", 1)
    return FlowConfig(
        vocab_size=int(vocab_size), n_mels=int(n_mels), spk_embed_dim=int(spk_dim), input_size=int(input_size),
        encoder_dim=int(encoder_dim), encoder_heads=heads,
        encoder_ffn=int(state["encoder.encoders.0.feed_forward.w_1.weight"].shape[0]),
        encoder_layers=count("encoder.encoders."),
        block_size=int(encoder_yaml.get("block_size", defaults.block_size)),
        encoder_dropout=float(encoder_yaml.get("dropout_rate", defaults.encoder_dropout)),
        regulator_layers=(count("length_regulator.model.") - 1) // 2,  # conv + norm per layer (Mish has no weights)
        regulator_groups=int(regulator_groups),
        unet_channels=channels, unet_blocks=count("estimator.down_blocks.0.1."),
        unet_mid_blocks=count("estimator.mid_blocks."), unet_heads=unet_heads, unet_head_dim=head_dim,
        unet_dropout=float(estimator_yaml.get("dropout", defaults.unet_dropout)),
        frame_local_norm=False,
        sigma_min=float(cfm_params.get("sigma_min", defaults.sigma_min)),
        t_scheduler=str(cfm_params.get("t_scheduler", defaults.t_scheduler)),
        training_cfg_rate=float(cfm_params.get("training_cfg_rate", defaults.training_cfg_rate)),
        inference_cfg_rate=float(cfm_params.get("inference_cfg_rate", defaults.inference_cfg_rate)),
    )


def hift_overrides(official: Mapping[str, Any] | None) -> dict[str, Any]:
    """HiFTConfig fields that config.yaml states and weights cannot show (strides, NSF constants)."""
    hift = dict((official or {}).get("hift") or {})
    overrides: dict[str, Any] = {}
    for ours, theirs in (("upsample_rates", "upsample_rates"), ("nsf_alpha", "nsf_alpha"), ("nsf_sigma", "nsf_sigma"),
                         ("nsf_voiced_threshold", "nsf_voiced_threshold"), ("sampling_rate", "sampling_rate"),
                         ("audio_limit", "audio_limit"), ("lrelu_slope", "lrelu_slope")):
        if hift.get(theirs) is not None:
            overrides[ours] = hift[theirs]
    istft = hift.get("istft_params") or {}
    if istft.get("hop_len") is not None:
        overrides["istft_hop_length"] = istft["hop_len"]
    for ours, theirs in (("resblock_dilation_sizes", "resblock_dilation_sizes"),
                         ("source_resblock_dilation_sizes", "source_resblock_dilation_sizes")):
        if hift.get(theirs) is not None:
            overrides[ours] = hift[theirs]
    return overrides


def convert_glm4voice_decoder(src: str | os.PathLike, out: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Convert SRC (config.yaml, flow.pt, hift.pt) into the decoder part directory OUT."""
    from decoder.hift import HiFTGenerator, convert_official_hift_state_dict, infer_hift_config
    from voicelm.core.checkpoint import load_state_strict

    src = Path(src)
    if not src.is_dir():
        raise CheckpointError(f"{src} is not a directory; pass the glm-4-voice-decoder folder (config.yaml, flow.pt, hift.pt)")
    config_path = src / "config.yaml"
    if not config_path.exists():
        raise CheckpointError(f"{config_path} not found: SRC must hold config.yaml, flow.pt and hift.pt")
    official = read_official_config(config_path)
    flow_state = convert_official_flow_state_dict(load_official_weights(src / "flow.pt"))
    flow_config = infer_flow_config(flow_state, official)
    hift_state = convert_official_hift_state_dict(load_official_weights(src / "hift.pt"))
    vocoder = HiFTGenerator(infer_hift_config(hift_state, **hift_overrides(official)))

    decoder = SpeechDecoder(flow_config, vocoder)
    state = {f"flow.{k}": v for k, v in flow_state.items()}
    state.update({f"vocoder.{k}": v for k, v in hift_state.items()})
    load_state_strict(decoder, state, where=f"{src} (converted)")
    return decoder.save_pretrained(out, dtype=dtype)


# --- command line -------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="glm-4-voice-decoder directory: config.yaml, flow.pt, hift.pt")
    parser.add_argument("out", help="output decoder directory (config.json + model.safetensors)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                        help="weight precision in the output (default float32)")


def main(args: argparse.Namespace) -> int:
    dtype = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    try:
        out = convert_glm4voice_decoder(args.src, args.out, dtype=dtype)
    except CheckpointError as exc:
        print(f"voicelm convert glm4voice-decoder: {exc}")
        return 1
    print(f"wrote {out} (speech vocabulary {SpeechDecoder.read_vocab_size(out)})")
    return 0


