"""Secure aggregation that survives dropouts (issue 20): the aggregator learns only the sum.

SecAgg (Bonawitz et al., CCS 2017) with the SecAgg+ neighbour graph (Bell et al., CCS 2020),
as pure parts: no sockets, no clocks except a `now` argument, no files. One concept a module:

- `encoding`: fixed-point encoding of sample-weighted float updates in Z_2^32, decode of the sum
- `shamir`: t-of-n secret sharing of 32-byte secrets over GF(2^521 - 1)
- `prg`: a seed expanded into a uint32 vector (ChaCha20)
- `keys`: per-round X25519 key pairs, HKDF seeds per pair, AES-GCM boxes for routed shares
- `graph`: the SecAgg+ neighbour graph, derived from a public round seed
- `config`: the round's public parameters, validated
- `stages`: the messages of the four stages (pure data)
- `site` / `server`: the two state machines
"""

from common.secagg.config import SecAggConfig, SecAggError
from common.secagg.server import Failed, Finished, Publish, SecAggResult, ServerSecAgg
from common.secagg.site import SiteSecAgg

__all__ = [
    "Failed",
    "Finished",
    "Publish",
    "SecAggConfig",
    "SecAggError",
    "SecAggResult",
    "ServerSecAgg",
    "SiteSecAgg",
]
