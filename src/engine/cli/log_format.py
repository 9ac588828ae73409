"""``engine run --log-format json``: one JSON object per line on stderr, for log
shippers (journald, Loki, Elasticsearch): ``{"time", "level", "logger", "message"}``
plus ``"exception"`` when there is one; an app's forwarded output comes on the logger
``engine.app.APP`` (engine/pool/output_log.py)."""
from __future__ import annotations

import json
import logging
from datetime import datetime, timezone


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
                 "level": record.levelname, "logger": record.name,
                 "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def configure(level: str, form: str) -> None:
    """The node's logging: ``form`` "text" (the default) or "json", on stderr."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if form == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler])
