"""The MLX worker: the only place the model lives."""

import os

# transformers warns on import that PyTorch is absent; MLX needs only its tokenizers.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
