"""The app engine: manifests, apps, slave pools, drivers, node and CLI."""

from engine.api import apublish, on, publish  # noqa: E402  the app API: ``from engine import on``
from engine.client.calls import acall, astream, call, stream  # noqa: E402  handlers calling other apps
