"""TLS for node-to-node links: ``tls+tcp://HOST:PORT`` endpoints, stdlib :mod:`ssl`.

An :class:`~transport.rpc.RpcServer` given ``ssl_context=`` wraps every accepted TCP
connection in a ``trio.SSLStream`` and completes the handshake (bounded by
:data:`HANDSHAKE_TIMEOUT`) before a byte of the rpc protocol is read; an
:class:`~transport.rpc.RpcClient` given ``ssl_context=`` does the same when it
connects.  Any ``ssl.SSLContext`` will do; :class:`TlsConfig` makes the usual pair for
a private mesh: mutual TLS, every node holding a certificate signed by one CA.

Why mutual TLS with a private CA rather than hostname checks: peers are dialled by the
addresses discovery learned (a beacon's source IP, a ``0.0.0.0`` bind rewritten), which
are rarely names in a certificate.  What identifies a node is holding a key whose
certificate the mesh's own CA signed, and both sides check exactly that.
"""
from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from transport.errors import TransportError, Unreachable

# s a TLS handshake may take before the connection is dropped: a peer that connects
# and says nothing must not hold a task (and a socket) for longer.
HANDSHAKE_TIMEOUT = 10.0
TLS_PREFIX = "tls+"


class TlsConfigError(TransportError):
    """TLS cannot be set up as asked: a certificate, key or CA file missing, unreadable
    or invalid (the message names the file), a ``tls+tcp://`` endpoint without an
    ``ssl_context``, or a context given for an endpoint that is not ``tls+tcp://``."""


class TlsHandshakeError(Unreachable):
    """The TLS handshake with a peer failed (its certificate not signed by our CA, ours
    refused by it, a peer that does not speak TLS...).  An :class:`Unreachable`, so code
    that retries unreachable peers treats it alike; raised locally, never sent."""


@dataclass(frozen=True)
class TlsConfig:
    """A node's certificate and key, and the CA whose certificates it trusts.

    Both contexts require TLS 1.2 or newer and a peer certificate signed by ``ca``
    (mutual TLS).  The client does not check the server's host name (``check_hostname``
    off): see the module docstring; the CA check is what authenticates the peer, and it
    is never off."""

    cert: Path
    key: Path
    ca: Path

    def __post_init__(self) -> None:
        for name in ("cert", "key", "ca"):  # accept str paths too
            object.__setattr__(self, name, Path(getattr(self, name)))

    def server_context(self) -> ssl.SSLContext:
        """For an RpcServer: presents ``cert``, requires a client certificate signed by
        ``ca``."""
        return self._context(ssl.PROTOCOL_TLS_SERVER)

    def client_context(self) -> ssl.SSLContext:
        """For an RpcClient: presents ``cert``, requires a server certificate signed by
        ``ca``."""
        ctx = self._context(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False  # (must be off before verify_mode could be relaxed;
        ctx.verify_mode = ssl.CERT_REQUIRED  # it stays required: the CA check)
        return ctx

    def _context(self, protocol: int) -> ssl.SSLContext:
        self._check_readable()
        ctx = ssl.SSLContext(protocol)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.verify_mode = ssl.CERT_REQUIRED
        try:
            ctx.load_verify_locations(cafile=str(self.ca))
        except (ssl.SSLError, OSError) as exc:
            raise TlsConfigError(f"TLS CA file {self.ca}: not a PEM certificate ({exc})") from None
        try:
            ctx.load_cert_chain(certfile=str(self.cert), keyfile=str(self.key))
        except (ssl.SSLError, OSError) as exc:
            raise TlsConfigError(f"TLS certificate {self.cert} with key {self.key}: cannot be "
                                 f"loaded (not PEM, or the key does not match: {exc})") from None
        return ctx

    def _check_readable(self) -> None:
        """Name the file at fault: ssl's own errors often do not ("[X509] PEM lib")."""
        for role, path in (("certificate", self.cert), ("key", self.key), ("CA", self.ca)):
            try:
                with path.open("rb"):
                    pass
            except OSError as exc:
                raise TlsConfigError(f"TLS {role} file {path}: {exc.strerror or exc}") from None


def is_tls(address: str) -> bool:
    return address.startswith(TLS_PREFIX + "tcp://")


def check_context(address: str, context: ssl.SSLContext | None, *, server_side: bool) -> None:
    """Refuse a TLS endpoint without a context, a context the endpoint would not use
    (silently plain TCP where TLS was meant), or a context made for the other side."""
    if is_tls(address):
        if context is None:
            raise TlsConfigError(f"{address}: a tls+tcp:// endpoint needs ssl_context= "
                                 "(e.g. TlsConfig(...).server_context() / client_context())")
        want = ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT
        other = ssl.PROTOCOL_TLS_CLIENT if server_side else ssl.PROTOCOL_TLS_SERVER
        if context.protocol == other:
            side = "server" if server_side else "client"
            raise TlsConfigError(f"{address}: the {side} needs a {side}-side ssl_context "
                                 f"(made with {want.name})")
    elif context is not None:
        raise TlsConfigError(f"{address}: ssl_context given, but only tls+tcp:// endpoints "
                             "use TLS (this one would be plain)")


def describe(exc: BaseException) -> str:
    """What went wrong in a handshake, from trio's BrokenResourceError (whose own text
    is empty: the ssl error is its cause)."""
    cause = exc.__cause__ or exc.__context__
    return str(cause or exc) or type(cause or exc).__name__


__all__ = ["HANDSHAKE_TIMEOUT", "TlsConfig", "TlsConfigError", "TlsHandshakeError",
           "check_context", "describe", "is_tls"]
