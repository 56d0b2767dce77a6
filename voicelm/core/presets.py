"""Model presets: `conf/<part>/<name>.yaml`, the same files hydra composes for training.

Inference never needs them (a checkpoint carries its config.json); they are for building a
model of a named geometry, e.g. `glm4voice` on the meta device or `tiny` in tests.
"""

from __future__ import annotations

from omegaconf import OmegaConf

from voicelm.core.paths import CONF_DIR


def preset_names(part: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / part).glob("*.yaml"))


def load_preset(part: str, name: str) -> dict:
    """The mapping stored in conf/<part>/<name>.yaml (interpolations resolved)."""
    path = CONF_DIR / part / f"{name}.yaml"
    if not path.exists():
        raise KeyError(f"no {part} preset {name!r}; known presets: {preset_names(part)}")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)
