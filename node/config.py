"""The node's settings: `DIR/node.toml`, overridden by `FBM_NODE_*` environment variables."""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.settings import TransportSettings
from node.policy import PrivacyPolicy, StatisticsPolicy

CONFIG_FILE = "node.toml"


class NodeSettings(BaseSettings):
    """Everything a node process needs to know, explicit and validated."""

    model_config = SettingsConfigDict(env_prefix="FBM_NODE_", env_nested_delimiter="__", extra="forbid")

    node_dir: Path = Field(description="the node's folder (config, database, bundle)")
    bundle: Path = Field(description="identity bundle folder from `fbm-broker enroll`")
    mqtt: TransportSettings = Field(default_factory=TransportSettings)
    train_threads: int = Field(default=1, ge=1, description="torch threads of the training process")
    round_timeout_s: float = Field(default=3600.0, gt=0, description="a round's local training is stopped after this")
    resend_after_s: float = Field(default=30.0, gt=0, description="re-send an unacknowledged update after this long")
    trust_zoo_plans: bool = Field(default=True, description="run the built-in zoo plans without approval")
    max_epochs: int = Field(default=100, ge=1, description="decline jobs asking more local epochs per round")
    max_rounds: int = Field(default=1000, ge=1, description="decline jobs of more rounds")
    max_round_seconds: float = Field(default=3600.0, gt=0, description="decline jobs whose rounds may last longer (round_deadline_s)")
    plan_poll_s: float = Field(default=2.0, gt=0, description="how often the running node re-reads plan decisions")
    sandbox: bool = Field(default=True, description="confine training with Landlock (files, network) where the kernel has it")
    train_memory_mb: int = Field(default=8192, ge=0, description="address-space limit of the training process (0: none)")
    max_training_processes: int = Field(default=2, ge=1, description="live training processes (one per job, least "
                                        "recently used stopped first; a warm spare counts)")
    training_template: Path | None = Field(default=None, description="runtime folder of the host's shared training "
                                           "template (`fbm-node template`); none: the node starts its own")
    min_statistics_rows: int = Field(default=10, ge=1, description="refuse federated statistics over fewer rows")
    privacy: PrivacyPolicy = Field(default_factory=PrivacyPolicy,
                                   description="the least a job must guarantee (batch size, records, quorum, DP, budget)")
    statistics: StatisticsPolicy = Field(default_factory=StatisticsPolicy,
                                         description="what federated statistics may reveal (extremes, bins, small cells)")
    train_file_size_mb: int = Field(default=1024, ge=0, description="largest file the training process may write (0: no limit)")
    log_level: str = "info"

    @property
    def database(self) -> Path:
        return self.node_dir / "node.db"

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        return (env_settings, init_settings)  # environment beats the file

    @classmethod
    def load(cls, node_dir: str | Path) -> NodeSettings:
        node_dir = Path(node_dir).expanduser().resolve()
        path = node_dir / CONFIG_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{node_dir} is not a node folder (no {CONFIG_FILE}); create it with `fbm-node init`")
        data = tomllib.loads(path.read_text())
        data.setdefault("node_dir", str(node_dir))
        bundle = Path(data.get("bundle", "bundle"))
        data["bundle"] = str(bundle if bundle.is_absolute() else node_dir / bundle)
        return cls(**data)


def write_default_config(node_dir: Path, bundle: str = "bundle") -> Path:
    path = node_dir / CONFIG_FILE
    path.write_text(
        f'''# fedbiomq node configuration. Environment variables FBM_NODE_<NAME> override these
# (nested: FBM_NODE_MQTT__HOST, FBM_NODE_MQTT__PORT, ...).
bundle = "{bundle}"          # identity bundle (cert, key, CA, broker address)
train_threads = 1            # torch threads for local training
round_timeout_s = 3600       # stop a round's training after this many seconds
trust_zoo_plans = true       # built-in zoo plans run without approval; other plans need
                             # `fbm-node plan approve` (jobs wait as pending until then)
max_epochs = 100             # jobs asking more (local epochs per round, rounds, seconds
max_rounds = 1000            # per round: round_deadline_s) are declined, and told which cap
max_round_seconds = 3600
train_memory_mb = 8192       # address-space limit of the training process (0: none)
sandbox = true               # Landlock: training reads only Python, system libs and its dataset
max_training_processes = 2   # one training process per job, kept warm across its rounds
# training_template = "/run/user/1000/fedbiomq-template"  # several nodes on one host, one user:
                             # share one `fbm-node template` (torch's memory once, not per node)
log_level = "info"

[privacy]                    # the least a job must guarantee; a job asking for less is declined
min_batch_size = 8           # smaller batches make an update close to one patient's gradient
min_records_per_update = 32  # fewest records one update is computed from (batch_size x max_batches)
min_quorum = 1               # fewest sites every round must aggregate (raise it: no site alone)
dp_required = false          # true: only jobs with client-level DP or DP-SGD (training_args.dp)
dp_min_noise_multiplier = 0.5
# epsilon_budget = 8.0       # the dataset's total epsilon over all jobs (needs DP); delta = 1e-5
# zoo_plans = ["mlp", "cnn"] # which zoo plans run without approval (default: all)
# [privacy.datasets.NAME]    # per-dataset overrides, e.g. epsilon_budget = 2.0

[statistics]                 # what federated statistics may reveal
extremes = "off"             # per-feature min/max: "off" or "exact" (each is one patient's value)
max_bins = 64
min_cell_count = 5           # histogram cells with fewer patients are sent as 0
max_queries = 20             # statistics answered per dataset in any 24 hours

[mqtt]
# host = "broker.example.org"   # default: from the bundle
# port = 8883
keepalive_s = 20
session_expiry_s = 604800       # the broker keeps our queued requests for a week
'''
    )
    return path
