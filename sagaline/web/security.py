"""Who is asking: bearer tokens with two scopes, the dashboard's session cookie, CSRF tokens."""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass

from ..exceptions import ConfigurationError

OPERATE, READ = "operate", "read"
SESSION_COOKIE = "sagaline_session"
# `name:secret` names a token (the name goes into the audit trail); a bare secret is
# named after its scope. Several tokens are separated by commas.
_NAMED = re.compile(r"^([A-Za-z0-9_.@-]{1,64}):(.+)$")
_LOOPBACK = {"127.0.0.1", "::1", "localhost"}


@dataclass(frozen=True)
class Principal:
    name: str
    scope: str  # OPERATE or READ

    @property
    def may_operate(self) -> bool:
        return self.scope == OPERATE


ANONYMOUS = Principal("anonymous", OPERATE)


class Access:
    """The tokens the server accepts; without any, everyone may operate (loopback only)."""

    def __init__(self, token: str | None = None, read_token: str | None = None):
        self._tokens: dict[str, Principal] = {}
        for raw, scope, default_name in (
            (token, OPERATE, "operator"),
            (read_token, READ, "reader"),
        ):
            for entry in (raw or "").split(","):
                entry = entry.strip()
                if not entry:
                    continue
                match = _NAMED.match(entry)
                name, secret = (match.group(1), match.group(2)) if match else (default_name, entry)
                if len(secret) < 16:
                    raise ConfigurationError(
                        f"the {scope} token {name!r} is too short: use at least 16 "
                        f"characters (e.g. python -c 'import secrets; "
                        f"print(secrets.token_urlsafe())')"
                    )
                self._tokens[secret] = Principal(name, scope)
        # Signs CSRF tokens when no bearer token exists (the open, loopback-only mode).
        self._process_key = secrets.token_bytes(32)

    @classmethod
    def from_env(cls, token: str | None = None, read_token: str | None = None) -> Access:
        return cls(
            token if token is not None else os.environ.get("SAGALINE_WEB_TOKEN"),
            read_token if read_token is not None else os.environ.get("SAGALINE_WEB_READ_TOKEN"),
        )

    @property
    def open(self) -> bool:
        return not self._tokens

    def by_token(self, presented: str) -> Principal | None:
        found = None
        for secret, principal in self._tokens.items():
            # Compare with every token, in constant time each.
            if hmac.compare_digest(secret.encode(), presented.encode()):
                found = principal
        return found

    def _key_of(self, principal: Principal) -> bytes:
        for secret, p in self._tokens.items():
            if p == principal:
                return secret.encode()
        return self._process_key

    def session_value(self, principal: Principal) -> str:
        sig = _sign(self._key_of(principal), f"session:{principal.name}:{principal.scope}")
        return f"{principal.name}:{principal.scope}:{sig}"

    def by_session(self, value: str) -> Principal | None:
        name, _, rest = value.partition(":")
        scope, _, sig = rest.partition(":")
        for secret, principal in self._tokens.items():
            if (principal.name, principal.scope) == (name, scope) and hmac.compare_digest(
                sig, _sign(secret.encode(), f"session:{name}:{scope}")
            ):
                return principal
        return None

    def csrf_token(self, principal: Principal) -> str:
        return _sign(self._key_of(principal), f"csrf:{principal.name}")

    def csrf_ok(self, principal: Principal, presented: str) -> bool:
        return hmac.compare_digest(self.csrf_token(principal), presented)


def _sign(key: bytes, message: str) -> str:
    return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()


def check_bind(host: str, access: Access) -> None:
    """Refuse to listen beyond this machine when no token protects the app."""
    if access.open and host not in _LOOPBACK and not host.startswith("127."):
        raise ConfigurationError(
            f"refusing to serve on {host!r} without a token: anyone who reaches it could "
            f"cancel sagas. Set SAGALINE_WEB_TOKEN (and SAGALINE_WEB_READ_TOKEN for "
            f"read-only access), or bind 127.0.0.1"
        )
