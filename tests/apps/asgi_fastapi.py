"""A FastAPI app: a JSON endpoint, path params, a POST body validated by a model."""

import asyncio

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

app = FastAPI()


class Order(BaseModel):
    item: str
    quantity: int


@app.get("/api/status")
async def status() -> dict:
    return {"ok": True}


@app.get("/api/users/{user_id}")
async def user(user_id: int, verbose: bool = False) -> dict:
    if user_id == 404:
        raise HTTPException(status_code=404, detail="no such user")
    return {"user_id": user_id, "verbose": verbose}


@app.post("/api/orders", status_code=201)
async def order(body: Order) -> dict:
    await asyncio.sleep(0.01)
    return {"item": body.item, "total": body.quantity * 2}


@app.get("/healthz")
def health() -> dict:
    # A sync view: FastAPI runs it in its thread pool.
    return {"healthy": True}
