"""Slaves in each language behind one node (issue #14): the conformance app of Python,
Node.js and Perl (tests/conformance/apps/), 2 slaves each, called through the node's
control endpoint; sequential echo round trips and the throughput at each in-flight level,
so every language is measured against the Python slave in the same run."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from .harness import PAYLOAD, REPO, RRFigures, Settings, child_process, measure_rr, python_child

APPS = REPO / "tests" / "conformance" / "apps"
PERL_LIB = REPO / "workers" / "perl" / "lib"
LANGUAGES = ("python", "nodejs", "perl")


def available(language: str) -> str | None:
    """Why ``language`` cannot be measured here (None: it can)."""
    try:
        from engine import languages
    except ImportError as exc:
        return f"skipped: engine not importable ({exc})"
    folder = APPS / language
    if not (folder / "manifest.json").exists():
        return f"skipped: no conformance app for {language}"
    if language == "perl":
        probe = subprocess.run(["perl", "-MData::MessagePack", "-e", "1"], capture_output=True)
        return "skipped: Data::MessagePack missing (libdata-messagepack-perl)" \
            if probe.returncode else None
    kind = json.loads((folder / "manifest.json").read_text())["type"]
    missing = languages.get(kind).missing()
    return f"skipped: {missing}" if missing else None


async def echo_rr(settings: Settings, language: str) -> RRFigures:
    from engine.client import connect

    with tempfile.TemporaryDirectory(prefix="bench-lang-") as tmp:
        folder = Path(tmp) / f"lang-{language}"
        shutil.copytree(APPS / language, folder, symlinks=True)
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["engine"] = {"pool-limit": 2, "queue-limit": 2048, "idle-timeout": 600}
        (folder / "manifest.json").write_text(json.dumps(manifest))
        env = dict(os.environ, ENGINE_PERL_LIB=str(PERL_LIB),
                   PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "src")]))
        async with child_process(python_child("bench.servers", "node", "tcp://127.0.0.1:0",
                                              folder), env=env) as node:
            async with connect(node.ready, timeout=10) as client:
                app = folder.name

                async def call() -> Any:
                    return await client.call(app, "echo", PAYLOAD)

                return await measure_rr(lambda: call, settings)


async def all_languages(settings: Settings) -> dict[str, RRFigures | str]:
    out: dict[str, RRFigures | str] = {}
    for language in LANGUAGES:
        reason = available(language)
        out[language] = reason if reason else await echo_rr(settings, language)
    return out
