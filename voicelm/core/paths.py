"""Where the project keeps things on disk (relative to the repository: voicelm installs editable)."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "conf"  # hydra configs and model presets
# The pipeline directory the demo, server, chat and CLI tools load when given none: trained by
# the CPU demo recipe and shipped with the repository.
DEFAULT_PIPELINE = REPO_ROOT / "models" / "demo"
