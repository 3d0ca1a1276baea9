"""visionlab technique modules: one LightningModule per technique."""
