"""Console page module users: not written yet (registers no route)."""

from __future__ import annotations

from cmcd.api.console.web import Console


def register(c: Console) -> None:
    pass
