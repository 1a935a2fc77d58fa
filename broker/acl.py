"""Mosquitto ACL text from the federation's identities (DESIGN.md section 3).

Mosquitto `pattern` lines apply to every user, so roles are written out per user: each
identity gets exactly its role's topics, with its own name where a topic names it.
"""

from __future__ import annotations

from collections.abc import Mapping

from common.identity import validate_identity_name

P = "fbm/v1"

# (access, topic template); "{me}" is the identity's own name.
ROLE_RULES: dict[str, list[tuple[str, str]]] = {
    "node": [
        ("read", f"{P}/jobs/+"),
        ("read", f"{P}/jobs/+/c/+"),
        ("read", f"{P}/jobs/+/model"),
        ("read", f"{P}/jobs/+/model/c/+"),
        ("read", f"{P}/jobs/+/events"),
        ("write", f"{P}/jobs/+/updates/{{me}}"),
        ("write", f"{P}/nodes/{{me}}/status"),
        ("read", f"{P}/nodes/{{me}}/requests"),
        ("write", f"{P}/nodes/{{me}}/replies"),
    ],
    "researcher": [
        ("readwrite", f"{P}/jobs/+"),
        ("readwrite", f"{P}/jobs/+/c/+"),
        ("read", f"{P}/jobs/+/model"),
        ("read", f"{P}/jobs/+/model/c/+"),
        ("read", f"{P}/jobs/+/events"),
        ("read", f"{P}/jobs/+/history"),
        ("read", f"{P}/jobs/+/history/c/+"),
        ("read", f"{P}/nodes/+/status"),
        ("write", f"{P}/nodes/+/requests"),
        ("read", f"{P}/nodes/+/replies"),
    ],
    "aggregator": [
        ("read", f"{P}/jobs/+"),
        ("read", f"{P}/jobs/+/c/+"),
        ("write", f"{P}/jobs/+/model"),
        ("write", f"{P}/jobs/+/model/c/+"),
        ("write", f"{P}/jobs/+/events"),
        ("write", f"{P}/jobs/+/history"),
        ("write", f"{P}/jobs/+/history/c/+"),
        ("read", f"{P}/jobs/+/updates/+"),
        ("read", f"{P}/nodes/+/status"),
        ("write", f"{P}/nodes/+/requests"),
        ("read", f"{P}/nodes/+/replies"),
    ],
    "admin": [
        ("readwrite", f"{P}/#"),
    ],
}


def acl_text(identities: Mapping[str, str]) -> str:
    """The acl_file for `identities` (name -> role); revoked identities are simply absent."""
    lines = ["# Written by fbm-broker from identities.json: do not edit by hand.", ""]
    for name in sorted(identities):
        validate_identity_name(name)  # a name is written into the file: no line breaks, no wildcards
        role = identities[name]
        lines.append(f"# {role}")
        lines.append(f"user {name}")
        for access, template in ROLE_RULES[role]:
            lines.append(f"topic {access} {template.format(me=name)}")
        lines.append("")
    return "\n".join(lines)
