"""Checkpoint import and export: diffusers / transformers / open_clip <-> sdjax params."""
