"""Settings, all from environment variables (see docs/configuration.md).

Unset, they give the embedded default: SQLite, the django-q2 ORM broker, in-process cache and
channel layer. DATABASE_URL and REDIS_URL switch to PostgreSQL and Redis.
"""

from __future__ import annotations

import os
import secrets
from decimal import Decimal
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from agentsvc.env import (
    env_allowed_networks,
    env_bool,
    env_cidr_list,
    env_float,
    env_float_list,
    env_int,
    env_list,
    env_port_list,
    env_prices,
    env_str,
)

BASE_DIR = Path(__file__).resolve().parent.parent
DATA_DIR = Path(env_str("DATA_DIR", str(BASE_DIR / "var")))

DATABASE_URL = env_str("DATABASE_URL")
REDIS_URL = env_str("REDIS_URL")
EMBEDDED = not DATABASE_URL

DEBUG = env_bool("DEBUG", False)
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])


def _secret_key() -> str:
    key = env_str("SECRET_KEY")
    if key:
        return key
    if not EMBEDDED:
        raise ImproperlyConfigured("SECRET_KEY must be set when DATABASE_URL is set")
    # Embedded default: a random key kept next to the SQLite database, so sessions survive restarts.
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    path = DATA_DIR / "secret_key"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(50))
        path.chmod(0o600)
    return path.read_text().strip()


SECRET_KEY = _secret_key()

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_q",
    "channels",
    "agentsvc",
    "runs",
    "webhooks",
    "schedules",
]

MIDDLEWARE = [
    "agentsvc.middleware.RequestContextMiddleware",
    "agentsvc.middleware.ApiProblemMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "agentsvc.middleware.ContentSecurityPolicyMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "agentsvc.urls"
ASGI_APPLICATION = "agentsvc.asgi.application"
WSGI_APPLICATION = None
APPEND_SLASH = False

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# Connections one process may hold (PostgreSQL): its pool's size.
DB_POOL_MAX = env_int("DB_POOL_MAX", 20, minimum=1)
# The fast lane's Redis connections per web process (rate counters), and how long a call waits
# for a free one before it is answered 503.
REDIS_POOL_MAX = env_int("REDIS_POOL_MAX", 32, minimum=1)
REDIS_POOL_TIMEOUT_S = env_float("REDIS_POOL_TIMEOUT_S", 5, minimum=0.1)
if EMBEDDED:
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": DATA_DIR / "agentsvc.sqlite3",
            # WAL lets the web and worker processes read while one writes; IMMEDIATE takes the write
            # lock at BEGIN, so concurrent writers wait (busy timeout) instead of failing mid-way.
            "OPTIONS": {
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
                "transaction_mode": "IMMEDIATE",
                "timeout": 20,
            },
        }
    }
else:
    try:
        DATABASES = {"default": dj_database_url.parse(DATABASE_URL)}
    except ValueError as e:
        raise ImproperlyConfigured(f"DATABASE_URL is not a valid database URL: {e}") from e
    # Under ASGI every request may run on a new thread, so per-thread persistent connections
    # would pile up; a psycopg pool per process bounds them (CONN_MAX_AGE must stay 0).
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": 1,
        "max_size": DB_POOL_MAX,
        "timeout": env_float("DB_POOL_TIMEOUT_S", 5, minimum=0.1),
        # Connections above min_size close after a minute unused, so a burst does not keep them.
        "max_idle": 60,
    }

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

if REDIS_URL:
    CACHES = {"default": {"BACKEND": "agentsvc.cache.RedisCache", "LOCATION": REDIS_URL}}
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL]},
        }
    }
else:
    CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
        # Shared by the web and worker processes of one machine: worker liveness for /readyz.
        "shared": {
            "BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
            "LOCATION": str(DATA_DIR / "cache"),
        },
    }
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = DATA_DIR / "static"

SESSION_COOKIE_HTTPONLY = True
# Messages stay server-side: the admin shows a new API key once in one, and a cookie would carry it.
MESSAGE_STORAGE = "django.contrib.messages.storage.session.SessionStorage"
SESSION_COOKIE_SECURE = env_bool("SECURE_COOKIES", False)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
# Strict-Transport-Security on HTTPS answers (0: none). Only for deployments served over TLS.
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 0, minimum=0)

