"""The node's side of secure aggregation (issue 20): after training, instead of publishing its
update, a site runs `SiteSecAgg` against the aggregator's retained stage state.

Kept out of node/service.py: the service only builds a SiteRound and feeds it the states it
reads on `jobs/{job}/secagg`; everything else is here and in common/secagg.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog

from common import topics
from common.messages import Body, JobSpec, SecAggState
from common.secagg.params import Params, flat_delta, round_config
from common.secagg.site import SiteSecAgg
from common.secagg.wire import server_state, site_body

Send = Callable[[str, str, Body], None]  # (topic, message type, body)
log = structlog.get_logger("node.secagg")


class SiteRound:
    """One site's round: the trained update (as a delta from the round's model) and its count."""

    def __init__(self, spec: JobSpec, round_: int, me: str, reference: Params, params: Params,
                 n_samples: int, send: Send) -> None:
        if spec.secure_aggregation is None:
            raise ValueError(f"job {spec.job_id} does not use secure aggregation")
        self.spec, self.round, self.me, self._send = spec, round_, me, send
        self._reference, self._delta, self._count = reference, flat_delta(params, reference), n_samples
        self._site: SiteSecAgg | None = None

    def on_state(self, body: SecAggState) -> None:
        """React to the aggregator's published stage; re-publishing makes it answer again."""
        if body.round != self.round or self.me not in body.expected:
            return
        if self._site is None:
            opt = self.spec.secure_aggregation
            assert opt is not None
            cfg = round_config(self.spec.job_id, self.round, opt.threshold, opt.neighbours, opt.clip,
                               opt.max_count, self._reference, len(body.expected))
            self._site = SiteSecAgg(cfg, self.me, self._delta, self._count)
        answer = self._site.on_state(server_state(body))
        if answer is None:
            return
        type_, out = site_body(self.round, answer)
        self._send(topics.secagg_site(self.spec.job_id, self.me), type_, out)
        log.info("secagg_sent", job=self.spec.job_id, round=self.round, stage=body.stage, type=type_)
