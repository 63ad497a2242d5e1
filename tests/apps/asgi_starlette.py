"""A Starlette app: routes, path params, a JSON POST, a streaming response, lifespan state."""

import asyncio
import contextlib

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route


@contextlib.asynccontextmanager
async def lifespan(app):
    yield {"greeting": "hello from lifespan"}


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse(request.state.greeting)


async def item(request: Request) -> JSONResponse:
    return JSONResponse(
        {
            "id": request.path_params["item_id"],
            "q": request.query_params.get("q"),
            "url": str(request.url),
            "root_path": request.scope["root_path"],
            "client": request.client.host if request.client else None,
        }
    )


async def echo(request: Request) -> JSONResponse:
    data = await request.json()
    return JSONResponse({"got": data, "length": int(request.headers["content-length"])})


async def stream(request: Request) -> StreamingResponse:
    async def chunks():
        for i in range(4):
            yield f"part {i}\n"
            await asyncio.sleep(0.4)

    return StreamingResponse(chunks(), media_type="text/plain")


app = Starlette(
    routes=[
        Route("/hello", hello),
        Route("/items/{item_id:int}", item),
        Route("/echo", echo, methods=["POST"]),
        Route("/stream", stream),
    ],
    lifespan=lifespan,
)
