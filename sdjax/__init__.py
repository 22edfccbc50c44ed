"""sdjax: Subject-Diffusion (zero-shot personalized text-to-image generation) in JAX/Flax.

import sdjax
pipe = sdjax.load_pipeline()          # the embedded default model
images = sdjax.sample(pipe, "a star on a white background",
                      [sdjax.Subject("ref.png", "star")], seed=0)
"""

__version__ = "0.1.0"
__all__ = ["Subject", "load_pipeline", "sample"]


def __getattr__(name):
    # Lazy, so `import sdjax` (and the CLI's --help) does not pay for importing JAX.
    if name in ("Subject", "sample"):
        from sdjax import sampling as _sampling

        return getattr(_sampling, name)
    if name == "load_pipeline":
        from sdjax.pipeline import load_pipeline

        return load_pipeline
    raise AttributeError(f"module 'sdjax' has no attribute {name!r}")
