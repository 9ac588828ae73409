"""Reacts to the orders app's events: one job per event the mesh delivers."""
from engine import on


@on("mail")
def mail(event):
    # {"type": "order.placed", "data": {...the order...}, "publisher": "orders"}
    order = event["data"]
    print(f"mail: order {order['id']} of {order['qty']} x {order['item']} ({event['type']})", flush=True)
    return order["id"]
