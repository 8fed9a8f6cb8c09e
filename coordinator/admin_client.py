"""The admin command line's connection to a coordinator: where, who, and the HTTP calls.

* Where: ``--url URL``, else ``$FEDSILO_ADMIN_URL``, else ``--data-dir DIR`` (the
  ``public_url`` or ``host:port`` of a coordinator on this machine).
* Who: the token comes from ``--token-file FILE`` (mode 0600, refused if looser),
  else ``$FEDSILO_ADMIN_TOKEN``, else ``$FEDSILO_ADMIN_TOKEN_FILE``. There is no
  ``--token`` option on purpose: a token on the command line ends up in shell
  history and in every other user's ``ps``.
"""

from __future__ import annotations

import argparse
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

__all__ = [
    "ENV_NAMES",
    "ENV_TOKEN",
    "ENV_TOKEN_FILE",
    "ENV_URL",
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_USAGE",
    "AdminApi",
    "AdminCliError",
    "base_url_from",
    "coordinator_config",
    "raise_for_status",
    "read_token_file",
    "token_from",
]

#: Environment variables read by the admin CLI (a client: the server never reads them).
ENV_URL = "FEDSILO_ADMIN_URL"
ENV_TOKEN = "FEDSILO_ADMIN_TOKEN"
ENV_TOKEN_FILE = "FEDSILO_ADMIN_TOKEN_FILE"
ENV_NAMES = (ENV_URL, ENV_TOKEN, ENV_TOKEN_FILE)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_REFUSED = 0, 1, 2, 3


class AdminCliError(Exception):
    """Printed as one line; ``exit_code`` is the process's exit status."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# --------------------------------------------------------------------------- credentials


def read_token_file(path: Path | str) -> str:
    """The token in ``path``, refusing a file that group or others may read or write."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as exc:
        raise AdminCliError(f"cannot read token file {path}: {exc.strerror}", EXIT_USAGE) from None
    if not stat.S_ISREG(st.st_mode):
        raise AdminCliError(f"token file {path} is not a regular file", EXIT_USAGE)
    if st.st_mode & 0o077:
        raise AdminCliError(
            f"token file {path} is accessible to others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"run: chmod 600 {path}", EXIT_USAGE)
    token = path.read_text(encoding="utf-8").strip()
    if not token:
        raise AdminCliError(f"token file {path} is empty", EXIT_USAGE)
    return token


def token_from(args: argparse.Namespace, environ: Mapping[str, str]) -> str:
    if args.token_file:
        return read_token_file(args.token_file)
    if environ.get(ENV_TOKEN, "").strip():
        return environ[ENV_TOKEN].strip()
    if environ.get(ENV_TOKEN_FILE):
        return read_token_file(environ[ENV_TOKEN_FILE])
    raise AdminCliError(f"no API token: set {ENV_TOKEN}, or give --token-file FILE (mode 0600)", EXIT_USAGE)


def coordinator_config(data_dir: Path):
    from .config import ConfigError, CoordinatorConfig
    from .startup import StartupError, load_config

    # The server's own FEDSILO_* overrides apply (host, port, public_url); this
    # client's variables are not the server's settings, so they are left out.
    environ = {k: v for k, v in os.environ.items() if k not in ENV_NAMES}
    try:
        load_config(data_dir)  # a readable "not initialised" message
        return CoordinatorConfig.load(data_dir, environ=environ)
    except (StartupError, ConfigError) as exc:
        raise AdminCliError(str(exc), EXIT_USAGE) from None


def base_url_from(args: argparse.Namespace, environ: Mapping[str, str]) -> str:
    if args.url:
        return args.url
    if environ.get(ENV_URL):
        return environ[ENV_URL]
    if args.data_dir:
        return coordinator_config(args.data_dir).base_url
    raise AdminCliError(f"where is the coordinator? give --url URL or --data-dir DIR, or set {ENV_URL}", EXIT_USAGE)


# --------------------------------------------------------------------------- HTTP


class AdminApi:
    """A bearer-authenticated httpx client for one coordinator (a context manager)."""

    def __init__(self, base_url: str, token: str, *, ca_bundle: str | None = None,
                 client_cert: str | None = None, client_key: str | None = None,
                 timeout: float = 60.0, transport: httpx.BaseTransport | None = None) -> None:
        if not base_url.startswith(("https://", "http://")):
            raise AdminCliError(f"coordinator URL {base_url!r} must start with https:// or http://", EXIT_USAGE)
        verify: Any = True
        if ca_bundle or client_cert:
            import ssl

            try:
                verify = ssl.create_default_context(cafile=ca_bundle or None)
                if client_cert:
                    verify.load_cert_chain(client_cert, client_key)
            except (OSError, ssl.SSLError) as exc:
                raise AdminCliError(f"cannot load the TLS files: {exc}", EXIT_USAGE) from None
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, verify=verify, transport=transport,
                                  headers={"Authorization": f"Bearer {token}"}, trust_env=True)

    def __enter__(self) -> AdminApi:
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.close()

    def request(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                json_body: Any = None) -> httpx.Response:
        params = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            response = self._http.request(method, path, params=params, json=json_body)
        except httpx.HTTPError as exc:
            raise AdminCliError(f"cannot reach {self.base_url}: {exc}") from None
        raise_for_status(response)
        return response

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.request(method, path, **kwargs).json()

    def stream(self, path: str, params: Mapping[str, Any]):
        """A streamed GET (the caller uses it as a context manager)."""
        return self._http.stream("GET", path, params={k: v for k, v in params.items() if v is not None})


def raise_for_status(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        body = response.json()
        what = f"{body.get('reason', '?')}: {body.get('detail', '')}"
    except (ValueError, AttributeError):
        what = response.text[:200] if isinstance(response.content, bytes) and response.content else ""
    raise AdminCliError(f"{response.status_code} {what}".rstrip(": "))
