"""The admin API: placement, statistics, recalibration, profiling and emulation controls, behind a bearer token.

Owns authentication (constant-time comparison of token digests; the token itself is never stored,
logged or echoed) and the admin routes, which forward to the coordinator through a `CoordinatorClient`
(a Serve deployment handle in production, an in-process coordinator in tests). Errors are raised as
`APIError` so the app's single error handler answers in OpenAI's JSON format. Knows nothing of Ray.

Without a configured token every admin route answers 404 (the admin API is disabled); a missing token
gets 401, a wrong one 403. Emulation controls exist only when the workers emulate devices.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Literal, Protocol

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.coordinator import AdminBusy
from service.emulator import MIN_SPEED
from service.openai_api import APIError
from service.worker import FAULTS
from service.worker_pool import WorkerCallError

log = logging.getLogger(__name__)


class CoordinatorUnavailable(RuntimeError):
    """The coordinator could not take the call (its replica died or restarts, or Serve refused it): a 503, not a 500
    (Ray's own errors are no `RayTaskError`, which carries the coordinator's)."""


class CoordinatorClient(Protocol):
    """Awaitable calls into the coordinator, by method name."""

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any: ...


def token_digest(token: str) -> str:
    """SHA-256 hex digest of an admin token (what the ingress keeps instead of the token)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


# Strict: true, "1" and 1.0 are not device 1, nor "0.5" a speed (a typo should fail, not act on a device).
class RecalibrateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    policy: Literal["vibe", "eplb", "contiguous"] | None = None
    mode: Literal["auto", "incremental", "full"] = "incremental"
    dry_run: bool = False
    force: bool = False


class SpeedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    device: int = Field(ge=0)
    speed: float = Field(ge=MIN_SPEED, le=10)


class FaultRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    device: int = Field(ge=0)
    operation: Literal[FAULTS] = "import"  # (Literal of a tuple: one of its values)


def admin_router(client: CoordinatorClient, *, token_sha256: str | None, num_devices: int,
                 emulation: bool, flush_statistics: Callable[[], Awaitable[None]] | None = None) -> APIRouter:
    """Routes under /admin. `token_sha256`: digest of the configured token, or None (admin disabled).

    `flush_statistics` (the ingress's: hand the coordinator the router statistics not yet reported) runs before
    a recalibration, so that it plans on every pass this replica served before the call, not only on those its
    periodic report has sent (a recalibration right after the first requests found no statistics). If it
    fails, the recalibration goes on with what the coordinator has.
    """

    def authorize(request: Request) -> None:
        if token_sha256 is None:
            raise APIError(404, "the admin API is disabled: start the service with VIBE_ADMIN_TOKEN set",
                           type="not_found_error")
        header = request.headers.get("authorization", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise APIError(401, "missing admin bearer token (Authorization: Bearer <token>)",
                           type="authentication_error")
        if not hmac.compare_digest(token_digest(presented.strip()), token_sha256):
            raise APIError(403, "the admin token is not valid", type="permission_error")

    def check_device(device: int) -> None:
        if device >= num_devices:
            raise APIError(400, f"device {device} does not exist (devices 0..{num_devices - 1})", param="device")

    async def call(method: str, *args: Any, **kwargs: Any) -> Any:
        """The coordinator's answer; a worker that did not answer the coordinator's call is a 503 naming it."""
        try:
            return await client.call(method, *args, **kwargs)
        except WorkerCallError as exc:
            raise APIError(503, f"{exc} (GET /admin/stats shows lost devices; retry once it is back)",
                           type="service_unavailable_error", code="device_unavailable") from exc
        except CoordinatorUnavailable as exc:
            raise APIError(503, f"{exc}; retry shortly", type="service_unavailable_error",
                           code="coordinator_unavailable") from exc
        except AdminBusy as exc:  # (one admin recalibration or profiling at a time: not queued, each holding a slot)
            raise APIError(409, str(exc), type="conflict_error", code="admin_busy") from exc

    router = APIRouter(prefix="/admin", dependencies=[Depends(authorize)])

    @router.get("/placement")
    async def placement() -> dict[str, Any]:
        return await call("placement_view")

    @router.get("/stats")
    async def stats() -> dict[str, Any]:
        return await call("stats_view")

    @router.post("/recalibrate")
    async def recalibrate(request: Request) -> dict[str, Any]:
        body = await _json_body(request, RecalibrateRequest)
        if flush_statistics is not None:
            try:
                await flush_statistics()
            except Exception as exc:  # the coordinator's own answer below says what is wrong
                log.warning("could not hand over router statistics before a recalibration: %s", exc)
        return await call("recalibrate", policy=body.policy, mode=body.mode, dry_run=body.dry_run,
                                 force=body.force, reason="admin", admin=True)

    @router.post("/profile")
    async def profile() -> dict[str, Any]:
        return await call("profile_devices", admin=True)

    @router.get("/ui", response_class=HTMLResponse)
    async def ui() -> HTMLResponse:
        return HTMLResponse(render_placement_page(await call("placement_view")))

    if emulation:
        @router.post("/emulation/speed")
        async def set_speed(request: Request) -> dict[str, Any]:
            body = await _json_body(request, SpeedRequest)
            check_device(body.device)
            await call("set_emulated_speed", body.device, body.speed)
            return {"device": body.device, "speed": body.speed}

        @router.post("/emulation/fault")
        async def inject_fault(request: Request) -> dict[str, Any]:
            body = await _json_body(request, FaultRequest)
            check_device(body.device)
            await call("inject_fault", body.device, body.operation)
            return {"device": body.device, "operation": body.operation, "armed": True}

    known = {route.path for route in router.routes}

    # last: any other method or path under /admin, after the token check (a wrong method answered 405 before it,
    # also with the admin API disabled, which says 404 for every /admin route: a review)
    @router.api_route("/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"],
                      include_in_schema=False)
    async def other(rest: str, request: Request) -> None:
        if f"/admin/{rest}" in known:
            raise APIError(405, f"{request.method} is not allowed on /admin/{rest}", type="invalid_request_error")
        raise APIError(404, f"no admin route /admin/{rest}", type="not_found_error")

    return router


