"""sdjax: Subject-Diffusion (zero-shot personalised text-to-image generation) in JAX/Flax.

import sdjax
pipe = sdjax.load_pipeline()          # the embedded default model
images = sdjax.sample(pipe, "a star on a white background",
                      [sdjax.Subject("ref.png", "star")], seed=0)

The names are imported when first used: `import sdjax` (and `sdjax --help`) does not
import JAX.
"""

__version__ = "0.1.0"
__all__ = ["Subject", "load_pipeline", "sample"]


def __getattr__(name):
    if name == "Subject":
        from sdjax.subjects import Subject

        return Subject
    if name == "sample":
        from sdjax.sampling import sample

        return sample
    if name == "load_pipeline":
        from sdjax.pipeline import load_pipeline

        return load_pipeline
    if name in ("models", "convert", "diffusion"):  # sdjax.models.UNet after `import sdjax`
        import importlib

        return importlib.import_module(f"sdjax.{name}")
    raise AttributeError(f"module 'sdjax' has no attribute {name!r}")
