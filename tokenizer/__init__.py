"""Speech tokenizer: 16 kHz audio -> discrete speech tokens at 12.5 Hz.

    from tokenizer import SpeechTokenizer
    tok = SpeechTokenizer.from_pretrained("pipeline/tokenizer")
    ids = tok.encode(samples, sample_rate)           # LongTensor (ceil(seconds * 12.5),)
    stream = tok.stream(); stream.push(piece) ...; stream.flush()

See docs/tokenizer.md. Imports only `voicelm.core` from this project.
"""

from tokenizer.config import TokenizerConfig
from tokenizer.manifest_tokens import tokenize_manifest
from tokenizer.model import SpeechTokenizer, build_tokenizer
from tokenizer.streaming import TokenStream

__all__ = ["SpeechTokenizer", "TokenizerConfig", "TokenStream", "build_tokenizer", "tokenize_manifest"]
