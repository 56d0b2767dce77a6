"""Flow model: shapes and exact frame alignment, block-causal encoder, KV cache, loss, presets."""

import pytest
import torch

from decoder.flow import (FlowConfig, FlowInputError, FlowModel, frames_for_tokens, stream_noise,
                          token_of_frames, with_sampling)
from voicelm.core.audio import MEL_FRAMES_PER_TOKEN
from voicelm.core.checkpoint import config_from_dict
from voicelm.core.presets import load_preset


def tiny_flow(**overrides) -> FlowModel:
    torch.manual_seed(0)
    config = config_from_dict(FlowConfig, {**load_preset("decoder", "tiny"), **overrides})
    return FlowModel(config).eval()


def test_frame_alignment_is_exact_over_long_streams():
    # 6.890625 frames per token; cumulative, never accumulated rounding.
    assert MEL_FRAMES_PER_TOKEN == 6.890625
    for n in (1, 10, 64, 999, 123_457):
        assert frames_for_tokens(n) == int(n * 6.890625)
    # frames of consecutive chunks add up to the frames of the whole, for any chunking
    sizes = [10, 20, 40, 40, 7]
    total, parts = 0, 0
    for size in sizes:
        parts += frames_for_tokens(total + size) - frames_for_tokens(total)
        total += size
    assert parts == frames_for_tokens(total)
    # every frame belongs to the token whose span holds it
    frames = torch.arange(frames_for_tokens(1000))
    owners = token_of_frames(frames)
    assert owners.max() == 999 and (owners.diff() >= 0).all()
    assert torch.equal(torch.bincount(owners), torch.tensor(
        [frames_for_tokens(i + 1) - frames_for_tokens(i) for i in range(1000)]))


def test_block_causal_encoder_hides_future_blocks_but_not_own_block():
    flow = tiny_flow()
    tokens = torch.randint(0, 64, (1, 30))
    base = flow.encode(tokens)
    changed = tokens.clone()
    changed[0, 25] = (changed[0, 25] + 1) % 64  # a token of the third block
    out = flow.encode(changed)
    assert torch.allclose(out[:, :20], base[:, :20], atol=1e-6)  # earlier blocks untouched
    assert not torch.allclose(out[:, 20:25], base[:, 20:25])  # same block sees it (full attention)
    full = flow.encode(tokens, block_causal=False)
    assert not torch.allclose(full[:, :10], base[:, :10])  # full attention does see the future


def test_gradients_do_not_flow_from_future_blocks():
    flow = tiny_flow()
    emb = flow.input_embedding(torch.randint(0, 64, (1, 30))).detach().requires_grad_(True)
    out = flow.encoder(emb)
    out[0, :10].sum().backward()
    assert emb.grad[0, 10:].abs().max() == 0
    assert emb.grad[0, :10].abs().max() > 0


def test_kv_cached_encoder_equals_offline():
    flow = tiny_flow()
    tokens = torch.randint(0, 64, (1, 47))
    offline = flow.encode(tokens)
    with flow.encoder.streaming(1):
        pieces = [flow.encode_step(tokens[:, a:b]) for a, b in ((0, 10), (10, 30), (30, 40), (40, 47))]
        with pytest.raises(RuntimeError, match="partial block"):
            flow.encode_step(tokens[:, :10])  # the stream ended on a partial block
    assert torch.allclose(torch.cat(pieces, dim=1), offline, atol=1e-5)


def test_inference_shapes_determinism_and_prompt():
    flow = tiny_flow()
    tokens = torch.randint(0, 64, (23,))
    mel = flow.inference(tokens)
    assert mel.shape == (80, frames_for_tokens(23))
    assert torch.equal(mel, flow.inference(tokens))  # fixed noise seed per stream
    prompt = torch.randint(0, 64, (12,))
    prompt_mel = torch.randn(80, frames_for_tokens(12))
    with_prompt = flow.inference(tokens, prompt_tokens=prompt, prompt_mel=prompt_mel)
    assert with_prompt.shape == (80, frames_for_tokens(35) - frames_for_tokens(12))
    with pytest.raises(FlowInputError, match="same audio"):
        flow.inference(tokens, prompt_tokens=prompt, prompt_mel=prompt_mel[:, :40])


def test_noise_depends_only_on_frame_index():
    whole = stream_noise(7, 0, 700, 80)
    assert torch.equal(torch.cat([stream_noise(7, 0, 250, 80), stream_noise(7, 250, 700, 80)], dim=1), whole)
    assert not torch.equal(stream_noise(8, 0, 700, 80), whole)


def test_bad_tokens_get_clear_errors():
    flow = tiny_flow()
    with pytest.raises(FlowInputError, match="outside this decoder's speech vocabulary"):
        flow.inference(torch.tensor([1, 2, 64]))
    with pytest.raises(FlowInputError, match="outside"):
        flow.inference(torch.tensor([-1, 2]))
    with pytest.raises(FlowInputError, match="empty"):
        flow.inference(torch.tensor([], dtype=torch.long))
    with pytest.raises(FlowInputError, match="integer"):
        flow.inference(torch.tensor([1.0, 2.0]))