# --- Requests -------------------------------------------------------------------------------
MAX_REQUEST_BYTES = env_int("MAX_REQUEST_BYTES", 1024 * 1024, minimum=1024)
DATA_UPLOAD_MAX_MEMORY_SIZE = MAX_REQUEST_BYTES

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["agentsvc.auth.ApiKeyAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_THROTTLE_CLASSES": ["agentsvc.limits.KeyRequestThrottle"],
    "DEFAULT_PARSER_CLASSES": ["agentsvc.parsers.StrictJSONParser"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "EXCEPTION_HANDLER": "agentsvc.errors.exception_handler",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_CONTENT_NEGOTIATION_CLASS": "agentsvc.negotiation.JSONContentNegotiation",
    "UNAUTHENTICATED_USER": None,
}

# --- Runs -----------------------------------------------------------------------------------
RUN_TIMEOUT_MAX_S = env_int("RUN_TIMEOUT_MAX_S", 900, minimum=1)
# The longest a run may wait for a person's answer (a chain's input_timeout_s, default 24 h).
INPUT_TIMEOUT_MAX_S = env_int("INPUT_TIMEOUT_MAX_S", 7 * 86400, minimum=1)
INVOKE_WAIT_DEFAULT_S = env_float("INVOKE_WAIT_DEFAULT_S", 30, minimum=0)
INVOKE_WAIT_MAX_S = env_float("INVOKE_WAIT_MAX_S", 60, minimum=0)
STREAM_COALESCE_MS = env_int("STREAM_COALESCE_MS", 50, minimum=0)

# --- Model providers --------------------------------------------------------------------------
# An agent names a provider; the provider says where the OpenAI-compatible server is and which
# environment variable holds its key (the key itself is never stored in the database).
PROVIDERS = {
    "openai": {
        "base_url": env_str("OPENAI_BASE_URL", "https://api.openai.com/v1"),
        "api_key_env": "OPENAI_API_KEY",
    },
    "local": {
        "base_url": env_str("LOCAL_MODEL_URL", "http://127.0.0.1:8089/v1"),
        "api_key_env": "LOCAL_MODEL_API_KEY",
    },
}
# What `make run` starts at LOCAL_MODEL_URL: smollm2 (real, on llama.cpp), demo (scripted)
# or off (bring your own server).
LOCAL_MODEL = env_str("LOCAL_MODEL", "smollm2")
if LOCAL_MODEL not in ("smollm2", "demo", "off"):
    raise ImproperlyConfigured(f"LOCAL_MODEL must be smollm2, demo or off, got {LOCAL_MODEL!r}")
LOCAL_MODEL_NAME = "smollm2-135m-instruct"
LOCAL_MODEL_THREADS = env_int("LOCAL_MODEL_THREADS", 2, minimum=1)
LOCAL_MODEL_CTX = env_int("LOCAL_MODEL_CTX", 4096, minimum=512)
PROVIDER_CONNECT_TIMEOUT_S = env_float("PROVIDER_CONNECT_TIMEOUT_S", 5, minimum=0.1)
PROVIDER_READ_TIMEOUT_S = env_float("PROVIDER_READ_TIMEOUT_S", 60, minimum=0.1)
PROVIDER_MAX_RETRIES = env_int("PROVIDER_MAX_RETRIES", 2, minimum=0)
PROVIDER_RETRY_MAX_WAIT_S = env_float("PROVIDER_RETRY_MAX_WAIT_S", 20, minimum=0)

# USD per million tokens (input, output). Sources: the providers' public price pages.
MODEL_PRICES: dict[str, tuple[Decimal, Decimal]] = {
    "gpt-4o-mini": (Decimal("0.15"), Decimal("0.60")),
    "gpt-4o": (Decimal("2.50"), Decimal("10.00")),
    "gpt-4.1-mini": (Decimal("0.40"), Decimal("1.60")),
    "gpt-4.1-nano": (Decimal("0.10"), Decimal("0.40")),
}
MODEL_PRICES.update(env_prices("MODEL_PRICES"))

# --- Web ---------------------------------------------------------------------------------------
# Daphne processes `manage.py web` starts on one port: a process is CPU-bound, one per core.
WEB_PROCESSES = env_int("WEB_PROCESSES", os.cpu_count() or 1, minimum=1)

# --- Executors -------------------------------------------------------------------------------
# An executor process keeps up to RUN_CONCURRENCY runs going at once (a run mostly waits on its
# model) on EXECUTOR_DB_THREADS database threads, so it holds at most that many connections.
RUN_CONCURRENCY = env_int("RUN_CONCURRENCY", 500, minimum=1)
EXECUTOR_DB_THREADS = env_int(
    "EXECUTOR_DB_THREADS", min(4, DB_POOL_MAX) if not EMBEDDED else 2, minimum=1
)
# The group commit: events of all runs in a process go in one transaction, at most one per tick.
EXECUTOR_FLUSH_MS = env_int("EXECUTOR_FLUSH_MS", 5, minimum=0)
# Runs pause streaming while this many events wait for the database.
EXECUTOR_MAX_PENDING_EVENTS = env_int("EXECUTOR_MAX_PENDING_EVENTS", 20_000, minimum=100)
# Queued runs are claimed at once on a wake-up, or at the latest every EXECUTOR_POLL_S.
EXECUTOR_POLL_S = env_float("EXECUTOR_POLL_S", 1.0, minimum=0.01)
EXECUTOR_CLAIM_BATCH = env_int("EXECUTOR_CLAIM_BATCH", 100, minimum=1)
EXECUTOR_CLAIM_INTERVAL_MS = env_int("EXECUTOR_CLAIM_INTERVAL_MS", 5, minimum=0)
# How often an executor looks for cancellations of its runs.
EXECUTOR_CANCEL_POLL_MS = env_int("EXECUTOR_CANCEL_POLL_MS", 100, minimum=10)
# Sync tools run on this many threads per executor (a tool that blocks holds one, not the loop).
TOOL_THREADS = env_int("TOOL_THREADS", 32, minimum=1)
# A tool's output is cut to this many characters before the model reads it.
TOOL_OUTPUT_MAX_CHARS = env_int("TOOL_OUTPUT_MAX_CHARS", 20_000, minimum=100)
# LangGraph chains keep their checkpoints in PostgreSQL over this many connections per executor
# (as many savers: a saver writes one thing at a time).
LANGGRAPH_DB_POOL_MAX = env_int("LANGGRAPH_DB_POOL_MAX", 4, minimum=1)
# On SIGTERM: runs in flight get this long to finish, then go back to the queue.
WORKER_DRAIN_S = env_float("WORKER_DRAIN_S", 20, minimum=0)

# --- Workers (django-q2): the schedules -------------------------------------------------------
# Runs execute in executors; the cluster runs the schedules (the keeper, the purge), short tasks.
Q_WORKERS = env_int("Q_WORKERS", 1, minimum=1)
# A task running longer than `retry` would be handed to a second worker: `retry` > `timeout`.
Q_CLUSTER = {
    "name": env_str("Q_CLUSTER_NAME", "agentsvc"),
    "workers": Q_WORKERS,
    "timeout": 600,
    "retry": 660,
    "max_attempts": 1,
    "queue_limit": Q_WORKERS * 4,
    "catch_up": False,
    "ack_failures": True,
    "save_limit": 1000,
    "label": "Worker tasks",
    "poll": env_float("Q_POLL_S", 0.05, minimum=0.01),
    # Runs the keeper and the purge; off only where something else does.
    "scheduler": env_bool("Q_SCHEDULER", True),
}
if REDIS_URL:
    Q_CLUSTER["redis"] = REDIS_URL
else:
    Q_CLUSTER["orm"] = "default"
    Q_CLUSTER["cache"] = "shared"

# --- Logging --------------------------------------------------------------------------------
LOG_LEVEL = env_str("LOG_LEVEL", "INFO").upper()
if LOG_LEVEL not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
    raise ImproperlyConfigured(
        f"LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {LOG_LEVEL!r}"
    )
# plain: one line of text per record; json: one JSON object per line, for log shippers. Both
# carry request_id, run_id and key_prefix where known (agentsvc/logs.py).
LOG_FORMAT = env_str("LOG_FORMAT", "plain").strip().lower()
if LOG_FORMAT not in ("plain", "json"):
    raise ImproperlyConfigured(f"LOG_FORMAT must be plain or json, got {LOG_FORMAT!r}")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {
        "context": {"()": "agentsvc.logs.ContextFilter"},
        "task_chatter": {"()": "agentsvc.logs.TaskChatterFilter"},
    },
    "formatters": {
        "plain": {
            "()": "agentsvc.logs.PlainFormatter",
            "format": "%(asctime)s %(levelname)s %(name)s %(message)s",
        },
        "json": {"()": "agentsvc.logs.JsonFormatter"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": LOG_FORMAT,
            "filters": ["context"],
        }
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        "django.channels.server": {"level": "WARNING"},
        "httpx": {"level": "WARNING"},
        "httpx2": {"level": "WARNING"},  # the openai package's copy of httpx (framework chains)
        # Without the lines of each task it runs (LOG_LEVEL=DEBUG: with them).
        "django-q": {"filters": [] if LOG_LEVEL == "DEBUG" else ["task_chatter"]},
    },
}

