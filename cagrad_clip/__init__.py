"""cagrad-clip."""
