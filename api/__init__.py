"""The HTTP front end (FastAPI). Never imports MLX."""
