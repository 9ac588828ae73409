"""Event drivers: where an app's events come from (timers, servers, monitors...)."""
from engine.drivers.registry import OptionContext, get, known_types, parse_options, register

__all__ = ["OptionContext", "get", "known_types", "parse_options", "register"]
