"""voicelm: end-to-end spoken dialogue models in the style of GLM-4-Voice."""

from voicelm.core.paths import DEFAULT_PIPELINE

__version__ = "0.1.0"


def __getattr__(name):
    # Imported on first use so `import voicelm` (and `voicelm --help`) stays light.
    if name in ("load_pipeline", "Pipeline"):
        from voicelm import pipeline

        return getattr(pipeline, name)
    if name == "Session":
        from voicelm.session import Session

        return Session
    raise AttributeError(f"module 'voicelm' has no attribute {name!r}")
