"""Prints the configuration reference (every setting of every service with its
YAML key, environment variable and flag) as Markdown. The README embeds its
output between markers, and tests/test_docs.py checks that they agree.

    python tools/settings_reference.py            # print
    python tools/settings_reference.py --write    # update README.md in place
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from clipsearch.server.settings import ENV_PREFIX, ServerSettings

BEGIN = "<!-- settings-reference:begin -->"
END = "<!-- settings-reference:end -->"
README = Path(__file__).resolve().parent.parent / "README.md"


def services():
    from encoder_service.__main__ import EncoderSettings
    from gateway.settings import GatewaySettings
    from index_service.settings import IndexSettings

    return [("encoder_service", "encoder", EncoderSettings), ("index_service", "index", IndexSettings),
            ("gateway", "gateway", GatewaySettings)]


def default_text(field: dataclasses.Field) -> str:
    value = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    if isinstance(value, list):
        return ",".join(value) or "(empty)"
    return "(empty)" if value == "" else str(value)


def table(title: str, fields) -> list[str]:
    lines = [title, "", "| YAML key | environment | flag | default | meaning |", "|---|---|---|---|---|"]
    for field in fields:
        help_text = field.metadata.get("help", "").replace("|", "\\|")
        lines.append(f"| `{field.name}` | `{ENV_PREFIX}{field.name.upper()}` | `--{field.name.replace('_', '-')}` "
                     f"| `{default_text(field)}` | {help_text} |")
    return lines + [""]


def reference() -> str:
    common = dataclasses.fields(ServerSettings)
    lines = [BEGIN, "", *table("#### Every service", common)]
    for module, section, cls in services():
        own = [f for f in dataclasses.fields(cls) if f.name not in {c.name for c in common}]
        lines += table(f"#### `python -m {module}` (YAML section `{section}:`)", own)
    lines.append(END)
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    text = reference()
    if "--write" in argv:
        readme = README.read_text()
        start, end = readme.index(BEGIN), readme.index(END) + len(END)
        README.write_text(readme[:start] + text + readme[end:])
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
