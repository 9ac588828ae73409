"""A node's side of its token (docs/security.md): which token it holds, where it keeps
it, and which requests it answers without it.

Deploying a folder is running its code, so a node's control endpoint answers only
callers holding its token (their frames sealed with it: :mod:`transport.seal`).  Where
the token comes from (:class:`ControlAuth`), first match wins:

- ``token``: the secret itself (``ENGINE_NODE_TOKEN``, for containers, or given in code);
- ``token_file``: a file that holds it (``--token-file``, ``ENGINE_TOKEN_FILE``),
  made with a new random token (mode 0600) if it does not exist;
- neither: the node's file under the token folder for its control address
  (:mod:`engine.client.tokens`), made on first start, kept for the next ones.

The last is for loopback only: a node asked to listen beyond loopback without a token
given to it refuses to start (:class:`~engine.client.tokens.TokenError`), so that
nobody opens a node to the network without knowing which token its clients need.

Wherever it came from, the node leaves its token where the clients on its host, its
own slaves among them, find it (:func:`engine.client.tokens.find_token`): its address's
file is the token file it was given (a link to it), or holds the token it was given in
code; only a token from ``ENGINE_NODE_TOKEN`` is written nowhere (whoever has the
node's environment has it, its slaves too).  A node on an ephemeral port (``:0``)
removes the files it made for that port when it stops.

Without the token, a caller gets answers to :data:`OPEN_VERBS` (read-only), and only
on a loopback or ipc address; every other request is answered ``Unauthorized``.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from transport.errors import Unauthorized

from engine.client.tokens import (TOKEN_ENV, TOKEN_FILE_ENV, Token, TokenError, read_token,
                                  token_dir, token_path)

log = logging.getLogger("engine.node")

# What a caller without the token may ask, on loopback: read-only views of the node.
# (An allow-list: a verb added later needs the token until it is listed here.)
OPEN_VERBS = frozenset({"list", "info", "nodes"})
SECURITY_DOC = "docs/security.md"


@dataclass(frozen=True)
class ControlAuth:
    """How a node gets its token (this module's docstring)."""

    token: str | bytes | None = field(default=None, repr=False)
    token_file: Path | None = None
    # Where ``token`` came from: ENGINE_NODE_TOKEN is written nowhere (see above).
    token_source: str = "ControlAuth(token=)"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *,
                 token_file: str | Path | None = None) -> ControlAuth:
        """``token_file`` (``--token-file``), else ENGINE_TOKEN_FILE, else
        ENGINE_NODE_TOKEN, else the default file (on loopback)."""
        env = os.environ if env is None else env
        if token_file is None and env.get(TOKEN_FILE_ENV):
            token_file = env[TOKEN_FILE_ENV]
        if token_file is not None:
            return cls(token_file=Path(token_file))
        if env.get(TOKEN_ENV):
            return cls(token=env[TOKEN_ENV], token_source=TOKEN_ENV)
        return cls()


def is_local(address: str) -> bool:
    """Whether only this host can reach ``address``: a loopback TCP address (a name
    counts if everything it resolves to is loopback) or a socket path."""
    scheme, _, rest = address.partition("://")
    kind = scheme.removeprefix("nng+").removeprefix("tls+")
    if kind in ("ipc", "unix", "inproc"):
        return True
    if kind != "tcp":
        return False
    host = rest.rpartition(":")[0].strip("[]")
    if not host or host == "*":
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback
                               for info in infos)


def _ephemeral(address: str) -> bool:
    return address.partition("://")[0].removeprefix("nng+").removeprefix("tls+") == "tcp" \
        and address.rpartition(":")[2].split("/")[0] == "0"


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def load_or_create(path: Path) -> Token:
    """The token in ``path``, made there (mode 0600, its folder 0700) if missing.  A
    file that others may read is refused: its token is no secret any more."""
    if not path.exists():
        # (a dangling link, left by a node given a token file since removed, is replaced)
        _write_new(path, new_secret(), replace=path.is_symlink())
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise TokenError(f"cannot read the token file {path}: {exc.strerror or exc}") from None
    if mode & 0o077:
        raise TokenError(f"the token file {path} may be read by others (mode {mode & 0o777:o}): "
                         f"`chmod 600 {path}`, or make a new one (see {SECURITY_DOC})")
    return read_token(path)


