"""Run a real twostage server on a free loopback port in a background thread (for tests)."""
from __future__ import annotations

import asyncio
import threading
from dataclasses import replace
from pathlib import Path

import grpc

from twostage.server.app import RunningServer, start_server
from twostage.server.config import Config
from twostage.v1 import twostage_pb2_grpc as pb_grpc


def make_config(models: Path, index: Path, **overrides) -> Config:
    cfg = Config(models=str(models), index=str(index), host="127.0.0.1", port=0, metrics_port=0,
                 log_format="text", log_level="warning", intra_op_threads=2, index_save_interval_s=3600.0)
    cfg = replace(cfg, **overrides)
    cfg.validate()
    return cfg


class Channels:
    """Insecure loopback channels and stubs to `self.target`, closed together by `close_channels()`."""

    _channels: list[grpc.Channel]
    target: str

    def channel(self) -> grpc.Channel:
        ch = grpc.insecure_channel(self.target)
        self._channels.append(ch)
        return ch

    def stub(self) -> pb_grpc.TwoStageStub:
        return pb_grpc.TwoStageStub(self.channel())

    def close_channels(self) -> None:
        for ch in self._channels:
            ch.close()
        self._channels.clear()


class ServerThread(Channels):
    """Starts the server on its own event loop; `.target`, `.running`, `.stub()`; stop() drains it."""

    def __init__(self, config: Config, wait: bool = True):
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="twostage-test-server")
        self.thread.start()
        self.running: RunningServer = self.call(start_server(config))
        self._channels: list[grpc.Channel] = []
        if wait:
            self.wait_loaded()

    def call(self, coro, timeout: float = 300.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def wait_loaded(self) -> None:
        self.call(self.running.wait_loaded())

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.running.port}"

    def stop(self, grace: float = 1.0) -> None:
        self.close_channels()
        try:
            self.call(self.running.stop(grace), timeout=60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
            self.loop.close()

    def __enter__(self) -> "ServerThread":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
