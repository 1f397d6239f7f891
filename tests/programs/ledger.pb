# Ledger
Charges amounts one by one; each charge is a durable call that writes a line to a ledger file.

```python
import asyncio
import os

from playbooks.execution.tool_calls import current_tool_call


@playbook(triggers=["At the beginning"])
async def Main(count: int = 8, pause: float = 0.05) -> int:
    """Charges 0..count-1 and says the total."""
    total = 0
    for n in range(count):
        total += await Charge(n, pause)
    await Say("user", f"charged {total} in {count} charges")
    return total


@playbook
async def Charge(n: int, pause: float) -> int:
    """Writes the charge to the ledger (with the call's idempotency key), then takes a while."""
    call = current_tool_call()
    key = call.idempotency_key if call is not None else "-"
    with open(os.environ["PLAYBOOKS_TEST_LEDGER"], "a") as ledger:
        ledger.write(f"start\t{key}\t{n}\n")
    await asyncio.sleep(pause)
    with open(os.environ["PLAYBOOKS_TEST_LEDGER"], "a") as ledger:
        ledger.write(f"done\t{key}\t{n}\n")
    return n * 10
```
