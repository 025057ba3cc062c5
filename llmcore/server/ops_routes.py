"""Operations routes: ``/health`` (liveness and per-model load), ``/metrics`` (Prometheus), the chat page."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from llmcore.engine.async_engine import EngineDeadError
from llmcore.server.chat_page import CHAT_PAGE
from llmcore.server.protocol import HealthResponse
from llmcore.server.registry import ServedModel
from llmcore.server.state import server_state

HEALTH_STATS_WAIT_S = 2.0

router = APIRouter()


async def model_health(m: ServedModel) -> dict[str, Any]:
    """One model's health: exact figures taken between two steps, or the snapshot if the engine is slow."""
    alive = m.engine.is_running
    s = m.engine.stats()
    if alive:
        try:
            s = await asyncio.wait_for(m.engine.exact_stats(), HEALTH_STATS_WAIT_S)
        except (asyncio.TimeoutError, EngineDeadError):
            pass
    return {
        "device": m.device_name(),
        "max_model_len": m.max_model_len,
        "num_running": s.get("num_running", 0),
        "num_waiting": s.get("num_waiting", 0),
        "in_flight": m.in_flight,
        "kv_blocks_used": s.get("kv_blocks_used", 0),
        "kv_blocks_total": s.get("kv_blocks_total", 0),
        "requests_aborted": s.get("requests_aborted", 0),
        "alive": alive,
    }


@router.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
async def health(request: Request) -> JSONResponse:
    """Liveness and per-model load: running/waiting sequences, in-flight requests, KV blocks used."""
    models = {m.name: await model_health(m) for m in server_state(request).registry}
    ok = all(h["alive"] for h in models.values())
    return JSONResponse({"status": "ok" if ok else "error", "models": models}, status_code=200 if ok else 503)


@router.get("/metrics", include_in_schema=False)
async def prometheus(request: Request) -> Response:
    return Response(generate_latest(server_state(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/", include_in_schema=False)
async def chat_page() -> HTMLResponse:
    return HTMLResponse(CHAT_PAGE)
