"""The values of the pytest plugin's `--sagaline-store` option (no imports: the plugin
and `sagaline.testkit.explore_failures` both read them)."""

from __future__ import annotations

STORE_KINDS = ("memory", "sqlite", "postgresql://...", "redis://...", "redis+cluster://...")


def describe_choice(value: str) -> str:
    """The store kind a `--sagaline-store` value asks for; ValueError if none."""
    v = value.strip()
    if v in ("memory", "memory://"):
        return "memory"
    if v == "sqlite" or v.startswith("sqlite:"):
        return "sqlite"
    if v.startswith(("postgresql:", "postgresql+", "postgres:")):
        return "postgresql"
    if v.startswith(("redis:", "rediss:", "redis+cluster:", "rediss+cluster:")):
        return "redis"
    raise ValueError(f"--sagaline-store={value!r}: use one of {', '.join(STORE_KINDS)}")
