"""Mosquitto ACL text from the federation's identities and the channel table
(common/protocol.py: who may read and write each topic).

Mosquitto `pattern` lines apply to every user, so roles are written out per user: each
identity gets exactly its role's topics, with its own name where a topic names it.
"""

from __future__ import annotations

from collections.abc import Mapping

from common.identity import validate_identity_name
from common.protocol import acl_rules


def acl_text(identities: Mapping[str, str]) -> str:
    """The acl_file for `identities` (name -> role); revoked identities are simply absent."""
    lines = ["# Written by fbm-broker from identities.json: do not edit by hand.", ""]
    for name in sorted(identities):
        validate_identity_name(name)  # a name is written into the file: no line breaks, no wildcards
        role = identities[name]
        lines.append(f"# {role}")
        lines.append(f"user {name}")
        for access, template in acl_rules(role):
            lines.append(f"topic {access} {template.format(me=name)}")
        lines.append("")
    return "\n".join(lines)
