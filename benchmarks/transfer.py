"""Model transfer through the broker: fedbiomq's messenger vs Mosquitto's own C clients.

For each size (10, 100, 500 MB) and in the same run, on the same TLS broker:
- C, one message: `mosquitto_sub` waits for it, `mosquitto_pub -f` sends the file as ONE
  message (sizes up to 200 MB: MQTT's largest packet is 256 MB); time from starting the
  publisher to the subscriber's exit;
- C, chunked: the same file in QoS-1 messages of our chunk size (1 MiB) over one connection,
  by a 50-line libmosquitto program (`benchmarks/c/pub_chunks.c`, compiled here), to
  `mosquitto_sub -C N`;
- ours: a node identity sends an `update` holding one float32 tensor of that size through the
  Messenger (codec, sha256 + Ed25519 signature, 1 MiB chunks at QoS 1, reassembly, signature
  check, decode) to an aggregator identity in another process; time from `send` to the
  decoded tensor in the receiver's hands. The receiver reports its peak RSS above its
  baseline in payload copies: about 2 (the reassembled message and the tensor msgpack copies
  out of it).
- ours, sealed (issue 18, on by default in the product): the same, with the update encrypted
  end to end for the receiving aggregator (AES-256-GCM under a content key wrapped with X25519,
  common/sealed.py) before it is signed; the receiver checks, decrypts and decodes. One more
  payload copy at the receiver (the decrypted body).

    python -m benchmarks.transfer [--sizes 10 100 500] [--seal both|on|off]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from broker.local import LocalFederation
from broker.mosquitto_conf import BrokerLimits
from broker.workspace import Workspace
from common.chunking import DEFAULT_CHUNK_SIZE

MB = 1024 * 1024


def _rss(field: str = "VmRSS:") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    return 0


def receive(bundle: str, topic: str, nbytes: int) -> None:
    """Child process: subscribe, say ready, print arrival time and memory once the tensor is here."""
    import threading

    import torch

    from common.identity import Identity
    from common.logging import configure_logging
    from common.messenger import Messenger
    from common.settings import TransportSettings

    configure_logging("warning")
    got = threading.Event()
    result: dict = {}

    def on_update(msg) -> None:
        result["at"] = time.time()
        result["ok"] = msg.body.params["w"].numel() * 4 == nbytes
        result["sealed"] = msg.sealed
        got.set()

    torch.zeros(1)  # torch's own start-up memory is baseline, not payload
    m = Messenger(Identity.load(bundle), TransportSettings(clean_start=True, session_expiry_s=0,
                                                           reassembly_max_bytes=4 * 1024**3))
    m.subscribe(topic, on_update, types={"update"})
    m.connect()
    base = _rss()
    print("ready", flush=True)
    got.wait(600)
    peak = _rss("VmHWM:")  # this process's own high-water mark (ru_maxrss inherits the parent's)
    print(json.dumps({**result, "extra_copies": (peak - base) / nbytes}), flush=True)
    m.close()


CHUNK = DEFAULT_CHUNK_SIZE


def build_pub_chunks(folder: Path) -> Path:
    binary = folder / "pub_chunks"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(Path(__file__).with_name("c") / "pub_chunks.c"), "-lmosquitto"],
                   check=True)
    return binary


def _c_clients(fed: LocalFederation, name: str, payload: Path, chunked: Path | None) -> float:
    """Seconds for the C clients to move `payload`: one message, or our chunk size with `chunked`."""
    bundle = fed.ws.bundle_dir(name)
    tls = [str(bundle / "ca.crt"), str(bundle / "identity.crt"), str(bundle / "identity.key")]
    common = ["-h", "localhost", "-p", str(fed.port), "--cafile", tls[0], "--cert", tls[1], "--key", tls[2],
              "-u", name, "-q", "1", "-t", "fbm/v1/bench/c"]
    count = -(-payload.stat().st_size // CHUNK) if chunked else 1
    sub = subprocess.Popen(["stdbuf", "-oL", "mosquitto_sub", *common, "-i", f"{name}:sub", "-C", str(count), "-N", "-d"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert sub.stdout is not None
    for line in sub.stdout:  # debug output: wait for the SUBACK
        if b"SUBACK" in line:
            break
    start = time.perf_counter()
    if chunked:
        subprocess.run([str(chunked), "localhost", str(fed.port), *tls, name, f"{name}:pub", "fbm/v1/bench/c",
                        str(payload), str(CHUNK)], check=True, capture_output=True)
    else:
        subprocess.run(["mosquitto_pub", *common, "-i", f"{name}:pub", "-f", str(payload)], check=True,
                       capture_output=True)
    while sub.stdout.read(1 << 20):  # the messages themselves, to nowhere
        pass
    sub.wait(600)
    return time.perf_counter() - start


def _ours(fed: LocalFederation, size: int, sealed: bool) -> tuple[float, float]:
    import torch

    from common import topics
    from common.identity import Identity
    from common.messages import Update
    from common.messenger import Messenger
    from common.settings import TransportSettings

    topic = topics.update("bench", "bench", "bench-node")
    child = subprocess.Popen([sys.executable, "-m", "benchmarks.transfer", "--receive", str(fed.ws.bundle_dir("bench-agg")),
                              topic, str(size)], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    for line in child.stdout:  # (log lines may come first)
        if line.strip() == "ready":
            break
    tensor = torch.randn(size // 4)
    sender = Messenger(Identity.load(fed.ws.bundle_dir("bench-node")),
                       TransportSettings(clean_start=True, session_expiry_s=0, publish_timeout_s=600, seal=sealed))
    sender.connect()
    sender.settle_keys(["bench-agg"], quiet_s=0)
    start = time.time()
    sender.send(topic, "update", Update(round=1, params={"w": tensor}, n_samples=1), job="bench", round_=1,
                to=["bench-agg"])
    report = next(json.loads(line) for line in child.stdout if line.startswith("{"))
    child.wait(60)
    sender.close()
    if not report.get("ok") or report.get("sealed") != sealed:
        raise RuntimeError(f"the receiver got a wrong tensor, or sealed={report.get('sealed')}: {report}")
    return report["at"] - start, report["extra_copies"]


def measure(sizes_mb: list[int], seal: str = "both") -> list[dict]:
    """One row per size; `seal` (both, on, off) says which of our two transfers to time."""
    root = Path(tempfile.mkdtemp(prefix="fbm-transfer-"))
    os.chmod(root, 0o755)
    ws = Workspace(root / "federation")
    from broker.local import free_port

    ws.init("bench", port=free_port(), bind="127.0.0.1", limits=BrokerLimits(max_packet_bytes=255 * MB))
    fed = LocalFederation(root, port=ws.federation().port).start()
    rows = []
    try:
        for name, role in (("bench-admin", "admin"), ("bench-node", "node"), ("bench-agg", "aggregator")):
            fed.enroll(name, role)
        pub_chunks = build_pub_chunks(root)
        for mb in sizes_mb:
            size = mb * MB
            payload = root / f"payload-{mb}.bin"
            with open(payload, "wb") as handle:
                handle.write(os.urandom(size))
            single_s = _c_clients(fed, "bench-admin", payload, None) if mb <= 200 else float("nan")
            chunked_s = _c_clients(fed, "bench-admin", payload, pub_chunks)
            clear_s, copies = _ours(fed, size, False) if seal != "on" else (float("nan"), float("nan"))
            sealed_s, sealed_copies = _ours(fed, size, True) if seal != "off" else (float("nan"), float("nan"))
            payload.unlink()
            best_c = min(chunked_s, single_s) if mb <= 200 else chunked_s
            rows.append({"mb": mb, "c_single_mb_s": mb / single_s, "c_chunked_mb_s": mb / chunked_s,
                         "ours_mb_s": mb / clear_s, "ratio": best_c / clear_s, "receiver_extra_copies": copies,
                         "sealed_mb_s": mb / sealed_s, "sealed_ratio": best_c / sealed_s,
                         "sealed_receiver_extra_copies": sealed_copies})
            print(json.dumps({k: round(v, 3) for k, v in rows[-1].items()}), flush=True)
    finally:
        fed.stop()
        shutil.rmtree(root, ignore_errors=True)
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--receive":
        receive(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 500])
    parser.add_argument("--seal", choices=["both", "on", "off"], default="both",
                        help="time our transfer in clear, sealed end to end, or both (default)")
    args = parser.parse_args()
    from common.logging import configure_logging

    configure_logging("warning")
    rows = measure(args.sizes, args.seal)
    print(f"\n{'size':>7} {'C 1 msg MB/s':>13} {'C chunked MB/s':>15} {'ours clear MB/s':>16} {'/best C':>8} "
          f"{'ours sealed MB/s':>17} {'/best C':>8} {'receiver copies clear/sealed':>29}")
    for r in rows:
        print(f"{r['mb']:>5}MB {r['c_single_mb_s']:>13.0f} {r['c_chunked_mb_s']:>15.0f} {r['ours_mb_s']:>16.0f} "
              f"{r['ratio']:>8.0%} {r['sealed_mb_s']:>17.0f} {r['sealed_ratio']:>8.0%} "
              f"{r['receiver_extra_copies']:>14.2f} / {r['sealed_receiver_extra_copies']:.2f}")


if __name__ == "__main__":
    main()
