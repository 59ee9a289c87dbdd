"""The SSRF guard: the one place that decides whether a webhook URL may be connected to.

Used at registration (endpoints and a run's own webhook), at every delivery attempt and by
resends. A host is resolved once; the address checked is the address connected to (the
delivery connects to that IP and keeps the Host header and TLS SNI), so DNS rebinding between
the check and the connect cannot pass.

WEBHOOK_ALLOWED_NETWORKS lifts the guard for chosen private networks, each entry for one port
or for any port. Any port is not quite any: the ports of this service (SERVICE_PORTS) and of its
PostgreSQL and Redis stay closed unless an entry names them, so that allowing an internal
receiver does not let a tenant post to /metrics or to Redis from inside.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import urlsplit

from django.conf import settings

from agentsvc.env import AllowedNetwork, parse_allowed_network
from agentsvc.errors import echo

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Ranges refused whatever the flags of the ipaddress module say (they vary across Python patches).
_BLOCKED = [
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",  # "this network", unspecified
        "10.0.0.0/8",
        "100.64.0.0/10",  # CGNAT
        "127.0.0.0/8",
        "169.254.0.0/16",  # link-local, cloud metadata
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, broadcast
        "::/128",
        "::1/128",
        "::ffff:0:0/96",  # IPv4-mapped (checked again as IPv4 below)
        "64:ff9b::/96",  # NAT64 well-known prefix (checked again as IPv4 below)
        "64:ff9b:1::/48",  # NAT64 local use
        "100::/64",  # discard
        "2001:db8::/32",  # documentation
        "fc00::/7",  # unique local
        "fe80::/10",  # link-local
        "fec0::/10",  # site-local (deprecated)
        "ff00::/8",  # multicast
    )
]
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class BlockedAddress(Exception):
    """The URL is not http(s), or its host is (or resolves to) a refused address."""

    def __init__(self, message: str, *, permanent: bool = True) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True)
class Target:
    """Where to connect: the checked address, and the names to keep for Host and TLS SNI."""

    scheme: str
    host: str
    port: int
    address: str
    path: str
    # A private address the allow-list opened: what it answers is not shown to tenants.
    private: bool = False

    @property
    def connect_url(self) -> str:
        ip = f"[{self.address}]" if ":" in self.address else self.address
        return f"{self.scheme}://{ip}:{self.port}{self.path}"

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        name = f"[{self.host}]" if ":" in self.host else self.host
        return name if self.port == default else f"{name}:{self.port}"


@lru_cache(maxsize=8)
def _allowed(entries: tuple[str, ...]) -> list[AllowedNetwork]:
    return [parse_allowed_network(e) for e in entries]


def _url_port(url: str, default: int) -> int | None:
    try:
        parts = urlsplit(url)
        return (parts.port or default) if parts.hostname else None
    except ValueError:
        return None


def own_ports() -> frozenset[int]:
    """Ports an allow-list entry without a port does not open: this service's (SERVICE_PORTS)
    and those of its PostgreSQL and Redis."""
    ports = set(settings.SERVICE_PORTS)
    database = settings.DATABASES["default"]
    if database.get("HOST") and "postgresql" in database.get("ENGINE", ""):
        ports.add(int(database.get("PORT") or 5432))
    if settings.REDIS_URL and (redis_port := _url_port(settings.REDIS_URL, 6379)):
        ports.add(redis_port)
    return frozenset(ports)


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address inside IPv4-mapped, NAT64, 6to4 and Teredo IPv6 forms."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour:
        return ip.sixtofour
    if ip.teredo:
        return ip.teredo[1]
    return None


def _refused_by_default(candidates: list[IPAddress]) -> bool:
    for c in candidates:
        if any(c.version == n.version and c in n for n in _BLOCKED):
            return True
        if c.is_multicast or c.is_private or c.is_reserved or c.is_loopback:
            return True
        if c.is_link_local or c.is_unspecified or not c.is_global:
            return True
    return False


def address_check(address: str, port: int) -> tuple[bool, bool]:
    """(refused, private) for connecting to `address` on `port`: private when the address is
    one the guard refuses unless WEBHOOK_ALLOWED_NETWORKS lifts it."""
    ip = ipaddress.ip_address(address.split("%")[0])
    candidates = [ip]
    inner = _embedded_ipv4(ip)
    if inner is not None:
        candidates.append(inner)
    if not _refused_by_default(candidates):
        return False, False
    for entry in _allowed(tuple(settings.WEBHOOK_ALLOWED_NETWORKS)):
        if not any(c.version == entry.network.version and c in entry.network for c in candidates):
            continue
        if entry.port == port or (entry.port is None and port not in own_ports()):
            return False, True
    return True, True


def address_blocked(address: str, port: int) -> bool:
    """True when connecting to `address` on `port` is refused."""
    return address_check(address, port)[0]


def _split(url: str) -> tuple[str, str, int, str]:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise BlockedAddress("The URL is not valid.") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise BlockedAddress("Only http and https URLs are allowed.")
    host = parts.hostname or ""
    if not host:
        raise BlockedAddress("The URL has no host.")
    if parts.username or parts.password:
        raise BlockedAddress("The URL must not contain credentials.")
    if port == 0:  # not a port anything listens on (and `port or default` would read it as 80)
        raise BlockedAddress("The URL's port must be 1 to 65535.")
    path = parts.path or "/"
    if parts.query:
        path += f"?{parts.query}"
    return scheme, host, port or (443 if scheme == "https" else 80), path


def _resolve(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise BlockedAddress(f"Cannot resolve {echo(host)}: {e}", permanent=False) from None
    return [info[4][0] for info in infos]


def resolve_target(url: str) -> Target:
    """Resolve the URL's host once and return the address to connect to.

    Every address in the answer must be allowed: an answer mixing public and private addresses
    is refused as a whole, so the choice of address cannot be steered.
    """
    scheme, host, port, path = _split(url)
    addresses = _resolve(host, port)
    if not addresses:
        raise BlockedAddress(f"{echo(host)} has no address.", permanent=False)
    private = False
    for address in addresses:
        refused, private_here = address_check(address, port)
        if refused:
            raise BlockedAddress(f"{echo(host)} resolves to a refused address.")
        private = private or private_here
    return Target(
        scheme=scheme, host=host, port=port, address=addresses[0], path=path, private=private
    )


def check_url(url: str) -> None:
    """Registration check: refuse bad schemes and hosts that are or resolve to refused addresses.

    A name that does not resolve now is accepted (it may later); every delivery checks again.
    """
    try:
        resolve_target(url)
    except BlockedAddress as e:
        if e.permanent:
            raise
