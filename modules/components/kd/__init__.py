"""Knowledge-distillation parts: soft-target functions, target sources, loss terms, mixing, stored sparse logits."""
