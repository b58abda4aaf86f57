"""Training: one loop for pretraining, SFT and preference optimisation."""
