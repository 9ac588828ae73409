"""``"type": "nodejs"``: ``node app.js``, with the ``engine-worker`` library (``workers/js``)
on its module path: ``const { on } = require("engine-worker")``.

The library lives in the source tree's ``workers/js`` (its msgpack dependency installed
there by ``make test``/``make demo`` from the npm registry); ``ENGINE_JS_WORKERS`` names
another folder holding an ``engine-worker`` package (a NODE_PATH entry)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import ClassVar

from engine.languages.base import SOCKET, STDIO, Launch, LanguagePlugin, SlaveCommand

# <repo>/workers/node_path holds engine-worker -> ../js (a NODE_PATH entry)
_TREE = Path(__file__).resolve().parents[3] / "workers"


def node_path() -> Path:
    """The folder node finds ``engine-worker`` in."""
    override = os.environ.get("ENGINE_JS_WORKERS")
    return Path(override) if override else _TREE / "node_path"


class NodePlugin(LanguagePlugin):
    name: ClassVar[str] = "nodejs"
    default_args: ClassVar[str] = "app.js"
    transports: ClassVar[tuple[str, ...]] = (SOCKET, STDIO)

    def missing(self) -> str | None:
        if shutil.which("node") is None:
            return "`node` on the PATH (install Node.js 18 or later), and it is not there"
        library = node_path() / "engine-worker"
        if not (library / "package.json").exists():
            return f"the engine-worker library at {library}, which is not there"
        if not (library / "node_modules" / "@msgpack" / "msgpack").exists():
            return (f"engine-worker's dependencies (run `npm ci` in {library.resolve()}, or "
                    f"`make test`), which are not installed")
        return None

    def command(self, launch: Launch) -> SlaveCommand:
        paths = [str(node_path()), *filter(None, [os.environ.get("NODE_PATH")])]
        env = dict(launch.contract_env(), NODE_PATH=os.pathsep.join(paths))
        # -r: the library loads first, so it sees (and reports) an app that fails to load
        argv = ["node", "-r", "engine-worker", str(launch.entry), *launch.args]
        return SlaveCommand(self.guarded(argv, launch), env)
