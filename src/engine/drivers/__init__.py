"""Event drivers: where an app's events come from (timers, servers, monitors...).

:class:`Driver` (engine/drivers/base.py) is the seam between an app and its drivers;
the registry maps manifest type names to Driver classes.
"""
from engine.drivers.base import Driver, DriverHost
from engine.drivers.options import DriverSpec, OptionContext
from engine.drivers.registry import get, known_types, parse_options, register

__all__ = ["Driver", "DriverHost", "DriverSpec", "OptionContext", "get", "known_types", "parse_options",
           "register"]
