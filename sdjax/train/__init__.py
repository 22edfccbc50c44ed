"""Training: losses, train state, the compiled step, the loop."""