# --- Model availability ---------------------------------------------------------------------
MODEL_PROBE_TIMEOUT_S = env_float("MODEL_PROBE_TIMEOUT_S", 2, minimum=0.1)
MODEL_PROBE_CACHE_S = env_float("MODEL_PROBE_CACHE_S", 5, minimum=0)

# --- Idempotency ----------------------------------------------------------------------------
IDEMPOTENCY_TTL_S = env_int("IDEMPOTENCY_TTL_S", 24 * 3600, minimum=60)
# A request holding a key longer than this is taken as abandoned (its process died).
IDEMPOTENCY_LOCK_S = env_int("IDEMPOTENCY_LOCK_S", int(INVOKE_WAIT_MAX_S) + 60, minimum=5)

# --- Limits ---------------------------------------------------------------------------------
RATE_REQUESTS_PER_MINUTE = env_int("RATE_REQUESTS_PER_MINUTE", 600, minimum=1)
RATE_RUNS_PER_MINUTE = env_int("RATE_RUNS_PER_MINUTE", 60, minimum=1)
RATE_TOKENS_PER_MINUTE = env_int("RATE_TOKENS_PER_MINUTE", 200_000, minimum=1)
MAX_ACTIVE_RUNS = env_int("MAX_ACTIVE_RUNS", 20, minimum=1)
CONCURRENCY_RETRY_AFTER_S = env_int("CONCURRENCY_RETRY_AFTER_S", 5, minimum=1)
QUEUE_MAX = env_int("QUEUE_MAX", 10_000, minimum=1)
QUEUE_RETRY_AFTER_S = env_int("QUEUE_RETRY_AFTER_S", 5, minimum=1)
QUEUE_DEPTH_CACHE_S = env_float("QUEUE_DEPTH_CACHE_S", 1, minimum=0)
RATELIMIT_USE_CACHE = "default"

