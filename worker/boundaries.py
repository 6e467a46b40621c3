"""Where a prompt gets prefix-cache checkpoints, for a model whose cache cannot be trimmed (worker.prefix_cache).

A recurrent state or a window that has moved on cannot be cut back to an earlier token, so such a cache is only
reusable at the exact lengths it was kept at. The prompt is therefore prefilled in segments and a copy of its
cache is kept at a few token positions (`Marks`: position -> (cache type, canonical message count)):

- the end of the leading system messages ("system": shared by every session of an agent, kept longest);
- the ends of the last `CHECKPOINT_MESSAGES` messages ("user"): a client that edits or drops an earlier answer
  (reasoning removed, text changed) still finds everything before it; earlier boundaries were checkpointed by
  the turns that first prefilled them;
- the end of the prompt less its last token, `len(prompt) - 1` ("user"): the next turn of the conversation
  starts with it (the decoder needs one token of input, so it is never the whole prompt); for a model that
  thinks, before a `<think>` the generation prompt opens (the next turn's template drops it from the history),
  as mlx_lm.server ends its own segments.

A message boundary is the number of prompt tokens that render `messages[:k]` exactly, found the way the worker
tokenizes (the template's text, then encode): `messages[:k]` is rendered without the generation prompt and kept
only when the whole prompt's text starts with it and a token ends exactly there. A template that renders earlier
turns differently once later ones follow (one that drops earlier reasoning, one that stamps a date) leaves that
boundary out. Each boundary names its canonical message count k, the index of mlxq.keys.prefix_hashes: the
worker publishes hash k for the entry that holds it, so routing sends the conversation's next turn here
(worker.prefix_index); worker.tool_prompt may prepend a system message (`shift`), which has no hash of its own.

Cost, measured (issue 24; float32 caches of the tiny test models, tests.families): a checkpoint is a whole copy
of the sequence's cache at that point, its fixed state plus the attention KV of every token before it:

    family            at 100 tokens   at 1000 tokens   = fixed state + growing KV
    llama (plain KV)        51 KB          512 KB          0 + 512 B/token (an entry, never a checkpoint)
    qwen3_next              42 KB          273 KB       16.9 KB + 256 B/token
    granitemoehybrid        46 KB          276 KB       20.2 KB + 256 B/token
    falcon_h1               62 KB          522 KB       10.5 KB + 512 B/token
    gemma3_text            102 KB          778 KB       512 B/token + 2 windows of 32 (+ up to a chunk - 1)

Scaled to real models (bf16 KV): Qwen3-Next-80B keeps ~74 MB of GatedDeltaNet state (float32) + 24 KB/token, so
a checkpoint at 8k tokens is ~270 MB; Gemma-3-27B ~0.4-0.6 GB of windows + 80 KB/token. A prefill stop costs an
extract and that copy: prefilling 2048 tokens in 512-token chunks took 1027 ms with no stop, 1050 ms with 4 and
1110 ms with 16 (qwen3_next; llama 281/287/306 ms; the others within noise): a few stops cost ~2%, and on a real
model the copy (memory bandwidth) is small beside the prefill. So the bound is memory, and the spacing is: the
system boundary, the last `CHECKPOINT_MESSAGES` boundaries and the end, none within `MIN_GAP` tokens of the next.
In a session each turn so adds one or two checkpoints (the end of the previous answer when the new question is
long enough, and the end of the prompt) beside the entry after generation; the prefix cache's byte bound evicts
them, entries after generation first and system prompts last.
"""

from __future__ import annotations

from typing import Any

# A checkpoint's cache type (LRUPromptCache's: evicted "assistant" first, then "user", "system" last) and the
# canonical message count k whose boundary hash (mlxq.keys.prefix_hashes, 1-based) it holds; None: no hash.
Mark = tuple[str, int | None]
Marks = dict[int, Mark]

# Message boundaries checkpointed per prompt, counted from its end (besides the system one and the end).
CHECKPOINT_MESSAGES = 3
# Positions closer than this to the next kept one are dropped (the system boundary and the end are kept).
MIN_GAP = 16
# A stop inside a prompt is paid on every prefill that crosses it (a forward's fixed cost) and repaid only by a later
# request that diverges right there: an agent's conversation grows at its end, so that is a client editing or retrying
# a message, not every turn. So a stop must close this many times what a forward's fixed cost is worth in tokens
# (`Batcher._stops`). At 1x, a real-size Gemma 3 on this CPU prefilled a later turn's 55 new tokens as 28 + 27 tokens
# (640 ms; 535 ms in one chunk), the stop at its last answer's end, while its later-turn TTFT was 1.2x mlx_lm.server's
# (scripts/bench_arch.py --size real). Where a forward's fixed cost is small (a GPU, Apple silicon) stops stay close.
STOP_WORTH = 4


