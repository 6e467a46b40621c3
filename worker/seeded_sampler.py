"""A sampler of its own random keys, for a request that sets `seed`."""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p


class SeededSampler:
    """mlx-lm's sampling chain drawing from its own keys, so a seed reproduces whatever else is batched.

    mlx-lm's samplers draw from the global mx.random.state, which MLX 0.32 no longer lets a caller swap per
    request: its filters are reused here and only the draw is ours. The n-th token of the answer takes the n-th
    key of the seed's chain, whichever step draws it: a speculative step draws several positions at once and
    hands back the keys of those it rejects (`rollback`), so drafting, which depends on the rest of the batch,
    does not move the draws.
    """

    def __init__(self, temp: float, top_p: float, min_p: float, top_k: int, seed: int) -> None:
        self._filters: list[Callable[[mx.array], mx.array]] = []
        if 0 < top_p < 1.0:
            self._filters.append(lambda x: apply_top_p(x, top_p))
        if min_p:
            self._filters.append(lambda x: apply_min_p(x, min_p))
        if top_k > 0:
            self._filters.append(lambda x: apply_top_k(x, top_k))
        self._scale = 1 / temp
        self._chain = mx.random.key(seed)
        self._keys: list[mx.array] = []  # the draws' keys so far, kept for those handed back
        self._drawn = 0

    def __call__(self, logprobs: mx.array) -> mx.array:
        """One token per row of `logprobs` ([L, V]): the answer's next L positions."""
        for f in self._filters:
            logprobs = f(logprobs)
        scaled = logprobs * self._scale
        draws = []
        for i in range(scaled.shape[0]):
            draws.append(mx.random.categorical(scaled[i : i + 1], key=self._key(self._drawn)))
            self._drawn += 1
        return draws[0] if len(draws) == 1 else mx.concatenate(draws)

    def rollback(self, n: int) -> None:
        """The last n positions drawn were not kept: their keys draw them again."""
        self._drawn -= n

    def _key(self, n: int) -> mx.array:
        while len(self._keys) <= n:
            self._chain, draw = mx.random.split(self._chain)
            self._keys.append(draw)
        return self._keys[n]
