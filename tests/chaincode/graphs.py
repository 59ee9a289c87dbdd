"""LangGraph graphs as a chain owner writes them. Each node's model comes from the input state
(a fake-model name per test, so the fake counts each node's requests on its own)."""

from __future__ import annotations

import operator
from typing import Annotated, TypedDict

from langchain_core.tools import tool
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition
from langgraph.types import Send, interrupt

from agentsvc.chainkit import chat_model


class Brief(TypedDict, total=False):
    topic: str
    researcher_model: str
    writer_model: str
    notes: str
    brief: str


async def researcher(state: Brief) -> Brief:
    llm = chat_model(state["researcher_model"])
    answer = await llm.ainvoke(
        [("system", "You list facts."), ("user", f"Facts: {state['topic']}")]
    )
    return {"notes": answer.content}


async def writer(state: Brief) -> Brief:
    llm = chat_model(state["writer_model"])
    answer = await llm.ainvoke(f"Write on {state['topic']}: {state['notes']}")
    return {"brief": answer.content}


brief = (
    StateGraph(Brief)
    .add_node("researcher", researcher)
    .add_node("writer", writer)
    .add_edge(START, "researcher")
    .add_edge("researcher", "writer")
    .add_edge("writer", END)
    .compile()
)


@tool
def almanac(topic: str) -> str:
    """Look a topic up in the almanac."""
    return f"{topic} rise twice a day"


@tool
def torn_page(topic: str) -> str:
    """A page of the almanac that is missing."""
    raise LookupError(f"no page on {topic}")


class Chat(MessagesState):
    model: str
    writer_model: str
    brief: str


async def assistant(state: Chat) -> dict:
    llm = chat_model(state["model"]).bind_tools([almanac, torn_page])
    return {"messages": [await llm.ainvoke(state["messages"])]}


def summary(state: Chat) -> dict:
    """A sync node: LangGraph runs it on a thread, and its model's callbacks come from there."""
    answer = chat_model(state["writer_model"]).invoke(state["messages"][-1].content)
    return {"brief": answer.content}


# The model calls tools (a prebuilt ToolNode, which gives the model the error of a tool that
# raises) until it answers, then another node writes.
tooled = (
    StateGraph(Chat)
    .add_node("assistant", assistant)
    .add_node("tools", ToolNode([almanac, torn_page], handle_tool_errors=True))
    .add_node("summary", summary)
    .add_edge(START, "assistant")
    .add_conditional_edges("assistant", tools_condition, {"tools": "tools", END: "summary"})
    .add_edge("tools", "assistant")
    .add_edge("summary", END)
    .compile()
)


class Counter(TypedDict, total=False):
    n: int


def again(state: Counter) -> Counter:
    return {"n": state.get("n", 0) + 1}


# Never reaches its end: past its recursion limit (5 super-steps here) the run fails.
loops = (
    StateGraph(Counter)
    .add_node("again", again)
    .add_edge(START, "again")
    .add_edge("again", "again")
    .compile()
    .with_config(recursion_limit=5)
)


async def explode(state: Brief) -> Brief:
    raise ValueError("the graph's own bug")


broken = (
    StateGraph(Brief)
    .add_node("researcher", researcher)
    .add_node("explode", explode)
    .add_edge(START, "researcher")
    .add_edge("researcher", "explode")
    .compile()
)


def ask(state: Brief) -> Brief:
    return {"notes": interrupt("May I go on?")}


asks = StateGraph(Brief).add_node("ask", ask).add_edge(START, "ask").compile()


class Fan(TypedDict, total=False):
    topic: str
    model: str
    parts: Annotated[list[str], operator.add]
    brief: str


async def part(state: dict) -> dict:
    answer = await chat_model(state["model"]).ainvoke(f"Part {state['topic']}")
    return {"parts": [answer.content]}


def fan_out(state: Fan) -> list[Send]:
    return [
        Send("part", {"topic": f"{state['topic']} {i}", "model": state["model"]}) for i in range(3)
    ]


async def edit(state: Fan) -> Fan:
    return {"brief": " / ".join(state["parts"])}


class Edited(TypedDict):
    brief: str


inner = (
    StateGraph(Fan, output_schema=Edited).add_node("edit", edit).add_edge(START, "edit").compile()
)

# Three tasks sent to one node in one super-step, then a subgraph as a node.
fans = (
    StateGraph(Fan)
    .add_node("part", part)
    .add_node("inner", inner)
    .add_conditional_edges(START, fan_out, ["part"])
    .add_edge("part", "inner")
    .compile()
)
