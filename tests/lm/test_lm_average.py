"""`voicelm lm average`: weighted checkpoint averages, and clear refusals."""

import pytest
import torch

from voicelm.cli import main as cli
from voicelm.lm import VoiceLM
from voicelm.lm.average import AverageError, average_lms


def test_average_is_the_weighted_mean_and_the_command_writes_it(tiny_config, tokenizer, tmp_path):
    a = VoiceLM.random(tiny_config, tokenizer, seed=0)
    b = VoiceLM.random(tiny_config, tokenizer, seed=1)
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    mixed = average_lms([tmp_path / "a", tmp_path / "b"], [3, 1])   # weights are normalised
    sa, sb = a.model.state_dict(), b.model.state_dict()
    for k, v in mixed.model.state_dict().items():
        assert torch.allclose(v, 0.75 * sa[k] + 0.25 * sb[k], atol=1e-6), k
    assert not torch.equal(mixed.model.state_dict()["lm_head.weight"], sa["lm_head.weight"])
    # the command: equal weights by default, half precision on request, loads back
    assert cli(["lm", "average", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "ab"),
                "--dtype", "float16"]) == 0
    back = VoiceLM.from_pretrained(tmp_path / "ab")
    assert back.model.dtype == torch.float16 and back.config == a.config
    assert torch.allclose(back.model.state_dict()["lm_head.weight"].float(),
                          (sa["lm_head.weight"] + sb["lm_head.weight"]) / 2, atol=1e-3)
    # without --dtype the first checkpoint's storage dtype is kept
    assert cli(["lm", "average", str(tmp_path / "ab"), str(tmp_path / "a"), "--out", str(tmp_path / "aba")]) == 0
    assert VoiceLM.from_pretrained(tmp_path / "aba").model.dtype == torch.float16


def test_average_refuses_what_cannot_be_averaged(tiny_config, tokenizer, tmp_path):
    from voicelm.lm import VoiceLMConfig, train_text_tokenizer

    VoiceLM.random(tiny_config, tokenizer, seed=0).save_pretrained(tmp_path / "a")
    wider = VoiceLMConfig.from_preset("tiny", text_vocab_size=tokenizer.vocab_size, hidden_size=tiny_config.hidden_size * 2)
    VoiceLM.random(wider, tokenizer, seed=0).save_pretrained(tmp_path / "wide")
    with pytest.raises(AverageError, match="config differs"):
        average_lms([tmp_path / "a", tmp_path / "wide"])
    other = train_text_tokenizer(["a completely different corpus of words"] * 20, tokenizer.vocab_size)
    VoiceLM.random(tiny_config, other, seed=0).save_pretrained(tmp_path / "tok")
    with pytest.raises(AverageError, match="text tokenizer differs"):
        average_lms([tmp_path / "a", tmp_path / "tok"])
    with pytest.raises(AverageError, match="one weight per checkpoint"):
        average_lms([tmp_path / "a", tmp_path / "a"], [1.0])
    with pytest.raises(AverageError, match="at least two"):
        average_lms([tmp_path / "a"])
    # an existing --out is refused before anything is read or written
    with pytest.raises(SystemExit, match="already exists"):
        cli(["lm", "average", str(tmp_path / "a"), str(tmp_path / "a"), "--out", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match="config differs"):
        cli(["lm", "average", str(tmp_path / "a"), str(tmp_path / "wide"), "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
