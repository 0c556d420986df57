"""A test helper: serve an aiohttp app from a background thread with its own event loop."""

from __future__ import annotations

import asyncio
import threading

from aiohttp import web

from knn_service.http_app import start_site


class ServerThread:
    """Serve an app from a background thread with its own event loop (tests, notebooks).

    ``start()`` returns once the socket listens; ``stop()`` shuts the app down.
    """

    def __init__(self, app: web.Application, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = app
        self.host = host
        self.port = port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="knn-http", daemon=True)
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ServerThread:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(
            start_site(self.app, self.host, self.port), self._loop
        )
        self._runner, self.port = future.result(timeout=30)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=30)
            self._runner = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
