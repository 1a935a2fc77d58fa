"""The node admin's caps on what a job may ask of this node (node.toml).

Zoo plans run without approval (`trust_zoo_plans`), and an approved plan's source says nothing
of how long it runs: the number of local epochs, of rounds and the length of a round are the
researcher's choice. A job over a cap is declined, and the reply names the cap.
"""

from __future__ import annotations

from common.messages import JobSpec
from node.config import NodeSettings


def cap_refusal(spec: JobSpec, settings: NodeSettings) -> str | None:
    """Why `spec` asks more than this node allows, or None if it is within every cap."""
    raw = spec.training_args.get("epochs", 1)
    try:
        epochs = float(raw)
    except (TypeError, ValueError):
        return f"training_args.epochs = {raw!r} is not a number"
    asked = [("training_args.epochs", epochs, "max_epochs", settings.max_epochs),
             ("rounds", spec.rounds, "max_rounds", settings.max_rounds),
             ("round_deadline_s", spec.round_deadline_s, "max_round_seconds", settings.max_round_seconds)]
    for what, value, cap, limit in asked:
        if not value <= limit:  # (NaN is over every cap)
            return f"{what} = {value:g} is over this node's {cap} = {limit:g} (set in its node.toml)"
    return None
