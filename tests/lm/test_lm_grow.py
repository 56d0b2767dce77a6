"""`voicelm lm grow`: a deeper LM that computes what the original does, and can then learn."""

import pytest
import torch

from voicelm.cli import main as cli
from voicelm.lm import VoiceLM
from voicelm.lm.grow import GrowError, grow_lm, new_layer_sources


def _ids(lm, length=24, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, lm.config.vocab_size, (2, length), generator=g)


def test_inserted_layers_are_spread_through_the_stack():
    assert new_layer_sources(8, 12) == [0, 1, None, 2, 3, None, 4, 5, None, 6, 7, None]
    assert new_layer_sources(2, 3) == [0, 1, None]
    assert new_layer_sources(2, 6) == [0, None, None, 1, None, None]
    assert sum(s is None for s in new_layer_sources(8, 13)) == 5


def test_grown_lm_gives_the_same_logits_and_its_new_layers_can_learn(tiny_lm):
    old = tiny_lm.config.num_layers
    grown = grow_lm(tiny_lm, old + 2)
    assert grown.config.num_layers == old + 2 and len(grown.model.model.layers) == old + 2
    ids = _ids(tiny_lm)
    with torch.no_grad():
        want = tiny_lm.model(ids).logits
        got = grown.model(ids).logits
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    # one step of training moves the inserted layers' zeroed projections off zero
    inserted = [i for i, s in enumerate(new_layer_sources(old, old + 2)) if s is None]
    grown.model.train()
    optimizer = torch.optim.SGD(grown.model.parameters(), lr=0.1)
    loss = grown.model(ids, labels=ids).loss
    loss.backward()
    layer = grown.model.model.layers[inserted[0]]
    for proj in (layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight):
        assert proj.abs().sum() == 0 and proj.grad is not None and proj.grad.abs().sum() > 0
    optimizer.step()
    assert layer.mlp.down_proj.weight.abs().sum() > 0
    with torch.no_grad():
        assert not torch.allclose(grown.model(ids).logits, want, atol=1e-5)


def test_grow_command_writes_a_part_that_loads_back_identical(tiny_lm, tmp_path):
    tiny_lm.save_pretrained(tmp_path / "lm")
    assert cli(["lm", "grow", str(tmp_path / "lm"), "--layers", str(tiny_lm.config.num_layers + 1),
                "--out", str(tmp_path / "deep")]) == 0
    back = VoiceLM.from_pretrained(tmp_path / "deep")
    assert back.config.num_layers == tiny_lm.config.num_layers + 1
    assert back.model.dtype == torch.float32
    assert back.text_tokenizer.to_str() == tiny_lm.text_tokenizer.to_str()
    ids = _ids(tiny_lm)
    with torch.no_grad():
        assert torch.allclose(back.model(ids).logits, tiny_lm.model(ids).logits, atol=1e-5)


def test_grow_refuses_what_it_cannot_do(tiny_lm, tmp_path):
    with pytest.raises(GrowError, match="not more than"):
        grow_lm(tiny_lm, tiny_lm.config.num_layers)
    tiny_lm.save_pretrained(tmp_path / "lm")
    (tmp_path / "taken").mkdir()
    with pytest.raises(SystemExit, match="already exists"):
        cli(["lm", "grow", str(tmp_path / "lm"), "--layers", "9", "--out", str(tmp_path / "taken")])
    with pytest.raises(SystemExit, match="not a directory"):
        cli(["lm", "grow", str(tmp_path / "nope"), "--layers", "9", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="not more than"):
        cli(["lm", "grow", str(tmp_path / "lm"), "--layers", "1", "--out", str(tmp_path / "y")])
    assert not (tmp_path / "y").exists()
