"""Build the broker's connect-time check (`broker/plugin/fbm_auth.c`) into the workspace.

Mosquitto 2.0 cannot bind a client id to the certificate's identity nor cut off a revoked
certificate without a restart (see the C file's header); a 150-line plugin does both. It is
compiled once per workspace (and again when its source changes) with the system C compiler.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

SOURCE = Path(__file__).with_name("plugin") / "fbm_auth.c"
NEEDS = "a C compiler and the headers of Mosquitto and OpenSSL (Debian: apt-get install gcc mosquitto-dev libmosquitto-dev libssl-dev)"


class PluginBuildError(RuntimeError):
    """The plugin could not be compiled; the message says what is missing."""


def source_digest() -> str:
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]


def ensure_built(target_dir: Path, prebuilt: Path | None = None) -> Path:
    """`target_dir/fbm_auth.so`, compiled now if missing or built from another source.

    `prebuilt` is a folder with a plugin built from this same source (a container image ships
    one, so the broker image needs no compiler); it is copied instead of compiling.
    """
    target = target_dir / "fbm_auth.so"
    stamp = target_dir / "fbm_auth.so.sha"
    digest = source_digest()
    if target.is_file() and stamp.is_file() and stamp.read_text().strip() == digest:
        return target
    if prebuilt is not None and (prebuilt / "fbm_auth.so.sha").is_file() \
            and (prebuilt / "fbm_auth.so.sha").read_text().strip() == digest:
        shutil.copyfile(prebuilt / "fbm_auth.so", target.with_suffix(".so.tmp"))
        target.with_suffix(".so.tmp").replace(target)
        stamp.write_text(digest)
        return target
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise PluginBuildError(f"cannot build the broker plugin: no C compiler found; needs {NEEDS}")
    tmp = target.with_suffix(".so.tmp")
    done = subprocess.run(
        [compiler, "-shared", "-fPIC", "-O2", "-Wall", "-o", str(tmp), str(SOURCE), "-lcrypto"],
        capture_output=True, text=True,
    )
    if done.returncode != 0:
        raise PluginBuildError(f"cannot build the broker plugin ({done.stderr.strip()[-400:]}); needs {NEEDS}")
    tmp.chmod(0o644)
    tmp.replace(target)
    stamp.write_text(digest)
    return target
