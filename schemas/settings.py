"""The one settings object, read from the environment (prefix `DUALSTREAM_`) at start-up.

Nothing reads the environment at import time: entry points call `Settings()` and pass it on.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DUALSTREAM_", extra="ignore")

    # Where work comes from and results go
    redis_url: SecretStr = Field(
        default=SecretStr("redis://127.0.0.1:6379/0"),
        description="redis:// or rediss:// URL (AUTH in the URL), or sentinel:// URLs joined "
        "by ';' (one per sentinel); broker and result store",
    )
    redis_sentinel_master: str = Field(
        default="mymaster", description="sentinel:// URLs: the name of the monitored primary")
    redis_replicas_to_ack: int = Field(
        default=0, ge=0, description="an enqueue is acknowledged only once this many replicas "
        "have it (Redis WAIT), so a failover cannot lose it; 1 with Sentinel")
    redis_replicas_ack_timeout_ms: int = Field(
        default=2000, ge=1, description="how long an enqueue waits for its replicas before "
        "it fails and is retried")
    output_uri: str = Field(
        default="file://./dualstream-out",
        description="s3://bucket/prefix or file:///dir: where embedding shards are written",
    )
    redis_tls_ca_file: str | None = Field(
        default=None, description="rediss://: CA bundle that signs the server's certificate "
        "(default: the system's CAs); the certificate and host name are always verified",
    )
    redis_tls_cert_file: str | None = Field(
        default=None, description="rediss://: client certificate, for servers that require one"
    )
    redis_tls_key_file: str | None = Field(
        default=None, description="rediss://: the client certificate's private key"
    )
    key_prefix: str = "ds"
    result_ttl_s: int = 7 * 24 * 3600

    # The model
    model: str = Field(default="", description="model spec the worker serves (see README)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    channels_last: bool = Field(
        default=False, description="run the vision tower in channels-last memory format"
    )
    compile: bool = Field(
        default=False, description="torch.compile the vision tower at start-up (slow start)"
    )

    # Decoding
    jpeg_draft: bool = Field(
        default=False, description="decode JPEGs at 1/2-1/8 scale when the model's input is "
        "smaller (2x less CPU; pixels differ slightly from the reference preprocessing)",
    )
    image_decoder: Literal["pil", "torch"] = Field(
        default="pil", description="pil: Pillow on the prepare threads, exactly as the reference "
        "libraries; torch: JPEG batches decoded and resized by torchvision on the model's device "
        "(the GPU's decoder on CUDA); other formats and failures fall back to pil",
    )
    # Unset, transparent pixels keep the colour stored under them, as in every family's
    # reference pipeline (Pillow's convert("RGB")); set, they are composited onto this colour.
    image_background: str | None = Field(
        default=None, description="composite alpha and transparency onto this colour (a name "
        "such as 'white' or '#rrggbb') instead of dropping them as the references do",
    )

    # Batching and concurrency
    max_batch_items: int = Field(default=64, ge=1, le=65_535)  # a shard's rows: u16 in records
    max_batch_wait_ms: int = Field(default=100, ge=0, description="longest wait for batch-mates "
                                   "while more items are being prepared; a lone item never waits")
    max_inflight_messages: int = Field(default=16, ge=1, description="unacknowledged messages")
    fetch_threads: int = Field(default=16, ge=1)
    preprocess_threads: int = Field(default=2, ge=1)
    worker_processes: int = Field(
        default=1, ge=1, description="worker processes for the model on this machine, each "
        "with its own interpreter and model copy (sharing the GPU); more than 1: a supervisor "
        "starts them (worker/supervisor.py)")
    worker_devices: list[str] = Field(
        default_factory=list, description="one GPU per worker process: process i sees only "
        "worker_devices[i % len] (its CUDA_VISIBLE_DEVICES), e.g. [\"0\",\"1\",\"2\",\"3\"] "
        "with worker_processes=4 for four GPUs; empty: every process sees what this one does")

    # Sources
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    allowed_buckets: list[str] = Field(
        default_factory=list, description="buckets jobs may read; empty: any the credentials can"
    )
    allowed_http_hosts: list[str] = Field(
        default_factory=list,
        description="hosts (glob patterns) that http(s) sources may name; empty: no http sources",
    )
    http_allow_private_networks: bool = Field(
        default=False, description="let allowed http hosts resolve to private addresses (on-prem)"
    )
    local_root: str | None = Field(
        default=None, description="local mode: file sources must lie under this directory"
    )

    # Upload events (producer/event_cli.py)
    webhook_token: SecretStr | None = Field(
        default=None, description="the bearer token the events webhook requires (MinIO's "
        "auth_token; an SNS HTTPS subscription sends it as its basic-auth password)")
    webhook_require_token: bool = Field(
        default=True, description="false: the webhook accepts requests without a token "
        "(only behind something else that authenticates them)")
    sns_confirm_hosts: list[str] = Field(
        default_factory=list, description="hosts (glob patterns) besides AWS's own "
        "(*.amazonaws.com, *.amazonaws.com.cn) whose https SubscribeURL may be confirmed")

    # The dead-letter store (control/deadletters.py): past either cap, the oldest are trimmed
    dead_letter_max_entries: int = Field(default=10_000, ge=1)
    dead_letter_max_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)

    # Limits on input
    max_image_bytes: int = 50 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_image_side: int = 20_000

    # Reliability
    visibility_timeout_s: int = Field(
        default=300, ge=1, description="the longest a live worker holds a message before it "
        "retries it; a dead worker's messages are back within this (or heartbeat_ttl_s)")
    heartbeat_ttl_s: float = Field(
        default=10.0, gt=0, description="a consumer whose heartbeat is this old is dead: what "
        "it held goes back on the queue (capped at visibility_timeout_s)")
    claim_lease_s: int = Field(default=120, ge=1)
    max_deliveries: int = Field(default=5, ge=1)
    max_retries: int = Field(default=8, ge=0)
    retry_backoff_s: float = 1.0
    drain_timeout_s: float = 25.0

    # The HTTP API (`dualstream api`, producer/api.py)
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8080, ge=1, le=65_535)
    api_token: SecretStr | None = Field(
        default=None, description="bearer token every /v1 route asks for (not the scaling one)")
    api_require_token: bool = Field(
        default=True, description="false: the API takes requests without a token (local use)")
    api_max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    api_max_backlog_jobs: int = Field(
        default=1_000_000, ge=0, description="429 for a model with this many jobs queued and "
        "held; 0: no bound")
    unserved_models: Literal["refuse", "warn", "allow"] = Field(
        default="warn", description="a submission to a model no worker announced: refused, "
        "accepted with a warning, or accepted")
    search_timeout_s: float = Field(
        default=30.0, gt=0, description="POST /v1/search: the longest the API waits for a "
        "worker to embed the query (then 504)")
    search_cache_mb: int = Field(
        default=1024, ge=0, description="POST /v1/search: the vectors of recently searched "
        "exports and runs the API keeps loaded, in MiB (the least recently used go first)")
    search_roots: list[str] = Field(
        default_factory=list, description="POST /v1/search: folders and s3://bucket/prefix "
        "locations under which `export` may name an export; empty: any the API can read")

    # Celery task events, which Flower and `celery events` show: three a message (received,
    # started, succeeded), sent in batches every `task_events_flush_s` (worker/task_events.py;
    # 0: each at once, one PUBLISH apiece, as Celery sends them)
    task_events: bool = True
    task_events_flush_s: float = Field(default=1.0, ge=0, le=60)

    # Prometheus metrics and the HTTP probes (/metrics, /livez, /readyz) of a worker; 0: off
    metrics_port: int = Field(default=0, ge=0, le=65_535)
    metrics_host: str = "0.0.0.0"

    # Health files for Kubernetes probes
    health_dir: str = "/tmp/dualstream-health"
    health_interval_s: float = Field(default=5.0, gt=0)
    stall_timeout_s: float = Field(default=60.0, gt=0, description="liveness: max model stall")

    @property
    def redis_dsn(self) -> str:
        return self.redis_url.get_secret_value()
