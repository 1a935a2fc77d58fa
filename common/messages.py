"""Message types: for each `type`, the pydantic model of its body and the roles that may send it.

Adding a type is one decorated class here; `open_envelope` refuses any type not registered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from common import topics
from common.codec import TorchArray, is_torch
from common.secagg.option import check_option, check_rule


def _tensor(value: Any) -> Any:
    """A torch tensor, or one held as numpy (`TorchArray`: the node never imports torch)."""
    if isinstance(value, TorchArray) or is_torch(value):
        return value
    raise ValueError(f"expected a torch tensor, got {type(value).__name__}")


Tensor = Annotated[Any, BeforeValidator(_tensor)]
Tensors = dict[str, Tensor]
JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"


class Body(BaseModel):
    """Base of every body: unknown fields are refused, tensors are allowed."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, frozen=True)


@dataclass(frozen=True)
class MessageSpec:
    type: str
    model: type[Body]
    roles: frozenset[str]


_REGISTRY: dict[str, MessageSpec] = {}


def message(type_: str, *roles: str):
    """Register a body model under `type_`, sendable by `roles`."""

    def register(model: type[Body]) -> type[Body]:
        if type_ in _REGISTRY:
            raise ValueError(f"message type {type_!r} registered twice")
        _REGISTRY[type_] = MessageSpec(type_, model, frozenset(roles))
        return model

    return register


def spec_for(type_: str) -> MessageSpec:
    return _REGISTRY[type_]


def registered_types() -> list[str]:
    return sorted(_REGISTRY)


@message("enc_key", "node", "researcher", "aggregator", "admin")
class EncKey(Body):
    """An identity's X25519 public key (common/sealed.py), retained on `keys/{identity}`."""

    key: bytes = Field(min_length=32, max_length=32)


@message("job_key", "aggregator")
class JobKey(Body):
    """A job's content key, for a node of the job it was not sealed for (it joined later), sent
    sealed for that node on its own `requests` topic: with it the node opens the retained job.
    `of="model"`: the content key of the aggregator's models of the job, given to each node once
    per key when the models carry no wrap for the nodes (more readers than `model_wraps_max`);
    it opens only models its sender signed."""

    job_id: str = Field(pattern=JOB_ID_PATTERN)
    owner: str = Field(min_length=1, max_length=64)  # the job's topics live under its owner's name
    key: bytes = Field(min_length=32, max_length=32)
    of: Literal["job", "model"] = "job"

    def opens(self, sender: str) -> tuple[str, str | None]:
        """(the topic whose sealed messages the key opens, whose messages: None for anyone):
        a model's key opens only its sender's models, so another aggregator's key cannot stand
        in for the one of the job's aggregator; a job's opens the job whoever sealed it."""
        if self.of == "model":
            return topics.model(self.owner, self.job_id), sender
        return topics.job(self.owner, self.job_id), None


# --- nodes -----------------------------------------------------------------------------------


class DatasetInfo(Body):
    """What a node says publicly about one dataset: never its path or rows."""

    name: str
    tags: list[str]
    type: str
    description: str = ""
    n_samples: int = Field(ge=0)
    shape: list[int] = []
    features: list[str] = []
    target: str | None = None
    n_classes: int | None = None
    # tables: column -> kind, missing count, categories held by enough rows (node.loaders.tabular)
    columns: dict[str, dict[str, Any]] = {}
    # medical images: modalities (shape, voxel spacing, subject count), subjects, complete subjects
    imaging: dict[str, Any] = {}


@message("node_status", "node")
class NodeStatus(Body):
    state: Literal["online", "offline"]
    datasets: list[DatasetInfo] = []
    version: str = ""
    jobs: list[str] = []


@message("request", "researcher", "aggregator", "admin")
class Request(Body):
    """A question to one node: `ping`, `list_datasets`, `plan_status`, ..."""

    command: str = Field(min_length=1, max_length=64)
    args: dict[str, Any] = {}
    payload: Tensors = {}


