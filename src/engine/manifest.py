"""App manifests: JSON in, frozen typed objects out.

This is a pure core: :func:`parse_manifest` turns an already-decoded JSON value into an
:class:`AppManifest` or raises :class:`ManifestError` naming the file, the field path
(``engine.pool-limit``) and what was expected.  Nothing is started here, so a bad manifest
can never half-start an app.  ``docs/manifest.md`` documents every key.

Two shapes from the Cocaine seeds are accepted: ``drivers`` (each entry has a ``type`` and
the ``emit``-ted event name) and the older ``tasks`` (the key is the event name).
Unknown keys are rejected (typo protection), except the free-form ``version`` and
``description``.  Durations are seconds in JSON (fractions allowed).
"""
from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, TypeGuard

from engine.drivers.options import DriverSpec
from engine.errors import ManifestError
from engine import languages

MANIFEST_FILE = "manifest.json"
DEFAULT_ENTRY = "app.py"           # "args" of a python app when the manifest has none
BACKENDS = ("process", "thread")
SPAWN_MODES = ("zygote", "exec")   # engine.spawn: how a process slave is started
MAX_PREFETCH = 1024  # engine.prefetch: jobs queued in one slave beyond its concurrency
# App and driver names end up in CLI arguments, log lines and socket paths.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(I?B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


@dataclass(frozen=True)
class ResourceLimits:
    cpus: frozenset[int] | None = None      # resource-limits.cpuset.cpuset.cpus, applied via CPU affinity
    memory_bytes: int | None = None          # RLIMIT_AS
    cpu_seconds: int | None = None           # RLIMIT_CPU
    open_files: int | None = None            # RLIMIT_NOFILE
    mems: str | None = None                  # cpuset.cpuset.mems: recorded, not enforced (no cgroups)


LOG_OUTPUT_RATE = 50.0   # lines/s per slave forwarded to the node's log by default


@dataclass(frozen=True)
class EngineConfig:
    pool_limit: int = 10
    queue_limit: int = 100
    heartbeat_timeout: float = 30.0          # seconds without a sign of life from a slave
    # seconds a job may take from submission to its answer (None: no bound); a slow
    # job is not a hung slave (docs/manifest.md)
    request_timeout: float | None = None
    grow_threshold: int = 1                  # queued jobs per slave before another is spawned
    startup_timeout: float = 10.0            # seconds
    idle_timeout: float = 600.0              # seconds
    termination_timeout: float = 5.0         # seconds
    backend: str = "process"                 # "process" | "thread"
    spawn: str = "zygote"                    # "zygote" (fork from a template) | "exec"
    concurrency: int = 1                     # jobs one slave may run at once
    # INVOKEs a slave may hold queued beyond concurrency: "auto" (by measured job
    # duration, engine/prefetch.py) or a fixed number (0 = off)
    prefetch: int | Literal["auto"] = "auto"
    crashlog_limit: int = 100                # lines kept from a dead slave's output
    # a slave's output and logging forwarded to the node's log, lines/s per slave
    # (engine/pool/output_log.py): "log-output": true (this), false (0: none) or a rate
    log_output: float = LOG_OUTPUT_RATE
    # recycling (engine/pool/policy.py): a slave is replaced after this many jobs (0:
    # never; each slave's limit has up to 10% jitter) or once its RSS passes this (MB)
    max_jobs_per_slave: int = 0
    max_rss_per_slave: float = 0.0
    resource_limits: ResourceLimits = field(default_factory=ResourceLimits)
    # where the slave protocol runs: "socket" (an inherited socketpair end) or "stdio"
    # (the slave's stdin and stdout); None: its language plugin's default
    transport: str | None = None


@dataclass(frozen=True)
class PubsubConfig:
    endpoint: str | None = None   # None: the node picks one


@dataclass(frozen=True)
class AppManifest:
    name: str
    source: Path                   # the manifest file
    type: str                      # language plugin: "python", "exec", "nodejs" (engine.languages)
    entry: Path                    # the app module (python), program (exec) or script (nodejs)
    engine: EngineConfig
    drivers: tuple[DriverSpec, ...]
    pubsub: PubsubConfig | None = None
    version: int = 1
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    args: tuple[str, ...] = ()     # the rest of ``args`` after the entry, as written

    @property
    def base_dir(self) -> Path:
        return self.source.parent


