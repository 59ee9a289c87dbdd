"""Strict environment parsing: a bad value stops start-up with a message naming the variable."""

from __future__ import annotations

import ipaddress
import os
from decimal import Decimal, InvalidOperation

from django.core.exceptions import ImproperlyConfigured


def env_str(name: str, default: str = "") -> str:
    """A string from NAME, or from the file named by NAME_FILE (for secrets)."""
    file_name = os.environ.get(f"{name}_FILE")
    if file_name:
        try:
            with open(file_name, encoding="utf-8") as f:
                return f.read().strip()
        except OSError as e:
            raise ImproperlyConfigured(f"{name}_FILE: cannot read {file_name}: {e}") from e
    return os.environ.get(name, default)


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ImproperlyConfigured(f"{name} must be a boolean (true/false/1/0), got {raw!r}")


def env_int(name: str, default: int, *, minimum: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be an integer, got {raw!r}") from None
    if minimum is not None and value < minimum:
        raise ImproperlyConfigured(f"{name} must be at least {minimum}, got {value}")
    return value


def env_float(name: str, default: float, *, minimum: float | None = None) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a number, got {raw!r}") from None
    if minimum is not None and value < minimum:
        raise ImproperlyConfigured(f"{name} must be at least {minimum}, got {value}")
    return value


def env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    if raw is None:
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]


def env_float_list(name: str, default: list[float]) -> list[float]:
    items = env_list(name, [str(x) for x in default])
    try:
        values = [float(x) for x in items]
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a comma-separated list of numbers") from None
    if any(v < 0 for v in values):
        raise ImproperlyConfigured(f"{name} must not contain negative numbers")
    return values


def env_prices(name: str) -> dict[str, tuple[Decimal, Decimal]]:
    """MODEL=IN:OUT pairs (USD per million tokens), comma-separated."""
    prices: dict[str, tuple[Decimal, Decimal]] = {}
    for item in env_list(name, []):
        model, sep, pair = item.rpartition("=")
        parts = pair.split(":")
        if not sep or not model or len(parts) != 2:
            raise ImproperlyConfigured(f"{name}: expected model=input:output, got {item!r}")
        try:
            prices[model] = (Decimal(parts[0]), Decimal(parts[1]))
        except InvalidOperation:
            raise ImproperlyConfigured(f"{name}: prices must be decimals, got {item!r}") from None
    return prices


def env_cidr_list(name: str, default: list[str] | None = None) -> list[str]:
    """Comma-separated CIDRs (10.1.0.0/16, 127.0.0.1, fd00::/8), each checked at start-up."""
    items = env_list(name, default or [])
    for item in items:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ImproperlyConfigured(f"{name}: {item!r} is not a CIDR network") from None
    return items
