"""``python -m bench.cluster_scale --nodes 10,30,60 --mode lan [--mode etcd]``: how a
cluster of N real nodes behaves as N grows (issue 13, "Measured").

For each mode and N it starts N ``python -m engine run --cluster ...`` processes, all on
loopback (control endpoints on 127.0.0.1, beacons confined to 127.0.0.1 on a discovery
port of the run's own), and measures:

- *see-all*: from the moment the last node serves until every node's ``nodes`` view
  lists every node;
- *deploy-all*: a copy of ``examples/echo`` deployed on one node, until every node's
  ``list`` shows it running;
- the idle cost over a window (``--idle``, 5 s): CPU per node (schedstat), the ``nodes``
  view's message counters (``stats["messages_in"]``/``["messages_out"]``, "n/a" when the
  cluster has none), RSS and open file descriptors per node;
- *detect*: one node SIGKILLed, until no other node's view lists it.

``--mode etcd`` starts ``/usr/bin/etcd`` on free loopback ports with a temporary data
dir and gives every node ``--cluster-registry etcd://...`` (``--registry URL``: use a
running etcd instead); it is skipped, with the reason, when ``engine run`` has no such
option.  It prints a table, an on-paper extrapolation to 100 and 1,000 nodes, and writes
``bench/cluster_scale.json`` (``--extrapolate FILE`` prints the extrapolation of a
saved run without starting anything).

Bounded: every phase has a timeout, every N a total one (``--timeout``, default
90 s + 6 s per node), and every process started (nodes, their slaves, etcd) is ended and
reaped when its N ends, failed, timed out or interrupted (Ctrl-C).  A measurement, not a
test: the exit status is 0 unless a run could not be made at all.
"""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

import psutil
import trio

from .harness import BENCH_DIR, REPO, cpu_seconds, fmt, free_udp_port, python_env
from .report import machine
from .soak import ADDRESS_RE

APP = "scale-echo"
ECHO = REPO / "examples" / "echo"
ETCD = "/usr/bin/etcd"
RESULTS = BENCH_DIR / "cluster_scale.json"
MSG_COUNTERS = ("messages_in", "messages_out")     # in the `nodes` view's stats, if any
SECRET = "cluster-scale-" + "s" * 24
CALL_TIMEOUT = 10.0
STOP_GRACE = 20.0


@dataclass
class Row:
    """One mode and N: seconds, per-node means (``*_max``: the worst node), notes."""
    mode: str
    nodes: int
    start_s: float | None = None          # first spawn until the last node serves
    see_all_s: float | None = None
    deploy_all_s: float | None = None
    detect_s: float | None = None
    msgs_per_s: float | None = None       # per node, in + out (None: no counter)
    cpu_pct: float | None = None
    cpu_pct_max: float | None = None
    rss_mb: float | None = None           # the node process
    rss_tree_mb: float | None = None      # with its slaves
    fds: float | None = None
    fd_limit: int | None = None
    notes: list[str] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)   # every process started, to check none is left


# -- the nodes --------------------------------------------------------------------------------

@dataclass
class NodeProc:
    popen: subprocess.Popen[bytes]
    log: Path
    address: str = ""
    id: str = ""

    def text(self) -> str:
        return self.log.read_text(errors="replace")


