"""The app the replay-server test serves: the tool of the recorded OpenAI tool round (``get_weather``)."""

from sideband import Sideband

app = Sideband(instructions="You tell the weather.", voice="marin", greeting=None)


@app.tool
async def get_weather(city: str) -> dict[str, object]:
    """Current weather in a city.

    Args:
        city: City name, e.g. "London".
    """
    return {"city": city, "temperature_c": 21}
