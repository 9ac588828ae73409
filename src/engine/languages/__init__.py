"""Language plugins: how a slave of each language starts and speaks (docs/languages.md)."""
from engine.languages.base import SOCKET, STDIO, TRANSPORTS, Launch, LanguagePlugin, SlaveCommand
from engine.languages.registry import get, names, plugins

__all__ = ["SOCKET", "STDIO", "TRANSPORTS", "Launch", "LanguagePlugin", "SlaveCommand", "get",
           "names", "plugins"]
