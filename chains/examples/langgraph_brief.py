"""An example LangGraph chain (chains/code.yaml): research notes, then a brief.

Two nodes, each an agent of the run: `researcher` takes an outline from a tool and asks the model
for notes along it, `writer` turns the notes into a brief. The run's input is the graph's input
state ({"topic", "audience"}) and its output the final state. The model is the service's `local`
provider (the one `make run` starts), through agentsvc.chainkit.chat_model.
"""

from __future__ import annotations

from typing import TypedDict

from langchain_core.tools import tool
from langgraph.graph import END, START, StateGraph

from agentsvc.chainkit import chat_model

llm = chat_model("smollm2-135m-instruct", provider="local", max_tokens=300, temperature=0.3)


class Brief(TypedDict, total=False):
    topic: str
    audience: str
    outline: str
    notes: str
    brief: str


@tool
def outline(topic: str) -> str:
    """The points a short brief on a topic covers, in order."""
    points = ("what it is", "why it matters", "what to watch next")
    return "\n".join(f"- {point}: {topic}" for point in points)


async def researcher(state: Brief) -> Brief:
    points = await outline.ainvoke({"topic": state["topic"]})  # agent.tool_call / tool_result
    notes = await llm.ainvoke(
        [
            ("system", "You list the key facts about a topic as short bullet points."),
            ("user", f"Key facts about {state['topic']}, along these points:\n{points}"),
        ]
    )
    return {"outline": points, "notes": notes.content}


async def writer(state: Brief) -> Brief:
    audience = state.get("audience", "general")
    brief = await llm.ainvoke(
        [
            ("system", "You turn notes into a clear one-paragraph brief."),
            (
                "user",
                f"Write a brief on {state['topic']} for a {audience} audience from these "
                f"notes:\n{state['notes']}",
            ),
        ]
    )
    return {"brief": brief.content}


graph = (
    StateGraph(Brief)
    .add_node("researcher", researcher)
    .add_node("writer", writer)
    .add_edge(START, "researcher")
    .add_edge("researcher", "writer")
    .add_edge("writer", END)
    .compile()
)
