"""The cluster on the command line (docs/cluster.md): ``python -m engine nodes``, and the
options with which ``run`` starts a node in a cluster (``--cluster NAME ...``)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from engine.cli.common import EXIT_OK, Runner, command, connect_node, node_options, to_json

if TYPE_CHECKING:
    from transport.tls import TlsConfig
    from engine.cluster.service import ClusterOptions


def add_cluster_options(p: argparse.ArgumentParser) -> None:
    """``run``'s cluster options (read back by :func:`cluster_options`)."""
    g = p.add_argument_group("cluster (default: from ENGINE_CLUSTER, ENGINE_STATE_DIR, MESH_*)")
    g.add_argument("--cluster", metavar="NAME", help="join the cluster NAME (zero-config discovery)")
    g.add_argument("--cluster-key", metavar="KEY", help="separates clusters of one name on a LAN")
    g.add_argument("--cluster-secret", metavar="SECRET",
                   help="the cluster's secret, >= 16 characters: authenticates beacons, node "
                        "links and operators' grants (default ENGINE_CLUSTER_SECRET; prefer "
                        "--cluster-secret-file: a command line is visible to other users)")
    g.add_argument("--cluster-secret-file", metavar="PATH",
                   help="read the secret from PATH (mode 0600; default ENGINE_CLUSTER_SECRET_FILE)")
    g.add_argument("--insecure", action="store_true", default=None,
                   help="run the cluster WITHOUT a secret (one host only; warned at every start)")
    g.add_argument("--cluster-registry", metavar="etcd://HOST:PORT",
                   help="use etcd for membership and the app catalog instead of LAN beacons "
                        "(default ENGINE_CLUSTER_REGISTRY)")
    g.add_argument("--state-dir", metavar="DIR", help="where apps received from peers are written")
    g.add_argument("--discovery-port", type=int, metavar="PORT", help="UDP discovery port")
    g.add_argument("--discovery-interface", metavar="IP",
                   help="IPv4 of the interface to beacon on (default: the control address's)")
    t = p.add_argument_group("TLS, for a --control tls+tcp://HOST:PORT endpoint and its peers "
                             "(default: ENGINE_TLS_CERT, ENGINE_TLS_KEY, ENGINE_TLS_CA)")
    t.add_argument("--tls-cert", metavar="PEM", help="this node's certificate")
    t.add_argument("--tls-key", metavar="PEM", help="its private key")
    t.add_argument("--tls-ca", metavar="PEM", help="the CA whose certificates peers and clients show")


def tls_options(args: argparse.Namespace) -> "TlsConfig | None":
    """``run``'s TLS files: all three options, else the environment's, else None."""
    from transport.tls import TlsConfig, TlsConfigError

    from engine.client.tls import tls_from_env

    given = (args.tls_cert, args.tls_key, args.tls_ca)
    if not any(given):
        return tls_from_env()
    if not all(given):
        raise TlsConfigError("TLS needs all of --tls-cert, --tls-key and --tls-ca")
    cert, key, ca = (Path(value) for value in given)
    return TlsConfig(cert, key, ca)


def cluster_options(args: argparse.Namespace) -> ClusterOptions | None:
    """The cluster ``run``'s node joins: from the options, else the environment;
    None when neither names one."""
    from transport.mesh.discovery import DiscoveryConfig

    from engine.cluster.secret import read_secret_file
    from engine.cluster.service import ClusterOptions

    disco = DiscoveryConfig.from_env(**{k: v for k, v in (
        ("port", args.discovery_port), ("interface", args.discovery_interface)) if v is not None})
    secret = args.cluster_secret
    if secret is None and args.cluster_secret_file:
        secret = read_secret_file(args.cluster_secret_file)
    return ClusterOptions.from_env(
        name=args.cluster, key=args.cluster_key, secret=secret, insecure=args.insecure,
        registry=args.cluster_registry,
        state_dir=Path(args.state_dir) if args.state_dir else None, discovery=disco)


def add_grant_options(p: argparse.ArgumentParser) -> None:
    """``deploy``/``undeploy``: the secret their cluster-wide change is signed with."""
    p.add_argument("--cluster-secret-file", metavar="PATH",
                   help="on a node in a cluster, sign the change with the cluster's secret "
                        "read from PATH (default ENGINE_CLUSTER_SECRET, "
                        "ENGINE_CLUSTER_SECRET_FILE; docs/cluster.md)")


def grant_secret_arg(args: argparse.Namespace) -> str | None:
    from engine.cluster.secret import read_secret_file

    return read_secret_file(args.cluster_secret_file) if args.cluster_secret_file else None


@command("nodes", "list the cluster's nodes with their apps and load")
def nodes_command(p: argparse.ArgumentParser) -> Runner:
    node_options(p)
    p.add_argument("--json", action="store_true", help="print the raw JSON")

    async def run(args: argparse.Namespace) -> int:
        async with connect_node(args) as node:
            view = await node.verb("nodes")
        if args.json:
            print(to_json(view, indent=2))
            return EXIT_OK
        registry = view.get("registry", {}).get("kind", "lan")
        secure = "" if view.get("secure", True) else ", INSECURE: no secret"
        print(f"cluster {view['cluster']}: {len(view['nodes'])} node(s) ({registry} registry{secure})")
        for problem in view.get("problems", []):
            print(f"problem: {problem}")
        for name, rec in view.get("catalog", {}).items():
            print(f"catalog: {name} {rec['state']} (generation {rec['generation']}, "
                  f"by {rec['origin'] or '?'})")
        for name, why in view.get("divergence", {}).items():
            print(f"DIVERGED here: {name}: {why}")
        for n in view["nodes"]:
            if not n.get("linked", True):
                print(f"{n['id']}  {n['control']}  (a member beyond this node's sample: "
                      f"no load figures here)")
                continue
            mark = " (this node)" if n["self"] else f"  seen {n['age']:.1f}s ago"
            if not n.get("connected", True):
                mark += " (not connected: not routed to)"
            print(f"{n['id']}  {n['control']}  cpu {n['cpu'] * 100:.0f}%{mark}")
            for name, a in n["apps"].items():
                version = f"v{a['version']}" if "version" in a else "v?"
                mark = "" if a.get("in_line", True) else "\tDIVERGED from the catalog"
                print(f"  {name}\t{version}@{(a.get('digest') or 'unshared')[:12]}\t{a['state']}"
                      f"\tqueue {a['queue']}\trunning {a['running']}/{a['capacity']}"
                      f"\tslaves {a['slaves']}\t{a['jobs_per_s']:g} jobs/s{mark}")
        return EXIT_OK
    return run
