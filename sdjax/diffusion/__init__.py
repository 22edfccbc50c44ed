"""Diffusion math: noise schedules and the forward process (`schedules`), DDIM sampling (`ddim`)."""
