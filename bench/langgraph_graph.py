"""The graph of bench/langgraph_bench.py: two nodes, `researcher` then `writer`, each one model
call streamed from the fake model named by LANGGRAPH_BENCH_MODEL (the writer prompted with the
researcher's notes). Both sides of the benchmark run this very object: agentsvc's executor (its
entrypoint) and the reference's `ainvoke`."""

from __future__ import annotations

import os
from typing import TypedDict

from langgraph.graph import END, START, StateGraph

from agentsvc.chainkit import chat_model

# streaming=True: the reference streams too (the fake model only streams).
llm = chat_model(os.environ.get("LANGGRAPH_BENCH_MODEL", "fake?tokens=10"), streaming=True)


class Brief(TypedDict, total=False):
    topic: str
    notes: str
    brief: str


async def researcher(state: Brief) -> Brief:
    return {"notes": (await llm.ainvoke(state["topic"])).content}


async def writer(state: Brief) -> Brief:
    return {"brief": (await llm.ainvoke(state["notes"])).content}


graph = (
    StateGraph(Brief)
    .add_node("researcher", researcher)
    .add_node("writer", writer)
    .add_edge(START, "researcher")
    .add_edge("researcher", "writer")
    .add_edge("writer", END)
    .compile()
)
