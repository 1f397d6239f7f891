# Reporter
Tells the user about each team, member by member.

```python
TEAMS = {"red": ["ana", "bo"], "blue": ["cy", "di", "ed"]}


@playbook
async def Members(team: str) -> list:
    """The members of a team."""
    return list(TEAMS[team])


@playbook
async def Announce(team: str, members: list) -> int:
    """Tells the user about a team, one line per member, and its grade; returns how many lines it said."""
    await Say("user", f"Team {team}:")
    for name in members:
        await Say("user", f"  - {name}")
    grade = await Grade(team, len(members))
    await Say("user", f"  grade: {grade}")
    return len(members) + 2
```

## Main
### Triggers
- At the beginning

### Steps
1. Get the members of every team (red, blue)
2. Announce each team
3. Tell the user how many lines were said in all
4. Return that number

## Grade($team, $size)
Grades a team by its size.

### Steps
1. Return "big" for 3 or more members, else "small"
