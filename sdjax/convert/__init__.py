"""Checkpoint import and export: diffusers / transformers / open_clip <-> sdjax params.

The public entry points, also importable from here: `unet_from_diffusers(path) ->
(UNetConfig, params)` for a diffusers `UNet2DConditionModel` folder and
`unet_to_diffusers(config, params, folder)` (`sdjax.convert.unet`).
"""

_PUBLIC = {"unet_from_diffusers": "sdjax.convert.unet", "unet_to_diffusers": "sdjax.convert.unet"}
__all__ = list(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'sdjax.convert' has no attribute {name!r}")
