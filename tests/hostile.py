"""Hostile values for the no-injection tests (tests/e2e/test_no_injection.py,
tests/integration/test_ssh_quoting.py)."""
from __future__ import annotations

import pathlib
from typing import List


def payloads(canary: pathlib.Path) -> List[str]:
    """Shell code in every form that would run (creating `canary`) if a value were pasted into a
    command line unquoted or badly quoted."""
    touch = f"touch {canary}"
    return [f"$({touch})", f"`{touch}`", f"x; {touch}", f"x\n{touch}", f"x && {touch}", f"x | {touch}",
            f"'; {touch}; '", f'"; {touch}; "', f"() {{ :; }}; {touch}", f"$({touch})'\"`{touch}`",
            f"-e {touch}", f"x\\\n{touch}"]