# --- Observability ----------------------------------------------------------------------------
METRICS_TOKEN = env_str("METRICS_TOKEN")
# Traces go to this OTLP/HTTP collector (e.g. http://otel-collector:4318); unset: no tracing.
# The exporter itself reads the standard OTEL_EXPORTER_OTLP_* variables (headers, timeout).
OTEL_EXPORTER_OTLP_ENDPOINT = env_str("OTEL_EXPORTER_OTLP_ENDPOINT").strip()
OTEL_SERVICE_NAME = env_str("OTEL_SERVICE_NAME", "agentsvc").strip() or "agentsvc"
if OTEL_EXPORTER_OTLP_ENDPOINT and not OTEL_EXPORTER_OTLP_ENDPOINT.startswith(
    ("http://", "https://")
):
    raise ImproperlyConfigured(
        f"OTEL_EXPORTER_OTLP_ENDPOINT must be an http(s) URL, got {OTEL_EXPORTER_OTLP_ENDPOINT!r}"
    )
# Who sees the `checks` of /readyz (everyone sees its status): a request with the metrics token,
# or one made directly (no Forwarded / X-Forwarded-For) from these networks. Default: loopback,
# unless METRICS_TOKEN is set, when the token is the only way (a proxy on the same machine
# would otherwise make every request look local).
READYZ_DETAIL_NETWORKS = env_cidr_list(
    "READYZ_DETAIL_NETWORKS", [] if METRICS_TOKEN else ["127.0.0.0/8", "::1/128"]
)