def stops(marks: Marks, start: int, least: int) -> tuple[int, ...]:
    """The checkpoints of `marks` a prefill from `start` (the tokens its cache already holds) stops at. A stop ends a
    chunk, so the tokens after it cost another forward's fixed cost: a boundary that closes fewer than `least` tokens
    since the last stop (or `start`) is passed by: prefilling those few again later (a client that edits that message)
    costs no more than the forward it saves now. The system boundary is always kept: every session of the agent starts
    with it. (The batcher keeps the end of the prompt as well: `Batcher._stops`.)

    Measured (issue 24, `scripts/bench_arch.py --size real`, this CPU): an agent's later turn hits the cache at its
    last answer's end, two tokens before that message's boundary; a stop there cost a whole forward for two tokens, and
    with the end-of-prompt stop a later turn took three forwards where mlx_lm.server takes one (Gemma 3's later-turn TTFT
    2.4x mlx_lm.server's)."""
    kept: list[int] = []
    last = start
    for position in sorted(p for p in marks if p > start):
        if marks[position][0] == "system" or position - last >= least:
            kept.append(position)
            last = position
    return tuple(kept)


def completion_marks(prompt: list[int]) -> Marks:
    """A completion's prompt is one piece: only the end-of-prompt checkpoint (its one hash)."""
    return {len(prompt) - 1: ("user", 1)} if len(prompt) > 1 else {}


def chat_marks(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    text: str,
    *,
    shift: int = 0,
    last: int = CHECKPOINT_MESSAGES,
    min_gap: int = MIN_GAP,
) -> tuple[list[int], Marks]:
    """(prompt tokens, checkpoints) of a chat prompt whose text is `text` (the template's rendering of `messages`
    with the generation prompt, then any answer prefill). `shift`: messages worker.tool_prompt prepended to the
    canonical ones."""
    tokens = tokenizer.encode(text, add_special_tokens=False)
    ends = _token_ends(tokenizer, text, tokens)
    n = len(messages)
    system = 0
    while system < n and messages[system].get("role") == "system":
        system += 1
    wanted = ([system] if system else []) + [k for k in range(max(n - last + 1, 1), n + 1) if k > system]
    marks: Marks = {}
    for k in wanted:
        pos = _boundary(tokenizer, messages[:k], tools, text, tokens, ends)
        if pos is not None:
            marks[pos] = ("system" if k == system else "user", k - shift if k > shift else None)
    end = _prompt_end(tokenizer, tokens)
    if end > 0:
        marks[end] = ("user", n - shift if n > shift else None)
    return tokens, spaced({p: m for p, m in marks.items() if p <= end}, end, min_gap)


def _prompt_end(tokenizer: Any, tokens: list[int]) -> int:
    """Where the end-of-prompt checkpoint goes: the last token left for the decoder, or a `<think>` the generation
    prompt opens (looked for in its last few tokens, as mlx_lm.server does)."""
    end = len(tokens) - 1
    if getattr(tokenizer, "has_thinking", False):
        try:
            think = int(tokenizer.rfind_think_start(tokens, start=max(len(tokens) - 11, 0)))
        except Exception:
            think = -1
        if 0 < think < end:
            end = think
    return end


def spaced(marks: Marks, end: int, min_gap: int) -> Marks:
    """Drop a "user" position closer than `min_gap` tokens to the next one kept; the end and "system" stay."""
    kept: Marks = {}
    following = None
    for pos in sorted(marks, reverse=True):
        mark = marks[pos]
        if pos == end or mark[0] == "system" or following is None or following - pos >= min_gap:
            kept[pos] = mark
            following = pos
    return dict(sorted(kept.items()))


def _token_ends(tokenizer: Any, text: str, tokens: list[int]) -> dict[int, int] | None:
    """{character offset: number of tokens that end there}, from the fast tokenizer's offsets; None when they
    cannot be had, or tokenize otherwise than `encode` did."""
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    if not getattr(hf, "is_fast", False):
        return None
    try:
        enc = hf(text, add_special_tokens=False, return_offsets_mapping=True)
    except Exception:
        return None
    if list(enc["input_ids"]) != list(tokens):
        return None
    ends: dict[int, int] = {}
    for i, (_, end) in enumerate(enc["offset_mapping"]):
        ends[int(end)] = i + 1  # the last token ending at `end` (a zero-width token counts with it)
    return ends


def _boundary(
    tokenizer: Any,
    head: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    text: str,
    tokens: list[int],
    ends: dict[int, int] | None,
) -> int | None:
    """How many of `tokens` render `head` (a leading part of the conversation) exactly; None when no token
    boundary falls there or the template renders it otherwise inside the whole conversation."""
    try:
        part = tokenizer.apply_chat_template(head, tools=tools, add_generation_prompt=False, tokenize=False)
    except Exception:  # a template that refuses a partial conversation (one that must end with a user turn)
        return None
    if not isinstance(part, str) or not part or not text.startswith(part):
        return None
    if ends is not None:
        pos = ends.get(len(part))
    else:  # no offsets: encode the part (slower), and keep it when the prompt starts with those tokens
        ids = tokenizer.encode(part, add_special_tokens=False)
        pos = len(ids) if tokens[: len(ids)] == ids else None
    return pos if pos is not None and 0 < pos < len(tokens) else None
