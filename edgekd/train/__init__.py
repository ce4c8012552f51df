"""Training: configs, the compiled training loop, exact-resume checkpoints, optimizers and the teacher cache."""
