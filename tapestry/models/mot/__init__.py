"""The unified mixture-of-transformers family (Inset / ILLUME-X / BAGEL layout)."""
