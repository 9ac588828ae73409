"""Where ``/socket.io/socket.io.js`` comes from: an installed ``socket.io-client``.

socket.io's own server serves its browser client at ``/socket.io/socket.io.js``, and
pages (the seed's among them) load it from there.  Sockend serves the same files from
the npm package, found in this order:

1. ``--socketio-client PATH`` (``SockendConfig.socketio_client``): the ``socket.io.js``
   file itself, the package's ``dist`` folder, the package folder, or a folder holding
   ``node_modules``;
2. ``$SOCKEND_SOCKETIO_CLIENT``, read the same way;
3. ``node_modules/socket.io-client`` in the working directory, the ``--static`` folder,
   or any folder above them (Node's own lookup).

When none has it, the page gets a 404 that says what to install, and Sockend says so
once at start.
"""
from __future__ import annotations

import os
from pathlib import Path

CLIENT_FILES = frozenset({
    "socket.io.js", "socket.io.js.map", "socket.io.min.js", "socket.io.min.js.map",
    "socket.io.esm.min.js", "socket.io.esm.min.js.map", "socket.io.msgpack.min.js",
    "socket.io.msgpack.min.js.map"})
PACKAGE = Path("node_modules") / "socket.io-client"
HOW_TO_INSTALL = ("socket.io.js is not installed: run `npm install socket.io-client@4` in the "
                  "folder Sockend runs in (or above its --static folder), or pass "
                  "--socketio-client PATH")


def find_client_dist(configured: Path | None, *starts: Path | None) -> Path | None:
    """The ``dist`` folder holding ``socket.io.js``, or None."""
    for hint in (configured, os.environ.get("SOCKEND_SOCKETIO_CLIENT") or None):
        if hint is not None:
            found = _dist_of(Path(hint))
            if found is not None:
                return found
    for start in (Path.cwd(), *starts):
        if start is None:
            continue
        try:
            folder = Path(start).resolve()
        except OSError:
            continue
        for parent in (folder, *folder.parents):
            found = _dist_of(parent / PACKAGE)
            if found is not None:
                return found
    return None


def _dist_of(path: Path) -> Path | None:
    for candidate in (path.parent if path.name == "socket.io.js" else path,
                      path / "dist", path / PACKAGE / "dist"):
        if (candidate / "socket.io.js").is_file():
            return candidate
    return None