class Fleet:
    """N node processes of one cluster.  :meth:`end` (sync, idempotent) ends and reaps
    every one of them and whatever they started; it is also what a Ctrl-C runs."""

    def __init__(self, workdir: Path, extra: Sequence[str]) -> None:
        self.workdir = workdir
        self.env = {**python_env(), "XDG_CONFIG_HOME": str(workdir / "config")}  # token files
        self.argv = [sys.executable, "-m", "engine", "run", "--control", "tcp://127.0.0.1:0",
                     "--cluster", f"scale-{uuid.uuid4().hex[:8]}", "--cluster-secret", SECRET,
                     "--discovery-port", str(free_udp_port()),
                     "--discovery-interface", "127.0.0.1", *extra]
        self.nodes: list[NodeProc] = []
        self.seen: dict[int, psutil.Process] = {}       # every descendant noticed

    def spawn(self) -> NodeProc:
        i = len(self.nodes)
        log = self.workdir / f"node{i}.log"
        with open(log, "wb") as err:
            popen = subprocess.Popen([*self.argv, "--state-dir", str(self.workdir / f"state{i}")],
                                     stdout=subprocess.DEVNULL, stderr=err, env=self.env,
                                     cwd=self.workdir)
        node = NodeProc(popen, log)
        self.nodes.append(node)
        return node

    async def serving(self, node: NodeProc, timeout: float) -> None:
        with trio.fail_after(timeout):
            while not node.address:
                text = node.text()
                match = ADDRESS_RE.search(text)
                if match and "serving" in text:
                    node.address = match.group(1)
                elif node.popen.poll() is not None:
                    raise RuntimeError(f"a node exited at start: {text[-800:]}")
                else:
                    await trio.sleep(0.05)

    def token_file(self, node: NodeProc) -> Path:
        from engine.client.tokens import token_path
        return token_path(node.address, self.env)

    def note_descendants(self) -> None:
        for node in self.nodes:
            try:
                for p in psutil.Process(node.popen.pid).children(recursive=True):
                    self.seen.setdefault(p.pid, p)
            except psutil.Error:
                pass

    def pids(self) -> list[int]:
        return sorted({n.popen.pid for n in self.nodes} | set(self.seen))

    def end(self, grace: float = STOP_GRACE) -> list[str]:
        """SIGTERM every node, SIGKILL those still up after ``grace``, reap them, then
        kill any descendant left running; returns those leftovers described."""
        self.note_descendants()
        for n in self.nodes:
            if n.popen.poll() is None:
                n.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for n in self.nodes:
            try:
                n.popen.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                n.popen.kill()
                n.popen.wait()
        left = []
        for p in psutil.wait_procs(list(self.seen.values()), timeout=5)[1]:
            try:
                left.append(f"{p.pid} {' '.join(p.cmdline())[:80]}")
                p.kill()
            except psutil.Error:
                pass
        return left


def echo_folder(where: Path) -> Path:
    """A copy of examples/echo, one slave at most, quick to stop."""
    folder = where / APP
    shutil.copytree(ECHO, folder, ignore=shutil.ignore_patterns("__pycache__"))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["engine"].update({"pool-limit": 1, "termination-timeout": 2})
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


async def until_each(clients: Sequence[Any], done: Callable[[Any], Awaitable[bool]],
                     t0: float, timeout: float, interval: float) -> tuple[float | None, int]:
    """Poll every client until ``done(client)``; (seconds from ``t0`` until the last one
    was, or None on timeout; how many were)."""
    from transport.errors import TransportError

    at: list[float] = []

    async def poll(client: Any) -> None:
        while True:
            try:
                if await done(client):
                    at.append(time.monotonic())
                    return
            except TransportError:
                pass                     # not answering (yet): as not done
            await trio.sleep(interval)

    with trio.move_on_after(timeout):
        async with trio.open_nursery() as nursery:
            for c in clients:
                nursery.start_soon(poll, c)
    return (max(at) - t0 if len(at) == len(clients) else None), len(at)


async def ids_of(client: Any) -> set[str]:
    return {n["id"] for n in (await client.verb("nodes", timeout=CALL_TIMEOUT))["nodes"]}


async def app_running(client: Any) -> bool:
    apps = (await client.list())["apps"]
    return bool(apps.get(APP, {}).get("state") == "running")


async def gather(clients: Sequence[Any], fn: Callable[[Any], Awaitable[Any]]) -> list[Any]:
    out: list[Any] = [None] * len(clients)

    async def one(i: int) -> None:
        out[i] = await fn(clients[i])

    async with trio.open_nursery() as nursery:
        for i in range(len(clients)):
            nursery.start_soon(one, i)
    return out


def message_count(view: dict[str, Any]) -> int | None:
    stats = view.get("stats") or {}
    if not all(isinstance(stats.get(k), int) for k in MSG_COUNTERS):
        return None
    return sum(stats[k] for k in MSG_COUNTERS)


# -- one N --------------------------------------------------------------------------------------

