"""Strict environment parsing: a bad value stops start-up with a message naming the variable."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
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


def _port(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 65535:
        raise ValueError(f"port must be a number from 1 to 65535, got {text!r}")
    return int(text)


def env_port_list(name: str, default: list[int]) -> list[int]:
    """Comma-separated TCP ports (8000,8001)."""
    try:
        return [_port(item) for item in env_list(name, [str(p) for p in default])]
    except ValueError as e:
        raise ImproperlyConfigured(f"{name}: {e}") from None


@dataclass(frozen=True)
class AllowedNetwork:
    """An entry of WEBHOOK_ALLOWED_NETWORKS: a network, and the one port it opens (None: any)."""

    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    port: int | None


def parse_allowed_network(entry: str) -> AllowedNetwork:
    """`10.20.0.0/16`, `10.20.0.0/16:443`, `fd00::/8`, `[fd00::/8]:8443` (an IPv6 network with
    a port is written in brackets, as in a URL). Raises ValueError."""
    text, port = entry.strip(), None
    if text.startswith("["):
        inner, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError("expected [network] or [network]:port")
        text = inner
        if rest:
            port = _port(rest[1:])
    elif text.count(":") == 1:  # IPv4 and a port; IPv6 addresses have at least two colons
        text, port_text = text.split(":")
        port = _port(port_text)
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(
            "not a CIDR network (an IPv6 network with a port is written [fd00::/8]:443)"
        ) from None
    return AllowedNetwork(network, port)


def env_allowed_networks(name: str) -> list[str]:
    """Comma-separated networks, each with an optional port (parse_allowed_network), checked
    at start-up."""
    items = env_list(name, [])
    for item in items:
        try:
            parse_allowed_network(item)
        except ValueError as e:
            raise ImproperlyConfigured(f"{name}: {item!r}: {e}") from None
    return items
