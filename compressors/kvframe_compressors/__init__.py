"""kvframe plugin: gradient compressors."""
