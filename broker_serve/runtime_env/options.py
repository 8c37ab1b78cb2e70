"""A `runtime_env` as Ray users write it: checked, and merged as Ray merges an application's
with a deployment's (docs/architecture.md, "Runtime environments")."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..exceptions import RuntimeEnvError

DEFAULT_SETUP_TIMEOUT_S = 600.0


class PipOptions(BaseModel):
    """Ray's dict form of `pip`."""

    model_config = ConfigDict(extra="forbid")

    packages: list[str] | str
    pip_check: bool = False
    pip_install_options: list[str] = Field(default_factory=list)


class SetupOptions(BaseModel):
    """Ray's `runtime_env["config"]`. `eager_install` is accepted: environments are always
    prepared before the replica starts."""

    model_config = ConfigDict(extra="forbid")

    setup_timeout_seconds: float = Field(default=DEFAULT_SETUP_TIMEOUT_S, gt=0)
    eager_install: bool = True


class RuntimeEnvOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    working_dir: str | None = None
    py_modules: list[str] = Field(default_factory=list)
    env_vars: dict[str, str] = Field(default_factory=dict)
    pip: list[str] | str | PipOptions | None = None
    excludes: list[str] = Field(default_factory=list)
    config: SetupOptions = Field(default_factory=SetupOptions)

    @field_validator("env_vars")
    @classmethod
    def _names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not name or "=" in name or "\0" in name:
                raise ValueError(f"{name!r} is not an environment variable name")
        return value

    @property
    def is_empty(self) -> bool:
        return not (self.working_dir or self.py_modules or self.env_vars or self.pip)


KNOWN_KEYS = frozenset(RuntimeEnvOptions.model_fields)


def parse(raw: Any, where: str) -> RuntimeEnvOptions:
    """`raw` checked, or RuntimeEnvError saying what is wrong with it, and `where` it was given."""
    if raw is None:
        return RuntimeEnvOptions()
    if not isinstance(raw, dict):
        raise RuntimeEnvError(f"the runtime_env of {where} must be a mapping, not "
                          f"{type(raw).__name__}")
    unknown = sorted(str(key) for key, value in raw.items()
                     if key not in KNOWN_KEYS and value not in (None, {}, [], ""))
    if unknown:
        raise RuntimeEnvError(f"runtime_env {unknown} of {where} is not supported: broker-serve "
                          f"supports {sorted(KNOWN_KEYS)}")
    known = {key: value for key, value in raw.items() if key in KNOWN_KEYS and value is not None}
    try:
        return RuntimeEnvOptions.model_validate(known)
    except ValidationError as exc:
        reasons = "; ".join(f"{'.'.join(str(p) for p in error['loc']) or 'runtime_env'}: "
                            f"{error['msg']}" for error in exc.errors())
        raise RuntimeEnvError(f"the runtime_env of {where} is invalid: {reasons}") from None


def merge(parent: dict[str, Any] | None, child: dict[str, Any] | None) -> dict[str, Any]:
    """A deployment's runtime_env laid over its application's, as Ray does: each key the child
    sets replaces the parent's, but `env_vars` are merged name by name (the child's win)."""
    merged = dict(parent or {})
    for key, value in (child or {}).items():
        if key == "env_vars" and isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged
