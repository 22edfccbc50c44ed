"""Flax models of sdjax: UNet, attention, encoders, VAE (NHWC, diffusers-named)."""
