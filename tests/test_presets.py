"""The presets of the three parts agree on the contracts a pipeline checks when it is assembled."""

import pytest

from voicelm.core.presets import load_preset


@pytest.mark.parametrize("preset", ["tiny", "demo", "glm4voice"])
def test_speech_vocabulary_agrees_across_parts(preset):
    codebook = load_preset("tokenizer", preset)["codebook_size"]
    assert load_preset("decoder", preset)["vocab_size"] == codebook
    assert load_preset("lm", preset)["speech_vocab_size"] == codebook


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(KeyError, match="tiny"):
        load_preset("tokenizer", "huge")
