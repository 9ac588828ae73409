"""Where a node's or a client's TLS certificates come from, and the context an address
needs (transport/tls.py has the TLS itself; docs/cluster.md, "TLS").

A control endpoint given as ``tls+tcp://HOST:PORT`` speaks mutual TLS: the node presents
its certificate and wants one signed by the same CA from every caller (its cluster
peers, the CLI, apps calling their node).  The three files are named by ``--tls-cert``,
``--tls-key``, ``--tls-ca`` on ``engine run``, or by ``ENGINE_TLS_CERT``,
``ENGINE_TLS_KEY``, ``ENGINE_TLS_CA`` for every command and client (a node running with
TLS sets them for its slaves, as it sets ``ENGINE_NODE``).
"""
from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Mapping

from transport.tls import TlsConfig, TlsConfigError, is_tls

TLS_ENV = ("ENGINE_TLS_CERT", "ENGINE_TLS_KEY", "ENGINE_TLS_CA")


def tls_from_env(env: Mapping[str, str] | None = None) -> TlsConfig | None:
    """The TLS files the environment names: all three, or none (None)."""
    env = os.environ if env is None else env
    given = [env.get(name, "") for name in TLS_ENV]
    if not any(given):
        return None
    missing = [name for name, value in zip(TLS_ENV, given) if not value]
    if missing:
        raise TlsConfigError(f"TLS needs all of {', '.join(TLS_ENV)}: {', '.join(missing)} "
                             f"not set")
    cert, key, ca = (Path(value) for value in given)
    return TlsConfig(cert, key, ca)


def tls_env(tls: TlsConfig) -> dict[str, str]:
    """The environment that names ``tls``'s files (for a node's slaves)."""
    return dict(zip(TLS_ENV, (str(tls.cert), str(tls.key), str(tls.ca))))


def client_context(address: str, tls: TlsConfig | None) -> ssl.SSLContext | None:
    """The client context ``address`` needs: None for a plain one; for ``tls+tcp://``,
    ``tls`` (else the environment's) or :class:`TlsConfigError` saying how to give it."""
    if not is_tls(address):
        return None
    tls = tls or tls_from_env()
    if tls is None:
        raise TlsConfigError(f"{address} speaks TLS: give this client a certificate "
                             f"({', '.join(TLS_ENV)})")
    return tls.client_context()


def server_context(address: str, tls: TlsConfig | None) -> ssl.SSLContext | None:
    """The server context a node listening on ``address`` needs (as :func:`client_context`)."""
    if not is_tls(address):
        return None
    if tls is None:
        raise TlsConfigError(f"a control endpoint on {address} needs --tls-cert, --tls-key and "
                             f"--tls-ca (or {', '.join(TLS_ENV)})")
    return tls.server_context()
