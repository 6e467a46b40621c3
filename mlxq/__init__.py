"""mlxq: an OpenAI- and Anthropic-compatible LLM service on MLX, built as a job queue."""

__version__ = "0.1.0"
