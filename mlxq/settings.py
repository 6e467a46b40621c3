"""Configuration, read from `MLXQ_*` environment variables and `.env`."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

BUILTIN_MODEL = "SmolLM2-135M-Instruct"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MLXQ_", env_file=".env", extra="ignore")

    data_dir: Path = Field(default_factory=lambda: Path.home() / ".mlxq")
    # Empty means the embedded default: SQLite files in data_dir.
    database_url: str = ""
    broker_url: str = ""
    # A model directory or hub id; empty means the built-in SmolLM2 pulled into data_dir.
    model: str = ""
    # The id clients send in `model`; defaults to the model directory's name.
    model_name: str = ""
    # A draft model directory for speculative decoding (same tokenizer, budgeted): it drafts where prompt lookup finds
    # nothing (worker.speculative).
    draft_model: str | None = None
    # An mlx-lm LoRA adapter directory (adapters.safetensors, adapter_config.json) applied to the model.
    adapter_path: str | None = None
    # Other names clients may send for the served model (fnmatch patterns; a value of "" or the served name
    # means the served model). Claude Code sends its own model names (a main and a small fast one); by
    # default every name is the served model. `{}` refuses any name but the served one (404).
    model_aliases: dict[str, str] = {"*": ""}
    # Models besides the main one (`model`, `model_name`), by the name clients send: {"name": directory or hub
    # id}. `mlxq serve` starts and supervises a worker for each; the api serves them too (as it serves every
    # model a live worker publishes). One model per worker process, always.
    models: dict[str, str] = {}
    # This worker's identity, unique among the live workers (its own queue is named by it): `mlxq serve`
    # names each worker it supervises, so a restarted one finds its predecessor's jobs; a worker started
    # alone is named after its host and process.
    worker_name: str = ""
    # Routing (mlxq.delivery): the worker holding a request's longest prefix gets it unless its load (its
    # sequences in flight and waiting) exceeds the least loaded worker's by more than this.
    route_load_margin: int = Field(default=4, ge=0)
    # "prefix" (the above); "load": the least loaded worker, prefixes and sessions ignored, as a shared queue
    # delivers (the baseline scripts/bench_routing.py measures against).
    routing: Literal["prefix", "load"] = "prefix"
    # Cache sampled requests (temperature > 0, no seed) too: an identical retry of an agent turn is then
    # a hit, at the cost of always answering it with the same sample.
    cache_sampled: bool = False
    # A sync request whose client disconnects is cancelled (unless another client shares it); with this set it
    # runs to its end instead and its answer is cached, for a client that retries after a timeout.
    finish_abandoned: bool = False
    # API keys, comma-separated (more can be stored hashed in the database: `mlxq keys add`). With any
    # key set, every endpoint but /health needs one (Authorization: Bearer, or x-api-key); jobs, batches
    # and files belong to the key that made them, and each key has its own response-cache namespace
    # unless `cache_scope` is "global".
    api_keys: SecretStr = SecretStr("")
    # What the caches share (README, "What the caches share"): "key", each key its own response cache, prefix KV
    # cache and routing; "global", all keys one (one tenant, many keys).
    cache_scope: Literal["key", "global"] = "key"
    # With keys on, /health without a valid key says only whether the service is up (no counts, no cache figures);
    # true shows every caller the details, as with keys off.
    health_details: bool = False
    # Back-pressure: with this many jobs queued, a request that would queue one more is a 429 with
    # Retry-After (0 = no ceiling); and a ceiling on max_tokens, clamped, not refused (0 = none).
    max_queue_depth: int = Field(default=0, ge=0)
    max_tokens_ceiling: int = Field(default=0, ge=0)
    queue: str = "mlxq"
    # Prefix of every Redis key the service writes besides Celery's own.
    redis_prefix: str = "mlxq"

    host: str = "127.0.0.1"
    port: int = 8000

    cache_max_entries: int = 10_000
    cache_ttl_s: float | None = None
    default_temperature: float = 1.0
    default_max_tokens: int = 512
    # How long a synchronous request waits for its job before answering 504.
    request_timeout_s: float = 600.0
    # Embedded mode: the safety-net poll of the SQL broker and stream channel. A local wake-up signal
    # (mlxq.bell) carries the latency; this poll only catches a lost signal, so it can be slow.
    poll_interval_s: float = 1.0
    heartbeat_s: float = 2.0
    # `mlxq serve` kills and restarts a worker whose heartbeat has stopped this long (hung, or stopped with
    # SIGSTOP): its process lives, so nothing else would. Its running jobs go back to the queue as a dead one's.
    worker_hung_s: float = Field(default=60.0, gt=0)
    # How long a request waits for a worker of its model while none is alive (one restarting after a crash, the
    # watchdog, or loading at start): past it, a request that would need a new inference is a 503
    # `worker_unavailable` at once, and one already waiting gets it too and its job is cancelled. Submitted jobs,
    # batch lines and background responses wait regardless (up to job_queue_timeout_s).
    worker_wait_s: float = Field(default=120.0, gt=0)
    # SSE keepalive comment interval while a streamed job waits or prefills.
    sse_keepalive_s: float = 5.0
    # The worker's memory budget (GB of MLX memory: weights, KV in flight, prefix cache, prefill, buffer cache;
    # the process's own Python memory comes on top, as /health's allowance). 0: on macOS MLX's recommended
    # working set, elsewhere the machine's memory less a quarter (at least 2 GB). Per worker process.
    memory_gb: float = Field(default=0.0, ge=0)
    # Prefix-trie KV cache in the worker: entries, memory bound (MB; 0 = its share of the memory budget),
    # disk bound (MB; 0 = same as memory) of the disk tier (entries evicted from memory, served back on a hit) and of
    # what is saved for a restart, and how often it is saved.
    prefix_cache: bool = True
    prefix_cache_size: int = 16
    prefix_cache_mb: int = 0
    prefix_cache_disk_mb: int = 0
    prefix_cache_save_s: float = 60.0
    # Idle prefix entries in a cheaper form: over its byte bound, the prefix cache quantizes its least recently used
    # entries' KV layers to this many bits (8 or 4; 0 = never, every hit exact) before it evicts any, and a hit
    # dequantizes them. An entry in use stays exact until pressure reaches it. Measured on SmolLM2-135M (float32 KV,
    # CPU): an entry takes 3.56x fewer bytes at 8 bits (6.4x at 4), so a 200 MB budget kept 16 1,000-token sessions
    # (29 at 4 bits) instead of 4; a hit dequantizes a 2,000-token entry in ~50 ms against 19 s to prefill it; and
    # over 8 turns served from 8-bit entries every greedy answer equalled the uncached one, where at 4 bits 4 of
    # the 8 differed. A bfloat16 model gains 1.9x at 8 bits, 3.6x at 4 (worker.prefix_cache.DISK_MIN_TOKENS).
    prefix_cache_bits: int = 8
    # Continuous batching in the worker: sequences decoded together, the KV tokens they may hold
    # (prompt + max_tokens of each; 0 = the memory budget's KV share), at most this many prefilled together,
    # and the Celery consumer threads that hand requests to the engine (each waits on one request).
    batch_size: int = Field(default=16, ge=1)
    batch_tokens: int = Field(default=0, ge=0)
    prefill_batch_size: int = Field(default=8, ge=1)
    worker_threads: int = Field(default=64, ge=1)
    # The worker's scheduler (issue 25): each step decodes the batch, then prefills waiting prompts (interactive
    # first, then by fair share, shortest first) for about the rest of this many ms, by the model's prefill rate as
    # measured. It is what a newcomer waits for the step in progress and a decoding stream pauses, about; longer
    # prefills a long prompt with fewer decode steps between its chunks (beside decoding sequences a step runs longer
    # by itself, up to 2.7x this, where their decode would take over 13% of it). 0: mlx-lm's own prefill (fixed chunks of
    # every prompt in its prompt batch together, padded), for comparison.
    step_target_ms: float = Field(default=150.0, ge=0)
    # Fair shares of the batch between API keys (with keys off, between sessions): each key's weight by its id (as
    # `mlxq keys list` shows it; a JSON map, {"<id>": 2.0}; 1 each by default) in who is admitted and prefilled next,
    # and the most sequences one key holds in the batch while another key waits (0: half the batch): over it, its
    # sequences wait, and one gives way (parked, resumed later) to another key's interactive request.
    key_weights: dict[str, float] = {}
    key_max_inflight: int = Field(default=0, ge=0)
    # A low-priority request (a job, a batch line) waiting this long in the worker is admitted and prefilled as an
    # interactive one: strict priority would hold it for as long as an interactive flood lasts. 0: strict priority.
    low_priority_age_s: float = Field(default=30.0, ge=0)
    # Speculative decoding in the batch (worker.speculative): "lookup" drafts tokens by prompt lookup (n-grams of
    # each sequence's own prompt and output, and the client's `prediction`; an answer that copies its prompt gets
    # several tokens per step, and one that copies nothing decodes plainly), "off" decodes one token per step.
    # true/false are taken for lookup/off. scripts/bench_spec.py measures both.
    speculative: Literal["lookup", "off"] = "lookup"

    @field_validator("speculative", mode="before")
    @classmethod
    def _speculative_bool(cls, v: object) -> object:
        if isinstance(v, bool):
            return "lookup" if v else "off"
        if isinstance(v, str) and v.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no"):
            return "lookup" if v.strip().lower() in ("1", "true", "yes", "on") else "off"
        return v

    # Niceness the worker process adds to itself (0 = none).
    worker_nice: int = 0
    # Reliability: a job whose worker died runs again, at most this many times in all (so one request
    # that kills the worker cannot crash-loop it); a job no worker starts within the timeout fails.
    max_attempts: int = Field(default=2, ge=1)
    job_queue_timeout_s: float = 24 * 3600.0
    # A queued job whose task message is older than this while the broker's queue is empty lost its
    # message (a worker died holding it, a broker restarted): it is sent again.
    resend_after_s: float = 10.0
    # Retention: finished jobs, the request log, and stream events of finished jobs.
    job_retention_s: float = 7 * 24 * 3600.0
    request_log_retention_s: float = 30 * 24 * 3600.0
    stream_retention_s: float = 3600.0
    # How often the api prunes by the retention settings above.
    housekeeping_s: float = 600.0
    # Batches: lines and bytes per input file (OpenAI's limits are 50,000 and 200 MB), how long files and
    # finished batches are kept, and how many low-priority jobs (batch lines, jobs that ask for it) are in
    # flight at once (0 = twice batch_size): the rest wait in the database, not in the broker, so an
    # interactive request never queues behind a batch and still finds a free worker thread.
    max_batch_lines: int = Field(default=50_000, ge=1)
    max_file_mb: float = Field(default=200, gt=0)
    file_retention_s: float = 30 * 24 * 3600.0
    low_priority_window: int = Field(default=0, ge=0)
    # Set by `mlxq serve` for the worker it supervises: the worker stops when that process is gone.
    supervisor_pid: int = 0
    # Bad-input limits, checked by the api before anything is enqueued. A body over `max_body_mb` is a 413
    # before it is parsed (a JSON body is held whole in memory, and a 16 MB one is already ~4M tokens of
    # text, past any context); the counts bound the work one request can make the api and worker do while
    # validating and templating (`max_tools` is OpenAI's own limit; `max_stop`, `max_prompts` are generous).
    max_body_mb: float = Field(default=16, gt=0)
    max_messages: int = Field(default=2048, ge=1)
    max_tools: int = Field(default=128, ge=1)
    max_stop: int = Field(default=16, ge=1)
    max_prompts: int = Field(default=256, ge=1)
    # Flower (`mlxq flower`, Celery's monitor; needs the Redis broker). Basic auth always: bound to loopback
    # without a password, a one-time password is made and printed; bound elsewhere, a password is required.
    # Refused: a ',' in either (Flower splits --basic-auth on commas into several logins) and a ':' in the
    # user (basic auth ends the user at the first colon, so that user could never log in).
    flower_host: str = "127.0.0.1"
    flower_port: int = Field(default=5555, ge=1, le=65535)
    flower_user: str = "mlxq"
    flower_password: SecretStr = SecretStr("")

    @field_validator("prefix_cache_bits")
    @classmethod
    def _quant_bits(cls, bits: int) -> int:
        if bits not in (0, 2, 3, 4, 5, 6, 8):  # mx.quantize's affine widths
            raise ValueError("prefix_cache_bits must be 0 (off), 2, 3, 4, 5, 6 or 8")
        return bits

    @model_validator(mode="after")
    def _defaults(self) -> Settings:
        self.data_dir = self.data_dir.expanduser()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'mlxq.sqlite'}"
        if self.database_url.startswith("postgresql://") or self.database_url.startswith("postgres://"):
            self.database_url = "postgresql+psycopg://" + self.database_url.split("://", 1)[1]
        if not self.broker_url:
            self.broker_url = f"sqla+sqlite:///{self.data_dir / 'broker.sqlite'}"
        if not self.model:
            self.model = str(self.data_dir / "models" / BUILTIN_MODEL)
        if not self.model_name:
            self.model_name = Path(self.model).name or self.model
        return self

    @property
    def served_models(self) -> dict[str, str]:
        """Every configured model by name, the main one first: {name: directory or hub id}."""
        return {self.model_name: self.model, **{k: v for k, v in self.models.items() if k != self.model_name}}

    @property
    def worker_lost_after_s(self) -> float:
        """A worker is gone after missing several heartbeats (and at least 10 s): nothing is routed to it, and
        its jobs go to another."""
        return max(10.0, 5 * self.heartbeat_s)

    @property
    def low_window(self) -> int:
        return self.low_priority_window or 2 * self.batch_size

    @property
    def uses_redis(self) -> bool:
        return self.broker_url.startswith(("redis://", "rediss://"))

    @property
    def builtin_model_dir(self) -> Path:
        return self.data_dir / "models" / BUILTIN_MODEL


@lru_cache
def get_settings() -> Settings:
    return Settings()
