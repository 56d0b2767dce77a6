"""Audio I/O and validation: every bad input gets an AudioError that says what was wrong."""

import numpy as np
import pytest
import soundfile as sf
import torch

from voicelm.core import audio
from voicelm.core.audio import AudioError, load_audio, num_tokens, prepare_audio, save_audio

RATE = audio.SAMPLE_RATE


def tone(seconds=0.5, rate=RATE, freq=440.0, amp=0.5):
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_rate_constants_agree():
    assert audio.SAMPLE_RATE / audio.TOKEN_RATE == audio.SAMPLES_PER_TOKEN == 1280
    assert audio.MEL_FRAMES_PER_TOKEN == pytest.approx(6.890625)
    assert num_tokens(1280) == 1 and num_tokens(1281) == 2 and num_tokens(16000) == 13
    assert num_tokens(22050, 22050) == 13  # one second is 12.5 tokens at any rate: a partial token counts


def test_text_file_renamed_wav_is_not_audio(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("this is a shopping list, not a recording\n" * 20)
    with pytest.raises(AudioError, match="not a readable audio file"):
        load_audio(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(AudioError, match="not found"):
        load_audio(tmp_path / "absent.wav")
    with pytest.raises(AudioError, match="directory"):
        load_audio(tmp_path)


def test_empty_audio():
    with pytest.raises(AudioError, match="empty"):
        prepare_audio(np.zeros(0, np.float32), RATE)


def test_empty_wav_file(tmp_path):
    path = tmp_path / "empty.wav"
    sf.write(path, np.zeros(0, np.float32), RATE)
    with pytest.raises(AudioError, match="empty"):
        load_audio(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_samples(bad):
    wav = tone()
    wav[100] = bad
    with pytest.raises(AudioError, match="NaN/inf"):
        prepare_audio(wav, RATE)


def test_too_many_channels():
    with pytest.raises(AudioError, match="channels"):
        prepare_audio(np.tile(tone(), (9, 1)), RATE)


def test_three_dimensional_array():
    with pytest.raises(AudioError, match="1-D .* or 2-D"):
        prepare_audio(np.zeros((2, 2, 100), np.float32), RATE)


def test_over_length_limit_array_and_file(tmp_path):
    with pytest.raises(AudioError, match="over the limit of 1 s"):
        prepare_audio(tone(1.5), RATE, max_seconds=1.0)
    path = tmp_path / "long.wav"
    sf.write(path, tone(1.5), RATE)
    with pytest.raises(AudioError, match="over the limit"):
        load_audio(path, max_seconds=1.0)
    assert prepare_audio(tone(1.5), RATE, max_seconds=None).numel() == int(1.5 * RATE)


def test_all_silent_refused_unless_allowed(tmp_path):
    with pytest.raises(AudioError, match="silent"):
        prepare_audio(np.zeros(RATE, np.float32), RATE)
    path = tmp_path / "silence.wav"
    sf.write(path, np.zeros(RATE, np.float32), RATE)
    with pytest.raises(AudioError, match=r"silence\.wav.*silent"):
        load_audio(path)
    assert prepare_audio(np.zeros(RATE, np.float32), RATE, allow_silent=True).abs().max() == 0


def test_bad_sample_rate_and_dtype():
    with pytest.raises(AudioError, match="sample_rate"):
        prepare_audio(tone(), 0)
    with pytest.raises(AudioError, match="sample_rate"):
        prepare_audio(tone(), 16000.5)
    with pytest.raises(AudioError, match="dtype"):
        prepare_audio(np.array(["a", "b"]), RATE)


def test_stereo_is_downmixed_either_layout():
    left, right = tone(amp=0.2), tone(amp=0.6)
    expected = (left + right) / 2
    channels_first = prepare_audio(np.stack([left, right]), RATE)
    samples_first = prepare_audio(np.stack([left, right], axis=1), RATE)
    assert channels_first.shape == (left.size,)
    np.testing.assert_allclose(channels_first.numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(samples_first.numpy(), expected, atol=1e-6)


def test_stereo_file_is_downmixed(tmp_path):
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([tone(amp=0.2), tone(amp=0.6)], axis=1), RATE)
    wav = load_audio(path)
    assert wav.ndim == 1
    assert float(wav.abs().max()) == pytest.approx(0.4, abs=1e-3)


@pytest.mark.parametrize("source_rate", [8000, 22050, 44100, 48000])
def test_resampling_gives_target_rate_length_and_pitch(source_rate):
    seconds, freq = 1.0, 440.0
    wav = prepare_audio(tone(seconds, source_rate, freq), source_rate, RATE)
    assert wav.dtype == torch.float32
    assert abs(wav.numel() - int(seconds * RATE)) <= 1
    spectrum = np.abs(np.fft.rfft(wav.numpy()))
    peak_hz = np.argmax(spectrum) * RATE / wav.numel()
    assert abs(peak_hz - freq) < 2.0  # same tone after resampling: the rate was honoured


def test_int16_is_scaled_to_unit_range():
    pcm = np.array([0, 16384, -32768, 32767] * 400, dtype=np.int16)
    wav = prepare_audio(pcm, RATE)
    assert wav.dtype == torch.float32
    assert float(wav.min()) == -1.0
    assert float(wav[1]) == pytest.approx(0.5)


def test_clipping_is_clamped_with_a_warning():
    with pytest.warns(UserWarning, match="peaks at"):
        wav = prepare_audio(tone(amp=2.0), RATE)
    assert float(wav.abs().max()) <= 1.0


def test_save_load_round_trip(tmp_path):
    wav = tone(0.7)
    path = save_audio(tmp_path / "sub" / "a.wav", torch.from_numpy(wav), RATE)
    assert sf.info(path).samplerate == RATE and sf.info(path).subtype == "PCM_16"
    back = load_audio(path)
    assert back.shape == (wav.size,)
    np.testing.assert_allclose(back.numpy(), wav, atol=1.0 / 32768 * 2)
    at_22k = load_audio(path, 22050)
    assert abs(at_22k.numel() - round(0.7 * 22050)) <= 1


def test_save_is_atomic_on_error(tmp_path):
    target = tmp_path / "out.wav"
    bad = tone()
    bad[0] = np.nan
    with pytest.raises(AudioError, match="NaN"):
        save_audio(target, bad, RATE)
    with pytest.raises(Exception):
        save_audio(target, tone(), 0)  # libsndfile refuses a 0 Hz file mid-write
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temporary file is left


def test_save_replaces_existing_file_only_on_success(tmp_path):
    target = save_audio(tmp_path / "out.wav", tone(amp=0.3), RATE)
    before = target.read_bytes()
    with pytest.raises(Exception):
        save_audio(target, tone(amp=0.9), 0)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.wav"]
