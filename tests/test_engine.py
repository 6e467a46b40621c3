"""The MLX engine on real models: the tiny random llama for mechanics, SmolLM2 for the real answer."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker.blas import preload_openblas

preload_openblas()

from worker.engine import Engine, RequestError  # noqa: E402

USER = {"role": "user", "content": "What is the capital of France?"}


@pytest.fixture(scope="module")
def tiny(tiny_model: Path) -> Iterator[Engine]:
    engine = Engine.load(str(tiny_model))
    yield engine
    engine.close()  # a running engine thread can abort the interpreter's exit (MLX's thread-locals)


@pytest.fixture(scope="module")
def smol(smollm2: Path) -> Iterator[Engine]:
    engine = Engine.load(str(smollm2))
    yield engine
    engine.close()


class Deltas:
    """Collects the engine's events."""

    def __init__(self) -> None:
        self.events: list[dict] = []

    def __call__(self, event: dict) -> None:
        self.events.append(event)

    @property
    def parts(self) -> list[str]:
        return [e["content"] for e in self.events if e["type"] == "delta"]

    @property
    def text(self) -> str:
        return "".join(self.parts)


def chat(**kw) -> dict:
    return {"messages": [USER], "temperature": 0.0, "max_tokens": 12, **kw}


def test_builtin_smollm2_answers_paris(smol: Engine):
    result = smol.generate("chat", chat(max_tokens=30))
    assert result["text"] == "The capital of France is Paris."
    assert result["finish_reason"] == "stop"
    assert result["usage"]["prompt_tokens"] == len(smol.chat_tokens(chat()))


def test_gguf_conversion_keeps_per_module_bits(smollm2: Path):
    config = json.loads((smollm2 / "config.json").read_text())
    assert config["quantization"]["bits"] == 4
    assert config["quantization"]["model.embed_tokens"]["bits"] == 8
    assert config["rope_traditional"] is True and config["tie_word_embeddings"] is True


def test_tokenizer_round_trips_and_knows_special_tokens(smol: Engine):
    text = "def f(x):\n    return x ** 2  # 12345 ünïcödé"
    assert smol.tokenizer.decode(smol.tokenizer.encode(text, add_special_tokens=False)) == text
    assert smol.tokenizer.encode("<|im_start|>", add_special_tokens=False) == [1]


def test_greedy_is_deterministic_and_max_tokens_gives_length(tiny: Engine):
    a = tiny.generate("chat", chat())
    b = tiny.generate("chat", chat())
    assert a == b
    assert a["finish_reason"] == "length" and a["usage"]["completion_tokens"] == 12


def test_seed_makes_sampling_reproducible(tiny: Engine):
    a = tiny.generate("chat", chat(temperature=1.0, seed=7, max_tokens=20))
    b = tiny.generate("chat", chat(temperature=1.0, seed=7, max_tokens=20))
    c = tiny.generate("chat", chat(temperature=1.0, seed=8, max_tokens=20))
    assert a["text"] == b["text"]
    assert c["text"] != a["text"]


def test_stop_string_matched_on_decoded_text(tiny: Engine):
    full = tiny.generate("chat", chat(max_tokens=30))["text"]
    stop = full[5:8]
    assert stop and stop in full
    deltas = Deltas()
    result = tiny.generate("chat", chat(max_tokens=30, stop=[stop]), emit=deltas)
    assert result["text"] == full[: full.index(stop)]
    assert result["finish_reason"] == "stop"
    assert deltas.text == result["text"]  # nothing of the stop string leaked to the stream


def test_streamed_deltas_join_to_the_text(tiny: Engine):
    deltas = Deltas()
    result = tiny.generate("chat", chat(max_tokens=20), emit=deltas)
    assert len(deltas.parts) > 1 and deltas.text == result["text"]
    assert deltas.events[0] == {
        "type": "started",
        "prompt_tokens": result["usage"]["prompt_tokens"],
        "cached_tokens": 0,
    }


def test_prompt_longer_than_context_is_a_400_with_both_counts(tiny: Engine):
    long = {"role": "user", "content": "word " * 3000}
    with pytest.raises(RequestError) as err:
        tiny.generate("chat", {"messages": [long], "temperature": 0, "max_tokens": 4})
    assert err.value.error["status"] == 400
    assert "2048" in err.value.error["message"] and "tokens" in err.value.error["message"]


def test_model_key_is_hashable_and_stable(tiny_model: Path, tiny: Engine):
    again = Engine.load(str(tiny_model))
    assert hash(again.key) == hash(tiny.key) and again.key == tiny.key


def test_missing_model_directory_fails_clearly(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="models pull"):
        Engine.load(str(tmp_path / "nope"))


def test_a_thorough_warm_up_runs_the_batch_paths_together_and_leaves_nothing_behind(
    tiny_model: Path, caplog: pytest.LogCaptureFixture
):
    """On a GPU the warm-up also runs a prompt of several chunks beside a drafting stream and short prompts, greedy
    and sampled, at once (MLX builds a GPU's kernels as it first meets them), then starts the generator afresh: its
    cold forwards must not price the steps after it. Forced here on the CPU."""
    from worker.generator import ChunkedPrefill

    engine = Engine.load(str(tiny_model))
    before = engine.generate("chat", chat())
    with caplog.at_level("WARNING", logger="worker.engine"):
        engine.warm_up(thorough=True)
    assert not [r for r in caplog.records if "warm-up" in r.getMessage()], "it ran, it did not fail"
    stats = engine.batcher.stats()
    assert stats["active"] == 0 and stats["waiting"] == 0 and stats["tokens"] == 0
    gen = engine.batcher._gen
    assert isinstance(gen, ChunkedPrefill) and gen.cost.fit() is None, "the warm-up's timings are forgotten"
    assert engine.generate("chat", chat()) == before
    engine.batcher.stop()


def test_a_process_that_closed_its_engine_exits_cleanly(tiny_model: Path):
    """A script that loads an engine, generates and closes it ends with status 0. The engine thread's C++ thread-locals
    (MLX's compile cache) were destroyed after join() returned, and when the interpreter had begun to finalize by
    then, the process aborted as it ended (status 134, "terminate called without an active exception")."""
    script = (
        "from worker.blas import preload_openblas\n"
        "preload_openblas()\n"
        "from worker.engine import Engine\n"
        f"engine = Engine.load({str(tiny_model)!r})\n"
        "engine.generate('chat', {'messages': [{'role': 'user', 'content': 'hi'}], 'max_tokens': 4})\n"
        "engine.close()\n"
    )
    root = Path(__file__).resolve().parent.parent
    for _ in range(3):  # it aborted on nearly every run before
        done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
