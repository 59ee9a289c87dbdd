"""Code chains: async functions (ctx, input) -> output."""

from __future__ import annotations

from tests.chaincode.tools import lookup


async def brief(ctx, input):
    """Two agents and a step: research with a tool, then write."""
    model = input.get("model", ctx.input.get("model"))
    facts = await ctx.agent("researcher", f"Research {input['topic']}", model=model, tools=[lookup])
    ctx.progress("researched", chars=len(facts))
    words = await ctx.step("count", lambda text: len(text.split()), facts)
    draft = await ctx.agent(
        "writer", f"Write about {facts}", model=input.get("writer_model", model)
    )
    return {"draft": draft, "words": words}


async def broken(ctx, input):
    """A chain that raises."""
    raise ValueError("the chain's own bug")


def not_async(ctx, input):
    return "sync"


ANSWER = 42


async def not_storable(ctx, input):
    """An output the database's JSON cannot hold."""
    return {"ratio": float("nan")}


async def step_not_storable(ctx, input):
    return await ctx.step("infinite", lambda: float("inf"))


async def nul_output(ctx, input):
    """NUL in the output: a database text cannot hold it."""
    return "x\x00y"


async def nul_progress(ctx, input):
    ctx.progress("a\x00b")
    return "never"