async def measure(fleet: Fleet, row: Row, n: int, args: argparse.Namespace) -> None:
    from engine.client import connect

    phase, interval = args.phase_timeout, 0.05 + n * 0.005
    t_spawn = time.monotonic()
    for _ in range(n):
        fleet.spawn()
    async with trio.open_nursery() as nursery:
        for node in fleet.nodes:
            nursery.start_soon(fleet.serving, node, 30 + 1.5 * n)
    t_ready = time.monotonic()
    row.start_s = t_ready - t_spawn
    async with AsyncExitStack() as stacks:
        conns: list[AsyncExitStack] = []
        clients = []
        for node in fleet.nodes:
            stack = await stacks.enter_async_context(AsyncExitStack())
            clients.append(await stack.enter_async_context(
                connect(node.address, timeout=CALL_TIMEOUT, token_file=fleet.token_file(node))))
            conns.append(stack)
        views = await gather(clients, lambda c: c.verb("nodes"))
        for node, view in zip(fleet.nodes, views):
            node.id = view["self"]
        everyone = {node.id for node in fleet.nodes}

        async def sees_all(c: Any) -> bool:
            return everyone <= await ids_of(c)
        row.see_all_s, k = await until_each(clients, sees_all, t_ready, phase, interval)
        if row.see_all_s is None:
            row.notes.append(f"see-all: {k}/{n} within {phase:g} s")

        t0 = time.monotonic()
        reply = await clients[0].deploy(echo_folder(fleet.workdir), name=APP, timeout=phase,
                                         cluster_secret=SECRET)
        bad = {p: o for p, o in (reply.get("peers") or {}).items() if "deployed" not in str(o)}
        if bad:
            row.notes.append(f"deploy: {len(bad)} peer(s) answered {sorted(set(map(str, bad.values())))[:2]}")
        row.deploy_all_s, k = await until_each(clients, app_running, t0, phase, interval)
        if row.deploy_all_s is None:
            row.notes.append(f"deploy-all: {k}/{n} running within {phase:g} s")

        await trio.sleep(1.0)               # let the last syncs settle
        await idle_window(fleet, clients, row, args.idle)

        victim = fleet.nodes[-1]
        await conns[-1].aclose()
        fleet.note_descendants()
        victim.popen.kill()
        t0 = time.monotonic()

        async def forgot(c: Any) -> bool:
            return victim.id not in await ids_of(c)
        row.detect_s, k = await until_each(clients[:-1], forgot, t0, phase, interval)
        victim.popen.wait()
        if row.detect_s is None:
            row.notes.append(f"detect: {k}/{n - 1} within {phase:g} s")


async def idle_window(fleet: Fleet, clients: Sequence[Any], row: Row, window: float) -> None:
    """CPU over ``window`` seconds (nothing asked of the nodes meanwhile), the message
    counters across it, and RSS / fds at its end."""
    pids = [node.popen.pid for node in fleet.nodes]
    before = await gather(clients, lambda c: c.verb("nodes"))
    cpu0, t0 = [cpu_seconds([p]) for p in pids], time.monotonic()
    await trio.sleep(window)
    cpu1, elapsed = [cpu_seconds([p]) for p in pids], time.monotonic() - t0
    after = await gather(clients, lambda c: c.verb("nodes"))
    cpu = [(b - a) / elapsed * 100 for a, b in zip(cpu0, cpu1)]
    row.cpu_pct, row.cpu_pct_max = sum(cpu) / len(cpu), max(cpu)
    counts = [(message_count(a), message_count(b)) for a, b in zip(before, after)]
    if all(a is not None and b is not None for a, b in counts):
        row.msgs_per_s = sum(b - a for a, b in counts if a is not None and b is not None) \
            / elapsed / len(counts)
    fleet.note_descendants()
    own, tree, fds = [], [], []
    for pid in pids:
        proc = psutil.Process(pid)
        own.append(proc.memory_info().rss / 2**20)
        tree.append(own[-1] + sum(_rss(p) for p in proc.children(recursive=True)))
        fds.append(proc.num_fds())
        row.fd_limit = proc.rlimit(psutil.RLIMIT_NOFILE)[0]
    row.rss_mb, row.rss_tree_mb, row.fds = (sum(v) / len(v) for v in (own, tree, fds))


