"""Every problem the planner finds, collected and reported together as one ``PlanError``."""

from __future__ import annotations

from dataclasses import dataclass, field

from mergekitlite.errors import PlanError

MAX_LISTED = 12  # problems of one kind listed before summarizing the rest


@dataclass
class Problems:
    """Problems in the order found; long runs of one kind (``group``) are cut to ``MAX_LISTED`` lines."""

    lines: list[str] = field(default_factory=list)
    grouped: dict[str, list[str]] = field(default_factory=dict)

    def add(self, line: str, group: str | None = None) -> None:
        if group is None:
            self.lines.append(line)
        else:
            self.grouped.setdefault(group, []).append(line)

    def __bool__(self) -> bool:
        return bool(self.lines or self.grouped)

    def all(self) -> list[str]:
        out = list(self.lines)
        for items in self.grouped.values():
            out.extend(items[:MAX_LISTED])
            if len(items) > MAX_LISTED:
                out.append(f"... and {len(items) - MAX_LISTED} more like the above")
        return out

    def raise_if_any(self) -> None:
        if self:
            raise PlanError(self.all())
