"""visionlab callbacks: independent of techniques, they talk to ``pl_module`` through a small interface."""
