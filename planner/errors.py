"""User-input errors that name their fields, so each front end can name them its own way."""
from __future__ import annotations

from string import Formatter

__all__ = ["PlanInputError"]


class PlanInputError(ValueError):
    """A bad planner input. The message is a ``str.format`` template: ``{slots_per_gpu}`` marks a
    field's name and ``{0}``, ``{1}``... the values. ``str(exc)`` names the Python fields
    (``slots_per_gpu``); a front end passes its own names to :meth:`render` (the CLI:
    ``--slots-per-gpu``), so a hint always points at something the user can type."""

    def __init__(self, template: str, *values):
        self.template = template
        self.values = values
        super().__init__(self.render())

    @property
    def fields(self) -> list[str]:
        """The field names the message mentions (placeholders that are not positional)."""
        return [f for _, f, _, _ in Formatter().parse(self.template) if f and not f.isdigit()]

    def render(self, names: dict[str, str] | None = None) -> str:
        """The message with each field called ``names[field]`` (default: its Python name)."""
        names = names or {}
        return self.template.format(*self.values, **{f: names.get(f, f) for f in self.fields})