def _write_new(path: Path, secret: str, *, replace: bool) -> None:
    """Write ``secret`` to ``path`` atomically, readable by this user only; without
    ``replace``, a file someone else made meanwhile is kept (theirs is read)."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(secret + "\n")
            if replace:
                os.replace(temp, path)
            else:
                try:
                    os.link(temp, path)
                except FileExistsError:
                    pass  # another node made it first: use theirs
        finally:
            temp.unlink(missing_ok=True)
    except OSError as exc:
        raise TokenError(f"cannot write the token file {path}: {exc.strerror or exc} "
                         f"(give the node one: --token-file PATH or {TOKEN_ENV})") from None


def _link(path: Path, target: Path) -> None:
    """``path`` a symlink to ``target``, replacing whatever was there."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    os.symlink(target.absolute(), temp)
    os.replace(temp, path)


class NodeToken:
    """The token of one running node: had before it binds, published after."""

    def __init__(self, auth: ControlAuth, env: Mapping[str, str] | None = None) -> None:
        self.auth = auth
        self.env = os.environ if env is None else env
        self.token: Token | None = None
        self.path: Path | None = None      # where clients on this host read it
        self._made: Path | None = None     # a file of ours to remove when the node stops
        self._ephemeral = False

    def before_bind(self, address: str) -> Token:
        """The token to serve ``address`` with; TokenError when there is none to have
        (a non-loopback address with no token given, an unreadable file)."""
        auth = self.auth
        self._ephemeral = _ephemeral(address)
        if auth.token is not None:
            token = Token.of(auth.token, auth.token_source)
        elif auth.token_file is not None:
            token = load_or_create(auth.token_file)
            self.path = auth.token_file
        elif not is_local(address):
            raise TokenError(
                f"the control address {address} is not loopback: whoever reaches it could "
                f"deploy code, so the node needs a token its clients will hold. Give it one: "
                f"--token-file PATH (made if missing; copy it to the clients) or {TOKEN_ENV} "
                f"(see {SECURITY_DOC})")
        elif self._ephemeral:
            token = Token.of(new_secret(), "a new token")   # written once the port is known
        else:
            self.path = token_path(address, self.env)
            token = load_or_create(self.path)
        self.token = token
        return token

    def after_bind(self, bound: str) -> Path | None:
        """Make the token findable by clients on this host at the bound address;
        the file they read it from (None: only from the environment)."""
        assert self.token is not None, "before_bind() comes first"
        default = token_path(bound, self.env)
        auth = self.auth
        try:
            if auth.token is not None:      # as before_bind: a secret first, then a file
                if auth.token_source == TOKEN_ENV:
                    return None             # whoever has the node's environment has it
                _write_new(default, self.token.secret.decode(), replace=True)
                self.path = default
            elif auth.token_file is not None:
                if default == auth.token_file:
                    return self.path
                _link(default, auth.token_file)
            elif self._ephemeral:
                _write_new(default, self.token.secret.decode(), replace=True)
                self.path = default
            else:
                return self.path            # its address's file already
            if self._ephemeral:
                self._made = default
        except OSError as exc:
            raise TokenError(f"cannot write the token file {default}: {exc.strerror or exc}") from None
        return self.path

    def close(self) -> None:
        """Remove what this node made for an ephemeral port (nobody can reach it again)."""
        made, self._made = self._made, None
        if made is not None:
            try:
                made.unlink()
            except OSError:
                pass


def refusal(target: str, event: str, address: str | None, open_verbs: frozenset[str]) -> Unauthorized:
    """The answer to a request that came without the token and needs it."""
    what = f"the verb {event!r}" if target == "" else f"calling app {target!r}"
    if open_verbs:
        without = (f"without it, only {', '.join(sorted(open_verbs))} are answered, and only "
                   f"on loopback")
    else:
        without = f"{address or 'its control address'} is not loopback: every request needs it"
    return Unauthorized(
        f"{what} needs this node's token ({without}). On the node's host, as the node's "
        f"user, the CLI and engine.client.connect find it by themselves (in {token_dir()}); "
        f"elsewhere pass --token-file, {TOKEN_FILE_ENV} or {TOKEN_ENV}; see {SECURITY_DOC}")
