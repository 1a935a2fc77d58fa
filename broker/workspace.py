"""A federation workspace on disk: PKI, identities, Mosquitto config, ACL, persistence.

Layout (DIR is what `fbm-broker init DIR` created):
    federation.json        name, listener address, limits
    identities.json        name -> role, cert fingerprint, issued, revoked
    pki/ca.crt, ca.key     the federation CA (the key never leaves this folder)
    broker/                server cert and key, mosquitto.conf, acl, data/ (persistence), log, pid
    bundles/NAME/          what `enroll` hands a site: ca.crt, identity.crt, identity.key, bundle.json
"""

from __future__ import annotations

import fcntl
import json
import os
import pwd
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from broker import pki
from broker.acl import acl_text
from broker.auth_plugin import ensure_built
from broker.mosquitto_conf import BrokerLimits, mosquitto_conf
from common.identity import BUNDLE_FILE, CA_FILE, CERT_FILE, KEY_FILE, ROLES, validate_identity_name

MOSQUITTO_USER = "mosquitto"


@dataclass(frozen=True)
class Federation:
    """The contents of federation.json."""

    name: str
    host: str
    port: int
    bind: str
    hosts: list[str]
    limits: BrokerLimits

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "host": self.host,
            "port": self.port,
            "bind": self.bind,
            "hosts": self.hosts,
            "limits": self.limits.model_dump(),
        }


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


