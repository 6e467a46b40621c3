"""A cheap bound on a prompt's length before anyone tokenizes it: text that cannot fit the context, whatever its
tokens, is refused at once with the over-context error the worker gives after tokenizing (a 5 MB input would
otherwise cost seconds of tokenizer CPU to refuse).

A token stands for at most `max_token_bytes` bytes of text (the longest entry of the model's vocabulary, added
tokens included), so a text of B UTF-8 bytes is at least B / max_token_bytes tokens. Only text the chat template
certainly renders counts (user and system messages, a completion's prompt: templates may drop earlier assistant
reasoning or tools), and the bound is halved again (`MARGIN`), so nothing that fits is refused. It holds only for
tokenizers that keep every input byte (byte-level BPE, or BPE with byte fallback, normalized at most by
prepending or replacing characters and Unicode composition); for any other, or a model whose tokenizer is not on
this machine, there is no bound and the worker's exact check decides.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from pathlib import Path
from typing import Any

from api.errors import APIError
from api.pipeline.model_info import ModelInfo
from api.pipeline.terms import OPENAI_TERMS, Terms
from mlxq.contract import context_exceeded
from mlxq.request import JobKind, Request
from mlxq.settings import Settings

log = logging.getLogger(__name__)

# How much further than the bound a text must go to be refused: room for what the bound does not model
# (Unicode composition shrinking the text a little before it is split).
MARGIN = 2

# Normalizers and pre-tokenizers that never drop input (a whitespace splitter or `Strip` would).
_KEEPING_NORMALIZERS = {"Prepend", "Replace", "NFC", "NFKC", "NFD", "NFKD", "Lowercase"}
_KEEPING_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "Split", "Punctuation"}


def _parts(node: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
    """The steps of a normalizer or pre-tokenizer, a `Sequence` flattened."""
    if node is None:
        return []
    if node.get("type") == "Sequence":
        return [p for child in node.get(key) or [] for p in _parts(child, key)]
    return [node]


@functools.lru_cache(maxsize=16)
def max_token_bytes(model_dir: str) -> int | None:
    """The most bytes of text one token of the model in `model_dir` stands for, or None where no such bound holds
    (module doc) or the tokenizer is not here. Read once per directory."""
    path = Path(model_dir).expanduser() / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    model = spec.get("model") or {}
    normalizers = _parts(spec.get("normalizer"), "normalizers")
    pre_tokenizers = _parts(spec.get("pre_tokenizer"), "pretokenizers")
    if any(n.get("type") not in _KEEPING_NORMALIZERS for n in normalizers):
        return None
    if any(
        p.get("type") not in _KEEPING_PRE_TOKENIZERS or str(p.get("behavior", "")).lower() == "removed"
        for p in pre_tokenizers
    ):
        return None
    byte_level = any(p.get("type") == "ByteLevel" for p in pre_tokenizers)
    vocab = model.get("vocab")
    if model.get("type") != "BPE" or not isinstance(vocab, dict) or not (byte_level or model.get("byte_fallback")):
        return None  # an unknown character could become one `unk` token standing for any length
    # Byte-level: each character of a vocabulary entry is one byte. Otherwise an entry's UTF-8 length is at least
    # the bytes it stands for (`▁` is three bytes for one space, `<0x41>` six for one).
    length = len if byte_level else (lambda token: len(token.encode("utf-8")))
    longest = max((length(token) for token in vocab), default=0)
    added = max((len(str(t.get("content", "")).encode("utf-8")) for t in spec.get("added_tokens") or []), default=0)
    return max(longest, added, 1)


def certain_bytes(kind: JobKind, request: Request) -> int:
    """UTF-8 bytes of the text the prompt certainly holds: a completion's prompt, a chat's user and system text."""
    if kind == "completion":
        return len(request.prompt.encode("utf-8", "surrogatepass")) if isinstance(request.prompt, str) else 0
    messages = request.messages or []
    if request.truncation == "auto":  # what the worker's truncation keeps whatever it leaves out: the system
        # messages that lead, and the conversation from its last cut on
        lead, cuts = request.truncation_cuts()
        messages = messages[:lead] + messages[cuts[-1] if cuts else lead :]
    total = 0
    for message in messages:
        if message.role not in ("user", "system", "developer"):
            continue
        content = message.content
        texts = [content] if isinstance(content, str) else [p.get("text") for p in content or []]
        total += sum(len(t.encode("utf-8", "surrogatepass")) for t in texts if isinstance(t, str))
    return total


async def check_context_bound(
    kind: JobKind, requests: list[Request], *, settings: Settings, model_info: ModelInfo, terms: Terms = OPENAI_TERMS
) -> None:
    """Refuse a prompt whose text alone cannot fit the context (module doc), as the worker would refuse it."""
    if kind not in ("chat", "completion"):
        return
    sizes = [certain_bytes(kind, r) for r in requests]
    model = requests[0].model
    info = await model_info.get(model)
    context = (info or {}).get("context_length")
    if not isinstance(context, int) or max(sizes, default=0) <= context:
        return  # not published yet, or short enough that no count could refuse it: nothing to read
    per_token = await asyncio.to_thread(max_token_bytes, settings.served_models.get(model, model))
    if per_token is None:
        return
    if (size := max(sizes)) > context * per_token * MARGIN:
        # No token of this model stands for more than `per_token` bytes of text: a lower bound on the count.
        raise APIError(
            400,
            context_exceeded(-(-size // per_token), context, at_least=True),
            param=terms.param("messages") if kind == "chat" else "prompt",
            code="context_length_exceeded",
        )
