"""Per-key limits (docs/api.md section 7): requests and runs per minute, tokens per minute, active
runs; and the global queue bound. Request and run counters live in the cache (Redis in
production, so every web process shares them); the token ledger lives in the database.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from django.conf import settings
from django.core.cache import caches
from django.db.models import F
from django.db.models.functions import Greatest
from django_ratelimit.core import _get_window, get_usage
from rest_framework.throttling import BaseThrottle

from agentsvc.errors import ApplicationError
from agentsvc.models import ApiKey, TokenWindow

WINDOW_S = 60


@dataclass(frozen=True)
class Quotas:
    requests: int
    runs: int
    tokens: int
    active_runs: int


def quotas(key: ApiKey) -> Quotas:
    return Quotas(
        requests=key.requests_per_minute or settings.RATE_REQUESTS_PER_MINUTE,
        runs=key.runs_per_minute or settings.RATE_RUNS_PER_MINUTE,
        tokens=key.tokens_per_minute or settings.RATE_TOKENS_PER_MINUTE,
        active_runs=key.max_active_runs or settings.MAX_ACTIVE_RUNS,
    )


def _limited(code: str, policy: str, detail: str, retry_after: float | None) -> ApplicationError:
    from agentsvc.metrics import rejection

    rejection(code)
    # At a window boundary the time left is 0: still send Retry-After (every 429 carries one).
    headers = {"Retry-After": str(max(1, math.ceil(retry_after or 0)))}
    return ApplicationError(code, detail, headers=headers, **{"violated-policies": [policy]})


# A key's requests and run starts in its current one-minute window. On Redis one call is one
# round trip whatever it counts (a Lua script, atomic); other caches (the embedded default's, one
# process) go through django-ratelimit. Each counter is (group, quota, n); counting stops at the
# first one over its quota, and a refused batch (n > 1) stays counted as one.
_COUNT_SCRIPT = """
local out = {}
for i, name in ipairs(KEYS) do
  local n = tonumber(ARGV[2 * i - 1])
  local count = redis.call('INCRBY', name, n)
  if count == n then redis.call('EXPIRE', name, ARGV[#ARGV]) end
  if count > tonumber(ARGV[2 * i]) then
    if n > 1 then count = redis.call('DECRBY', name, n - 1) + n - 1 end
    out[i] = count
    return out
  end
  out[i] = count
end
return out
"""
_scripts: dict[int, object] = {}
Counter = tuple[str, int, int]  # group, quota, n


def _redis_call(key: ApiKey, counters: list[Counter]) -> tuple[list[str], list[int], float]:
    cache = caches["default"]
    window_end = _get_window(str(key.pk), WINDOW_S)
    names = [cache.make_key(f"rl:{group}:{key.pk}:{window_end}") for group, _, _ in counters]
    args = [x for _, quota, n in counters for x in (n, quota)] + [WINDOW_S + 1]
    return names, args, window_end


def _left(window_end: int) -> float:
    """Seconds until the window ending at `window_end` gives way to the next one.
    django-ratelimit names a window by its last whole second: it still counts through that
    second, so the next window starts one second after `window_end`."""
    return window_end + 1 - time.time()


def _counts(key: ApiKey, counters: list[Counter]) -> list[tuple[int, float]]:
    """Count: [(count, seconds left in the window)], one per counter up to the first refused."""
    from agentsvc.cache import RedisCache

    cache = caches["default"]
    if isinstance(cache, RedisCache):
        client = cache._cache.get_client(write=True)
        script = _scripts.get(id(client))
        if script is None:
            script = _scripts[id(client)] = client.register_script(_COUNT_SCRIPT)
        names, args, window_end = _redis_call(key, counters)
        counted = script(keys=names, args=args)
        left = _left(window_end)
        return [(int(c), left) for c in counted]
    out = []
    for group, quota, n in counters:
        for i in range(n):
            usage = get_usage(
                None, group=group, key=lambda g, r: str(key.pk), rate=f"{quota}/m", increment=True
            )
            count = usage["count"]
            if i == 0 and count + n - 1 > quota:
                count += n - 1  # refused: only the first stays counted
                break
        out.append((count, usage["time_left"] + 1))  # whole seconds to window_end: _left
        if count > quota:
            break
    return out


async def counts_async(redis, key: ApiKey, counters: list[Counter]) -> list[tuple[int, float]]:
    """_counts on an asyncio Redis client (the fast lane's)."""
    script = _scripts.get(id(redis))
    if script is None:
        script = _scripts[id(redis)] = redis.register_script(_COUNT_SCRIPT)
    names, args, window_end = _redis_call(key, counters)
    counted = await script(keys=names, args=args)
    left = _left(window_end)
    return [(int(c), left) for c in counted]


def admission(key: ApiKey, *, runs: int = 0) -> list[Counter]:
    """The counters of a request (and of `runs` run starts with it)."""
    q = quotas(key)
    return [("requests", q.requests, 1)] + ([("runs", q.runs, runs)] if runs else [])


def admitted(request, key: ApiKey, counted: list[tuple[int, float]], *, runs: int = 0) -> None:
    """429 when a count of `admission` is over its quota. The state left on the request becomes
    the RateLimit headers of the answer."""
    q = quotas(key)
    count, left = counted[0]
    request.ratelimit_state = (q, max(0, q.requests - count), left)
    if count > q.requests:
        raise _limited(
            "rate_limited",
            "requests",
            f"More than {q.requests} requests in {WINDOW_S} s for this key.",
            left,
        )
    if runs:
        _runs_admitted(key, counted[1], runs)


def _runs_admitted(key: ApiKey, counted: tuple[int, float], runs: int) -> None:
    q = quotas(key)
    started, left = counted
    if started > q.runs:
        what = "runs" if runs == 1 else f"runs (this batch has {runs})"
        raise _limited(
            "rate_limited",
            "runs",
            f"More than {q.runs} {what} started in {WINDOW_S} s for this key.",
            left,
        )


def requests_admit(request, key: ApiKey) -> None:
    """Count a request against the key's requests-per-minute; 429 when over."""
    admitted(request, key, _counts(key, admission(key)))


class KeyRequestThrottle(BaseThrottle):
    """Every authenticated DRF view counts against the key's requests-per-minute."""

    def allow_request(self, request, view) -> bool:
        if isinstance(request.auth, ApiKey):
            requests_admit(request._request, request.auth)
        return True


def runs_admit(*, key: ApiKey, count: int = 1) -> None:
    """Count `count` run starts (a batch counts each run) against runs-per-minute; 429 when over,
    and then none of them is counted beyond the first."""
    q = quotas(key)
    (counted,) = _counts(key, [("runs", q.runs, count)])
    _runs_admitted(key, counted, count)


def ratelimit_headers(state: tuple[Quotas, int, float]) -> dict[str, str]:
    """IETF httpapi RateLimit-Policy and RateLimit (RFC 8941 structured fields)."""
    q, remaining, reset = state
    return {
        "RateLimit-Policy": f'"requests";q={q.requests};w={WINDOW_S}, '
        f'"tokens";q={q.tokens};w={WINDOW_S}',
        "RateLimit": f'"requests";r={remaining};t={max(0, math.ceil(reset))}',
    }


def active_runs_take(*, key: ApiKey, count: int = 1) -> None:
    """Take `count` of the key's active-run slots in the caller's transaction; 429 when they are
    not all free (a batch takes all or none).

    The conditional UPDATE waits for a concurrent start's commit and re-checks the row, so the
    limit holds exactly under parallel starts. The row stays locked until the caller commits: call
    this last in the transaction, so starts of one key queue behind a commit, not a round trip."""
    q = quotas(key)
    taken = ApiKey.objects.filter(pk=key.pk, active_runs__lte=q.active_runs - count).update(
        active_runs=F("active_runs") + count
    )
    if not taken:
        active = ApiKey.objects.values_list("active_runs", flat=True).get(pk=key.pk)
        raise active_runs_refused(key=key, active=active, count=count)


def active_runs_refused(*, key: ApiKey, active: int, count: int) -> ApplicationError:
    """The 429 for starts that found no free active-run slot."""
    return _limited(
        "concurrency_limit",
        "active_runs",
        f"This key already has {active} active runs (at most {quotas(key).active_runs})"
        + (f"; this batch needs {count} more." if count > 1 else "."),
        settings.CONCURRENCY_RETRY_AFTER_S,
    )


def active_runs_release(*, key_id: int, count: int = 1) -> None:
    """Runs of this key ended: give their slots back (in the transaction of their terminal
    events)."""
    ApiKey.objects.filter(pk=key_id, active_runs__gt=0).update(
        active_runs=Greatest(F("active_runs") - count, 0)
    )


# --- Tokens: a fixed one-minute window per key; runs reserve, then settle to real usage ----------
# The ledger is a database row per key and minute: web processes reserve, the worker that ends a
# run settles, and both must see the same numbers, in the embedded default too (where the cache is
# per process). A conditional UPDATE makes each reservation atomic.


def token_window(now: float | None = None) -> int:
    return int((now or time.time()) // WINDOW_S) * WINDOW_S


def _ledger(key_id: int, window: int):
    TokenWindow.objects.get_or_create(api_key_id=key_id, window=window)
    return TokenWindow.objects.filter(api_key_id=key_id, window=window)


def tokens_fit(*, key: ApiKey, amount: int, what: str) -> None:
    """422 `run_too_large` when `amount` exceeds the key's whole budget: waiting cannot help.
    `what` names the caller's request in the answer ("This run", "This batch of 20 runs")."""
    quota = quotas(key).tokens
    if amount > quota:
        # Waiting cannot make this fit: not a 429 (which invites a retry), and no Retry-After.
        from agentsvc.metrics import rejection

        rejection("run_too_large")
        raise ApplicationError(
            "run_too_large",
            f"{what} reserves {amount} tokens, more than this key's whole budget of {quota} "
            "tokens per minute; it can never start under this limit.",
        )


def tokens_refused(
    *, key: ApiKey, amount: int, what: str, used: int, window: int
) -> ApplicationError:
    """The 429 for a reservation that does not fit in what is left of the window."""
    quota = quotas(key).tokens
    return _limited(
        "token_budget_exceeded",
        "tokens",
        f"{what} reserves {amount} tokens; {max(0, quota - used)} of {quota} are left in this "
        "minute.",
        window + WINDOW_S - time.time(),
    )


def tokens_reserve(*, key: ApiKey, amount: int, what: str = "This run") -> int:
    """Reserve `amount` tokens in the current window; returns the window for settling."""
    tokens_fit(key=key, amount=amount, what=what)
    quota = quotas(key).tokens
    now = time.time()
    window = token_window(now)
    row = TokenWindow.objects.filter(api_key_id=key.pk, window=window)
    room = row.filter(used__lte=quota - amount)
    # The window's row exists after the key's first run in it: try the UPDATE alone first.
    if room.update(used=F("used") + amount):
        return window
    _ledger(key.pk, window)
    if room.update(used=F("used") + amount):
        return window
    used = row.values_list("used", flat=True).get()
    raise tokens_refused(key=key, amount=amount, what=what, used=used, window=window)


def tokens_settle(*, key_id: int, window: int, reserved: int, used: int) -> None:
    """Replace a reservation by real usage: refund in its window, charge overspend now."""
    delta = used - reserved
    if delta < 0:
        TokenWindow.objects.filter(api_key_id=key_id, window=window).update(
            used=Greatest(F("used") + delta, 0)
        )
    elif delta > 0:
        _ledger(key_id, token_window()).update(used=F("used") + delta)


def tokens_purge() -> int:
    """Scheduled: windows older than a few minutes are of no use."""
    return TokenWindow.objects.filter(window__lt=token_window() - 5 * WINDOW_S).delete()[0]
