# Buyer
Buys 3 widgets from the Seller, but only at 5 or less per widget.

## Main
### Triggers
- At the beginning

### Steps
- Look at the Seller's catalog with Seller.Catalog
- Ask the Seller for a quote for 3 widgets
- Wait for the Seller's offer
- Accept the offer if it is at most 5 per widget, else decline it
- Wait for the Seller's answer and tell the user the outcome
- Return the total paid (0 if declined)

# Seller
Sells widgets.

```python
PRICES = {"widget": 6.0}


@playbook(public=True)
async def Catalog() -> dict:
    """What the Seller sells, with list prices and the discount rule."""
    return {"prices": PRICES, "discount": "20% off for 3 or more of an item"}


@playbook
async def PriceFor(item: str, quantity: int) -> float:
    """The total price of an order, discount included."""
    total = PRICES[item] * quantity * (0.8 if quantity >= 3 else 1.0)
    return round(total, 2)
```

## Main
### Triggers
- At the beginning

### Steps
- Wait for a request from a buyer
- Price the request with PriceFor and send the offer to the buyer
- Wait for the buyer's answer
- Confirm the sale to the buyer, or thank them if they declined
- Return "sold" or "no sale"
