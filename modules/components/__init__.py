"""Pure torch/timm building blocks shared by techniques (no Lightning, no technique imports)."""
