"""Access control: a bearer token from a file or an environment variable, checked in constant time, and
the rule that a service reachable from other machines needs one."""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from fastapi import Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from cxrkit.serve.schemas import ApiError

TOKEN_ENV = "CXR_SERVE_TOKEN"
MIN_TOKEN_LENGTH = 16

_bearer = HTTPBearer(
    auto_error=False, description=f"the service's token (cxr serve --token-file, or ${TOKEN_ENV})"
)


class AuthConfigError(ValueError):
    """A token that cannot be used, or an exposed service without one."""


def load_token(token_file: str | os.PathLike | None, environ: dict[str, str] | None = None) -> str | None:
    """The token in ``token_file`` (whitespace stripped), else in ``$CXR_SERVE_TOKEN``, else None."""
    environ = os.environ if environ is None else environ
    if token_file is not None:
        try:
            token, origin = Path(token_file).read_text().strip(), str(token_file)
        except (OSError, UnicodeDecodeError) as error:
            raise AuthConfigError(f"cannot read the token file {token_file}: {error}") from error
    elif environ.get(TOKEN_ENV):
        token, origin = environ[TOKEN_ENV].strip(), f"${TOKEN_ENV}"
    else:
        return None
    if len(token) < MIN_TOKEN_LENGTH or any(character.isspace() for character in token):
        raise AuthConfigError(
            f"the token in {origin} must be at least {MIN_TOKEN_LENGTH} characters without spaces "
            "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    return token


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, token: str | None, insecure_no_auth: bool) -> None:
    """Refuse to serve on a non-loopback address without a token unless explicitly told to."""
    if token is None and not insecure_no_auth and not is_loopback(host):
        raise AuthConfigError(
            f"refusing to serve on {host} without a token: anyone who can reach it could use it. Give "
            f"--token-file (or set ${TOKEN_ENV}), bind to 127.0.0.1, or pass --insecure-no-auth"
        )


def bearer_guard(token: str | None) -> Callable[..., Awaitable[None]]:
    """A route dependency admitting requests with ``Authorization: Bearer <token>`` (all when None)."""

    async def require_token(
        credentials: HTTPAuthorizationCredentials | None = Security(_bearer),  # noqa: B008
    ) -> None:
        if token is None:
            return
        given = credentials.credentials.encode() if credentials is not None else b""
        if not hmac.compare_digest(given, token.encode()):
            raise ApiError(
                401,
                "unauthorized",
                "missing or wrong bearer token (send 'Authorization: Bearer <token>')",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return require_token
