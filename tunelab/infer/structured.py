"""Per-row grammar state for the batched engine (placeholder until the always-finish version lands)."""

from __future__ import annotations

from tunelab.errors import TunelabError


class GrammarState:
    """One row's grammar: an xgrammar matcher."""

    def __init__(self, compiled, max_new_tokens: int):
        import xgrammar as xgr

        self.matcher = xgr.GrammarMatcher(compiled)
        self.closed_early = False

    def forced_token(self, remaining: int) -> int | None:
        return None

    def fill_mask(self, bitmask, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_id: int) -> None:
        if not self.matcher.accept_token(token_id):
            raise TunelabError(f"the grammar rejected token {token_id}")

    def is_terminated(self) -> bool:
        return self.matcher.is_terminated()
