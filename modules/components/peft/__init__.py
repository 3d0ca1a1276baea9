"""Parameter-efficient fine-tuning parts: SSF, adapters, side networks, low-bit codebooks, task files."""
