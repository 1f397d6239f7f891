# TripPlanner
Plans what to pack for a trip to several cities.

```python
FORECASTS = {
    "Lisbon": {"temp_c": 24, "rain": False},
    "Oslo": {"temp_c": 6, "rain": True},
}


@playbook
async def GetForecast(city: str) -> dict:
    """Tomorrow's forecast for a city: temperature in Celsius and whether it rains."""
    return {"city": city, **FORECASTS[city]}


@playbook
async def FormatList(city: str, items: list) -> str:
    """One line for the user: the city and what to pack there."""
    return f"{city}: " + ", ".join(items)
```

## Main
### Triggers
- At the beginning

### Steps
- Make a packing list for Lisbon and one for Oslo with PackingList
- Tell the user each list, formatted with FormatList
- Return the lists by city

## PackingList($city)
Decides what to pack for one city.

### Steps
- Get the forecast for the city
- Choose the clothes
  - t-shirts and sunglasses above 18 degrees, a sweater and a coat below
  - add an umbrella if it rains
- Return the list of items