async def _json_body(request: Request, model: type[BaseModel]) -> BaseModel:
    """The body as `model`, read as JSON whatever the Content-Type (plain `curl -d '{...}'` sends a form
    type); an empty body means the defaults. Bad JSON or fields are a 400 naming the problem."""
    raw = await request.body()
    try:
        json.loads(raw or b"{}", object_pairs_hook=_unique)
    except _Repeated as exc:  # (pydantic's JSON parser keeps the last: {"dry_run": true, ..., "dry_run": false} ran)
        raise APIError(400, f"invalid admin request body: {exc.key!r} is given more than once", param=exc.key) from None
    except ValueError:  # not JSON: said below, as pydantic words it
        pass
    try:
        return model.model_validate_json(raw or b"{}")
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(str(p) for p in problem["loc"]) or None
        raise APIError(400, f"invalid admin request body: {problem['msg']}", param=where) from None


class _Repeated(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's pairs as a dict, refusing a key given twice."""
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _Repeated(key)
        seen[key] = value
    return seen


def render_placement_page(view: dict[str, Any]) -> str:
    """A self-contained HTML page: heatmaps (layers x devices) of predicted time and tokens, and the slots."""
    layers = view["layers"]
    times = [layer["device_predicted_s"] for layer in layers]
    tokens = [layer["device_tokens"] for layer in layers]
    rows = "".join(
        f"<tr><td>{layer['layer']}</td><td>{layer['imbalance']:.3f}</td><td>"
        + " ".join(f"{s['expert']}@{s['device']}" + (f"({s['share']:.2f})" if s["share"] < 1 else "")
                   for s in layer["slots"])
        + "</td></tr>" for layer in layers)
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>vibe-serve placement</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:2px 6px;font-size:13px}"
        "table{border-collapse:collapse}</style></head><body>"
        f"<h1>Placement version {int(view['version'])} ({html.escape(str(view['policy']))})</h1>"
        "<h2>Predicted device time per layer (ms)</h2>" + _heatmap(times, scale=1e3)
        + "<h2>Tokens per device per layer (window mean per pass)</h2>" + _heatmap(tokens, scale=1.0)
        + "<h2>Slots (expert@device(share))</h2><table><tr><th>layer</th><th>max/mean</th><th>slots</th></tr>"
        + rows + "</table></body></html>")


def _heatmap(values: list[list[float]], *, scale: float) -> str:
    """An inline SVG heatmap, one row per layer and one column per device, cells labelled."""
    cell_w, cell_h, left, top = 64, 26, 70, 22
    num_layers, num_devices = len(values), len(values[0]) if values else 0
    peak = max((v for row in values for v in row), default=0.0) or 1.0
    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{left + cell_w * num_devices + 10}' "
             f"height='{top + cell_h * num_layers + 10}' font-size='11'>"]
    for d in range(num_devices):
        parts.append(f"<text x='{left + d * cell_w + 8}' y='14'>device {d}</text>")
    for layer, row in enumerate(values):
        y = top + layer * cell_h
        parts.append(f"<text x='4' y='{y + 17}'>layer {layer}</text>")
        for d, value in enumerate(row):
            heat = value / peak
            color = f"rgb(255,{int(255 * (1 - heat))},{int(255 * (1 - heat))})"
            parts.append(f"<rect x='{left + d * cell_w}' y='{y}' width='{cell_w - 2}' height='{cell_h - 2}' "
                         f"fill='{color}'/><text x='{left + d * cell_w + 6}' y='{y + 17}'>{value * scale:.2f}</text>")
    parts.append("</svg>")
    return "".join(parts)
