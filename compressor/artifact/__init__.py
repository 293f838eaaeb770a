"""Compressed artifacts: our safetensors format and manifest, the streamed writer, the download archive."""
