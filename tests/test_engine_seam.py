"""The engine's seam (worker.generator, worker.model_spec, worker.sequence_builder) on the tiny random llama: a
draft model and a LoRA adapter load and are budgeted, sampling settings cover every sampling field, and the
batcher decodes through whatever generator it is given."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from worker.blas import preload_openblas

preload_openblas()

import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm import load as mlx_load  # noqa: E402
from mlx_lm import stream_generate as mlx_stream_generate  # noqa: E402
from mlx_lm.tuner.utils import linear_to_lora_layers  # noqa: E402

import worker.batcher  # noqa: E402
from mlxq.request import SAMPLING, Request  # noqa: E402
from worker.engine import Engine, ModelSpec  # noqa: E402
from worker.generator import Admission, Generator, GeneratorConfig, Step, mlx_batch_generator  # noqa: E402
from worker.memory import weights_bytes  # noqa: E402
from worker.sequence_builder import SamplingSettings, sampling_settings  # noqa: E402

PROMPT = {"messages": [{"role": "user", "content": "Tell me about the sea."}], "temperature": 0.0, "max_tokens": 12}
LORA = {"rank": 4, "scale": 20.0, "dropout": 0.0}


@pytest.fixture(scope="module")
def plain(tiny_model: Path) -> Iterator[Engine]:
    engine = Engine.load(str(tiny_model))
    yield engine
    engine.close()  # its engine thread, left running, aborted the interpreter's exit (MLX's thread-locals)


@pytest.fixture(scope="module")
def adapter(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter for the tiny model in mlx-lm's format, its lora_b random so that it changes the answer."""
    model, _ = mlx_load(str(tiny_model))
    model.freeze()
    layers = len(model.layers)
    linear_to_lora_layers(model, layers, LORA)
    mx.random.seed(3)
    lora = {
        name: mx.random.normal(v.shape) * 0.5 if name.endswith("lora_b") else v
        for name, v in tree_flatten(model.trainable_parameters())
    }
    assert lora and all(name.rsplit(".", 1)[-1] in ("lora_a", "lora_b") for name in lora)
    out = tmp_path_factory.mktemp("adapter") / "tiny-lora"
    out.mkdir()
    mx.save_safetensors(str(out / "adapters.safetensors"), lora)
    config = {"fine_tune_type": "lora", "num_layers": layers, "lora_parameters": LORA}
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def test_a_draft_model_is_held_and_budgeted_and_leaves_greedy_output_alone(
    tiny_model: Path, tmp_path: Path, plain: Engine
):
    draft_dir = tmp_path / "draft"
    shutil.copytree(tiny_model, draft_dir)  # the tiny model as its own draft, from another directory
    engine = Engine.load(ModelSpec(str(tiny_model), draft=str(draft_dir)))
    try:
        assert engine.draft is not None
        assert engine.generate("chat", PROMPT) == plain.generate("chat", PROMPT)
        draft_bytes = weights_bytes(engine.draft)
        assert draft_bytes == weights_bytes(engine.model) > 0
        assert engine.budget.weights == plain.budget.weights + draft_bytes
        limits = engine.budget.limits()
        assert limits["weights"] == limits["weights_model"] + limits["weights_draft"]
        assert limits["weights_draft"] == draft_bytes
        # The draft is part of the identity; the answers' name (no adapter) is the model's.
        assert engine.key.draft and engine.key != plain.key and engine.key.weights == plain.key.weights
    finally:
        engine.close()


def test_an_adapter_changes_the_key_and_decodes_as_mlx_lm_does(tiny_model: Path, adapter: Path, plain: Engine):
    engine = Engine.load(ModelSpec(str(tiny_model), adapter=str(adapter)))
    try:
        assert engine.key.adapter and engine.key != plain.key
        assert engine.key.weights != plain.key.weights  # answers are cached apart from the base model's
        limits = engine.budget.limits()
        assert limits["weights_adapter"] > 0
        assert limits["weights"] == limits["weights_model"] + limits["weights_adapter"]

        tokens = plain.chat_tokens(PROMPT)
        request = {"prompt": tokens, "temperature": 0.0, "max_tokens": 16}
        ours = engine.generate("completion", request)
        model, tokenizer = mlx_load(str(tiny_model), adapter_path=str(adapter))
        their_tokens = [r.token for r in mlx_stream_generate(model, tokenizer, prompt=tokens, max_tokens=16)]
        # The continuation as text after the prompt: a completion keeps its first token's leading space, which
        # mlx-lm's detokenizer drops (worker.sequence's `keep_space`).
        theirs = tokenizer.decode(tokens + their_tokens)[len(tokenizer.decode(tokens)) :]
        assert ours["text"] == theirs
        assert ours["text"] != plain.generate("completion", request)["text"], "the adapter must change the answer"
    finally:
        engine.close()


def test_sampling_settings_have_one_field_per_sampling_parameter():
    assert {f.name for f in fields(SamplingSettings)} == set(SAMPLING)
    request = Request.model_validate({"model": "m", "prompt": "x", "top_k": 100, "seed": 5, "logprobs": True})
    settings = sampling_settings(request, vocab_size=100)
    assert settings.temperature == 1.0 and settings.top_k == 0  # a top_k at the vocabulary keeps every token
    assert settings.seed == 5 and settings.logprobs and settings.top_logprobs == 0
    assert sampling_settings(request, vocab_size=1000).top_k == 100


class Counting:
    """mlx-lm's generator behind the interface, counting what the batcher asks of it."""

    def __init__(self, inner: Generator, calls: dict[str, int]) -> None:
        self.inner, self.calls = inner, calls

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def admit(self, admission: Admission) -> int:
        self._count("admit")
        return self.inner.admit(admission)

    def step(self) -> Step:
        self._count("step")
        return self.inner.step()

    def extract(self, uid: int) -> tuple[list[Any], list[int]]:
        self._count("extract")
        return self.inner.extract(uid)

    def remove(self, uid: int) -> None:
        self._count("remove")
        self.inner.remove(uid)


def test_the_batcher_decodes_only_through_the_generator_it_is_given(tiny_model: Path, plain: Engine):
    assert not hasattr(worker.batcher, "BatchGenerator")
    calls: dict[str, int] = {}
    made: list[GeneratorConfig] = []

    def factory(config: GeneratorConfig, stream: Any) -> Generator:
        made.append(config)
        return Counting(mlx_batch_generator(config, stream), calls)

    engine = Engine.load(str(tiny_model), generator=factory)
    try:
        engine.enable_prefix_cache(max_entries=4, max_bytes=1 << 30)
        result = engine.generate("chat", PROMPT)
        assert result == plain.generate("chat", PROMPT)
        assert len(made) == 1 and made[0].model is engine.model
        assert calls["admit"] == 1
        # One token per step, and each accepted draft (worker.speculative) one more.
        assert calls["step"] + engine.draft_stats.accepted >= result["usage"]["completion_tokens"]
        # Stopped by its stop string, not by the generator: its cache is taken out through the interface.
        stop = result["text"][3:6]
        cut = engine.generate("chat", {**PROMPT, "stop": [stop]})
        assert cut["finish_reason"] == "stop" and calls["admit"] == 2 and calls["extract"] == 1
        engine.generate("chat", {**PROMPT, "stop": [stop]}, use_prefix_cache=False)
        assert calls["remove"] == 1
    finally:
        engine.close()
