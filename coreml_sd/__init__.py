"""coreml-sd: Stable Diffusion on Apple Silicon through Core ML."""

__version__ = "0.1.0"
