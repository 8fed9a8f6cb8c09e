"""Web pages for operators and compliance officers, mounted at ``/ui`` (docs/operations.md)."""

from coordinator.ui.routes import routes

__all__ = ["routes"]
