# The api image (no MLX). The worker needs MLX on its host: on a Mac run `mlxq worker` natively;
# on Linux the same image with the worker extra runs it on the CPU (or mlx[cuda12] on NVIDIA).
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends libopenblas0-pthread && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY mlxq mlxq
COPY api api
COPY worker worker
COPY migrations migrations
ARG EXTRAS=""
RUN pip install --no-cache-dir -e ".${EXTRAS:+[$EXTRAS]}"
ENV MLXQ_DATA_DIR=/data MLXQ_HOST=0.0.0.0
EXPOSE 8000
CMD ["mlxq", "api"]
