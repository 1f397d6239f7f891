# OrderAssistant
Answers a customer's questions about their orders. Friendly and brief.

```python
ORDERS = {
    "A100": {"status": "shipped", "total": 42.5, "items": ["kettle"]},
    "A101": {"status": "processing", "total": 18.0, "items": ["mug", "green tea"]},
    "A102": {"status": "delivered", "total": 99.9, "items": ["desk lamp"]},
}


@playbook
async def ListOrders() -> list:
    """The ids of the customer's orders, oldest first."""
    return sorted(ORDERS)


@playbook
async def LookupOrder(order_id: str) -> dict:
    """One order: its id, status, total and items. Raises KeyError for an unknown id."""
    if order_id not in ORDERS:
        raise KeyError(f"no order {order_id!r}")
    return {"id": order_id, **ORDERS[order_id]}
```

## Main
Gives the customer an overview of their orders.

### Triggers
- At the beginning

### Steps
1. Greet the user
2. Get the ids of the customer's orders
3. For each order, look it up and tell the user its status and total
4. Tell the user the sum of all the totals
5. Return the number of orders

### Notes
- Show money with two decimals
