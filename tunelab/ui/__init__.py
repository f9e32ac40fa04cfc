"""The web UI: pages over the registry, run folders, reports, the serving service and the production loop."""

from tunelab.ui.app import build_ui, mount_ui, serve_ui
from tunelab.ui.context import UiContext

__all__ = ["UiContext", "build_ui", "mount_ui", "serve_ui"]
