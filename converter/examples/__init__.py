"""Worked examples of the product's own train → save → convert flow (``python -m`` runnable)."""
