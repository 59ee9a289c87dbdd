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


CITY = {"type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}}


async def asks(ctx, input):
    """A question, then an approval, then an agent about the answer."""
    answer = await ctx.ask("Which city?", schema=CITY)
    if not await ctx.approve(f"Write about {answer['city']}?"):
        return {"skipped": answer["city"]}
    text = await ctx.agent("writer", f"Write about {answer['city']}", model=input.get("model"))
    return {"city": answer["city"], "text": text}


async def asks_twice_at_once(ctx, input):
    """Two questions asked in parallel: the run asks them one after the other."""
    import asyncio

    first, second = await asyncio.gather(ctx.ask("First?"), ctx.ask("Second?"))
    return {"first": first, "second": second}


async def asks_and_catches(ctx, input):
    """A chain that catches every Exception around its question still waits."""
    try:
        return await ctx.ask("Anything?")
    except Exception as e:  # what a chain owner may write
        return {"caught": type(e).__name__}