# --- OpenAPI ------------------------------------------------------------------------------------
SPECTACULAR_SETTINGS = {
    "TITLE": "agentsvc API",
    "DESCRIPTION": (
        "Agent chains behind an HTTP API: async runs (202 + poll), bounded synchronous calls, "
        "event logs, idempotency keys and per-key limits. Every error is application/problem+json."
    ),
    "VERSION": "1",
    "OAS_VERSION": "3.1.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    "SERVE_AUTHENTICATION": [],
    "SWAGGER_UI_DIST": "SIDECAR",
    # No validator badge: it would send the schema's URL to swagger.io (and the page's
    # Content-Security-Policy blocks the image anyway).
    "SWAGGER_UI_SETTINGS": {"deepLinking": True, "validatorUrl": None},
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    "ENUM_NAME_OVERRIDES": {
        "RunStatusEnum": "runs.models.RunStatus",
        "TerminalEventEnum": "runs.models.TERMINAL_EVENTS",
        "DeliveryStatusEnum": "webhooks.models.DeliveryStatus",
        "AttemptTriggerEnum": "webhooks.models.Trigger",
        "ViolatedPolicyEnum": "agentsvc.openapi.VIOLATED_POLICIES",
    },
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "runs.openapi.add_stream_operations",
        "agentsvc.openapi.add_common_headers",
        "agentsvc.openapi.add_links",
        "agentsvc.openapi.add_tags",
    ],
}
# --- Webhooks -------------------------------------------------------------------------------
# The executor's delivery pump looks for due deliveries at least this often.
WEBHOOK_POLL_S = env_float("WEBHOOK_POLL_S", 0.5, minimum=0.01)
# Seconds to wait for a receiver's answer (connect, send, and each read).
WEBHOOK_TIMEOUT_S = env_float("WEBHOOK_TIMEOUT_S", 5, minimum=0.1)
# Delays before each retry after the first attempt, each +-20 % jitter; then the delivery fails.
WEBHOOK_RETRY_SCHEDULE_S = env_float_list(
    "WEBHOOK_RETRY_SCHEDULE_S", [5, 300, 1800, 7200, 18000, 36000, 36000]
)
# A receiver's Retry-After (429/503) is honoured up to this many seconds.
WEBHOOK_RETRY_AFTER_MAX_S = env_float("WEBHOOK_RETRY_AFTER_MAX_S", 3600, minimum=0)
# An endpoint failing without a single success for this long is disabled (5 days).
WEBHOOK_DISABLE_AFTER_S = env_int("WEBHOOK_DISABLE_AFTER_S", 5 * 24 * 3600, minimum=60)
# Attempts one executor process keeps in flight (threads of their own).
WEBHOOK_CONCURRENCY = env_int("WEBHOOK_CONCURRENCY", 8, minimum=1)
# A PEM file of CAs to trust for https receivers instead of the public ones (certifi).
WEBHOOK_CA_BUNDLE = env_str("WEBHOOK_CA_BUNDLE")
# Networks exempt from the SSRF guard (e.g. an internal receiver), each optionally with the one
# port it opens: 10.20.0.0/16, 10.20.0.0/16:443, [fd00::/8]:8443. Empty: only public addresses.
WEBHOOK_ALLOWED_NETWORKS = env_allowed_networks("WEBHOOK_ALLOWED_NETWORKS")
# The ports this service listens on (each `daphne -p`; `manage.py serve --port` adds its own).
# An entry without a port does not open them, nor the ports of DATABASE_URL and REDIS_URL: a
# webhook could otherwise post to the service itself or its Redis from inside. An entry that
# names such a port (127.0.0.1/32:8000) opens it.
SERVICE_PORTS = env_port_list("SERVICE_PORTS", [8000])
# --- Streaming (SSE and WebSocket) ----------------------------------------------------------
# Readers replay events from the database and wait for a wake-up. With Redis, wake-ups come over
# the channel layer and the database is re-checked every STREAM_RECHECK_S in case one was dropped.
# Embedded (no Redis, the worker is another process), the worker sends wake-ups to a Unix socket
# in DATA_DIR and the web process re-checks the database every STREAM_POLL_MS: one small query
# per process per tick, however many streams are open.
SSE_PING_S = env_float("SSE_PING_S", 15, minimum=0.1)
SSE_RETRY_MS = env_int("SSE_RETRY_MS", 1000, minimum=0)
STREAM_POLL_MS = env_int("STREAM_POLL_MS", 50, minimum=5)
STREAM_RECHECK_S = env_float("STREAM_RECHECK_S", 1.0, minimum=0.05)
STREAMS_PER_KEY = env_int("STREAMS_PER_KEY", 20, minimum=1)
STREAMS_MAX = env_int("STREAMS_MAX", 10000, minimum=1)
# How long a stream ticket (POST /api/v1/stream-tickets) opens its stream, reconnects included.
STREAM_TICKET_TTL_S = env_int("STREAM_TICKET_TTL_S", 300, minimum=10)
STREAM_WAKEUP_VIA_LAYER = bool(REDIS_URL)
if REDIS_URL:
    # Wake-ups are tiny and fanned out per process, so a modest buffer per channel is plenty;
    # a message dropped at capacity only delays a reader until the next re-check.
    CHANNEL_LAYERS["default"]["CONFIG"].update({"capacity": 1000, "expiry": 30})