class Workspace:
    """Paths and operations of one federation workspace."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()

    # paths
    @property
    def federation_file(self) -> Path:
        return self.root / "federation.json"

    @property
    def identities_file(self) -> Path:
        return self.root / "identities.json"

    @property
    def pki_dir(self) -> Path:
        return self.root / "pki"

    @property
    def broker_dir(self) -> Path:
        return self.root / "broker"

    @property
    def conf_file(self) -> Path:
        return self.broker_dir / "mosquitto.conf"

    @property
    def acl_file(self) -> Path:
        return self.broker_dir / "acl"

    @property
    def data_dir(self) -> Path:
        return self.broker_dir / "data"

    @property
    def log_file(self) -> Path:
        return self.broker_dir / "mosquitto.log"

    @property
    def pid_file(self) -> Path:
        return self.broker_dir / "mosquitto.pid"

    def bundle_dir(self, name: str) -> Path:
        return self.root / "bundles" / name

    def exists(self) -> bool:
        return self.federation_file.is_file()

    def require(self) -> None:
        if not self.exists():
            raise FileNotFoundError(
                f"{self.root} is not a federation workspace (no federation.json); "
                "create one with `fbm-broker init DIR`"
            )

    # federation
    def federation(self) -> Federation:
        self.require()
        raw = json.loads(self.federation_file.read_text())
        return Federation(
            name=raw["name"],
            host=raw["host"],
            port=int(raw["port"]),
            bind=raw.get("bind", ""),
            hosts=list(raw.get("hosts", [])),
            limits=BrokerLimits.model_validate(raw.get("limits", {})),
        )

    def init(
        self,
        name: str,
        *,
        port: int = 8883,
        hosts: list[str] | None = None,
        bind: str = "",
        limits: BrokerLimits | None = None,
        force: bool = False,
    ) -> Federation:
        """Create the CA, the broker's cert, the config and an empty ACL."""
        if self.exists() and not force:
            raise FileExistsError(f"{self.root} already holds a federation (use --force to replace it)")
        hosts = hosts or []
        fed = Federation(
            name=name,
            host=hosts[0] if hosts else "localhost",
            port=port,
            bind=bind,
            hosts=hosts,
            limits=limits or BrokerLimits(),
        )
        for d in (self.pki_dir, self.broker_dir, self.data_dir, self.root / "bundles"):
            d.mkdir(parents=True, exist_ok=True)
        self.pki_dir.chmod(0o700)
        ca = pki.create_ca(name)
        (self.pki_dir / "ca.crt").write_bytes(ca.cert_pem)
        pki.write_private(self.pki_dir / "ca.key", ca.key_pem)
        server = pki.create_server_cert(ca, hosts)
        (self.broker_dir / "server.crt").write_bytes(server.cert_pem)
        pki.write_private(self.broker_dir / "server.key", server.key_pem)
        (self.broker_dir / "ca.crt").write_bytes(ca.cert_pem)
        self.federation_file.write_text(json.dumps(fed.to_json(), indent=2))
        self.identities_file.write_text("{}")
        self.write_broker_config(build_plugin=False)  # built where the broker runs (start/serve)
        return fed

    def write_broker_config(self, prebuilt_plugin: Path | None = None, *, build_plugin: bool = True) -> None:
        """mosquitto.conf for this workspace's current path (it may be mounted elsewhere), and
        the auth plug-in beside it (`build_plugin`: not needed to enrol, only to run)."""
        fed = self.federation()
        run_as = None
        if os.geteuid() == 0:
            run_as = MOSQUITTO_USER if _user_exists(MOSQUITTO_USER) else "root"
        self.conf_file.write_text(
            mosquitto_conf(
                port=fed.port,
                bind=fed.bind,
                broker_dir=self.broker_dir,
                limits=fed.limits,
                user=run_as,
            )
        )
        if build_plugin:
            ensure_built(self.broker_dir, prebuilt_plugin)
        self.write_acl()

    # identities
    def ca(self) -> pki.KeyPair:
        return pki.KeyPair((self.pki_dir / "ca.crt").read_bytes(), (self.pki_dir / "ca.key").read_bytes())

    def identities(self) -> dict[str, dict]:
        self.require()
        return json.loads(self.identities_file.read_text())

    def _save_identities(self, identities: dict[str, dict]) -> None:
        tmp = self.identities_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(identities, indent=2, sort_keys=True))
        tmp.replace(self.identities_file)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise changes to identities.json and the ACL (two admins, or threads, at once)."""
        with open(self.root / ".lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def enroll(self, name: str, role: str, *, days: int = pki.LEAF_DAYS, force: bool = False) -> Path:
        """Issue `name` a cert for `role`, write its bundle, grant its ACL. Returns the bundle dir."""
        with self._locked():
            return self._enroll(name, role, days=days, force=force)

    def _enroll(self, name: str, role: str, *, days: int, force: bool) -> Path:
        validate_identity_name(name)
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
        identities = self.identities()
        if name in identities and not identities[name].get("revoked") and not force:
            raise FileExistsError(
                f"identity {name!r} is already enrolled as {identities[name]['role']} (use --force to re-issue)"
            )
        pair = pki.create_identity_cert(self.ca(), name, role, days)
        return self._record(name, role, pair.cert_pem, pair.key_pem)

    def enroll_many(self, names: list[str], role: str, *, days: int = pki.LEAF_DAYS) -> list[Path]:
        """Enrol many identities at once (simulated fleets): one read and one write of
        identities.json and the ACL, instead of one per identity. Existing ones are kept."""
        with self._locked():
            identities = self.identities()
            ca = self.ca()
            bundles = []
            for name in names:
                validate_identity_name(name)
                if name in identities and not identities[name].get("revoked"):
                    bundles.append(self.bundle_dir(name))
                    continue
                pair = pki.create_identity_cert(ca, name, role, days)
                bundles.append(self._record(name, role, pair.cert_pem, pair.key_pem, identities, save=False))
            self._save_identities(identities)
            self.write_acl()
            return bundles

    def enroll_request(self, csr_pem: bytes, role: str | None = None, *, days: int = pki.LEAF_DAYS,
                       force: bool = False) -> Path:
        """Sign a site's certificate request: the bundle gets the certificate, never a key."""
        request = pki.read_request(csr_pem)
        role = role or request.role
        if request.role and role != request.role:
            raise ValueError(f"the request asks for role {request.role!r}, not {role!r}")
        if role not in ROLES:
            raise ValueError(f"the request names no role; give one of {', '.join(ROLES)} with --role")
        with self._locked():
            identities = self.identities()
            old = identities.get(request.name)
            if old and not old.get("revoked") and not force:
                raise FileExistsError(f"identity {request.name!r} is already enrolled as {old['role']} (use --force to re-issue)")
            cert_pem = pki.sign_request(self.ca(), request, role, days)
            return self._record(request.name, role, cert_pem, None)

    def _record(self, name: str, role: str, cert_pem: bytes, key_pem: bytes | None,
                identities: dict[str, dict] | None = None, *, save: bool = True) -> Path:
        """Write NAME's bundle (the key only when we made it), record the cert, grant its ACL."""
        fed = self.federation()
        identities = self.identities() if identities is None else identities
        bundle = self.bundle_dir(name)
        bundle.mkdir(parents=True, exist_ok=True)
        bundle.chmod(0o700)
        (bundle / CA_FILE).write_bytes((self.pki_dir / "ca.crt").read_bytes())
        (bundle / CERT_FILE).write_bytes(cert_pem)
        if key_pem is not None:
            pki.write_private(bundle / KEY_FILE, key_pem)
        else:
            (bundle / KEY_FILE).unlink(missing_ok=True)  # a key from an earlier enrolment is not this cert's
        meta = {
            "name": name,
            "role": role,
            "federation": fed.name,
            "broker_host": fed.host,
            "broker_port": fed.port,
            "max_packet_bytes": fed.limits.max_packet_bytes,
        }
        (bundle / BUNDLE_FILE).write_text(json.dumps(meta, indent=2))
        old = identities.get(name, {})
        # a re-issued identity gets a new key: certificates of a revoked one stay refused
        refused = list(old.get("revoked_certs", []))
        if old.get("revoked"):
            refused += [fp for fp in old.get("certs", [old.get("fingerprint")]) if fp and fp not in refused]
        fingerprint = pki.cert_fingerprint(cert_pem)
        identities[name] = {
            "role": role,
            "fingerprint": fingerprint,
            "certs": [fingerprint],
            "revoked_certs": refused,
            "issued": time.time(),
            "not_after": pki.cert_not_after(cert_pem),
            "revoked": False,
            "key_held_by": "workspace" if key_pem is not None else "site",
        }
        if save:
            self._save_identities(identities)
            self.write_acl()
        return bundle

    def renew(self, name: str, *, days: int = pki.LEAF_DAYS) -> Path:
        """A new certificate for the same key (the site replaces identity.crt; nothing else).

        The previous certificate stays valid until it expires, so a site can switch over
        without downtime; revoke the identity to cut every certificate at once.
        """
        with self._locked():
            identities = self.identities()
            entry = identities.get(name)
            if entry is None:
                raise KeyError(f"no identity {name!r} in this federation")
            if entry.get("revoked"):
                raise ValueError(f"identity {name!r} is revoked; enrol it again (--force) to issue a new key")
            bundle = self.bundle_dir(name)
            # the public key from the current cert: the workspace may never have held the private key (--csr)
            current = x509.load_pem_x509_certificate((bundle / CERT_FILE).read_bytes())
            request = pki.Request(name, entry["role"], current.public_key())  # type: ignore[arg-type]
            cert_pem = pki.sign_request(self.ca(), request, entry["role"], days)
            tmp = bundle / (CERT_FILE + ".tmp")
            tmp.write_bytes(cert_pem)
            tmp.replace(bundle / CERT_FILE)
            fingerprint = pki.cert_fingerprint(cert_pem)
            entry["certs"] = [*entry.get("certs", [entry["fingerprint"]]), fingerprint]
            entry["fingerprint"] = fingerprint
            entry["not_after"] = pki.cert_not_after(cert_pem)
            entry["renewed"] = time.time()
            self._save_identities(identities)
            return bundle

    @property
    def revoked_file(self) -> Path:
        return self.broker_dir / "revoked"

    def write_acl(self) -> None:
        """The ACL of the active identities, and the list the broker plugin refuses."""
        identities = self.identities()
        active = {n: i["role"] for n, i in identities.items() if not i.get("revoked")}
        self.acl_file.write_text(acl_text(active))
        refused: list[tuple[str, str]] = []
        for n, i in sorted(identities.items()):
            refused += [(fp, n) for fp in i.get("revoked_certs", [])]
            if i.get("revoked"):
                refused += [(fp, n) for fp in i.get("certs", [i.get("fingerprint")]) if fp]
        tmp = self.revoked_file.with_suffix(".tmp")
        tmp.write_text("".join(f"{fp} {n}\n" for fp, n in refused))
        tmp.replace(self.revoked_file)
        self.fix_ownership()

    def revoke(self, name: str) -> dict:
        """Mark `name` revoked (ACL entry removed, listed for the broker plugin); its entry."""
        with self._locked():
            identities = self.identities()
            if name not in identities:
                raise KeyError(f"no identity {name!r} in this federation (see `fbm-broker identities`)")
            identities[name]["revoked"] = True
            identities[name]["revoked_at"] = time.time()
            self._save_identities(identities)
            self.write_acl()
            return identities[name]

    def fix_ownership(self) -> None:
        """When run as root, Mosquitto drops to its own user before reading keys and state."""
        if os.geteuid() != 0:
            return
        try:
            user = pwd.getpwnam(MOSQUITTO_USER)
        except KeyError:
            return
        for path in [self.broker_dir, self.data_dir, *self.broker_dir.glob("*"), *self.data_dir.glob("*")]:
            if path.name in ("mosquitto.pid",):
                continue
            os.chown(path, user.pw_uid, user.pw_gid)
