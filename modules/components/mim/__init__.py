"""Masked image modeling parts (SimMIM, MAE, MR-MAE): masks, patch targets, encoders, the MAE decoder."""
