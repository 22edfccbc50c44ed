"""Flax models of sdjax: UNet, attention, encoders, VAE (NHWC, diffusers-named).

The public building blocks, also importable from here: `UNet` and its `UNetConfig`
(`sdjax.models.unet`, `sdjax.models.unet_config`). They load when first used, so importing
one submodule does not build the others.
"""

_PUBLIC = {"UNet": "sdjax.models.unet", "UNetConfig": "sdjax.models.unet_config"}
__all__ = list(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'sdjax.models' has no attribute {name!r}")
