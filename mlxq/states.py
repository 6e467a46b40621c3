"""The states things move through, written once for api, worker and scripts alike.

StrEnums, so a value read back from a database row or a JSON body compares equal to its member, and
a member is stored and serialised as its plain string.

- A job: queued -> running -> succeeded | failed | cancelled. Only an active job changes state (a late
  writer never overwrites a final one); a running job whose worker died goes back to queued.
- A batch (OpenAI's lifecycle): validating -> in_progress -> finalizing -> completed, or
  in_progress -> cancelling -> finalizing -> cancelled, or in_progress -> finalizing -> expired past its
  window; failed when it cannot run at all.
- A Responses API response (and its output items): queued -> in_progress -> completed | incomplete (cut by
  max_output_tokens or the context) | failed | cancelled; an item is in_progress, then completed or incomplete.
- A file: processed once stored (OpenAI's uploads are checked when a batch reads them).
- A finish reason: why a generation stopped.
- A cache outcome: what the response cache did for a request (the `X-Cache` header).
- A route reason: why a job went to the worker it went to.
"""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


JOB_ACTIVE: tuple[JobStatus, ...] = (JobStatus.QUEUED, JobStatus.RUNNING)
JOB_FINAL: tuple[JobStatus, ...] = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class BatchStatus(StrEnum):
    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


# A batch in one of these leaves it only for a final one.
BATCH_OPEN: tuple[BatchStatus, ...] = (
    BatchStatus.VALIDATING,
    BatchStatus.IN_PROGRESS,
    BatchStatus.FINALIZING,
    BatchStatus.CANCELLING,
)
BATCH_FINAL: tuple[BatchStatus, ...] = (
    BatchStatus.COMPLETED,
    BatchStatus.FAILED,
    BatchStatus.EXPIRED,
    BatchStatus.CANCELLED,
)


class ResponseStatus(StrEnum):
    """A Responses API response's `status` (api.dialects.responses), and its output items' (the three middle ones)."""

    QUEUED = "queued"  # a background response not started yet
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    INCOMPLETE = "incomplete"  # cut by max_output_tokens or the context
    FAILED = "failed"
    CANCELLED = "cancelled"


# A response in one of these has its answer (its output and usage).
RESPONSE_ANSWERED: tuple[ResponseStatus, ...] = (
    ResponseStatus.COMPLETED,
    ResponseStatus.INCOMPLETE,
    ResponseStatus.CANCELLED,
)


class FileStatus(StrEnum):
    PROCESSED = "processed"


class FilePurpose(StrEnum):
    BATCH = "batch"
    BATCH_OUTPUT = "batch_output"


class FinishReason(StrEnum):
    STOP = "stop"  # an end-of-sequence token or a stop string
    LENGTH = "length"  # max_tokens or the context
    TOOL_CALLS = "tool_calls"  # the answer is tool calls
    CANCELLED = "cancelled"  # stopped on request (client gone, DELETE, the worker stopping)


class CacheOutcome(StrEnum):
    HIT = "HIT"  # answered from the response cache
    MISS = "MISS"  # looked up, not found: generated
    BYPASS = "BYPASS"  # not looked up (sampled, no-cache)
    MIXED = "MIXED"  # several prompts of one request, not all alike


class RouteReason(StrEnum):
    """Why mlxq.delivery sent a job to its worker (in this order of precedence)."""

    PREFIX = "prefix"  # that worker's prefix cache holds the longest prefix of the request
    SESSION = "session"  # no worker holds more of it than another: the session's worker (a consistent hash)
    BALANCE = "balance"  # the worker it would go to is loaded past the margin: the least loaded one instead
    UNROUTED = "unrouted"  # no live worker serves its model yet: it waits, unsent, for one
