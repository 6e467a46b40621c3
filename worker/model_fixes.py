"""Fixes to mlx-lm model classes that batch wrongly, applied once before a model is loaded.

mlx-lm's batched prefill right-pads the shorter prompts of a batch and tells recurrent layers each row's true
length (`ArraysCache.lengths`) so that padding never enters their state. granitemoehybrid passes those lengths to
the Mamba2 `ssm_update`; nemotron_h (mlx-lm 0.32.2) does not, so a prompt batched with longer ones ends its
prefill with the padding folded into its SSM state and answers differently from `mlx_lm.generate`. The fix is the
same one line granitemoehybrid has; it is written here (rather than waiting on mlx-lm) because nemotron_h is one
of the families users run, and it applies only where the installed class still lacks it, so a fixed mlx-lm is left
alone.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

_applied = False


def apply() -> None:
    """Patch the installed mlx-lm's known batching bugs (idempotent)."""
    global _applied
    if _applied:
        return
    _applied = True
    _nemotron_h_lengths()


def _nemotron_h_lengths() -> None:
    try:
        module = importlib.import_module("mlx_lm.models.nemotron_h")
    except ImportError:
        return
    mixer = module.NemotronHMamba2Mixer
    if "lengths" in inspect.getsource(mixer._ssm):
        return
    ssm_update = module.ssm_update

    def _ssm(self: Any, hidden_states: Any, B: Any, C: Any, dt: Any, cache: Any, mask: Any) -> Any:  # noqa: N803
        batch, length, _ = hidden_states.shape
        y, state = ssm_update(
            hidden_states.reshape(batch, length, self.num_heads, self.head_dim),
            self.A_log,
            B.reshape(batch, length, self.n_groups, self.ssm_state_size),
            C.reshape(batch, length, self.n_groups, self.ssm_state_size),
            self.D.astype(hidden_states.dtype),
            dt,
            self.dt_bias,
            cache[1] if cache else None,
            self.time_step_limit,
            mask,
            cache.lengths if cache else None,
        )
        if cache:
            cache[1] = state
        return y.reshape(batch, length, self.intermediate_size)

    mixer._ssm = _ssm
