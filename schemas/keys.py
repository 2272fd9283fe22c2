"""Every Redis key and object-storage path dualstream uses, named in one place."""

from __future__ import annotations

import base64
import hashlib
import posixpath
import re
from dataclasses import dataclass

TASK_NAME = "dualstream.process"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


# Spellings that name the same model: a family prefix, open_clip's `hf-hub:`/`local-dir:`
# schemas, trailing slashes. The worker still loads the spec it was given; these only decide
# the queue and the model a job names.
_SPEC_PREFIXES = ("align:", "openclip:", "altclip:")
_SOURCE_PREFIXES = ("hf-hub:", "local-dir:")


def canonical_model(spec: str) -> str:
    """The one spelling of a model spec that names its queue: `align:kakaobrain/align-base`,
    `kakaobrain/align-base/` and `kakaobrain/align-base` are one model, as are
    `openclip:hf-hub:laion/X`, `hf-hub:laion/X` and `laion/X`, and `local-dir:/m/`, `/m`."""
    text = spec.strip()
    for prefixes in (_SPEC_PREFIXES, _SOURCE_PREFIXES):
        for prefix in prefixes:
            if text.startswith(prefix) and text[len(prefix):].strip():
                text = text[len(prefix):].strip()
                break
    if text.startswith(("/", "./", "../", "~")):
        text = posixpath.normpath(text)
    return text.rstrip("/") or text


def model_slug(model: str) -> str:
    """A short, filesystem- and queue-safe name for a model spec."""
    readable = _UNSAFE.sub("-", model.rsplit("/", 2)[-1] if model.startswith("/") else model)
    readable = readable.strip("-")[:48] or "model"
    digest = hashlib.sha256(model.encode()).hexdigest()[:8]
    return f"{readable}-{digest}"


def queue_name(model: str) -> str:
    """One Celery queue per model, whichever way its spec is spelled."""
    return f"dualstream.{model_slug(canonical_model(model))}"


@dataclass(frozen=True)
class RedisKeys:
    prefix: str = "ds"

    def record(self, job_id: str) -> str:
        """A job's one record (schemas/records.py): queued, being written, or settled. The job
        id (32 hex digits) is written as base64url of its 16 bytes, unpadded: 22 characters
        keep the key in Redis's 32-byte allocation. An id that is not hex is used as is."""
        try:
            short = base64.urlsafe_b64encode(bytes.fromhex(job_id)).rstrip(b"=").decode()
        except ValueError:
            short = job_id
        return f"{self.prefix}:r:{short}"

    def shard(self, shard_id: str) -> str:
        """A committed shard's vectors' URI, set when its manifest is written: the records
        that name the shard read as done from then on (control/results.py)."""
        return f"{self.prefix}:shard:{shard_id}"

    def shard_runs(self, shard_id: str) -> str:
        """Hash: what a shard's rows add to their runs' counters once it is committed."""
        return f"{self.prefix}:shardruns:{shard_id}"

    def run(self, run_id: str) -> str:
        """Hash: a run's counters (queued, done, failed, failed:<code>), listing cursor, pass."""
        return f"{self.prefix}:run:{run_id}"

    def run_failures(self, run_id: str) -> str:
        """List: one line per failed job of a run, `job id <TAB> code <TAB> source`."""
        return f"{self.prefix}:run:{run_id}:failed"

    def run_lock(self, run_id: str) -> str:
        """Which producer publishes a run right now (`dualstream bulk`)."""
        return f"{self.prefix}:run:{run_id}:lock"

    def publish_token(self, token: str) -> str:
        """A producer's publish call, so that a resent call is not published twice."""
        return f"{self.prefix}:pub:{token}"

    def run_repeats(self, run_id: str) -> str:
        """Set: jobs of a run that another run had already settled (counted once here)."""
        return f"{self.prefix}:run:{run_id}:repeats"

    def inflight(self, consumer: str, queue: str) -> str:
        """The messages of `queue` that one consumer holds (control/inflight.py); the queue
        is what follows the last `|`."""
        return f"{self.prefix}:inflight|{consumer}|{queue}"

    @property
    def consumers(self) -> str:
        """Sorted set: each in-flight list, scored by its consumer's last heartbeat (ms)."""
        return f"{self.prefix}:consumers"

    @property
    def last_sweep(self) -> str:
        """When a consumer last swept the index (ms, Redis's clock)."""
        return f"{self.prefix}:consumers:swept"

    def deliveries(self, message_id: str) -> str:
        return f"{self.prefix}:deliveries:{message_id}"

    @property
    def dead_letters(self) -> str:
        return f"{self.prefix}:dlq"

    def served(self, queue: str, worker: str) -> str:
        """A worker's announcement that it serves `queue` (control/served.py), with a TTL."""
        return f"{self.prefix}:served:{queue}|{worker}"

    @property
    def dead_letter_order(self) -> str:
        """The letters' ids scored by time, oldest first: what the caps trim."""
        return f"{self.prefix}:dlq:order"

    @property
    def dead_letter_stats(self) -> str:
        """The letters' bytes and how many the caps trimmed, ever."""
        return f"{self.prefix}:dlq:stats"


@dataclass(frozen=True)
class ShardPaths:
    """Layout of durable outputs under the output root.

    <root>/<model-slug>/<modality>/<shard_id>.npy      float32 [rows, dim], L2-normalised
    <root>/<model-slug>/<modality>/<shard_id>.parquet  row-aligned metadata
    <root>/<model-slug>/<modality>/<shard_id>.json     manifest: written last; its presence
                                                       commits the shard

    `modality` is `image` or `text`, so each directory holds vectors of one kind. The manifest
    and the metadata columns are described in `schemas/outputs.py`.
    """

    model: str
    modality: str

    @property
    def directory(self) -> str:
        return f"{model_slug(canonical_model(self.model))}/{self.modality}"

    def embeddings(self, shard_id: str) -> str:
        return f"{self.directory}/{shard_id}.npy"

    def metadata(self, shard_id: str) -> str:
        return f"{self.directory}/{shard_id}.parquet"

    def manifest(self, shard_id: str) -> str:
        return f"{self.directory}/{shard_id}.json"