@message("reply", "node")
class Reply(Body):
    """A node's answer to a request, or a notice about a job it cannot take (`in_reply_to` empty)."""

    command: str
    in_reply_to: str = ""
    ok: bool = True
    error: str = ""
    data: dict[str, Any] = {}
    payload: Tensors = {}


class JobAnswer(Body):
    """A node's answer to a job: the typed `data` of its `job` Reply (ok only when accepted; a
    pending or declined answer's reason is the reply's `error`)."""

    job: str
    status: Literal["accepted", "pending", "declined"]
    dataset: str | None = None  # accepted: which of the node's datasets trains it
    n_samples: int | None = None
    privacy: dict[str, Any] | None = None  # accepted under DP: the privacy spend reserved
    plan: str | None = None  # pending: the plan id awaiting the node admin's approval

    def reply(self, *, in_reply_to: str = "", error: str = "") -> Reply:
        return Reply(command="job", in_reply_to=in_reply_to, ok=self.status == "accepted", error=error,
                     data=self.model_dump(exclude_none=True))

    @classmethod
    def of(cls, reply: Reply, job: str | None = None) -> JobAnswer | None:
        """The answer a `job` reply carries (None for other replies); one without a status, from
        an older node, is accepted if ok, else declined; `job` (the envelope's) if it names none."""
        if reply.command != "job":
            return None
        data = {"job": job, "status": "accepted" if reply.ok else "declined", **reply.data}
        return cls.model_validate({k: v for k, v in data.items() if k in cls.model_fields})


class TrainFailed(Body):
    """A node could not train a round of a job: the typed `data` of its failed `train` Reply."""

    job: str
    round: int

    def reply(self, error: str) -> Reply:
        return Reply(command="train", ok=False, error=error, data=self.model_dump())

    @classmethod
    def of(cls, reply: Reply, job: str | None = None) -> TrainFailed | None:
        """The failure a failed `train` reply reports (None for other replies)."""
        if reply.command != "train" or reply.ok:
            return None
        data = {"job": job, **reply.data}
        return cls.model_validate({k: v for k, v in data.items() if k in cls.model_fields})


# --- jobs ------------------------------------------------------------------------------------


class PlanRef(Body):
    """A training plan: a zoo name, or source text with its sha256 and the class to use."""

    zoo: str | None = None
    source: str | None = None
    sha256: str | None = None
    class_name: str | None = None


class AggregatorRef(Body):
    name: str = "fedavg"
    args: dict[str, Any] = {}
    identity: str | None = None  # which aggregator should run the job (None: any)


class Selection(Body):
    """Which of the available nodes take part in a round.

    all: every eligible node; fraction: a random `fraction` of them (at least `k`), drawn
    with `seed` and the round number, so a rerun picks the same sets; at_least: every eligible
    node, but the round does not open before `k` of them are online.
    """

    mode: Literal["all", "fraction", "at_least"] = "all"
    fraction: float = Field(default=1.0, gt=0, le=1)
    k: int = Field(default=1, ge=1)
    seed: int = 0

    @property
    def selective(self) -> bool:
        return is_selective(self.mode)


def is_selective(mode: str) -> bool:
    """Whether a round's node list says who takes part: only `fraction` draws a subset; under
    `all` and `at_least` every eligible node does, including one that joins the open round."""
    return mode == "fraction"


class SecureAggregation(Body):
    """Secure aggregation for every round (docs/secure-aggregation.md): the aggregator learns
    only the sample-weighted sum. Each site masks with `neighbours` others (k, even); any
    `threshold` of them (T, k/2 < T <= k) recover a dropped site's masks. Update deltas are
    clipped to [-clip, clip]; sample counts above `max_count` count as `max_count`."""

    threshold: int = Field(ge=2)
    neighbours: int = Field(ge=2)
    clip: float = Field(gt=0)
    max_count: int = Field(default=100_000, ge=1)

    @model_validator(mode="after")
    def _valid(self) -> SecureAggregation:
        check_option(self.threshold, self.neighbours, self.clip, self.max_count)
        return self


