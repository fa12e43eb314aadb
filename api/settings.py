"""Settings: read once at the entry point, then passed down as frozen objects.

Every setting can come from the environment (``TOKENWARD_...``), from a
``.env`` file, or from a command-line flag (flags win).  A wrong value fails at
start-up with a message that names the setting and what to fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TOKENWARD_", env_file=".env", extra="ignore", frozen=True
    )

    # storage
    data_dir: str = Field("./tokenward-data", description="embedded ClickHouse data folder")
    clickhouse_url: str | None = Field(
        None, description="ClickHouse server DSN, e.g. http://user:pass@host:8123/; "
        "unset = embedded engine in data_dir")

    # Kafka (unset bootstrap = no Kafka: HTTP ingest only)
    kafka_bootstrap: str | None = None
    kafka_topic: str = "tokenward.usage"
    kafka_group: str = "tokenward"
    kafka_dead_letter_topic: str = "tokenward.usage.dlq"
    kafka_block_topic: str = "tokenward.blocks"
    kafka_batch_max: int = Field(5000, ge=1, le=100_000)

    # HTTP
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)

    # configuration files
    prices_file: str | None = None
    detectors_file: str | None = None
    policy_file: str | None = None
    auth_file: str | None = None

    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("prices_file", "detectors_file", "policy_file", "auth_file")
    @classmethod
    def _exists(cls, v: str | None) -> str | None:
        if v and not Path(v).is_file():
            raise ValueError(f"file not found: {v}")
        return v

    @field_validator("clickhouse_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v and not v.startswith(("http://", "https://", "clickhouse://", "clickhouses://")):
            raise ValueError("must start with http:// or https:// (the ClickHouse HTTP port)")
        return v or None

    @field_validator("kafka_bootstrap")
    @classmethod
    def _bootstrap(cls, v: str | None) -> str | None:
        if v:
            for hp in v.split(","):
                host, _, port = hp.strip().rpartition(":")
                if not host or not port.isdigit():
                    raise ValueError(f"expected host:port[,host:port...], got {v!r}")
        return v or None


class SettingsError(SystemExit):
    pass


def load_settings(**overrides: object) -> Settings:
    """Settings from env/.env with command-line overrides; exits with a clear
    message on a bad value."""
    clean = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**clean)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for err in exc.errors(include_url=False):
            name = ".".join(str(p) for p in err["loc"])
            lines.append(
                f"  {name} (flag --{name.replace('_', '-')} or env TOKENWARD_{name.upper()}): "
                f"{err['msg']}"
            )
        raise SettingsError("tokenward: invalid configuration:\n" + "\n".join(lines)) from None
