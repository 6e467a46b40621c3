"""The OpenAI dialect: chat completions, legacy completions, models."""