def test_training_loss_goes_down():
    torch.manual_seed(0)
    flow = tiny_flow(training_cfg_rate=0.0, prompt_prob=0.0).train()
    tokens = torch.randint(0, 64, (4, 20))
    lengths = torch.tensor([20, 20, 15, 10])
    target = torch.randn(1, 80, 1).expand(4, 80, frames_for_tokens(20)).contiguous()  # learnable
    optimizer = torch.optim.AdamW(flow.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = flow(tokens, lengths, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5


def test_glm4voice_preset_has_official_parameter_count():
    config = config_from_dict(FlowConfig, load_preset("decoder", "glm4voice"))
    with torch.device("meta"):
        flow = FlowModel(config)
    count = sum(p.numel() for p in flow.parameters())
    assert count == 111_166_208  # flow.pt: 445 MB of float32, ~111 M parameters
    assert sum(p.numel() for p in flow.encoder.parameters()) == 20_758_016


def _train_on_one_mel(flow: FlowModel, steps: int, prior_weight: float = 0.0) -> tuple[FlowModel, torch.Tensor, list]:
    torch.manual_seed(0)
    flow.train()
    tokens = torch.randint(0, 64, (4, 20))
    lengths = torch.full((4,), 20)
    target = (torch.randn(1, 80, 1) * 2 - 5).expand(4, 80, frames_for_tokens(20)).contiguous()
    optimizer = torch.optim.AdamW(flow.parameters(), lr=3e-3)
    history = []
    for _ in range(steps):
        parts = flow(tokens, lengths, target, prior_weight=prior_weight, parts=True)
        optimizer.zero_grad()
        parts["loss"].backward()
        optimizer.step()
        history.append({k: float(v.detach()) for k, v in parts.items()})
    return flow.eval(), tokens[0], history


def test_prior_loss_teaches_the_condition_the_mel():
    flow, _, history = _train_on_one_mel(tiny_flow(training_cfg_rate=0.0, prompt_prob=0.0), 40, prior_weight=1.0)
    first, last = history[0], history[-1]
    assert abs(first["loss"] - (first["flow"] + first["prior"])) < 1e-4  # total = flow + weight x prior
    assert last["prior"] < 0.2 * first["prior"]
    # Without the weight the prior is reported but not trained.
    _, _, plain = _train_on_one_mel(tiny_flow(training_cfg_rate=0.0, prompt_prob=0.0), 40)
    assert plain[-1]["loss"] == plain[-1]["flow"] and plain[-1]["prior"] > 5 * last["prior"]


def test_input_shortcut_starts_on_the_straight_field_and_removes_the_noise():
    flow = tiny_flow(input_shortcut=True)
    with torch.no_grad():
        flow.estimator.final_proj.weight.zero_()
        flow.estimator.final_proj.bias.zero_()
    x, mu, cond = torch.randn(2, 80, 30), torch.randn(2, 80, 30), torch.randn(2, 80, 30)
    v = flow.estimator(x, torch.ones(2, 1, 30), mu, torch.rand(2), torch.randn(2, 80), cond)
    assert torch.allclose(v, mu - x, atol=1e-6)  # the U-Net learns only the rest of the field
    assert not any("input_shortcut" in k for k in tiny_flow().state_dict())  # off: the official layout

    # The same short run: the sampled mel keeps the starting noise without the shortcut, not with it.
    errors = {}
    for shortcut in (False, True):
        flow, tokens, _ = _train_on_one_mel(tiny_flow(training_cfg_rate=0.0, prompt_prob=0.0,
                                                      input_shortcut=shortcut), 60, prior_weight=1.0)
        mel = flow.inference(tokens)
        errors[shortcut] = (mel[:, 1:] - mel[:, :-1]).abs().mean().item()  # the target is constant in time
    assert errors[True] < 0.5 * errors[False], errors


def test_attention_window_limits_how_far_a_frame_sees():
    # tiny preset: 3 attention layers and 9 three-tap convs on the path, so with a window of 2 a
    # frame's velocity depends on frames at most 3 * 2 + 9 = 15 away; with no window, on all of them
    frames = 120
    x, mu, cond = torch.randn(1, 80, frames), torch.randn(1, 80, frames), torch.zeros(1, 80, frames)
    mask, spk, t = torch.ones(1, 1, frames), torch.zeros(1, 80), torch.tensor([0.5])
    far = x.clone()
    far[..., 40:] += 3.0  # change only frames >= 40 away from frame 0
    for window, changes in ((2, False), (None, True)):
        estimator = tiny_flow(attention_window=window).estimator
        with torch.no_grad():
            near_out = estimator(x, mask, mu, t, spk, cond)[..., :20]
            far_out = estimator(far, mask, mu, t, spk, cond)[..., :20]
        assert (not torch.allclose(near_out, far_out, atol=1e-6)) == changes, f"attention_window={window}"
    with pytest.raises(ValueError, match="attention_window must be null .* or an integer >= 1"):
        FlowConfig(attention_window=0)


def test_attention_window_is_a_sampling_setting_of_a_trained_flow():
    # a shipped flow trained on short crops gets a reach for long answers without new weights
    trained = FlowConfig()
    shipped = with_sampling(trained, {"attention_window": 100, "noise_scale": 0.5})
    assert (shipped.attention_window, shipped.noise_scale) == (100, 0.5) and trained.attention_window is None
    assert with_sampling(shipped, {"attention_window": None}).attention_window is None
    with pytest.raises(ValueError, match=r"attention_window must be null \(the whole window\) or an integer >= 1 \(got 0\)"):
        with_sampling(trained, {"attention_window": 0})
