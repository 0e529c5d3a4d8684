"""The fencing pair a claim hands its worker, and the one mapping from a script's refusal to an exception.

Every write a worker makes for a claimed job carries its `Fence`: the attempt number and a random
token drawn at claim time. A fenced Lua script (fleet.queue_scripts, the prelude's `fence_check`)
changes nothing unless the job is running under that very attempt *and* token; the token makes a
claim that a Redis failover rolled back unable to share its attempt number with the next claim.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from fleet.exceptions import CancelRequested, FencedOut, PauseWithdrawn

__all__ = ["Fence", "new_claim_token", "raise_for_refusal"]


@dataclass(frozen=True)
class Fence:
    """Who may write for a job: one attempt of it, identified by its number and its claim token."""

    job_id: str
    attempt: int
    token: str

    def __str__(self) -> str:
        return f"attempt {self.attempt} of job {self.job_id}"

    @property
    def writer(self) -> str:
        """This claim's folder name in object-store paths, "a<attempt>-<token>" (at most 12 characters of
        the token): two claims that share an attempt number (one rolled back by a Redis failover) never
        write the same keys."""
        return f"a{self.attempt}-{self.token[:12]}"


def new_claim_token() -> str:
    """A fresh claim token (16 hex characters, 64 random bits)."""
    return secrets.token_hex(8)


def raise_for_refusal(reply: list, fence: Fence, doing: str) -> None:
    """Raise the exception a script's refusal means; return quietly for any other reply.

    Refusals: {'fenced', status, attempt} → FencedOut; {'cancel_requested'} → CancelRequested;
    {'pause_withdrawn'} → PauseWithdrawn. `doing` completes "attempt N of job J may not ...".
    """
    outcome = reply[0]
    if outcome == "fenced":
        status, current = reply[1] or "missing", reply[2] or "?"
        raise FencedOut(
            f"{str(fence).capitalize()} is stale (job is {status}, current attempt {current}, or another claim "
            f"of that attempt); it may not {doing}. Stop working on the job and publish nothing."
        )
    if outcome == "cancel_requested":
        raise CancelRequested(
            f"Job {fence.job_id} has a pending cancel request; attempt {fence.attempt} may not {doing}. "
            "Finish it as cancelled."
        )
    if outcome == "pause_withdrawn":
        raise PauseWithdrawn(
            f"The pause of job {fence.job_id} was withdrawn (resumed) before attempt {fence.attempt} stopped; "
            "it may not end paused. Hand the job back (finish it queued) so it resumes from its checkpoint."
        )
