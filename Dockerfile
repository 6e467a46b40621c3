# One image for the api (default), the worker (EXTRAS=worker) and Flower (EXTRAS=flower); the api never
# imports MLX. The worker needs MLX on its host: on a Mac run `mlxq worker` natively (Metal is not
# reachable from a container); on Linux this image with the worker extra runs it on the CPU (or
# mlx[cuda12] on NVIDIA).
FROM python:3.11-slim
# The system OpenBLAS: MLX's CPU wheel links a slow reference BLAS, and the worker preloads this one.
RUN apt-get update && apt-get install -y --no-install-recommends libopenblas0-pthread && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY mlxq mlxq
COPY api api
COPY worker worker
COPY cli cli
COPY migrations migrations
ARG EXTRAS=""
RUN pip install --no-cache-dir -e ".${EXTRAS:+[$EXTRAS]}"
# Not root. The data dir and the mount points inside it exist, owned by that user, so named volumes
# mounted there start out writable by it.
RUN useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin mlxq \
    && mkdir -p /data/models /data/prefix_cache && chown -R mlxq:mlxq /data
USER mlxq
ENV MLXQ_DATA_DIR=/data MLXQ_HOST=0.0.0.0
EXPOSE 8000
CMD ["mlxq", "api"]
