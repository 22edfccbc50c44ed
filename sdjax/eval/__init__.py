"""Evaluation: DreamBench's metric models (DINO ViT, CLIP) and similarity scores, and the toy
world's evaluation (docs/method.md §7)."""