def _rss(p: psutil.Process) -> float:
    try:
        return float(p.memory_info().rss) / 2**20
    except psutil.Error:
        return 0.0


async def run_one(mode: str, n: int, extra: Sequence[str], args: argparse.Namespace,
                  fleets: list[Fleet]) -> Row:
    row = Row(mode, n)
    budget = args.timeout or 90 + 6 * n
    with tempfile.TemporaryDirectory(prefix=f"cluster-scale-{mode}-{n}-") as tmp:
        fleet = Fleet(Path(tmp), extra)
        fleets.append(fleet)
        try:
            with trio.fail_after(budget):
                await measure(fleet, row, n, args)
        except trio.TooSlowError:
            row.notes.append(f"timed out: the whole run took over {budget:g} s")
        except Exception as exc:  # noqa: BLE001 - one failed N is a row, not the end of the run
            while isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
                exc = exc.exceptions[0]
            row.notes.append(f"error: {type(exc).__name__}: {exc}"[:300])
            row.notes.extend(f"node log: {n.text()[-300:]!r}" for n in fleet.nodes[:1])
        finally:
            row.pids = fleet.pids()
            left = fleet.end()
            if left:
                row.notes.append(f"left running (killed): {left[:3]}")
    return row


# -- etcd ---------------------------------------------------------------------------------------

def registry_supported() -> bool:
    out = subprocess.run([sys.executable, "-m", "engine", "run", "--help"], capture_output=True,
                         text=True, env=python_env(), timeout=60)
    return "--cluster-registry" in out.stdout


