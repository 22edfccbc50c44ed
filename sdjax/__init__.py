"""sdjax: Subject-Diffusion (zero-shot personalized text-to-image generation) in JAX/Flax."""

__version__ = "0.1.0"
