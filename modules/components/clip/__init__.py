"""CLIP parts: the contrastive losses, the text tower and tokenizer, token masking (FLIP, A-CLIP)."""
