"""The voice LM: a GLM-4 causal LM over text + speech tokens answering in 13 text : 26 speech.

Public API (see docs/lm.md):
    Vocabulary, TextTokenizer, train_text_tokenizer, load_tiktoken_file
    VoiceLMConfig, VoiceLM (from_pretrained / save_pretrained)
    UserTurn, AssistantTurn, Turn, build_prompt, interleave, split_ids, render_ids
    SamplingOptions, GenEvent, VoiceLMGen
"""

from voicelm.lm.generate import GenEvent, GenerationError, SamplingOptions, VoiceLMGen
from voicelm.lm.model import VoiceLM, VoiceLMConfig, build_glm, count_parameters
from voicelm.lm.prompt import (SYSTEM_ASR, SYSTEM_SPEECH_INPUT, SYSTEM_TEXT_INPUT, SYSTEM_TTS, AssistantTurn,
                               PromptError, Turn, UserTurn, build_prompt, interleave, render_ids, split_ids)
from voicelm.lm.text_tokenizer import TextTokenizer, TextTokenizerError, load_tiktoken_file, train_text_tokenizer
from voicelm.lm.vocab import Vocabulary, VocabularyError

__all__ = [
    "AssistantTurn", "GenEvent", "GenerationError", "PromptError", "SYSTEM_ASR", "SYSTEM_SPEECH_INPUT",
    "SYSTEM_TEXT_INPUT", "SYSTEM_TTS", "SamplingOptions", "TextTokenizer", "TextTokenizerError", "Turn", "UserTurn",
    "VoiceLM", "VoiceLMConfig", "VoiceLMGen", "Vocabulary", "VocabularyError", "build_glm", "build_prompt",
    "count_parameters", "interleave", "load_tiktoken_file", "render_ids", "split_ids", "train_text_tokenizer",
]
