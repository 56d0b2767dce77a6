"""`voicelm convert glm4voice-decoder` on a synthetic checkpoint with the official key names."""

import torch
import pytest

from decoder import SpeechDecoder
from decoder.convert import convert_glm4voice_decoder
from decoder.flow import FlowConfig, FlowModel
from decoder.hift import HiFTConfig, HiFTGenerator
from voicelm.cli import main as cli_main
from voicelm.core.checkpoint import CheckpointError

# The released config.yaml, at reduced width (HyperPyYAML tags as in THUDM/glm-4-voice-decoder).
CONFIG_YAML = """
sample_rate: 22050
text_encoder_input_size: 512
llm_input_size: 1536
spk_embed_dim: 16

flow: !new:cosyvoice.flow.flow.MaskedDiffWithXvec
    input_size: 32
    output_size: 80
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: 50
    input_frame_rate: 12.5
    only_mask_loss: True
    encoder: !new:cosyvoice.transformer.encoder.BlockConformerEncoder
        output_size: 32
        attention_heads: 2
        linear_units: 48
        num_blocks: 2
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0.1
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'block_rel_selfattn'
        input_size: 32
        use_cnn_module: False
        macaron_style: False
        block_size: 10
    length_regulator: !new:cosyvoice.flow.length_regulator.InterpolateRegulator
        channels: 80
        sampling_ratios: [1, 1]
    decoder: !new:cosyvoice.flow.flow_matching.ConditionalCFM
        in_channels: 240
        n_spks: 1
        spk_emb_dim: 80
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                solver: 'euler'
                t_scheduler: 'cosine'
                training_cfg_rate: 0.2
                inference_cfg_rate: 0.7
                reg_loss_type: 'l1'
        estimator: !new:cosyvoice.flow.decoder.ConditionalDecoder
            in_channels: 320
            out_channels: 80
            channels: [32, 32]
            dropout: 0.0
            attention_head_dim: 8
            n_blocks: 2
            num_mid_blocks: 2
            num_heads: 2
            act_fn: 'gelu'

hift: !new:cosyvoice.hifigan.generator.HiFTGenerator
    in_channels: 80
    base_channels: 32
    nb_harmonics: 2
    sampling_rate: !ref <sample_rate>
    nsf_alpha: 0.1
    nsf_sigma: 0.003
    nsf_voiced_threshold: 10
    upsample_rates: [8, 8]
    upsample_kernel_sizes: [16, 16]
    istft_params:
        n_fft: 16
        hop_len: 4
    resblock_kernel_sizes: [3, 7, 11]
    resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    source_resblock_kernel_sizes: [7, 11]
    source_resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5]]
    lrelu_slope: 0.1
    audio_limit: 0.99
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor
        num_class: 1
        in_channels: 80
        cond_channels: 16
"""

FLOW = FlowConfig(vocab_size=50, spk_embed_dim=16, input_size=32, encoder_dim=32, encoder_heads=2, encoder_ffn=48,
                  encoder_layers=2, regulator_layers=2, unet_channels=(32, 32), unet_blocks=2, unet_mid_blocks=2,
                  unet_heads=2, unet_head_dim=8)
HIFT = HiFTConfig(base_channels=32, nb_harmonics=2, f0_channels=16)


def official_names(flow: FlowModel, hift: HiFTGenerator):
    flow_sd = {("decoder." + k if k.startswith("estimator.") else k): v.clone() for k, v in flow.state_dict().items()}
    hift_sd = {}
    for k, v in hift.state_dict().items():  # old torch weight_norm layout, as in the released hift.pt
        k = k.replace(".parametrizations.weight.original0", ".weight_g").replace(".parametrizations.weight.original1", ".weight_v")
        hift_sd[k] = v.clone()
    return flow_sd, hift_sd


@pytest.fixture(scope="module")
def official_dir(tmp_path_factory):
    torch.manual_seed(0)
    flow, hift = FlowModel(FLOW).eval(), HiFTGenerator(HIFT).eval()
    src = tmp_path_factory.mktemp("glm-4-voice-decoder")
    (src / "config.yaml").write_text(CONFIG_YAML)
    flow_sd, hift_sd = official_names(flow, hift)
    assert any(k.startswith("decoder.estimator.down_blocks.0.1.0.attn1.to_q") for k in flow_sd)
    assert "conv_pre.weight_v" in hift_sd
    torch.save(flow_sd, src / "flow.pt")
    torch.save(hift_sd, src / "hift.pt")
    return src, flow, hift


def test_converted_decoder_reproduces_source_models(official_dir, tmp_path):
    src, flow, hift = official_dir
    assert cli_main(["convert", "glm4voice-decoder", str(src), str(tmp_path / "out")]) == 0
    decoder = SpeechDecoder.from_pretrained(tmp_path / "out")
    assert decoder.config.frame_local_norm is False  # official whole-utterance group norm
    assert decoder.config.unet_channels == (32, 32) and decoder.config.block_size == 10
    assert decoder.config.inference_cfg_rate == 0.7 and decoder.vocoder.config.nb_harmonics == 2
    tokens = torch.randint(0, 50, (23,))
    expected_mel = flow.inference(tokens)
    mel = decoder.decode_mel(tokens)
    assert torch.allclose(mel, expected_mel, atol=1e-5)
    wav, _ = hift.inference(expected_mel[None])
    assert torch.allclose(decoder.decode(tokens), wav[0], atol=1e-4)


def test_convert_refuses_incomplete_or_foreign_folders(official_dir, tmp_path):
    src, _, _ = official_dir
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.yaml").write_text((src / "config.yaml").read_text())
    (broken / "flow.pt").write_bytes((src / "flow.pt").read_bytes())
    with pytest.raises(CheckpointError, match="hift.pt"):
        convert_glm4voice_decoder(broken, tmp_path / "out")
    (broken / "hift.pt").write_bytes((src / "flow.pt").read_bytes())  # wrong file
    with pytest.raises(CheckpointError, match="HiFT"):
        convert_glm4voice_decoder(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written
    assert cli_main(["convert", "glm4voice-decoder", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 1
