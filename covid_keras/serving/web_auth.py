"""The web page's login: signed session cookies and a limit on failed logins.

Standard library only (no Starlette): :mod:`covid_keras.web` asks these two objects.

* :class:`Sessions`: the cookie the login form sets is ``v1.<issued>.<nonce>.<mac>``, the
  MAC an HMAC-SHA256 under a key derived (HMAC) from the ``--auth_token_file`` token. So
  the cookie never holds the token (which also opens the REST API), a restart of the page
  keeps its users signed in (no per-process key), changing the token file (then
  restarting) signs everyone out, and a cookie stops working ``--session_hours`` after the
  signed time it was issued, whatever the browser does with it (the lifetime is applied
  when the cookie is checked, so shortening it applies to cookies already out). Logout
  revokes the cookie's nonce in memory until its expiry (a bounded table; a restart forgets
  it, so a copy of a logged-out cookie works again until it expires or the token changes).
* :class:`LoginLimiter`: at most ``max_failures`` bad tokens per client address in
  ``window_s`` (then 429 with Retry-After until the oldest of them is older than the
  window), in a table of at most ``max_clients`` addresses (the stalest dropped first), an
  IPv6 client counted by its /64 (one host usually holds a whole /64).
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import ipaddress
import math
import re
import secrets
import time

COOKIE_VERSION = "v1"
SESSION_HOURS = 12.0
CLOCK_SKEW_S = 60  # a cookie issued "in the future" by up to this much (the clock stepped)
_KEY_LABEL = b"covid_keras.web session cookie key v1"
_COOKIE = re.compile(r"v1\.([0-9]{1,12})\.([0-9a-f]{32})\.([0-9a-f]{64})", re.ASCII)


class Sessions:
    """Issues and checks the login cookie's value (see the module docstring).

    ``clock``: seconds since the epoch (wall time, so expiries survive a restart)."""

    def __init__(self, token: str, max_age_s: float = SESSION_HOURS * 3600.0,
                 clock=time.time, max_revoked: int = 10000):
        if not 0 < max_age_s < float("inf"):  # nan and inf too: the cookie's Max-Age is int
            raise ValueError(f"the session lifetime must be a positive number of seconds. "
                             f"Received: {max_age_s}")
        self._key = hmac.new(token.encode("utf-8"), _KEY_LABEL, hashlib.sha256).digest()
        self.max_age_s = float(max_age_s)
        self.clock = clock
        self.max_revoked = max(1, int(max_revoked))
        self._revoked: dict[str, int] = {}  # nonce -> its cookie's expiry

    def _mac(self, issued: int, nonce: str) -> str:
        msg = f"{COOKIE_VERSION}.{issued}.{nonce}".encode("ascii")
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()

    def issue(self) -> str:
        """A new cookie value, signed with the time it is issued."""
        issued = int(self.clock())
        nonce = secrets.token_hex(16)
        return f"{COOKIE_VERSION}.{issued}.{nonce}.{self._mac(issued, nonce)}"

    def _parse(self, value: str | None) -> tuple[int, str] | None:
        """(expiry, nonce) of a cookie this key signed; None for anything else."""
        m = _COOKIE.fullmatch(value or "")
        if m is None:
            return None
        issued, nonce = int(m[1]), m[2]
        ok = hmac.compare_digest(m[3].encode("ascii"), self._mac(issued, nonce).encode("ascii"))
        return (int(issued + self.max_age_s), nonce) if ok and (
            issued <= self.clock() + CLOCK_SKEW_S) else None

    def valid(self, value: str | None) -> bool:
        """Signed by this key, issued less than ``max_age_s`` ago, not logged out."""
        parsed = self._parse(value)
        if parsed is None:
            return False
        expiry, nonce = parsed
        return self.clock() < expiry and nonce not in self._revoked

    def revoke(self, value: str | None) -> bool:
        """Logs ``value`` out (until its expiry, in this process); False: it was not valid."""
        if not self.valid(value):
            return False
        expiry, nonce = self._parse(value)
        if len(self._revoked) >= self.max_revoked:
            now = self.clock()
            for n in [n for n, e in self._revoked.items() if e <= now]:
                del self._revoked[n]
            while len(self._revoked) >= self.max_revoked:  # the oldest logout goes first
                del self._revoked[next(iter(self._revoked))]
        self._revoked[nonce] = expiry
        return True

    @property
    def revoked(self) -> int:
        return len(self._revoked)


def client_key(host: str | None) -> str:
    """The address a failed login is counted against: an IPv6 address by its /64, anything
    else (IPv4, a name, none) as it is."""
    if not host:
        return "unknown"
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host.lower()
    if ip.version == 4:
        return str(ip)
    if ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d is a.b.c.d
        return str(ip.ipv4_mapped)
    return str(ipaddress.ip_network(f"{ip}/64", strict=False))


class LoginLimiter:
    """Failed logins per client address: ``max_failures`` in ``window_s`` seconds, then
    refused until the oldest of them leaves the window. At most ``max_clients`` addresses are
    remembered (those whose failures are all older than the window are forgotten first, then
    the one that failed longest ago), so many addresses cannot grow it without bound.
    ``fail_delay_s``: how long the page waits before answering a bad token (costs no thread).
    ``clock``: monotonic seconds."""

    def __init__(self, max_failures: int = 5, window_s: float = 60.0,
                 max_clients: int = 10000, fail_delay_s: float = 0.5,
                 clock=time.monotonic):
        self.max_failures = max(1, int(max_failures))
        self.window_s = float(window_s)
        self.max_clients = max(1, int(max_clients))
        self.fail_delay_s = float(fail_delay_s)
        self.clock = clock
        # address -> its recent failure times; ordered by the latest failure, oldest first
        self._failures: collections.OrderedDict[str, collections.deque] = (
            collections.OrderedDict())

    def __len__(self) -> int:
        return len(self._failures)

    def _recent(self, key: str, now: float) -> collections.deque | None:
        times = self._failures.get(key)
        if times is None:
            return None
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if not times:
            del self._failures[key]
            return None
        return times

    def retry_after(self, host: str | None) -> int:
        """Seconds (rounded up, at least 1) before ``host`` may try again; 0: it may now."""
        now = self.clock()
        times = self._recent(client_key(host), now)
        if times is None or len(times) < self.max_failures:
            return 0
        return max(1, math.ceil(times[0] + self.window_s - now))

    def failed(self, host: str | None) -> None:
        now = self.clock()
        key = client_key(host)
        times = self._recent(key, now)
        if times is None:
            self._make_room(now)
            times = self._failures[key] = collections.deque(maxlen=self.max_failures)
        times.append(now)
        self._failures.move_to_end(key)

    def succeeded(self, host: str | None) -> None:
        self._failures.pop(client_key(host), None)

    def _make_room(self, now: float) -> None:
        while self._failures:  # the stalest first: forget those out of the window
            key, times = next(iter(self._failures.items()))
            if times and times[-1] > now - self.window_s:
                break
            del self._failures[key]
        while len(self._failures) >= self.max_clients:
            self._failures.popitem(last=False)
