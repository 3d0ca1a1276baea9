"""Quantization parts: int8 (torchao pt2e), BitNet b1.58 ternary weights, HAWQ mixed precision."""
