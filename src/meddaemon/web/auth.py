"""Who is looking, and what they may do: users and roles, password hashes, signed session cookies, CSRF.

- Roles: ``viewer`` (every page, no patient data), ``clinician`` (patient data too), ``admin``
  (patient data, and the actions: retry, promote, retire).
- On loopback with no ``[web_users]`` the person at the machine is its operator: ``admin``, as
  ``medcli`` would let them be. Any other bind needs users (a login form, passwords checked against
  scrypt hashes) or ``web_proxy_header``, a header a trusted reverse proxy on this host sets to
  the signed-in user's name; it is believed only from a loopback peer.
- The session is a cookie signed with HMAC-SHA256 under a key made when the app starts (a restart
  signs everyone out). It carries the user, the role and a CSRF token; every POST must send that
  token back in a form field or the ``X-CSRF-Token`` header, else 403 and nothing is done.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import ipaddress
import json
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from starlette.responses import Response

from meddaemon.config import WEB_ROLES, ConfigError, Settings

COOKIE = "meddaemon_session"
#: Lax, not Strict: a browser sends no Strict cookie when a link on another site (a chat, a RIS page)
#: leads here, and the console, seeing nobody, set a new session over the one signed in, in every
#: tab. Forms carry a CSRF token, and no GET changes anything.
COOKIE_SAME_SITE = "lax"
CSRF_FIELD = "csrf"
CSRF_HEADER = "x-csrf-token"
#: a session lasts this long after sign-in (seconds)
SESSION_SECONDS = 12 * 3600
LOCAL_OPERATOR = "local operator"
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}


class AuthError(ConfigError):
    """The console cannot be served safely with these settings."""


def hash_password(password: str, salt: bytes | None = None) -> str:
    """``scrypt$N$r$p$<salt hex>$<hash hex>``: what ``password_hash`` in ``[web_users.NAME]`` holds."""
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, **_SCRYPT, dklen=32)
    return f"scrypt${_SCRYPT['n']}${_SCRYPT['r']}${_SCRYPT['p']}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, expected = stored.split("$")
        if scheme != "scrypt":
            return False
        digest = hashlib.scrypt(
            password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p), dklen=32, maxmem=2**27
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(digest.hex(), expected)


@functools.cache
def _stand_in_hash() -> str:
    """What a password is checked against when no user has the name given."""
    return hash_password("", b"\0" * 16)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def names_loopback(host_header: str | None) -> bool:
    """Whether a request's Host (``localhost:8080``, ``[::1]:8080``) names this machine's loopback."""
    if not host_header:
        return False
    host = host_header.strip().lower()
    if host.startswith("["):
        host = host[: host.find("]") + 1]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return is_loopback(host)


@dataclass(frozen=True)
class User:
    name: str
    role: str

    @property
    def sees_patient_data(self) -> bool:
        return self.role in ("clinician", "admin")

    @property
    def may_act(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True)
class AuthPolicy:
    """How people are recognised: by password (``users``), a proxy header, or not at all (loopback)."""

    users: Mapping[str, Mapping[str, str]]
    proxy_header: str
    #: anyone who reaches the server is the operator (loopback bind, no users)
    open_local: bool

    @classmethod
    def from_settings(cls, settings: Settings, host: str) -> AuthPolicy:
        """The policy for serving on ``host``; an unauthenticated bind beyond loopback is refused."""
        users = dict(settings.web_users)
        proxy = settings.web_proxy_header.strip().lower()
        if not users and not proxy:
            if not is_loopback(host):
                raise AuthError(
                    f"the web console would serve {host} without authentication: add [web_users.NAME] tables "
                    "(role and password_hash from `meddaemon web --hash-password`) or web_proxy_header, "
                    "or bind to 127.0.0.1"
                )
            return cls({}, "", open_local=True)
        if proxy:
            for name, user in users.items():
                if user.get("role") not in WEB_ROLES:
                    raise AuthError(f"web_users.{name}: role {user.get('role')!r} is not one of {list(WEB_ROLES)}")
        return cls(users, proxy, open_local=False)

    @property
    def uses_login(self) -> bool:
        return not self.open_local and not self.proxy_header

    def login(self, name: str, password: str) -> User | None:
        user = self.users.get(name)
        if user is None or not user.get("password_hash"):
            verify_password(password, _stand_in_hash())  # one scrypt, as for a user: the same time either way
            return None
        return User(name, user["role"]) if verify_password(password, user["password_hash"]) else None

    def from_proxy(self, header_value: str | None, peer: str | None) -> User | None:
        if not header_value or peer is None or not is_loopback(peer):
            return None
        user = self.users.get(header_value)
        return None if user is None else User(header_value, user["role"])


class SignInThrottle:
    """After ``allowed`` failed sign-ins for a name or from an address, the next waits twice as long
    each time (from 1 s, at most ``longest``): a password was tried 22 times a second, each an
    unauthenticated scrypt. A success clears its name and address."""

    def __init__(self, allowed: int = 5, longest: float = 300.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.allowed, self.longest, self.clock = allowed, longest, clock
        self._failures: dict[str, tuple[int, float]] = {}
        self._lock = threading.Lock()

    def wait(self, *keys: str) -> float:
        """Seconds before a sign-in for these keys (``user:NAME``, ``from:ADDRESS``) is tried; 0: now."""
        now = self.clock()
        with self._lock:
            return max(0.0, *(self._until(key) - now for key in keys))

    def begin(self, *keys: str) -> float:
        """A sign-in for these keys: the seconds it must wait (nothing counted), or 0 and the attempt
        counted as failed until ``succeeded`` clears it. Counted before its password is checked:
        counted after, 200 attempts sent at once were all checked before the first was counted."""
        with self._lock:
            now = self.clock()
            wait = max(0.0, *(self._until(key) - now for key in keys))
            if wait > 0:
                return wait
            if len(self._failures) > 10_000:  # many names or addresses: forget those whose wait is over
                self._failures = {k: v for k, v in self._failures.items() if self._until(k) > now}
            for key in keys:
                count, _ = self._failures.get(key, (0, now))
                self._failures[key] = (count + 1, now)
            return 0.0

    def succeeded(self, *keys: str) -> None:
        with self._lock:
            for key in keys:
                self._failures.pop(key, None)

    def _until(self, key: str) -> float:
        count, last = self._failures.get(key, (0, 0.0))
        if count < self.allowed:
            return 0.0
        return last + min(self.longest, 2.0 ** min(count - self.allowed, 64))  # 2.0 ** 1024 overflows


@dataclass(frozen=True)
class Session:
    user: User | None
    csrf: str
    issued: float


class SessionSigner:
    """Session cookies signed with HMAC-SHA256 under a key of its own."""

    def __init__(self, key: bytes | None = None, max_age: float = SESSION_SECONDS) -> None:
        self.key = key or secrets.token_bytes(32)
        self.max_age = max_age
        #: the sessions signed out (by their CSRF token, with when they were issued) until they expire:
        #: a cookie copied before its user signed out was good for its 12 hours
        self._ended: dict[str, float] = {}
        self._lock = threading.Lock()

    def end(self, session: Session) -> None:
        """Sign ``session`` out for good: its cookie is refused from now on (the key is this
        process's, so a restart ends every session anyway)."""
        with self._lock:
            now = time.time()
            self._ended = {csrf: t for csrf, t in self._ended.items() if now - t <= self.max_age}
            self._ended[session.csrf] = session.issued

    def new(self, user: User | None) -> Session:
        return Session(user, secrets.token_urlsafe(24), time.time())

    def dump(self, session: Session) -> str:
        body = {"c": session.csrf, "t": session.issued}
        if session.user is not None:
            body.update(u=session.user.name, r=session.user.role)
        payload = base64.urlsafe_b64encode(json.dumps(body, separators=(",", ":")).encode()).decode().rstrip("=")
        return f"{payload}.{self._sign(payload)}"

    def load(self, cookie: str | None) -> Session | None:
        if not cookie or "." not in cookie:
            return None
        payload, signature = cookie.rsplit(".", 1)
        if not _same(signature, self._sign(payload)):
            return None
        try:
            body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
            issued = float(body["t"])
            csrf = str(body["c"])
        except (ValueError, KeyError, TypeError):
            return None
        if time.time() - issued > self.max_age or csrf in self._ended:
            return None
        user = User(str(body["u"]), str(body["r"])) if "u" in body and body.get("r") in WEB_ROLES else None
        return Session(user, csrf, issued)

    def _sign(self, payload: str) -> str:
        return hmac.new(self.key, payload.encode(), hashlib.sha256).hexdigest()


def csrf_ok(session: Session | None, sent: str | None) -> bool:
    return session is not None and bool(sent) and _same(session.csrf, str(sent))


def _same(a: str, b: str) -> bool:
    """Constant-time equality of two strings, whatever characters a client sent (``compare_digest``
    refuses ``str`` outside ASCII)."""
    return hmac.compare_digest(a.encode("utf-8", "surrogateescape"), b.encode("utf-8", "surrogateescape"))


def cookie_name(secure: bool) -> str:
    """The session cookie's name: with ``web_secure_cookie``, ``__Host-`` first, which a browser
    accepts only Secure, for this host alone and never set over plain HTTP, so that no http:// page
    of another port of the host (browsers share cookies across ports) can set or overwrite it."""
    return f"__Host-{COOKIE}" if secure else COOKIE


def set_session_cookie(response: Response, value: str, secure: bool = False) -> None:
    """The session's signed cookie on ``response``: HttpOnly, ``COOKIE_SAME_SITE``, and Secure (sent
    over HTTPS only) with ``web_secure_cookie``, for a console reached through a TLS proxy, which the
    console itself cannot tell from plain HTTP."""
    response.set_cookie(cookie_name(secure), value, httponly=True, samesite=COOKIE_SAME_SITE, secure=secure, path="/")


def delete_session_cookie(response: Response, secure: bool = False) -> None:
    response.delete_cookie(cookie_name(secure), httponly=True, samesite=COOKIE_SAME_SITE, secure=secure, path="/")


def throttle_key_of_name(name: str) -> str:
    """The sign-in throttle's key for a typed user name: its hash, whatever its length (the name as
    typed, up to the form's 1 MB a field, was kept: 10,000 of them before any was forgotten)."""
    return "user:" + hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()


def page_after_sign_in(asked: str | None) -> str:
    """Where to go once signed in: the page asked for when the sign-in page was shown, if it is a
    page of this console (a path: never another site, ``//host`` or ``/\\host``); else the overview."""
    if (
        not asked
        or not asked.startswith("/")
        or asked.startswith(("//", "/\\"))
        or asked.startswith("/login")
        or any(ord(c) < 0x20 or c == "\x7f" for c in asked)
    ):
        return "/"
    return asked
