"""The master -> generation contract: what a generation is told when it is exec'd.

It travels as JSON in the FCGI_ENGINE_GENERATION environment variable, so the master can build
it without importing the serving side. The server's settings travel whole (every ServerConfig
field, as loaded), so a new setting needs no edit here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from fcgi_engine.config.address import LOOPBACK
from fcgi_engine.config.settings import ServerConfig, resolve_allowed_addrs

ENV_KEY = "FCGI_ENGINE_GENERATION"


@dataclass(frozen=True)
class BootSpec:
    """What a generation is told when it is exec'd (JSON in $ENV_KEY)."""

    server: ServerConfig  # every setting, as loaded
    generation: int
    nproc: int  # the generation's worker count (a resize may differ from server.nproc)
    listen_fd: int
    channel_fd: int
    handoff_send_fd: int = -1
    handoff_recv_fd: int = -1
    # The sending end of the master's status hand-over pair (fcgi_engine.status_pass): a worker
    # passes a request for status_path through it. -1: none (an older master).
    status_pass_fd: int = -1
    # Resolved, never empty: the TCP peers a worker accepts (["any"]: every peer).
    allowed_addrs: list[str] = field(default_factory=lambda: list(LOOPBACK))
    app: str = ""  # server.app_spec, or "" for a `command:` server
    argv: list[str] = field(default_factory=list)  # the app's sys.argv tail (additional_args)
    # program + additional_args for a `command:` server, else []
    command: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> BootSpec:
        data: dict[str, Any] = json.loads(text)
        server = ServerConfig(**data.pop("server"))
        return cls(server=server, **data)


def for_server(
    cfg: ServerConfig,
    generation: int,
    nproc: int,
    *,
    listen_fd: int,
    channel_fd: int,
    handoff_send_fd: int,
    handoff_recv_fd: int,
    status_pass_fd: int = -1,
) -> BootSpec:
    app = cfg.app_spec or ""
    if not app and not cfg.command:
        raise ValueError(f"server {cfg.name} has no app and no command")
    return BootSpec(
        server=cfg,
        generation=generation,
        nproc=nproc,
        listen_fd=listen_fd,
        channel_fd=channel_fd,
        handoff_send_fd=handoff_send_fd,
        handoff_recv_fd=handoff_recv_fd,
        status_pass_fd=status_pass_fd,
        allowed_addrs=resolve_allowed_addrs(cfg).entries,
        app=app,
        argv=list(cfg.additional_args),
        command=[*cfg.command, *cfg.additional_args] if cfg.command else [],
    )
