"""The web dashboard's static files: `/` redirects to `/ui/`, which serves service/dashboard/.

The files are public and hold no data: the page asks for an API key, keeps it in the browser's
sessionStorage and reads everything through the authenticated `/v1` API, like any other client.
Only the named files are served (no directory walk), with a Content-Security-Policy that allows
scripts, styles and connections to this origin alone.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

from service.errors import APIError

__all__ = ["router", "DASHBOARD_DIR"]

DASHBOARD_DIR = Path(__file__).resolve().parent.parent / "dashboard"

_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "chart.js": "text/javascript; charset=utf-8",
    "sse.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}

_HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; "
        "frame-ancestors 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

router = APIRouter(include_in_schema=False)


@router.get("/")
async def root() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=307)


@router.get("/ui")
async def ui_without_slash() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=307)


@router.get("/ui/")
async def index() -> FileResponse:
    return _file("index.html")


@router.get("/ui/{name}")
async def asset(name: str) -> FileResponse:
    return _file(name)


def _file(name: str) -> FileResponse:
    media_type = _FILES.get(name)
    if media_type is None:
        raise APIError(404, f"No dashboard file '{name}'; the dashboard starts at /ui/.", code="not_found")
    return FileResponse(DASHBOARD_DIR / name, media_type=media_type, headers=_HEADERS)
