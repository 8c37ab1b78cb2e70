"""The controller's status page at `/` of the REST API's port (docs/architecture.md, "The status
page"): plain HTML, CSS and JavaScript shipped in this package, polling one JSON endpoint."""

from .overview import QueueDepths
from .page import OVERVIEW_PATH, StatusPage, handles

__all__ = ["OVERVIEW_PATH", "QueueDepths", "StatusPage", "handles"]
