"""Measuring a run while it trains: sample grids (`samples`), the held-out validation loss (`loss`),
CLIP score (`clip_score`), and FID / KID at the end (`fidelity`)."""
