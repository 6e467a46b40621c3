"""Data access, one module per table (keyword-only functions, as FastAPI's template writes them)."""
