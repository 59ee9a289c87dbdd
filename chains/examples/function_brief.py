"""A code chain: an async function (ctx, input) -> output.

`ctx.agent` runs an agent as a file chain's (streamed, with tools, usage and cost counted);
`ctx.step` runs a function once per run; `ctx.progress` reports progress. Each finished agent
and step is recorded, so a run resumed on another executor does none of them again.
"""

from __future__ import annotations

from chains.examples.tools import word_count


async def brief(ctx, input):
    notes = await ctx.agent(
        "researcher",
        f"List three key facts about {input['topic']}, one per line.",
        system_prompt="You list facts as short lines.",
        max_tokens=150,
    )
    words = await ctx.step("count", word_count, notes)
    ctx.progress("notes ready", words=words)
    brief = await ctx.agent(
        "writer",
        f"Write a two-sentence brief on {input['topic']} from these notes:\n{notes}",
        max_tokens=150,
    )
    return {"topic": input["topic"], "brief": brief, "note_words": words}
