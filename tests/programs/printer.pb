# Printer
Prints and says lines from python playbooks.

```python
@playbook(triggers=["At the beginning"])
async def Main() -> int:
    """Prints and says lines, and has a helper print some more."""
    print("first print, before any await")
    total = 0
    for n in range(3):
        print(f"print {n}")
        await Say("user", f"say {n}")
        total += await Part(n)
    print("last print, then return")
    return total


@playbook
async def Part(n: int) -> int:
    """Prints a line and says one."""
    print(f"  part {n} print")
    await Say("user", f"  part {n} say")
    print(f"  part {n} second print")
    return n * 10
```
