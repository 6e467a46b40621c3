"""What a dialect calls the neutral request's fields and tool choices, for the errors the one path words for it
(api.pipeline.validation, api.pipeline.context_bound): a check is made once, on the neutral request, and its 400 is
worded in the terms of the client that asked (Anthropic's `stop_sequences` and `{"type": "any"}`, not OpenAI's
`stop` and `'required'`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Terms:
    # A neutral field (mlxq.request.Request) -> the field of the dialect's body that sets it, where they differ.
    renamed: Mapping[str, str] = field(default_factory=dict)
    tool: str = "function"  # what a named tool_choice names
    any_tool: str = "tool_choice 'required'"  # the choice that forces some tool call

    def param(self, neutral: str) -> str:
        """The dialect's name of the neutral field `neutral`, or of the field it is the start of (`a.b.c`)."""
        head, dot, rest = neutral.partition(".")
        return self.renamed.get(head, head) + dot + rest


# Chat completions' are the neutral request's own.
OPENAI_TERMS = Terms()