@message("job", "researcher")
class JobSpec(Body):
    job_id: str = Field(pattern=JOB_ID_PATTERN)
    owner: str
    plan: PlanRef
    model_args: dict[str, Any] = {}
    training_args: dict[str, Any] = {}
    initial_params: Tensors = {}
    rounds: int = Field(ge=1, le=100_000)
    aggregator: AggregatorRef = AggregatorRef()
    tags: list[str] = Field(min_length=1)
    nodes: list[str] | None = None
    quorum: int = Field(default=1, ge=1)
    round_deadline_s: float = Field(default=600.0, gt=0)
    # stragglers: "wait" for every selected node until the deadline; "quorum": close the round
    # as soon as `quorum` updates are in (the others are recorded as missing that round)
    stragglers: Literal["wait", "quorum"] = "wait"
    selection: Selection = Selection()
    created: float = 0.0
    description: str = ""
    secure_aggregation: SecureAggregation | None = None

    @model_validator(mode="after")
    def _secure_aggregation_needs_a_sum_rule(self) -> JobSpec:
        if self.secure_aggregation is not None:
            check_rule(self.aggregator.name)
        return self


@message("withdraw", "researcher", "admin")
class Withdrawal(Body):
    """The job's owner (or an admin) ends it: retained on the job's topic in place of its spec,
    so a receiver that was away learns it too. Only the owner may write there (ACL); every
    receiver checks signer == the topic's owner (or an admin) again."""

    job_id: str = Field(pattern=JOB_ID_PATTERN)
    reason: str = Field(default="", max_length=500)


@message("update", "node")
class Update(Body):
    round: int = Field(ge=1)
    params: Tensors
    n_samples: int = Field(ge=1)
    metrics: dict[str, float] = {}
    timings: dict[str, float] = {}
    dataset: str = ""
    extra: Tensors = {}  # algorithm state for the aggregator (e.g. SCAFFOLD's control delta)


class NodeRoundReport(Body):
    node: str
    n_samples: int
    metrics: dict[str, float] = {}
    timings: dict[str, float] = {}


@message("round_opened", "aggregator")
class RoundOpened(Body):
    round: int = Field(ge=1)
    nodes: list[str]
    deadline: float
    model_round: int
    selection: str = "all"  # how `nodes` was chosen from `eligible`
    eligible: list[str] = []


@message("round_closed", "aggregator")
class RoundClosed(Body):
    round: int = Field(ge=1)
    reports: list[NodeRoundReport]
    missing: list[str] = []
    metrics: dict[str, float] = {}
    duration_s: float = 0.0
    notes: dict[str, Any] = {}  # what the rule decided (e.g. the updates Krum kept)


@message("model", "aggregator")
class GlobalModel(Body):
    """The global model after `round` rounds (round 0: the initial parameters), retained.

    It also carries the job's state, so a node or researcher that was away learns everything
    from this one retained message: which round is open, for whom, until when. The closed
    rounds' history has a retained topic of its own (`JobHistory`, researchers only).
    """

    round: int = Field(ge=0)
    params: Tensors
    aggregator: str = ""
    status: Literal["running", "done", "failed"] = "running"
    open_round: int | None = None
    nodes: list[str] = []
    deadline: float | None = None
    reason: str = ""
    extra: Tensors = {}  # published with the params (e.g. SCAFFOLD's server control variate)
    selection: str = "all"  # "all": any eligible node may join the open round; else only `nodes`


@message("job_history", "aggregator")
class JobHistory(Body):
    """Every closed round of a job with each node's report, retained on its own topic.

    Kept out of the model: the model goes to every node every round, and a history that grows
    with nodes x rounds would make that O(N^2) (researchers alone need it).
    """

    rounds: list[RoundClosed] = []


# --- secure aggregation (common/secagg): a site's four stage messages, the server's state -------


class SecAggPublicKeys(Body):
    c_pk: bytes
    s_pk: bytes


@message("secagg_keys", "node")
class SecAggKeys(Body):
    round: int = Field(ge=1)
    c_pk: bytes
    s_pk: bytes


