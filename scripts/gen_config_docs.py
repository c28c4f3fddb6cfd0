"""Write docs/configuration.md from the Config dataclass (`--check`: fail if it is stale)."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from twostage.server.config import ENV_PREFIX, Config

OUT = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def render() -> str:
    lines = [
        "# Configuration reference",
        "",
        "Generated from `server/config.py` by `python scripts/gen_config_docs.py`; a test fails when it is stale.",
        "",
        "Every knob can come from a config file (`--config FILE`, TOML or JSON; flat keys, or `[section]` tables whose",
        "keys are prefixed with the section name, e.g. `[rerank] max_delay_ms = 5`), an environment variable, or a flag.",
        "Precedence: flag > environment > file > default. Lists are comma-separated in env and flags.",
        "",
        "| key | flag | environment | default | meaning |",
        "|---|---|---|---|---|",
    ]
    for f in dataclasses.fields(Config):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        choices = f.metadata.get("choices")
        meaning = f.metadata["help"] + (f" (one of {', '.join(choices)})" if choices else "")
        flags = ", ".join(f"`{x}`" for x in (f"--{f.name.replace('_', '-')}", *f.metadata["aliases"])) \
            if f.metadata["flag"] else "(none)"
        lines.append(f"| `{f.name}` | {flags} | `{ENV_PREFIX}{f.name.upper()}` | `{default!r}` | {meaning.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    text = render()
    if "--check" in sys.argv:
        if not OUT.exists() or OUT.read_text() != text:
            print("docs/configuration.md is stale: run `python scripts/gen_config_docs.py`")
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
