"""HTTP policy at the ingress: CORS and an allowed-Host list. Pure (no Ray, no Starlette), cheap per request.

- CORS guards against a foreign web page *reading* our responses: a browser sends the page's ``Origin`` and
  only lets the page see the answer when ``Access-Control-Allow-Origin`` names it (the Fetch standard's CORS
  protocol, https://fetch.spec.whatwg.org/#http-cors-protocol). Off by default: no ``Access-Control-*``
  header is ever sent, so no page on another origin can read anything. Non-simple requests (JSON bodies, an
  ``Authorization`` header) are preceded by an ``OPTIONS`` preflight that names the method and headers; a
  refused preflight carries no ``Access-Control-Allow-Origin`` and the browser never sends the real request.
  ``"*"`` with credentials is refused at construction, as the Fetch standard forbids it.
- The Host allow-list guards against DNS rebinding: a page on ``evil.test`` re-points its name at our
  address, so the browser treats our API as same-origin and CORS never applies; the ``Host`` header still
  says ``evil.test``, so refusing unknown hosts (421 Misdirected Request) closes that hole. The rules follow
  Starlette's TrustedHostMiddleware (``*.example.com`` wildcards) and the OWASP DNS-rebinding note.

Header mappings are the request's, keys lower-case (as ASGI gives them).

Example:
    >>> policy = HttpPolicy(CorsPolicy(allow_origins=("https://*.example.com",)), HostPolicy(("api.example.com",)))
    >>> policy.check_host({"host": "api.example.com:8443"})
    >>> policy.response_headers({"origin": "https://app.example.com"})["Access-Control-Allow-Origin"]
    'https://app.example.com'
    >>> policy.preflight("OPTIONS", {"origin": "https://app.example.com", "access-control-request-method": "PUT"})
    (403, {'Vary': 'Origin'})
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass

from deployments.messages import ErrorInfo, ServeError

_DEFAULT_PORTS = {"http": 80, "https": 443}
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"  # "_": docker-compose service names carry it
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_ORIGIN = re.compile(r"([a-z][a-z0-9+.-]*)://(\*\.)?(\[[0-9a-f:.]+\]|[a-z0-9_.-]+)(?::([0-9]{1,5}))?")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+")  # an HTTP token (RFC 9110 §5.6.2), lower-cased


def _host(text: str) -> str | None:
    """``text`` (lower-case, no port) as a normalised host: a hostname, IPv4, or ``[ipv6]``; None if neither."""
    if text.startswith("["):
        try:
            return f"[{ipaddress.IPv6Address(text[1:-1]).compressed}]" if text.endswith("]") else None
        except ValueError:
            return None
    text = text.removesuffix(".")  # "example.com." names the same host
    return text if _HOSTNAME.fullmatch(text) else None


def _port(text: str | None) -> int | None:
    port = int(text) if text else None
    return port if port is None or 0 < port < 65536 else -1  # -1: a port no real request can carry


def _origin(value: str) -> tuple[str, bool, str, int | None] | None:
    """(scheme, wildcard, host, port) of an origin, default port dropped; None if it is not an origin."""
    match = _ORIGIN.fullmatch(value.strip().lower())
    if match is None or (host := _host(match[3])) is None:
        return None
    scheme, port = match[1], _port(match[4])
    return scheme, bool(match[2]), host, None if port == _DEFAULT_PORTS.get(scheme) else port


def _host_port(value: str) -> tuple[str, int | None] | None:
    """A Host header (or allow-list entry) as (normalised host, port or None); None if it is malformed."""
    value = value.strip().lower()
    head, sep, tail = value.rpartition(":")
    # "[::1]" has colons but no port; "[::1]:8000" and "example.com:80" have one. Bare IPv6 is malformed.
    if sep and tail.isdigit() and (head.endswith("]") or ":" not in head):
        host, port = _host(head), _port(tail)
        return None if host is None or port == -1 else (host, port)
    host = _host(value)
    return None if host is None else (host, None)


@dataclass(frozen=True)
class CorsPolicy:
    """Which foreign origins may call the API from a browser. ``allow_origins`` empty: CORS off.

    Origins: ``"https://app.example.com"`` (exact; case and default port normalised), ``"https://*.example.com"``
    (any subdomain, not the apex), or ``"*"`` alone (any origin; not with credentials). Header entries may end
    in ``*`` to allow a prefix (``x-stainless-*``: what the openai JS client sends from a browser); ``"*"``: any.
    """

    allow_origins: tuple[str, ...] = ()
    allow_methods: tuple[str, ...] = ("GET", "POST", "HEAD", "OPTIONS")
    allow_headers: tuple[str, ...] = ("authorization", "content-type", "x-api-key", "x-request-id", "traceparent",
                                      "openai-organization", "openai-project", "x-stainless-*")
    expose_headers: tuple[str, ...] = ("x-request-id", "retry-after", "retry-after-ms",
                                       "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests",
                                       "x-ratelimit-reset-requests", "x-ratelimit-limit-tokens",
                                       "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens")
    allow_credentials: bool = False
    max_age_s: int = 600

    def __post_init__(self) -> None:
        if "*" in self.allow_origins:
            if len(self.allow_origins) > 1:
                raise ValueError(f"CORS allow_origins: '*' already allows every origin, alone: {self.allow_origins}")
            if self.allow_credentials:
                raise ValueError("CORS allow_origins '*' with allow_credentials: the Fetch standard forbids it")
        for entry in self.allow_origins:
            parsed = _origin(entry) if entry != "*" else ("", False, "", None)
            if parsed is None or parsed[3] == -1 or (parsed[1] and parsed[2].startswith("[")):
                raise ValueError(f"CORS allow_origins: {entry!r} is not an origin (scheme://host[:port], no path)")
        for entry in self.allow_methods:
            if not _TOKEN.fullmatch(entry.lower()) or "*" in entry:
                raise ValueError(f"CORS allow_methods: {entry!r} is not an HTTP method")
        for name, entries in (("allow_headers", self.allow_headers), ("expose_headers", self.expose_headers)):
            for entry in entries:
                prefix_ok = name == "allow_headers"  # prefix patterns only where we match, not in what we send
                if not _TOKEN.fullmatch(entry.lower()) or "*" in entry[:-1] or (entry.endswith("*") and not prefix_ok):
                    raise ValueError(f"CORS {name}: {entry!r} is not a header name (or, allowed, a prefix*)")
        if self.max_age_s < 0:
            raise ValueError(f"CORS max_age_s: {self.max_age_s} < 0")


@dataclass(frozen=True)
class HostPolicy:
    """The ``Host`` values the ingress answers (DNS-rebinding protection). Empty: any Host.

    Entries: ``"example.com"``, ``"*.example.com"`` (any subdomain, not the apex), ``"127.0.0.1"``, ``"[::1]"``;
    with a port (``"localhost:8000"``) only that port, without one any port.
    """

    allowed_hosts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for entry in self.allowed_hosts:
            parsed = _host_port(entry.removeprefix("*."))
            if parsed is None or (entry.startswith("*.") and parsed[0].startswith("[")):
                raise ValueError(f"allowed_hosts: {entry!r} is not a host, [ipv6] or *.host (optionally :port)")


class HttpPolicy:
    """Both policies, compiled once into sets and suffix lists; the per-request methods only look things up."""

    def __init__(self, cors: CorsPolicy | None = None, hosts: HostPolicy | None = None) -> None:
        self.cors = cors or CorsPolicy()
        self.hosts = hosts or HostPolicy()
        c = self.cors
        self._cors_on = bool(c.allow_origins)
        self._any_origin = c.allow_origins == ("*",)
        parsed = [o for o in map(_origin, c.allow_origins) if o is not None]
        self._exact = {o[:1] + o[2:] for o in parsed if not o[1]}  # (scheme, host, port)
        self._wild = [(o[0], "." + o[2], o[3]) for o in parsed if o[1]]
        # fast path: browsers send origins normalised. Wildcard entries stay out: "https://*.x" is not an Origin.
        self._exact_raw = frozenset(o.strip().lower() for o in c.allow_origins if "*" not in o)
        self._methods = frozenset(m.upper() for m in c.allow_methods)
        self._headers = frozenset(h.lower() for h in c.allow_headers if not h.endswith("*"))
        self._prefixes = tuple(h.lower()[:-1] for h in c.allow_headers if h.endswith("*"))
        creds = {"Access-Control-Allow-Credentials": "true"} if c.allow_credentials else {}
        expose = {"Access-Control-Expose-Headers": ", ".join(c.expose_headers)} if c.expose_headers else {}
        self._actual = {**expose, **creds}
        self._pre = {"Access-Control-Allow-Methods": ", ".join(c.allow_methods),
                     "Access-Control-Max-Age": str(c.max_age_s), **creds}
        self._echo = not self._any_origin or c.allow_credentials  # "*" can only be sent without credentials
        self._host_any: set[str] = set()
        self._host_port: set[tuple[str, int]] = set()
        self._host_wild: list[tuple[str, int | None]] = []
        for entry in self.hosts.allowed_hosts:
            host, port = _host_port(entry.removeprefix("*.")) or ("", None)
            if entry.startswith("*."):
                self._host_wild.append(("." + host, port))
            elif port is None:
                self._host_any.add(host)
            else:
                self._host_port.add((host, port))

    def check_host(self, headers: Mapping[str, str]) -> None:
        """Raise a 421 ``invalid_host`` ServeError when an allow-list is set and Host is missing or not on it."""
        if not self.hosts.allowed_hosts:
            return
        value = headers.get("host")
        if value is None:
            raise ServeError(ErrorInfo(421, "missing Host header", code="invalid_host"))
        if not self._host_allowed(value):
            raise ServeError(ErrorInfo(421, f"Host {value[:100]!r} is not served here", code="invalid_host"))

    def _host_allowed(self, value: str) -> bool:
        parsed = _host_port(value)
        if parsed is None:
            return False
        host, port = parsed
        if host in self._host_any or (port is not None and (host, port) in self._host_port):
            return True
        return any(host.endswith(suffix) and (p is None or p == port) for suffix, p in self._host_wild)

    def _origin_allowed(self, origin: str) -> bool:
        if self._any_origin or origin.lower() in self._exact_raw:
            return True
        parsed = _origin(origin)
        if parsed is None or parsed[1]:  # a request's Origin never holds "*"
            return False
        scheme, _, host, port = parsed
        if (scheme, host, port) in self._exact:
            return True
        # ".example.com" suffix: "evil-example.com" and "example.com.evil.net" do not end with it
        return any(scheme == s and port == p and host.endswith(suffix) for s, suffix, p in self._wild)

    def _allow_origin(self, origin: str) -> dict[str, str]:
        if self._echo:
            return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        return {"Access-Control-Allow-Origin": "*"}

    def preflight(self, method: str, headers: Mapping[str, str]) -> tuple[int, dict[str, str]] | None:
        """A CORS preflight's answer: (204, headers) if allowed, (403, {"Vary": "Origin"}) if not; None when
        CORS is off or this is not a preflight (OPTIONS with Origin and Access-Control-Request-Method)."""
        if not self._cors_on or method.upper() != "OPTIONS":
            return None
        origin = headers.get("origin")
        wanted = headers.get("access-control-request-method")
        if origin is None or wanted is None:
            return None
        requested = [h.strip().lower() for h in headers.get("access-control-request-headers", "").split(",")]
        requested = [h for h in requested if h]
        if (not self._origin_allowed(origin) or wanted.strip().upper() not in self._methods
                or not all(h in self._headers or h.startswith(self._prefixes) for h in requested)):
            return 403, {"Vary": "Origin"}  # no Access-Control-Allow-Origin: the browser stops here
        out = {**self._allow_origin(origin), **self._pre}
        if requested:  # echoed: a pattern like "x-stainless-*" means nothing to the browser
            out["Access-Control-Allow-Headers"] = ", ".join(requested)
        return 204, out

    def response_headers(self, headers: Mapping[str, str]) -> dict[str, str]:
        """CORS headers for an actual response; {} when CORS is off, no Origin, or the origin is not allowed.
        The caller merges ``Vary`` with any it already sends."""
        origin = headers.get("origin") if self._cors_on else None
        if origin is None or not self._origin_allowed(origin):
            return {}
        return {**self._allow_origin(origin), **self._actual}
