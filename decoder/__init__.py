"""Speech decoder: 12.5 Hz speech tokens -> 22.05 kHz waveform, streaming."""
