"""An OpenAI-compatible chat completions server over llama.cpp, for the embedded default.

llama-cpp-python's own server does not report token usage when streaming, and the API bills
and limits by tokens, so this one does: after the last chunk it sends a usage chunk (as OpenAI
does with `stream_options.include_usage`). One model, one request at a time.

    python -m agentsvc.local_model_server --model FILE.gguf --alias NAME --port 8089
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Iterator

import uvicorn
from llama_cpp import Llama
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": "invalid_request_error"}}, status_code=status
    )


def build_app(llm: Llama, alias: str) -> Starlette:
    lock = threading.Lock()

    def prompt_tokens(messages: list[dict]) -> int:
        # The chat template is applied inside llama.cpp; a one-token completion reports the
        # prompt's length, and its evaluated prompt is reused by the streamed call that follows.
        return llm.create_chat_completion(messages=messages, max_tokens=1, temperature=0)["usage"][
            "prompt_tokens"
        ]

    def stream(messages: list[dict], max_tokens: int, temperature: float) -> Iterator[str]:
        with lock:
            n_prompt = prompt_tokens(messages)
            parts: list[str] = []
            created = int(time.time())
            for chunk in llm.create_chat_completion(
                messages=messages, max_tokens=max_tokens, temperature=temperature, stream=True
            ):
                chunk["model"] = alias
                delta = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
                if delta:
                    parts.append(delta)
                yield f"data: {json.dumps(chunk)}\n\n"
            text = "".join(parts)
            n_completion = (
                len(llm.tokenize(text.encode(), add_bos=False, special=True)) if text else 0
            )
            usage = {
                "prompt_tokens": n_prompt,
                "completion_tokens": n_completion,
                "total_tokens": n_prompt + n_completion,
            }
            yield (
                "data: "
                + json.dumps(
                    {
                        "id": "usage",
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": alias,
                        "choices": [],
                        "usage": usage,
                    }
                )
                + "\n\n"
            )
            yield "data: [DONE]\n\n"

    def complete(messages: list[dict], max_tokens: int, temperature: float) -> dict:
        with lock:
            result = llm.create_chat_completion(
                messages=messages, max_tokens=max_tokens, temperature=temperature
            )
        result["model"] = alias
        return result

    async def models(request: Request) -> JSONResponse:
        return JSONResponse(
            {"object": "list", "data": [{"id": alias, "object": "model", "owned_by": "local"}]}
        )

    async def chat(request: Request):
        try:
            body = await request.json()
            messages = body["messages"]
            max_tokens = int(body.get("max_tokens") or 256)
            temperature = float(body.get("temperature", 0.7))
            if not isinstance(messages, list) or not messages:
                raise ValueError
        except (ValueError, KeyError, TypeError):
            return _error(400, "expected {messages: [...], max_tokens?, temperature?}")
        if body.get("stream"):
            return StreamingResponse(
                stream(messages, max_tokens, temperature), media_type="text/event-stream"
            )
        return JSONResponse(await run_in_threadpool(complete, messages, max_tokens, temperature))

    return Starlette(
        routes=[Route("/v1/models", models), Route("/v1/chat/completions", chat, methods=["POST"])]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--alias", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8089)
    parser.add_argument("--n_ctx", type=int, default=4096)
    parser.add_argument("--n_threads", type=int, default=2)
    args = parser.parse_args()
    llm = Llama(model_path=args.model, n_ctx=args.n_ctx, n_threads=args.n_threads, verbose=False)
    uvicorn.run(build_app(llm, args.alias), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
