"""Where a node's token is kept, and how a client on its host finds it (docs/security.md).

A node's control endpoint runs code for whoever may deploy, so it answers only callers
that hold its *token*: a random secret the node makes on its first start, in a file
only its user may read.  A client seals its frames with it (:mod:`transport.seal`).

Where the token of the node at ``ADDRESS`` is found, first match wins:

1. what the caller passes: ``token=`` (the secret) or ``token_file=`` (a path);
2. ``ENGINE_NODE_TOKEN`` (the secret), then ``ENGINE_TOKEN_FILE`` (a path), when
   ``ENGINE_NODE`` is unset or is ``ADDRESS`` (in a slave, ENGINE_NODE is its node:
   these are its node's token, not any node's);
3. the file the node keeps for its control address under the token folder,
   ``$XDG_CONFIG_HOME/engine-trio/tokens/`` (default ``~/.config/engine-trio/tokens/``):
   ``tcp-PORT`` for ``tcp://HOST:PORT`` (one token per port, whatever the host: a node
   bound to 0.0.0.0 and a client dialling 127.0.0.1 meet), ``ipc-<hash>`` for a socket
   path.

None found: the client sends unsealed frames, which a node answers only for its
read-only verbs, and only on loopback.  Nothing here logs or prints a token.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from engine.errors import EngineError

if TYPE_CHECKING:
    from transport.seal import SealedClient

TOKEN_ENV = "ENGINE_NODE_TOKEN"
TOKEN_FILE_ENV = "ENGINE_TOKEN_FILE"
MIN_TOKEN = 16          # characters: a shorter secret is refused (it could be guessed)


class TokenError(EngineError):
    """A token that cannot be had or used: a missing or unreadable file, one others
    may read, one too short.  The message names the file or variable, never the secret."""


@dataclass(frozen=True)
class Token:
    """A node's token: the secret, and where it came from (for messages)."""

    secret: bytes = field(repr=False)
    source: str

    @classmethod
    def of(cls, secret: str | bytes, source: str) -> Token:
        raw = secret.encode() if isinstance(secret, str) else secret
        raw = raw.strip()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise TokenError(f"the token from {source} is not text") from None
        if any(c.isspace() for c in text):
            raise TokenError(f"the token from {source} holds white space (one line, one word)")
        if len(raw) < MIN_TOKEN:
            raise TokenError(f"the token from {source} is {len(raw)} characters long; a token "
                             f"has at least {MIN_TOKEN} (see docs/security.md)")
        return cls(raw, source)


def token_dir(env: Mapping[str, str] | None = None) -> Path:
    """The folder of the per-address token files (the node's user's)."""
    env = os.environ if env is None else env
    base = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME") or Path.home()) / ".config")
    return Path(base) / "engine-trio" / "tokens"


def token_name(address: str) -> str:
    """The file name of the token of the node whose control address is ``address``."""
    scheme, sep, rest = address.partition("://")
    if not sep:
        raise TokenError(f"{address!r} is not a control address (tcp://HOST:PORT, ipc://PATH)")
    kind = scheme.removeprefix("nng+").removeprefix("tls+")
    if kind == "tcp":       # (a TLS endpoint takes its port's token too: one node per port)
        port = rest.rpartition(":")[2].split("/")[0]
        if not port.isdigit():
            raise TokenError(f"{address!r}: no port in the control address")
        return f"tcp-{int(port)}"
    if kind in ("ipc", "unix"):
        path = os.path.abspath(rest)
        return "ipc-" + hashlib.sha256(path.encode()).hexdigest()[:16]
    raise TokenError(f"{address!r}: a control address is tcp://, tls+tcp:// or ipc://")


def token_path(address: str, env: Mapping[str, str] | None = None) -> Path:
    return token_dir(env) / token_name(address)


def read_token(path: str | Path) -> Token:
    """The token in ``path`` (its first line)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TokenError(f"cannot read the token file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise TokenError(f"the token file {path} is not text") from None
    return Token.of(text.splitlines()[0] if text.strip() else "", str(path))


def find_token(address: str, *, token: str | bytes | None = None,
               token_file: str | Path | None = None,
               env: Mapping[str, str] | None = None) -> Token | None:
    """The token to reach the node at ``address`` with, by the rules of this module's
    docstring; None when there is none.  Raises TokenError for one named (argument or
    environment) that cannot be read."""
    if token is not None:
        return Token.of(token, "the token= argument")
    if token_file is not None:
        return read_token(token_file)
    env = os.environ if env is None else env
    if env.get("ENGINE_NODE") in (None, "", address):
        if env.get(TOKEN_ENV):
            return Token.of(env[TOKEN_ENV], TOKEN_ENV)
        if env.get(TOKEN_FILE_ENV):
            return read_token(env[TOKEN_FILE_ENV])
    try:
        path = token_path(address, env)
    except TokenError:
        return None     # an address no node keeps a file for (e.g. nng+inproc)
    return read_token(path) if path.is_file() else None


def control_guard(address: str, *, token: str | bytes | None = None,
                  token_file: str | Path | None = None,
                  env: Mapping[str, str] | None = None) -> SealedClient | None:
    """The frame guard of a client of the node at ``address`` (``RpcClient(guard=)``,
    ``SyncRpcClient(guard=)``): sealing with the token :func:`find_token` finds, or
    None (plain frames) when there is none."""
    found = find_token(address, token=token, token_file=token_file, env=env)
    if found is None:
        return None
    from transport.seal import SealedClient, SealKey

    return SealedClient(SealKey.from_secret(found.secret))
