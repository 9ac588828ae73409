"""The app engine: manifests, apps, slave pools, drivers, node and CLI."""

from .api import on  # noqa: E402  the app API: ``from engine import on``
