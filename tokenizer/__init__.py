"""Speech tokenizer: 16 kHz audio -> discrete speech tokens at 12.5 Hz."""
