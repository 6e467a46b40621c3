"""The Anthropic dialect: the Messages API (`POST /v1/messages`, streaming, `count_tokens`) as Claude Code speaks it."""
