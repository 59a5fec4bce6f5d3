"""alive_switch.fleet.to_toml: a mapping as a TOML document (the host role's config file).

Tables become ``[a.b]`` sections after their parent's plain keys; lists hold scalars.
Strings are written as JSON strings, which TOML's basic strings read the same.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from ansible.errors import AnsibleFilterError

BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def to_toml(data: Any) -> str:
    if not isinstance(data, Mapping):
        raise AnsibleFilterError(f"to_toml needs a mapping, got {type(data).__name__}")
    return "".join(_table(data, []))


def _table(table: Mapping[str, Any], path: list[str]) -> list[str]:
    scalars = [(k, v) for k, v in table.items() if not isinstance(v, Mapping)]
    tables = [(k, v) for k, v in table.items() if isinstance(v, Mapping)]
    lines = [f"[{'.'.join(_key(p) for p in path)}]\n"] if path and scalars else []
    lines += [f"{_key(k)} = {_value(v, [*path, k])}\n" for k, v in scalars if v is not None]
    for key, value in tables:
        lines += ["\n", *_table(value, [*path, key])] if lines else _table(value, [*path, key])
    return lines


def _key(key: Any) -> str:
    text = str(key)
    return text if BARE_KEY.match(text) else json.dumps(text)


def _value(value: Any, path: list[str]) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(item, path) for item in value) + "]"
    raise AnsibleFilterError(f"to_toml: {'.'.join(map(str, path))} is a "
                             f"{type(value).__name__}, which TOML has no form for here")


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"to_toml": to_toml}
