"""An OpenAI Agents SDK chain: a triage agent hands the question off to the agent that can
answer it, a units agent with a function tool or a writer.

Written as for the SDK alone; agentsvc runs it streamed and sends each model call to the
chain's provider (`provider:` in chains/code.yaml), so the agents name the model and no client.
The run's input `{"question": "..."}` is the triage agent's input text.
"""

from __future__ import annotations

from agents import Agent, function_tool

MODEL = "smollm2-135m-instruct"

# Factors to metres, kilograms and litres.
_FACTORS = {
    "mm": 0.001,
    "cm": 0.01,
    "m": 1.0,
    "km": 1000.0,
    "in": 0.0254,
    "ft": 0.3048,
    "mi": 1609.344,
    "g": 0.001,
    "kg": 1.0,
    "lb": 0.45359237,
    "oz": 0.028349523125,
    "ml": 0.001,
    "l": 1.0,
    "gal": 3.785411784,
}
_KIND = {
    **dict.fromkeys(("mm", "cm", "m", "km", "in", "ft", "mi"), "length"),
    **dict.fromkeys(("g", "kg", "lb", "oz"), "mass"),
    **dict.fromkeys(("ml", "l", "gal"), "volume"),
}


@function_tool
def convert(value: float, from_unit: str, to_unit: str) -> str:
    """Convert a length, mass or volume from one unit to another.

    Args:
        value: the amount to convert
        from_unit: its unit: mm, cm, m, km, in, ft, mi, g, kg, lb, oz, ml, l or gal
        to_unit: the unit to convert to (of the same kind)
    """
    source, target = from_unit.strip().lower(), to_unit.strip().lower()
    if source not in _FACTORS or target not in _FACTORS:
        return f"unknown unit: use one of {', '.join(_FACTORS)}"
    if _KIND[source] != _KIND[target]:
        return f"cannot convert {_KIND[source]} ({source}) to {_KIND[target]} ({target})"
    result = value * _FACTORS[source] / _FACTORS[target]
    return f"{value:g} {source} = {result:.4g} {target}"


units = Agent(
    name="Units",
    model=MODEL,
    handoff_description="Converts lengths, masses and volumes between units.",
    instructions="Answer with the convert tool's result in one sentence.",
    tools=[convert],
)
writer = Agent(
    name="Writer",
    model=MODEL,
    handoff_description="Answers any other question in a few sentences.",
    instructions="Answer the question in two or three clear sentences.",
)
triage = Agent(
    name="Triage",
    model=MODEL,
    instructions=(
        "Hand a question about converting units to the Units agent, and any other question to "
        "the Writer agent. Do not answer yourself."
    ),
    handoffs=[units, writer],
)
