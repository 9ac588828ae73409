"""Answers the mesh's "order.place" requests and tells the mesh about each order."""
import itertools
import os

from engine import on
from engine import publish

_numbers = itertools.count(1)


@on("place")
def place(request):
    # The payload is the whole mesh request: {"type": "order.place", "item": ..., "qty": ...}
    if request.get("qty", 0) <= 0:
        raise ValueError("qty must be a positive number")
    order = {"id": f"{os.getpid()}-{next(_numbers)}", "item": request["item"], "qty": request["qty"]}
    published = publish("order.placed", order)     # through the node's mesh-publisher
    return {**order, "listeners": published["subscribers"]}
