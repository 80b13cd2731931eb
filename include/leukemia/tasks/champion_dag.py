"""The steps of the `leukemia_champion` DAG: roll `@champion` back, and list its moves."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def rollback(to_version: int | str, reason: str, by: str, source: str) -> dict[str, Any]:
    """Move `@champion` back to `to_version` (verified, recorded, both cards refreshed); the move
    as a small dict (`registry.AliasMove`)."""
    from leukemia import promotion

    return promotion.rollback(str(to_version), reason, by, source)


def history() -> list[str]:
    """Every recorded move of `@champion`, oldest first, one line each."""
    from leukemia import registry

    lines = [move.describe() for move in registry.history()]
    log.info("Moves of @champion, oldest first:\n%s", "\n".join(lines) or "none recorded")
    return lines
