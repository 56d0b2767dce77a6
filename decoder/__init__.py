"""Speech decoder: 12.5 Hz speech tokens -> 22.05 kHz waveform, streaming.

Public API: `SpeechDecoder` (decoder/model.py: flow + vocoder, offline `decode`, checkpoints) and
`StreamingDecoder` (decoder/streaming.py: push tokens, get waveform chunks). Imported lazily so
that `import decoder.hift` (or any submodule) does not load the others.
"""

_EXPORTS = {
    "SpeechDecoder": "decoder.model",
    "StreamingDecoder": "decoder.streaming",
    "FlowConfig": "decoder.flow",
    "FlowModel": "decoder.flow",
    "FlowInputError": "decoder.flow",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'decoder' has no attribute {name!r}")


__all__ = list(_EXPORTS)
