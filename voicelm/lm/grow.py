"""`voicelm lm grow`: a deeper copy of an LM that computes exactly what the original computes.

Fine-tuning a trained LM for more capacity is cheaper than training a bigger one from scratch.
The new decoder layers are spread evenly through the stack; each starts as a copy of the layer
below it, with its two output projections (attention `o_proj`, MLP `down_proj`; neither has a
bias) set to zero. transformers' GLM layer is pre-norm (`x + attn(norm(x))`, then
`x + mlp(norm(x))`), so such a layer adds nothing to the residual stream and the grown model's
logits equal the original's. The zeroed projections get gradients from the first step (their
inputs are the copied layer's working activations), so the new layers start learning at once.

    voicelm lm grow models/demo/voicelm --layers 12 --out runs/lm-grown [--dtype float32]
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import torch

from voicelm.core.averaging import DTYPES, refuse_existing_out
from voicelm.lm.model import VoiceLM, build_glm, count_parameters

ZEROED = ("self_attn.o_proj.weight", "mlp.down_proj.weight")


class GrowError(ValueError):
    """The requested growth cannot be made (the message says why)."""


def new_layer_sources(old: int, new: int) -> list[int | None]:
    """For each layer of the grown stack, the old layer it copies as is (an int), or None for an
    inserted layer (which copies the layer before it, output projections zeroed). The inserted
    layers are spread evenly: with 8 -> 12, one after every second old layer."""
    if old < 1:
        raise GrowError(f"the model has {old} layers; there is nothing to grow from")
    if new <= old:
        raise GrowError(f"--layers {new} is not more than the model's {old} layers; ask for a deeper model")
    extra = new - old
    # old layer i is followed by the inserted layers numbered floor((i+1)*extra/old) - floor(i*extra/old)
    sources: list[int | None] = []
    for i in range(old):
        sources.append(i)
        sources.extend([None] * ((i + 1) * extra // old - i * extra // old))
    return sources


def grow_lm(lm: VoiceLM, num_layers: int) -> VoiceLM:
    """A `num_layers`-deep VoiceLM (float32) whose logits equal `lm`'s; `lm` is not changed."""
    sources = new_layer_sources(lm.config.num_layers, num_layers)
    config = dataclasses.replace(lm.config, num_layers=num_layers)
    # a float32 scratch model in eval mode; every weight is replaced below (no reseeding of the global RNG)
    grown = VoiceLM(config, build_glm(config), lm.text_tokenizer)
    old_state = {k: v.detach().float() for k, v in lm.model.state_dict().items()}
    prefix = "model.layers."
    state = {k: v.clone() for k, v in old_state.items() if not k.startswith(prefix)}
    copied_from = -1
    for new_index, source in enumerate(sources):
        inserted = source is None
        copied_from = copied_from if inserted else source
        for key, value in old_state.items():
            if not key.startswith(f"{prefix}{copied_from}."):
                continue
            name = key[len(f"{prefix}{copied_from}."):]
            value = value.clone()
            if inserted and name in ZEROED:
                value.zero_()
            state[f"{prefix}{new_index}.{name}"] = value
    grown.load_state(state, where=f"grown {lm.config.num_layers} -> {num_layers} layers")
    return grown


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="LM part directory (config.json, model.safetensors)")
    parser.add_argument("--layers", type=int, required=True, help="decoder layers of the grown model (more than now)")
    parser.add_argument("--out", required=True, help="directory to write; must not exist")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="dtype of the written weights (default float32, to train from)")


def main(args: argparse.Namespace) -> int:
    out = refuse_existing_out("voicelm lm grow", args.out)
    if not os.path.isdir(args.checkpoint):
        raise SystemExit(f"voicelm lm grow: {args.checkpoint} is not a directory; give an LM part directory "
                         f"(config.json, model.safetensors), e.g. models/demo/voicelm")
    lm = VoiceLM.from_pretrained(args.checkpoint, dtype=torch.float32)
    try:
        grown = grow_lm(lm, args.layers)
    except GrowError as exc:
        raise SystemExit(f"voicelm lm grow: {exc}") from None
    grown.save_pretrained(out, dtype=DTYPES[args.dtype])
    added = count_parameters(grown.model) - count_parameters(lm.model)
    print(f"grew {args.checkpoint} from {lm.config.num_layers} to {args.layers} layers (+{added / 1e6:.1f} M "
          f"parameters, the function unchanged) into {out} ({args.dtype})")
    inserted = [i for i, source in enumerate(new_layer_sources(lm.config.num_layers, args.layers)) if source is None]
    print(f"inserted layers {inserted}: to train them faster than the rest, fine-tune with "
          f"solver.init_from={out} solver.lr_scale_layers=[{','.join(map(str, inserted))}] solver.layers_lr_scale=20")
    return 0
