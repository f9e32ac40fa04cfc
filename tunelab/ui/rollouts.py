"""The Serve page's canary section and the Monitor page's reports, over tunelab.ops.rollout and
tunelab.ops.monitor (issue 28), which land beside this UI."""

from __future__ import annotations

from tunelab.server.auth import Tenant
from tunelab.ui.shell import missing


def section(t: Tenant) -> list[str]:
    return [missing("tunelab/ops/rollout.py is installed but the UI does not read it yet.")]


def monitor_reports(t: Tenant) -> list[str]:
    return []
