"""The master -> generation contract: what a generation is told when it is exec'd.

It travels as JSON in the FCGI_ENGINE_GENERATION environment variable, so the master can build
it without importing the serving side.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from fcgi_engine.config.address import ANY, LOOPBACK, AddressError, AllowList
from fcgi_engine.config.settings import ServerConfig, web_server_addrs_from_env

ENV_KEY = "FCGI_ENGINE_GENERATION"


@dataclass
class GenerationConfig:
    name: str
    generation: int
    app: str
    nproc: int
    listen_fd: int
    channel_fd: int
    handoff_send_fd: int = -1
    handoff_recv_fd: int = -1
    health: str | None = None
    boot_timeout: float = 30.0
    graceful_timeout: float = 30.0
    max_requests: int = 0
    max_requests_jitter: int = 0
    timeout: float = 0.0
    max_body_size: int = 0
    max_params_bytes: int = 1 << 20
    script_name: str | None = None
    # Never empty: the TCP peers a worker accepts (["any"]: every peer), see resolve_allowed_addrs.
    allowed_addrs: list[str] = field(default_factory=lambda: list(LOOPBACK))
    params_timeout: float = 10.0
    body_timeout: float = 60.0
    body_min_rate: int = 65536
    idle_timeout: float = 120.0
    send_timeout: float = 60.0
    heartbeat_timeout: float = 10.0
    worker_connections: int = 1000
    body_buffer_size: int = 1 << 20
    argv: list[str] = field(default_factory=list)
    user: str | None = None
    group: str | None = None
    command: list[str] = field(default_factory=list)
    address: str = ""
    access_log: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> GenerationConfig:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class AllowedAddrs:
    """What a TCP listener of this server accepts, and which setting said so (for the log)."""

    entries: list[str]
    source: str  # "allowed_addrs", "FCGI_WEB_SERVER_ADDRS" or "default"

    @property
    def any(self) -> bool:
        return ANY in self.entries


def resolve_allowed_addrs(cfg: ServerConfig) -> AllowedAddrs:
    """The server's `allowed_addrs`, else $FCGI_WEB_SERVER_ADDRS, else loopback only.

    A TCP listener that nobody restricted accepts this host only: any local user could otherwise
    connect and set REMOTE_USER, REMOTE_ADDR or HTTPS for the app. Raises AddressError for an
    entry of $FCGI_WEB_SERVER_ADDRS that is not an address (the config's own entries were
    checked when it was loaded).
    """
    if cfg.allowed_addrs:
        return AllowedAddrs(list(cfg.allowed_addrs), "allowed_addrs")
    from_env = web_server_addrs_from_env()
    if from_env:
        try:
            AllowList(from_env)
        except AddressError as exc:
            raise AddressError(f"$FCGI_WEB_SERVER_ADDRS: {exc}") from None
        return AllowedAddrs(
            [ANY if e.lower() == ANY else e for e in from_env], "FCGI_WEB_SERVER_ADDRS"
        )
    return AllowedAddrs(list(LOOPBACK), "default")


def for_server(
    cfg: ServerConfig,
    generation: int,
    nproc: int,
    *,
    listen_fd: int,
    channel_fd: int,
    handoff_send_fd: int,
    handoff_recv_fd: int,
) -> GenerationConfig:
    app = cfg.app_spec or ""
    if not app and not cfg.command:
        raise ValueError(f"server {cfg.name} has no app and no command")
    return GenerationConfig(
        name=cfg.name,
        generation=generation,
        app=app,
        nproc=nproc,
        listen_fd=listen_fd,
        channel_fd=channel_fd,
        handoff_send_fd=handoff_send_fd,
        handoff_recv_fd=handoff_recv_fd,
        health=cfg.health,
        boot_timeout=cfg.boot_timeout,
        graceful_timeout=cfg.graceful_timeout,
        max_requests=cfg.max_requests,
        max_requests_jitter=cfg.max_requests_jitter,
        timeout=cfg.timeout,
        max_body_size=cfg.max_body_size,
        max_params_bytes=cfg.max_params_size,
        script_name=cfg.script_name,
        allowed_addrs=resolve_allowed_addrs(cfg).entries,
        params_timeout=cfg.params_timeout,
        body_timeout=cfg.body_timeout,
        body_min_rate=cfg.body_min_rate,
        idle_timeout=cfg.idle_timeout,
        send_timeout=cfg.send_timeout,
        heartbeat_timeout=cfg.heartbeat_timeout,
        worker_connections=cfg.worker_connections,
        body_buffer_size=cfg.body_buffer_size,
        argv=list(cfg.additional_args),
        user=cfg.user,
        group=cfg.group,
        command=[*cfg.command, *cfg.additional_args] if cfg.command else [],
        address=cfg.socket,
        access_log=cfg.access_log,
    )
