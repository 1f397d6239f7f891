"""Tools for examples/order_totals.md: a tiny in-memory order book standing in for a real backend."""

import anyio

ORDERS = [
    {"id": 101, "customer": "ada", "amount": 120.0, "status": "open"},
    {"id": 102, "customer": "grace", "amount": 80.0, "status": "open"},
    {"id": 103, "customer": "ada", "amount": 45.5, "status": "closed"},
    {"id": 104, "customer": "linus", "amount": 300.0, "status": "open"},
]
DISCOUNTS = {"ada": 0.1, "grace": 0.0, "linus": 0.25}


async def list_orders(status: str) -> list[dict]:
    await anyio.sleep(0.05)  # a network round trip
    return [o for o in ORDERS if o["status"] == status]


async def get_discount(customer: str) -> float:
    await anyio.sleep(0.05)
    return DISCOUNTS.get(customer, 0.0)


async def notify(message: str) -> None:
    await anyio.sleep(0.05)
    print(f"[notify] {message}")


TOOLS = {"ListOrders": list_orders, "GetDiscount": get_discount, "Notify": notify}
