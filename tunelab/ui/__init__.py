"""The web UI: pages over the registry, run folders, reports, the serving service and the production loop."""

from tunelab.ui.access import UiContext
from tunelab.ui.app import build_ui, mount_ui, serve_ui

__all__ = ["UiContext", "build_ui", "mount_ui", "serve_ui"]
