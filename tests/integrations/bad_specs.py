"""Bad strategy specs every framework adapter must refuse at construction.

Each case is ``(spec, error type, message pattern)``; the message names the adapter
that was given the spec (``owner``), so a user sees where the mistake was made.
"""

from __future__ import annotations

import re


def bad_specs(owner: str) -> list[tuple[str, type[Exception], str]]:
    """The cases for an adapter whose error messages say ``given to {owner}``."""
    given = f"given to {re.escape(owner)}"
    return [
        ("norm:x", TypeError, rf"bad spec 'norm:x' {given}: max_norm must be a real number"),
        ("norm:1.0,foo=2", ValueError, rf"{given}: strategy 'norm' has no option 'foo'"),
        ("zclip:z=-1", ValueError, rf"{given}: z_thresh must be .*> 0; got -1"),
        ("autoclip:p=200", ValueError, rf"{given}: percentile must be in \(0, 100\]"),
    ]
