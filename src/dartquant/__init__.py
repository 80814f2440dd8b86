"""dartquant: W4A4KV4 quantization of LLMs by calibrated rotations."""
__version__ = "0.1.0"
