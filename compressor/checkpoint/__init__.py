"""Models on disk and in motion: safetensors headers, positioned reads, block-by-block streaming, calibration data, memory."""
