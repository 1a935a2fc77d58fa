#!/bin/sh
# Run the compose federation with podman on one host, without compose and without a
# container network: every container on the host network, folders under $OUT as volumes.
# This is what ran on the development machine (podman 4.3, runc; docs/deploy.md says why
# these flags). Build the images first (docs/deploy.md, "building the images").
#
#   OUT=/tmp/fbm-podman PORT=18883 docker/podman-run.sh        # exits with the job's status
set -eu
OUT=${OUT:-/tmp/fbm-podman}
PORT=${PORT:-18883}
TAG=${TAG:-dev}
# runc: this kernel's hybrid cgroup mode is not supported by crun; the ulimits: podman's
# defaults exceed what an unprivileged container host may set
RUN="podman --runtime runc run --rm --network host --ulimit nofile=1024:1024 --ulimit nproc=4096:4096"
names="broker node-1 node-2 node-3 aggregator"

cleanup() { for n in $names; do podman rm -f "fbm-$n" >/dev/null 2>&1 || true; done; }
trap cleanup EXIT INT TERM
cleanup

mkdir -p "$OUT/federation" "$OUT/bundles" "$OUT/results"
for n in node-1 node-2 node-3 aggregator; do mkdir -p "$OUT/$n"; done
chown -R 10001:10001 "$OUT"

$RUN -v "$OUT/federation:/fbm/federation" -v "$OUT/bundles:/out" \
  -e FBM_WORKSPACE=/fbm/federation -e FBM_BUNDLES=/out -e FBM_BROKER_HOST=localhost -e FBM_BROKER_PORT="$PORT" \
  -e FBM_ENROLL="node:node-1 node:node-2 node:node-3 aggregator:aggregator researcher:researcher" \
  "fedbiomq/researcher:$TAG" setup

$RUN -d --name fbm-broker -v "$OUT/federation:/fbm/federation" "fedbiomq/broker:$TAG"
for i in 1 2 3; do
  $RUN -d --name "fbm-node-$i" -e FBM_SAMPLE_DATA="$i" \
    -v "$OUT/bundles/node-$i:/fbm/bundle:ro" -v "$OUT/node-$i:/var/lib/fbm/node" "fedbiomq/node:$TAG"
done
$RUN -d --name fbm-aggregator -v "$OUT/bundles/aggregator:/fbm/bundle:ro" \
  -v "$OUT/aggregator:/var/lib/fbm/aggregator" "fedbiomq/aggregator:$TAG"

# wait for the nodes' health checks (the same command as the images' HEALTHCHECK)
for i in 1 2 3; do
  tries=0
  until podman exec "fbm-node-$i" fbm-node health --dir /var/lib/fbm/node >/dev/null 2>&1; do
    tries=$((tries + 1)); [ $tries -lt 60 ] || { podman logs "fbm-node-$i" | tail -20; exit 1; }; sleep 1
  done
done
$RUN -v "$OUT/bundles/researcher:/fbm/bundle:ro" -v "$OUT/results:/var/lib/fbm/results" "fedbiomq/researcher:$TAG"
