"""Text from dynos made safe for an operator's terminal.

A dyno's output reaches `gateway logs` and a command reaches `gateway ps` as the dyno
wrote it, escape sequences included: a window title, a screen clear, an OSC 52 write to
the operator's clipboard. Written to a terminal, every control character is shown
escaped instead, as journalctl shows them (`\\x1b]0;title\\x07`); tabs stay. Piped,
the text stays raw, for tools that want it.
"""

from __future__ import annotations

import re

# C0 controls but tab, DEL, and the C1 controls (U+0080-U+009F: a terminal may read
# U+009B as CSI).
_CONTROLS = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def escape_controls(text: str) -> str:
    """`text` with each control character written as `\\xNN`."""
    return _CONTROLS.sub(lambda match: f"\\x{ord(match.group()):02x}", text)