def free_tcp_ports(k: int) -> list[int]:
    import socket
    socks = [socket.socket() for _ in range(k)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@asynccontextmanager
async def etcd_server(workdir: Path, fleets: list[Fleet]) -> AsyncIterator[str]:
    """A single-member etcd on free loopback ports; yields ``etcd://127.0.0.1:PORT``."""
    client, peer = free_tcp_ports(2)
    curl, purl = f"http://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
    with open(workdir / "etcd.log", "wb") as log:
        popen = subprocess.Popen(
            [ETCD, "--name", "scale", "--data-dir", str(workdir / "etcd"),
             "--listen-client-urls", curl, "--advertise-client-urls", curl,
             "--listen-peer-urls", purl, "--initial-advertise-peer-urls", purl,
             "--initial-cluster", f"scale={purl}"],
            stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    keeper = Fleet(workdir, ())                 # so that end() reaps it, Ctrl-C included
    keeper.nodes.append(NodeProc(popen, workdir / "etcd.log"))
    fleets.append(keeper)
    try:
        def healthy() -> bool:
            try:
                with urllib.request.urlopen(curl + "/health", timeout=1) as answer:
                    return b'"true"' in answer.read()
            except OSError:
                return False
        with trio.fail_after(20):
            while not await trio.to_thread.run_sync(healthy):
                if popen.poll() is not None:
                    raise RuntimeError(f"etcd exited: {(workdir / 'etcd.log').read_text()[-500:]}")
                await trio.sleep(0.1)
        yield f"etcd://127.0.0.1:{client}"
    finally:
        keeper.end(grace=5)


# -- the on-paper extrapolation -----------------------------------------------------------------

def nominal_lan_per_peer() -> dict[str, float]:
    """What the code's defaults cost per peer and second: a report exchange each way every
    ``report_interval`` (at 0.5 s: 2 status calls made and 2 answered), one beacon heard
    every ``hello_interval``."""
    from engine.cluster.service import ClusterOptions
    options = ClusterOptions(name="paper", insecure=True)
    return {"status_calls": 2 / options.report_interval,
            "beacons": 1 / options.discovery.hello_interval}


def _per_peer(rows: Sequence[Row], value: Callable[[Row], float | None]) -> tuple[float, float] | None:
    """(intercept, slope) of value against peers (N - 1): a least-squares line over the
    measured Ns, or through 0 with one N (an upper bound per peer)."""
    pts = [(r.nodes - 1, v) for r in rows if (v := value(r)) is not None and r.nodes > 1]
    if not pts:
        return None
    if len({x for x, _ in pts}) < 2:
        x, y = max(pts)
        return 0.0, y / x
    mx, my = sum(x for x, _ in pts) / len(pts), sum(y for _, y in pts) / len(pts)
    slope = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    return my - slope * mx, slope


def extrapolate(rows: Sequence[Row], targets: Sequence[int] = (100, 1000), cores: int = 2) -> list[str]:
    out = []
    lan = [r for r in rows if r.mode == "lan" and r.cpu_pct is not None]
    if lan:
        nominal = nominal_lan_per_peer()
        msgs = _per_peer(lan, lambda r: r.msgs_per_s)
        cpu, fds = _per_peer(lan, lambda r: r.cpu_pct), _per_peer(lan, lambda r: r.fds)
        src = "measured" if msgs else "nominal, no counter"
        per_peer = msgs[1] if msgs else sum(nominal.values())
        out.append(f"lan (O(N) per node: every node exchanges reports with every peer twice a "
                   f"second): per peer {per_peer:.1f} msgs/s ({src}; nominal "
                   f"{nominal['status_calls']:g} status calls + {nominal['beacons']:g} beacon/s)"
                   + (f", CPU {cpu[1]:.3f} %/peer" if cpu else "")
                   + (f", {fds[1]:.2f} fds/peer" if fds else "")
                   + f" (from N={','.join(str(r.nodes) for r in lan)}"
                   + ("; one N: a line through 0, an upper bound)" if len({r.nodes for r in lan}) < 2 else ")"))
        for t in targets:
            line = f"  N={t:>5,}: {per_peer * (t - 1):>8,.0f} msgs/s/node ({per_peer * (t - 1) * t:,.0f} cluster-wide)"
            if cpu:
                line += f", CPU {cpu[0] + cpu[1] * (t - 1):,.0f}% of a core/node"
            if fds:
                line += f", {fds[0] + fds[1] * (t - 1):,.0f} fds/node"
            out.append(line)
        if fds and fds[1] > 0:
            for limit in sorted({1024, *(r.fd_limit for r in lan if r.fd_limit)}):
                out.append(f"  fds run out (soft limit {limit:,}) near N={(limit - fds[0]) / fds[1] + 1:,.0f}")
        if cpu and cpu[1] > 0:
            # all N nodes on one host: N * (a + b (N-1)) = 100 * cores
            a, b = cpu
            n = next((k for k in range(2, 100_000) if k * (a + b * (k - 1)) >= 100 * cores), None)
            out.append(f"  one {cores}-core host running every node is saturated by idle cluster "
                       f"traffic alone near N={n}")
    etcd = [r for r in rows if r.mode == "etcd" and r.cpu_pct is not None]
    if etcd:
        r = max(etcd, key=lambda r: r.nodes)
        out.append(f"etcd (constant per node, measured at N={r.nodes}): "
                   f"{fmt(r.msgs_per_s)} msgs/s/node, CPU {fmt(r.cpu_pct)}%/node, "
                   f"{fmt(r.fds)} fds/node at any N")
    else:
        out.append("etcd: not measured (per node: a lease keep-alive and the catalog watch, "
                   "constant in N; load sampled from a few peers, not all)")
    return out


# -- output -------------------------------------------------------------------------------------

HEADS = ["mode", "N", "start s", "see-all s", "deploy-all s", "detect s", "msgs/s/node",
         "CPU%/node", "RSS MB/node", "fds/node"]


def table(rows: Sequence[Row]) -> list[str]:
    cells = [[r.mode, str(r.nodes), fmt(r.start_s, "s"), fmt(r.see_all_s, "s"),
              fmt(r.deploy_all_s, "s"), fmt(r.detect_s, "s"),
              "n/a" if r.msgs_per_s is None and r.cpu_pct is not None else fmt(r.msgs_per_s),
              fmt(r.cpu_pct, "x"), fmt(r.rss_mb, "MB"), fmt(r.fds, "x")] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(HEADS)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in [HEADS, *cells]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += [f"  {r.mode} N={r.nodes}: {note}" for r in rows for note in r.notes]
    return lines


def report(rows: Sequence[Row], info: dict[str, Any], path: Path | None) -> None:
    print(f"cluster scale: {info['date']}, {info['cores']} cores ({info['cpu']}), load "
          f"{' '.join(f'{x:.2f}' for x in info['load_avg'])}; a shared machine: other work ran beside")
    print("\n".join(table(rows)))
    if not any(r.msgs_per_s is not None for r in rows):
        print(f"msgs/s: n/a, the `nodes` view's stats have no {' / '.join(MSG_COUNTERS)} counters")
    print("on paper:")
    print("\n".join(extrapolate(rows, cores=info["cores"] or 2)))
    if path is not None:
        path.write_text(json.dumps({"machine": info, "rows": [asdict(r) for r in rows]}, indent=1))
        print(f"written: {path}")


async def run_all(args: argparse.Namespace, fleets: list[Fleet]) -> list[Row]:
    rows: list[Row] = []
    for mode in args.mode:
        async with AsyncExitStack() as stack:
            extra: list[str] = []
            if mode == "etcd":
                if not registry_supported():
                    print("etcd mode skipped: `python -m engine run` has no --cluster-registry yet")
                    continue
                registry = args.registry
                if registry is None:
                    if not Path(ETCD).exists():
                        print(f"etcd mode skipped: no {ETCD} (Debian's etcd-server)")
                        continue
                    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="scale-etcd-")))
                    registry = await stack.enter_async_context(etcd_server(tmp, fleets))
                extra = ["--cluster-registry", registry]
            for n in args.nodes:
                print(f"  {mode} N={n} ...", end="", flush=True)
                t0 = time.monotonic()
                rows.append(await run_one(mode, n, extra, args, fleets))
                print(f" {time.monotonic() - t0:.0f} s", flush=True)
                if any(note.startswith("timed out") for note in rows[-1].notes):
                    print(f"  {mode}: larger N skipped (N={n} did not finish in time)")
                    break
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster_scale",
                                     description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--nodes", default="10,30,60", help="comma-separated Ns (default 10,30,60)")
    parser.add_argument("--mode", action="append", choices=("lan", "etcd"),
                        help="lan (beacons) and/or etcd (registry); repeatable (default lan)")
    parser.add_argument("--registry", metavar="etcd://HOST:PORT",
                        help="a running etcd to use in etcd mode (implies --mode etcd)")
    parser.add_argument("--idle", type=float, default=5.0, help="idle window, s (default 5)")
    parser.add_argument("--phase-timeout", type=float, default=60.0,
                        help="bound of each phase, s (default 60)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="bound of one N, s (default 90 + 6 x N)")
    parser.add_argument("--json", type=Path, default=RESULTS, help=f"default {RESULTS}")
    parser.add_argument("--extrapolate", type=Path, metavar="FILE",
                        help="print the extrapolation of a saved run and exit")
    args = parser.parse_args(argv)
    if args.extrapolate:
        doc = json.loads(args.extrapolate.read_text())
        print("\n".join(extrapolate([Row(**r) for r in doc["rows"]],
                                    cores=doc["machine"].get("cores") or 2)))
        return 0
    try:
        args.nodes = [int(x) for x in args.nodes.split(",") if x.strip()]
    except ValueError:
        parser.error("--nodes wants comma-separated integers")
    if not args.nodes or min(args.nodes) < 2 or args.idle <= 0:
        parser.error("every N must be >= 2 and --idle > 0")
    args.mode = args.mode or (["etcd"] if args.registry else ["lan"])
    if args.registry and "etcd" not in args.mode:
        args.mode.append("etcd")
    info = {**machine(), "command": " ".join(["python -m bench.cluster_scale", *sys.argv[1:]])}
    fleets: list[Fleet] = []
    try:
        rows = trio.run(run_all, args, fleets)
    finally:
        for fleet in fleets:          # after a Ctrl-C, whatever a finally could not reach
            fleet.end(grace=5)
    report(rows, info, args.json)
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
