"""The live studio's web server (aiohttp): the page, one WebSocket per page for frames and control, downloads.

``python -m oneforcing studio`` (or ``oneforcing studio``) loads the model once and serves
``http://HOST:PORT/``. Each WebSocket connection gets its own :class:`~.live.LiveSession` (at most
``max_sessions`` at a time; more are told so and closed), whose generation thread stays off the event loop; closing
the tab stops the thread and frees the connection's KV caches, snapshots and frames.
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import json
import secrets
import threading
from pathlib import Path

import torch
from aiohttp import WSMsgType, web

from .export import branch_mp4, reproduce_command, schedule_json
from .live import LiveSession, StudioSettings
from .protocol import ControlError, parse_control

STATIC = Path(__file__).resolve().parent / "static"
MAX_MESSAGE_BYTES = 64 * 1024


class Studio:
    """The server's state: the shared pipeline, the settings, the open sessions (by token)."""

    def __init__(self, pipe, settings: StudioSettings, max_sessions: int = 2):
        self.pipe, self.settings, self.max_sessions = pipe, settings, max_sessions
        self.sessions: dict[str, LiveSession] = {}
        self.model_lock = threading.Lock()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self.index)
        app.router.add_get("/ws", self.websocket)
        app.router.add_get("/download/{token}/{branch}/{name}", self.download)
        app.router.add_static("/static/", STATIC)
        return app

    async def index(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html")

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=30, max_msg_size=MAX_MESSAGE_BYTES)
        await ws.prepare(request)
        if len(self.sessions) >= self.max_sessions:
            await ws.send_json({"type": "error", "code": "too_many_sessions",
                                "message": f"the studio already serves {self.max_sessions} pages (--max-sessions); "
                                           "close one and reload"})
            await ws.close()
            return ws
        token = secrets.token_urlsafe(12)
        outbox: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        live = LiveSession(self.pipe, self.settings, lambda item: loop.call_soon_threadsafe(outbox.put_nowait, item),
                           self.model_lock)
        self.sessions[token] = live
        sender = asyncio.create_task(_send_all(ws, outbox))
        try:
            await ws.send_json(self._hello(token))
            live.start()
            await self._receive(ws, live, outbox)
        finally:
            await loop.run_in_executor(None, live.close)
            sender.cancel()
            del self.sessions[token]
            _release_memory()
        return ws

    def _hello(self, token: str) -> dict:
        s = self.settings
        return {"type": "hello", "token": token, "fps": s.fps, "height": s.height, "width": s.width,
                "max_prompt_chars": s.max_prompt_chars, "ahead_blocks": s.ahead_blocks,
                "snapshot_blocks": s.snapshot_blocks, "max_sessions": self.max_sessions}

    async def _receive(self, ws: web.WebSocketResponse, live: LiveSession, outbox: asyncio.Queue) -> None:
        async for message in ws:
            if message.type == WSMsgType.TEXT:
                try:
                    live.command(parse_control(message.data, self.settings.max_prompt_chars))
                except ControlError as error:
                    outbox.put_nowait({"type": "error", "code": error.code, "message": str(error)})
            elif message.type == WSMsgType.BINARY:
                outbox.put_nowait({"type": "error", "code": "bad_message",
                                   "message": "control messages are JSON text, not binary"})

    async def download(self, request: web.Request) -> web.Response:
        live = self.sessions.get(request.match_info["token"])
        take = None if live is None else live.take
        try:
            branch = None if take is None else take.branch(int(request.match_info["branch"]))
        except ValueError:
            branch = None
        if branch is None or not branch.records:
            raise web.HTTPNotFound(text="no such video: the page that made it is closed, or nothing is made yet")
        name = request.match_info["name"]
        stem = f"studio-seed{take.seed}-branch{branch.id}"
        if name == "schedule.json":
            return web.Response(body=schedule_json(branch.schedule()), content_type="application/json",
                                headers=_attachment(f"{stem}.schedule.json"))
        if name == "branch.mp4":
            return await self._mp4(branch, take.seed, stem)
        raise web.HTTPNotFound(text=f"unknown download {name!r}")

    async def _mp4(self, branch, seed: int, stem: str) -> web.Response:
        first, frames = branch.kept_frames()
        if frames is None:
            raise web.HTTPGone(text="the frames of this branch are no longer kept (history budget)")
        s = self.settings
        comment = json.dumps({"prompt_schedule": branch.schedule(), "seed": seed, "first_frame": first,
                              "command": reproduce_command(seed, s.height, s.width, s.cli_flags())})
        body = await asyncio.get_running_loop().run_in_executor(None, branch_mp4, frames, s.fps, comment)
        return web.Response(body=body, content_type="video/mp4", headers=_attachment(f"{stem}.mp4"))


def _attachment(name: str) -> dict:
    return {"Content-Disposition": f'attachment; filename="{name}"'}


async def _send_all(ws: web.WebSocketResponse, outbox: asyncio.Queue) -> None:
    """Send what the session emits, in order: JSON events and binary frames."""
    while True:
        item = await outbox.get()
        if ws.closed:
            return
        try:
            if isinstance(item, bytes):
                await ws.send_bytes(item)
            else:
                await ws.send_str(json.dumps(item))
        except (ConnectionError, RuntimeError):
            return


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(studio: Studio, host: str, port: int, on_ready=None) -> None:
    """Serve until interrupted; ``on_ready(url)`` once listening (port 0: a free port is chosen)."""
    async def main() -> None:
        runner = web.AppRunner(studio.app())
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][1]
        url = f"http://{host if ':' not in host else f'[{host}]'}:{bound}/"
        if on_ready is not None:
            on_ready(url)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    asyncio.run(main())