@message("secagg_shares", "node")
class SecAggShares(Body):
    round: int = Field(ge=1)
    boxes: dict[str, bytes]
    made_for: bytes = b""  # a digest of the participants the shares are for (checked by the server)


@message("secagg_masked", "node")
class SecAggMasked(Body):
    round: int = Field(ge=1)
    vector: Any  # numpy uint32, the model's size + 1 (checked by the server)
    next_keys: SecAggPublicKeys | None = None  # the sender's keys for round + 1: that round skips its key stage


@message("secagg_unmask", "node")
class SecAggUnmask(Body):
    round: int = Field(ge=1)
    b_shares: dict[str, bytes]
    s_shares: dict[str, bytes]


@message("secagg_state", "aggregator")
class SecAggState(Body):
    """The server's stage, retained on `jobs/{job}/secagg`; `expected` and `deadline` let a
    site check it belongs and how long the stage lasts."""

    round: int = Field(ge=1)
    stage: Literal["keys", "shares", "masked", "unmask", "done", "failed"]
    expected: list[str] = []
    deadline: float = 0.0
    keys: dict[str, SecAggPublicKeys] = {}
    routed: dict[str, dict[str, bytes]] = {}
    share_senders: list[str] = []
    masked_senders: list[str] = []
    reason: str = ""
    next_keys: dict[str, SecAggPublicKeys] = {}  # unmask: the next round's carried keys (sites share ahead)


@message("update_received", "aggregator")
class UpdateReceived(Body):
    """The application-level acknowledgement: the node's update for `round` is folded in."""

    round: int = Field(ge=1)
    node: str


@message("job_accepted", "aggregator")
class JobAccepted(Body):
    aggregator: str
    nodes: list[str] = []


@message("job_done", "aggregator")
class JobDone(Body):
    rounds: int
    final_round: int
    metrics: dict[str, float] = {}


@message("job_failed", "aggregator")
class JobFailed(Body):
    reason: str
    round: int = 0


# --- the aggregator fleet (docs/design.md, "Aggregators as a fleet") ---------------------------


@message("job_claim", "aggregator")
class JobClaim(Body):
    """One aggregator's word about one job, retained on `jobs/{job}/claims/{aggregator}`.

    bid: it wants the job (epoch `epoch`), decided after the settle window; held: it runs the
    job until `lease_until` and renews the lease; finished: the job ended under it (never run
    again); yielded: it lost the bid or handed the job over. A take-over is a held claim of a
    higher epoch naming the `previous` holder, made after that holder's lease ran out."""

    job: str = Field(pattern=JOB_ID_PATTERN)
    epoch: int = Field(ge=1)
    state: Literal["bid", "held", "finished", "yielded"]
    load: int = Field(default=0, ge=0)  # jobs it held when it bid: the least loaded wins
    since: float  # when this epoch's bid was made (the claimer's clock)
    lease_until: float = 0.0
    issued: float  # when this message was made: a later one of the same epoch supersedes it
    previous: str | None = None  # the holder of the epoch before (a take-over)


@message("aggregator_status", "aggregator")
class AggregatorStatus(Body):
    """An aggregator's retained status on `aggregators/{aggregator}/status` (its Last Will
    says offline)."""

    state: Literal["online", "offline"]
    jobs: list[str] = []
    load: int = 0
    rules: list[str] = []
    at: float = 0.0
    lease_s: float = 0.0


@message("job_checkpoint", "aggregator")
class JobCheckpoint(Body):
    """A job's last durable state, retained on `jobs/{job}/checkpoints/{aggregator}` for the
    aggregator that takes the job over: the model after `round` closed rounds with their
    history and the rule's carried state, and the open round's partial state if any (what
    was folded and acknowledged). Published before any acknowledgement it covers."""

    epoch: int = Field(ge=1)
    seq: int = Field(ge=0)
    round: int = Field(ge=0)
    params: Tensors
    history: list[dict[str, Any]] = []
    rule: dict[str, Any] | None = None
    open: dict[str, Any] | None = None
