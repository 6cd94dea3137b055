"""Strategy spec strings for configs and the command line: ``"zclip:z=2.5"`` → a clipper.

Grammar: ``NAME`` or ``NAME:ARGS`` where ``ARGS`` is a comma-separated list of
``key=value`` options, optionally led by one bare value for the strategy's main
option (``norm:1.0`` is ``NormClip(max_norm=1.0)``). Values are read as int, float,
``true``/``false``, ``inf``, or else kept as strings; the strategy validates them.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

from gradclip._params import ParamsLike
from gradclip.clippers.base import Clipper, registry


def from_spec(
    spec: str, params: ParamsLike | Iterable[dict[str, Any]], **overrides: Any
) -> Clipper:
    """Build a clipper from a spec string, bound to ``params``.

    Args:
        spec: e.g. ``"none"``, ``"norm:1.0"``, ``"value:0.5"``, ``"agc:0.01"``,
            ``"autoclip:p=10"``, ``"zclip:z=2.5"``, ``"adagc"``.
        params: what the clipper binds to.
        **overrides: keyword options that win over the spec's (e.g. ``nonfinite``).

    Returns:
        The clipper.

    Raises:
        ValueError: an unknown strategy or option, or a malformed spec; the message
            lists the valid choices.

    Example:
        >>> import torch
        >>> from_spec("norm:0.5", [torch.nn.Parameter(torch.zeros(1))])
        NormClip(max_norm=0.5; params per group: [1])
    """
    name, options = parse_spec(spec)
    strategies = registry()
    if name not in strategies:
        raise ValueError(
            f"unknown clipping strategy {name!r} in spec {spec!r}; valid: "
            f"{', '.join(sorted(strategies))}"
        )
    cls = strategies[name]
    valid = _options_of(cls)
    resolved: dict[str, Any] = {}
    for key, value in options.items():
        if key == "":
            if cls.spec_positional is None:
                raise ValueError(
                    f"strategy {name!r} takes no bare value (spec {spec!r}); use key=value "
                    f"with one of: {', '.join(valid) or 'no options'}"
                )
            key = cls.spec_positional
        key = cls.spec_aliases.get(key, key)
        if key not in valid:
            aliases = ", ".join(f"{a}={t}" for a, t in cls.spec_aliases.items())
            hint = f" (aliases: {aliases})" if aliases else ""
            if key == "schedule":
                scheduled = sorted(n for n, c in strategies.items() if "schedule" in _options_of(c))
                hint += (
                    f". Threshold schedules are options of the norm-threshold strategies "
                    f"only: {', '.join(scheduled)}"
                )
            raise ValueError(
                f"strategy {name!r} has no option {key!r} (spec {spec!r}); valid: "
                f"{', '.join(valid) or 'none'}{hint}"
            )
        if key in resolved:
            raise ValueError(f"in spec {spec!r}, option {key!r} is given twice")
        resolved[key] = value
    resolved.update(overrides)
    return cls(params, **resolved)


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split a spec into its strategy name and options (a bare value has the key ``""``).

    >>> parse_spec("zclip:z=2.5,mode=percentile")
    ('zclip', {'z': 2.5, 'mode': 'percentile'})
    >>> parse_spec("norm:1")
    ('norm', {'': 1})
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(
            f"a clipping spec must be a non-empty string like 'norm:1.0'; got {spec!r}"
        )
    name, _, rest = spec.strip().partition(":")
    name = name.strip().lower()
    options: dict[str, Any] = {}
    if rest.strip():
        for index, part in enumerate(rest.split(",")):
            key, eq, value = part.partition("=")
            if not eq:
                if index != 0:
                    raise ValueError(
                        f"in spec {spec!r}, {part!r} needs the form key=value (only the "
                        "first argument may be a bare value)"
                    )
                key, value = "", part
            key = key.strip()
            if eq and not key:
                raise ValueError(f"in spec {spec!r}, {part!r} has no option name before '='")
            if key in options:
                raise ValueError(f"in spec {spec!r}, option {key or 'value'!r} is given twice")
            options[key] = _value(value.strip(), spec)
    return name, options


def _value(text: str, spec: str) -> Any:
    if not text:
        raise ValueError(f"in spec {spec!r}, an option has an empty value")
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def _options_of(cls: type[Clipper]) -> list[str]:
    parameters = inspect.signature(cls.__init__).parameters
    return [
        n for n, p in parameters.items() if n not in ("self", "params") and p.kind != p.VAR_KEYWORD
    ]
