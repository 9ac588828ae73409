"""A small pipeline: text files dropped into ``inbox/`` are counted (filesystem
monitor), a timer logs a heartbeat, an nng server answers word counts, and ``squares``
is a second stage on top of the ``echo`` app's streamed counter.

Try it (with ``make demo`` running)::

    echo "hello brave new world" > examples/pipeline/inbox/note.txt
    python -c "import pynng, msgpack; s = pynng.Req0(dial='tcp://127.0.0.1:9210'); \
s.send(msgpack.packb('inbox/note.txt')); print(msgpack.unpackb(s.recv()))"
    python -m engine call pipeline squares 4      # echo's count, squared as it streams
"""
from pathlib import Path

from engine import astream, on

HERE = Path(__file__).resolve().parent


@on("heartbeat")
def heartbeat(payload):
    return {"tick": payload["tick"], "files": len(list((HERE / "inbox").glob("*.txt")))}


@on("file_changed")
def file_changed(change):
    if change["kind"] in ("created", "modified", "moved"):
        text = Path(change["path"]).read_text(errors="replace")
        return {"file": change["relative"], "words": len(text.split())}
    return {"file": change["relative"], "kind": change["kind"]}


@on("stats")
def stats(name):
    """Request: a file name under the app's folder; reply: its line and word counts."""
    path = (HERE / str(name)).resolve()
    if HERE not in path.parents:
        raise ValueError("only files inside the app's folder")
    text = path.read_text(errors="replace")
    return {"file": str(name), "lines": text.count("\n"), "words": len(text.split())}


@on("squares")
async def squares(n):
    """Streams echo's ``count`` reply, squared chunk by chunk: two apps, one stream."""
    async for chunk in astream("echo", "count", {"n": int(n)}):
        yield chunk["i"] ** 2
