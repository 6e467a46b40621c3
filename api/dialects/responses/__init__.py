"""The OpenAI Responses dialect: `POST /v1/responses` (input items, flat tools, the typed event stream) as the
`openai` SDK's `client.responses` and Codex speak it."""