# --------------------------------------------------------------------------------------
# Entry points

def load_manifest(path: str | Path, *, name: str | None = None) -> AppManifest:
    """Read and parse one manifest file (or a folder holding ``manifest.json``)."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(str(path), "", "an existing manifest file", "no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(str(path), "", "a readable UTF-8 file", str(exc)) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        try:    # the seed's own example has one ("cpuset.mems": "1",}): take what it meant
            data = json.loads(without_trailing_commas(text))
        except json.JSONDecodeError:
            raise ManifestError(str(path), "", "valid JSON",
                                f"{exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise ManifestError(str(path), "", "valid JSON nested less deeply", "too deep to read") from None
    return parse_manifest(data, source=path, name=name)


def without_trailing_commas(text: str) -> str:
    """``text`` without the commas that only precede a ``}`` or ``]`` (outside strings):
    the one liberty hand-written manifests take with JSON (Cocaine's README example
    does).  Nothing else is relaxed: a file that is still not JSON is refused."""
    out: list[str] = []
    in_string = escaped = False
    for i, ch in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch == "," and _next_non_space(text, i + 1) in ("}", "]"):
            continue
        out.append(ch)
    return "".join(out)


def _next_non_space(text: str, start: int) -> str:
    for ch in text[start:start + 4096]:     # (bounded: a manifest is not a novel)
        if not ch.isspace():
            return ch
    return ""


def parse_manifest(data: Any, *, source: Path, name: str | None = None) -> AppManifest:
    """Validate a decoded manifest; ``source`` is the file it came from (for relative
    paths and messages), ``name`` overrides the ``name`` key and the folder name."""
    return _Parser(Path(source)).manifest(data, name)


# --------------------------------------------------------------------------------------
# The parser: one method per section, each knowing its field path.

_TOP_KEYS = ("name", "type", "args", "engine", "drivers", "tasks", "pubsub", "version", "description")


class _Parser:
    def __init__(self, source: Path) -> None:
        self.file = str(source)                 # as the user named it, for messages
        self.source = source.absolute()
        self.base_dir = self.source.parent

    def error(self, path: str, expected: str, got: Any = None) -> ManifestError:
        return ManifestError(self.file, path, expected, got)

    def obj(self, value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(path, "a JSON object", value)
        return value

    def reject_unknown(self, data: dict[str, Any], known: tuple[str, ...], prefix: str) -> None:
        for key in data:
            if key not in known:
                hint = difflib.get_close_matches(str(key), known, n=1)
                expected = f"one of {', '.join(known)}"
                if hint:
                    expected = f"{hint[0]!r} (unknown key; {expected})"
                else:
                    expected = f"a known key ({expected})"
                raise self.error(f"{prefix}{key}", expected)

    # -- top level ------------------------------------------------------------------
    def manifest(self, data: Any, name: str | None) -> AppManifest:
        data = self.obj(data, "")
        self.reject_unknown(data, _TOP_KEYS, "")
        app_name = self.app_name(data, name)
        language = data.get("type", "python")
        known = languages.names()
        if not isinstance(language, str) or language not in known:
            broken = languages.registry.broken.get(language) if isinstance(language, str) else None
            raise self.error("type", f"a language plugin, one of {', '.join(known)}"
                             + (f" (plugin {language!r} is installed but cannot be loaded: "
                                f"{broken})" if broken else ""), language)
        plugin = languages.get(language)
        entry, extra = self.args(data.get("args", plugin.default_args), plugin)
        engine = self.engine(data.get("engine", {}))
        self.fits_language(engine, plugin, data.get("engine") or {})
        if "drivers" in data and "tasks" in data:
            raise self.error("tasks", "either 'drivers' or the older 'tasks', not both")
        drivers = self.drivers(data["tasks"], "tasks") if "tasks" in data else \
            self.drivers(data.get("drivers", {}), "drivers")
        pubsub = self.pubsub(data["pubsub"]) if "pubsub" in data else None
        version = data.get("version", 1)
        if not _is_int(version) or version < 0:
            raise self.error("version", "a non-negative integer", version)
        if "description" in data and not isinstance(data["description"], str):
            raise self.error("description", "a string", data["description"])
        return AppManifest(
            name=app_name, source=self.source, type=language, entry=entry, engine=engine,
            drivers=drivers, pubsub=pubsub, version=version, raw=data, args=extra,
        )

    def app_name(self, data: dict[str, Any], override: str | None) -> str:
        if override is not None:
            where, value = "name", override
        elif "name" in data:
            where, value = "name", data["name"]
        else:
            where, value = "name (from the manifest's folder)", self.base_dir.name
        if not isinstance(value, str) or not _NAME_RE.match(value):
            raise self.error(where, "an app name of letters, digits, '.', '_' or '-' "
                                    "(at most 64, not starting with a punctuation mark)", value)
        return value

    def args(self, raw: Any, plugin: languages.LanguagePlugin) -> tuple[Path, tuple[str, ...]]:
        """``args``: the entry (a path, relative to the manifest's folder) or, for a
        language that takes arguments, a list of the entry then its arguments."""
        if isinstance(raw, list):
            if not plugin.takes_arguments:
                raise self.error("args", f"a path to the app's entry (a {plugin.name} app takes "
                                 f"no arguments)", raw)
            if not raw or not all(isinstance(a, str) for a in raw):
                raise self.error("args", "a list of strings: the program, then its arguments", raw)
            entry, extra = self.entry(raw[0]), tuple(raw[1:])
        else:
            entry, extra = self.entry(raw), ()
        problem = plugin.entry_problem(entry)
        if problem:
            raise self.error("args", problem, str(entry))
        return entry, extra

    def fits_language(self, engine: EngineConfig, plugin: languages.LanguagePlugin,
                      raw: dict[str, Any]) -> None:
        """The engine options the language cannot honour are refused, not ignored."""
        if engine.transport is not None and engine.transport not in plugin.transports:
            raise self.error("engine.transport", f"a transport the {plugin.name} plugin speaks: "
                             f"{', '.join(plugin.transports)}", engine.transport)
        if engine.backend == "thread" and not plugin.runs_in_node:
            raise self.error("engine.backend", f'"process" (a {plugin.name} app cannot run '
                             f"in the node's own process)", engine.backend)

    def entry(self, args: Any) -> Path:
        if not isinstance(args, str) or not args:
            raise self.error("args", "a path to the app's entry (relative, absolute or local:///abs)", args)
        if args.startswith("local://"):
            rest = args[len("local://"):]
            if not rest.startswith("/"):
                raise self.error("args", "local:// followed by an absolute path (local:///abs/app.py)", args)
            path = Path(rest)
        elif "://" in args:
            raise self.error("args", "a file path or local:///abs/path (no other schemes)", args)
        else:
            path = self.base_dir / args
        path = Path(_normpath(path))
        try:
            exists = path.exists()
        except (OSError, ValueError):  # a name too long for the file system, ...
            exists = False
        if not exists:
            raise self.error("args", "an existing app file or package folder", str(path))
        return path

    # -- engine ---------------------------------------------------------------------
    def engine(self, raw: Any) -> EngineConfig:
        raw = self.obj(raw, "engine")
        specs: dict[str, tuple[str, Callable[[Any, str], Any]]] = {
            "pool-limit": ("pool_limit", self.positive_int),
            "queue-limit": ("queue_limit", self.positive_int),
            "heartbeat-timeout": ("heartbeat_timeout", self.positive_seconds),
            "request-timeout": ("request_timeout", self.optional_seconds),
            "grow-threshold": ("grow_threshold", self.positive_int),
            "startup-timeout": ("startup_timeout", self.positive_seconds),
            "idle-timeout": ("idle_timeout", self.positive_seconds),
            "termination-timeout": ("termination_timeout", self.non_negative_seconds),
            "backend": ("backend", self.backend),
            "spawn": ("spawn", self.spawn),
            "concurrency": ("concurrency", self.positive_int),
            "prefetch": ("prefetch", self.prefetch),
            "crashlog-limit": ("crashlog_limit", self.non_negative_int),
            "log-output": ("log_output", self.log_output),
            "max-jobs-per-slave": ("max_jobs_per_slave", self.positive_int),
            "max-rss-per-slave": ("max_rss_per_slave", self.positive_megabytes),
            "resource-limits": ("resource_limits", self.resource_limits),
            "transport": ("transport", self.transport),
        }
        self.reject_unknown(raw, tuple(specs), "engine.")
        values = {attr: check(raw[key], f"engine.{key}")
                  for key, (attr, check) in specs.items() if key in raw}
        if values.get("backend") == "thread" and raw.get("resource-limits"):
            # Silently ignoring them would be worse than refusing the manifest.
            raise self.error("engine.resource-limits", 'no resource limits with backend "thread" '
                             "(its handlers share the node's process)", raw["resource-limits"])
        for key in ("max-jobs-per-slave", "max-rss-per-slave"):
            if values.get("backend") == "thread" and key in raw:
                raise self.error(f"engine.{key}", 'no slave recycling with backend "thread" '
                                 "(its handlers run on the node's threads)", raw[key])
        return EngineConfig(**values)

    def positive_int(self, value: Any, path: str) -> int:
        if not _is_int(value) or value <= 0:
            raise self.error(path, "a positive integer", value)
        return value

    def positive_megabytes(self, value: Any, path: str) -> float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) \
                and 0 < value < float("inf"):
            return float(value)
        raise self.error(path, "a positive number of megabytes", value)

    def log_output(self, value: Any, path: str) -> float:
        if value is True:
            return LOG_OUTPUT_RATE
        if value is False:
            return 0.0
        if isinstance(value, (int, float)) and not isinstance(value, bool) \
                and 0 < value < float("inf"):
            return float(value)
        raise self.error(path, "true, false or a positive number of lines per second", value)

    def prefetch(self, value: Any, path: str) -> int | Literal["auto"]:
        if value == "auto":
            return "auto"
        if _is_int(value) and 0 <= value <= MAX_PREFETCH:
            return value
        raise self.error(path, f'"auto" or a whole number of jobs from 0 to {MAX_PREFETCH}', value)

    def non_negative_int(self, value: Any, path: str) -> int:
        if not _is_int(value) or value < 0:
            raise self.error(path, "a non-negative integer", value)
        return value

    def positive_seconds(self, value: Any, path: str) -> float:
        if not _is_number(value) or value <= 0:
            raise self.error(path, "a positive number of seconds", value)
        return float(value)

    def optional_seconds(self, value: Any, path: str) -> float | None:
        if value is None:
            return None
        if not _is_number(value) or not 0 < value < float("inf"):
            raise self.error(path, "a positive number of seconds, or null for no limit", value)
        return float(value)

    def non_negative_seconds(self, value: Any, path: str) -> float:
        if not _is_number(value) or value < 0:
            raise self.error(path, "a non-negative number of seconds", value)
        return float(value)

    def transport(self, value: Any, path: str) -> str:
        if not isinstance(value, str) or value not in languages.TRANSPORTS:
            raise self.error(path, f"one of {', '.join(languages.TRANSPORTS)}", value)
        return value

    def backend(self, value: Any, path: str) -> str:
        if not isinstance(value, str) or value not in BACKENDS:
            raise self.error(path, f"one of {', '.join(BACKENDS)}", value)
        return value

    def spawn(self, value: Any, path: str) -> str:
        if not isinstance(value, str) or value not in SPAWN_MODES:
            raise self.error(path, f"one of {', '.join(SPAWN_MODES)}", value)
        return value

    def resource_limits(self, raw: Any, path: str) -> ResourceLimits:
        raw = self.obj(raw, path)
        self.reject_unknown(raw, ("cpuset", "memory", "cpu-time", "open-files"), f"{path}.")
        cpus = mems = None
        if "cpuset" in raw:
            cpuset = self.obj(raw["cpuset"], f"{path}.cpuset")
            self.reject_unknown(cpuset, ("cpuset.cpus", "cpuset.mems"), f"{path}.cpuset.")
            if "cpuset.cpus" in cpuset:
                cpus = self.cpu_list(cpuset["cpuset.cpus"], f"{path}.cpuset.cpuset.cpus")
            if "cpuset.mems" in cpuset:
                mems = cpuset["cpuset.mems"]
                if _is_int(mems):
                    mems = str(mems)
                if not isinstance(mems, str):
                    raise self.error(f"{path}.cpuset.cpuset.mems", "a memory node list like \"0-1\"", mems)
        memory = self.size(raw["memory"], f"{path}.memory") if "memory" in raw else None
        cpu_time = self.positive_int(raw["cpu-time"], f"{path}.cpu-time") if "cpu-time" in raw else None
        files = self.positive_int(raw["open-files"], f"{path}.open-files") if "open-files" in raw else None
        return ResourceLimits(cpus=cpus, memory_bytes=memory, cpu_seconds=cpu_time,
                              open_files=files, mems=mems)

    def cpu_list(self, value: Any, path: str) -> frozenset[int]:
        expected = 'a CPU list like "0-3,5"'
        if _is_int(value) and value >= 0:
            return frozenset([value])
        if not isinstance(value, str) or not value.strip():
            raise self.error(path, expected, value)
        cpus: set[int] = set()
        for part in value.split(","):
            lo, sep, hi = part.strip().partition("-")
            if not lo.isdigit() or (sep and not hi.isdigit()):
                raise self.error(path, expected, value)
            first, last = int(lo), int(hi) if sep else int(lo)
            if last < first or last > 4095:
                raise self.error(path, expected, value)
            cpus.update(range(first, last + 1))
        return frozenset(cpus)

    def size(self, value: Any, path: str) -> int:
        expected = 'a positive number of bytes, or a size like "512M" or "2G"'
        if _is_int(value):
            if value <= 0:
                raise self.error(path, expected, value)
            return value
        match = _SIZE_RE.match(value) if isinstance(value, str) else None
        if not match or int(match.group(1)) <= 0:
            raise self.error(path, expected, value)
        return int(match.group(1)) * _SIZE_UNITS[match.group(2).upper()]

    # -- drivers --------------------------------------------------------------------
    def drivers(self, raw: Any, section: str) -> tuple[DriverSpec, ...]:
        from engine.drivers import registry  # drivers import manifest types; import late

        raw = self.obj(raw, section)
        specs = []
        for driver_name, body in raw.items():
            path = f"{section}.{driver_name}"
            if not _NAME_RE.match(str(driver_name)):
                raise self.error(path, "a driver name of letters, digits, '.', '_' or '-'")
            body = self.obj(body, path)
            type_name = body.get("type")
            if not isinstance(type_name, str) or not type_name:
                raise self.error(f"{path}.type", "a driver type name, e.g. \"recurring-timer\"", type_name)
            emit = body.get("emit", driver_name)   # tasks: the key is the event name
            if not isinstance(emit, str) or not emit:
                raise self.error(f"{path}.emit", "the event name (a non-empty string)", emit)
            options_raw = {k: v for k, v in body.items() if k not in ("type", "emit")}
            ctx = registry.OptionContext(self.file, path, self.base_dir)
            options = registry.parse_options(type_name, options_raw, ctx)
            specs.append(DriverSpec(name=driver_name, type=registry.canonical(type_name),
                                    emit=emit, options=options, path=path))
        return tuple(specs)

    def pubsub(self, raw: Any) -> PubsubConfig:
        raw = self.obj(raw, "pubsub")
        self.reject_unknown(raw, ("endpoint",), "pubsub.")
        endpoint = raw.get("endpoint")
        if endpoint is not None and (not isinstance(endpoint, str) or "://" not in endpoint):
            raise self.error("pubsub.endpoint", "an nng address like \"tcp://127.0.0.1:9200\"", endpoint)
        return PubsubConfig(endpoint=endpoint)


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value \
        and value not in (float("inf"), float("-inf"))


def _normpath(path: Path) -> str:
    import os.path
    return os.path.normpath(str(path))


__all__ = ["AppManifest", "DriverSpec", "EngineConfig", "ManifestError", "PubsubConfig",
           "ResourceLimits", "load_manifest", "parse_manifest"]
