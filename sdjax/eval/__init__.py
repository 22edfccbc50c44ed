"""Evaluation: DreamBench's metric models (DINO ViT, CLIP) and similarity scores (SPEC 7)."""
