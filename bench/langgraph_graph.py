"""The graph of bench/langgraph_bench.py: two nodes, `researcher` then `writer`, each one model
call streamed from the model the input names (the writer prompted with the researcher's notes).
Both sides of the benchmark run this very object: agentsvc's executor (its entrypoint) and the
reference's `ainvoke`."""

from __future__ import annotations

from typing import TypedDict

from langgraph.graph import END, START, StateGraph

from agentsvc.chainkit import chat_model


class Brief(TypedDict, total=False):
    topic: str
    model: str
    notes: str
    brief: str


async def researcher(state: Brief) -> Brief:
    # streaming=True: the reference streams too (the fake model only streams).
    answer = await chat_model(state["model"], streaming=True).ainvoke(state["topic"])
    return {"notes": answer.content}


async def writer(state: Brief) -> Brief:
    answer = await chat_model(state["model"], streaming=True).ainvoke(state["notes"])
    return {"brief": answer.content}


graph = (
    StateGraph(Brief)
    .add_node("researcher", researcher)
    .add_node("writer", writer)
    .add_edge(START, "researcher")
    .add_edge("researcher", "writer")
    .add_edge("writer", END)
    .compile()
)
