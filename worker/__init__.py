"""The MLX worker: the only place the model lives."""
