"""visionlab application entry points."""
