"""Where tunelab keeps its cache ($TUNELAB_HOME, default ~/.cache/tunelab)."""

import os
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"


def tunelab_home() -> Path:
    """Return tunelab's cache folder, creating it if needed."""
    home = Path(os.environ.get("TUNELAB_HOME", Path.home() / ".cache" / "tunelab")).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home