# --- Scheduled runs -------------------------------------------------------------------------
# Every executor's clock looks for due ticks this often (one indexed query); a tick starts its
# run within about this long of its time.
SCHEDULE_POLL_S = env_float("SCHEDULE_POLL_S", 1.0, minimum=0.05)
# The shortest `interval_s` a schedule may have (a cron fires at most once a minute).
SCHEDULE_MIN_INTERVAL_S = env_int("SCHEDULE_MIN_INTERVAL_S", 60, minimum=1)
# --- Lifecycle keeper -------------------------------------------------------------------------
# A schedule (every minute) ends or retries what nobody else will: runs whose worker died, runs
# past their deadline, runs nobody is watching, and runs older than the retention window.
# An executor refreshes heartbeat_at of all its runs (one statement) this often, whatever its
# models are doing.
HEARTBEAT_S = env_float("HEARTBEAT_S", 5, minimum=0.05)
# A running run whose heartbeat is older than this lost its executor: retried once, then failed.
# Every executor checks each HEARTBEAT_S, so a killed one's runs move within about
# WORKER_LOST_AFTER_S + HEARTBEAT_S.
WORKER_LOST_AFTER_S = env_float("WORKER_LOST_AFTER_S", 30, minimum=0.1)
if WORKER_LOST_AFTER_S <= 2 * HEARTBEAT_S:
    raise ImproperlyConfigured(
        f"WORKER_LOST_AFTER_S ({WORKER_LOST_AFTER_S:g}) must be more than twice HEARTBEAT_S "
        f"({HEARTBEAT_S:g}): a live executor would be taken for lost"
    )
# A run still going this long after its deadline is ended `timed_out`.
RUN_GRACE_S = env_float("RUN_GRACE_S", 30, minimum=0)
# A run with no webhook that nobody polled or streamed for this long is cancelled (`orphaned`).
ORPHAN_TIMEOUT_S = env_float("ORPHAN_TIMEOUT_S", 300, minimum=1)
# Finished runs (input, output, events, webhook messages and attempts) are deleted after this.
RUN_RETENTION_DAYS = env_int("RUN_RETENTION_DAYS", 30, minimum=1)
