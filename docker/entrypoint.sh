#!/bin/sh
# fedbiomq container entry point: `entrypoint.sh ROLE`. Configured only by FBM_* variables and
# mounted folders; the same script runs as a plain process (tests/deploy) and in the images.
#
#   setup       one-shot: create the federation (CA, broker config) and enrol every party,
#               writing each party's bundle to $FBM_BUNDLES/NAME       (the admin's job)
#   broker      Mosquitto in the foreground, config rewritten for this mount  ($FBM_WORKSPACE)
#   node        init the node folder from $FBM_BUNDLE once, register sample data if
#               $FBM_SAMPLE_DATA is set, then run the node                ($FBM_NODE_DIR)
#   aggregator  run the aggregator                                         ($FBM_AGG_STATE)
#   researcher  submit $FBM_JOB, follow it, write results to $FBM_RESULTS; exit 0 if done
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
role=${1:-}
[ $# -gt 0 ] && shift

need() { eval "v=\${$1:-}"; [ -n "$v" ] || { echo "entrypoint: set $1 ($2)" >&2; exit 64; }; }

case "$role" in
  setup)
    need FBM_WORKSPACE "the federation workspace folder"
    need FBM_BUNDLES "where to write each party's bundle"
    need FBM_ENROLL "parties as role:name, space-separated, e.g. 'node:site-1 aggregator:agg-1'"
    if [ ! -f "$FBM_WORKSPACE/federation.json" ]; then
      fbm-broker init "$FBM_WORKSPACE" --name "${FBM_FEDERATION:-fedbiomq}" \
        --host "${FBM_BROKER_HOST:-broker}" --port "${FBM_BROKER_PORT:-8883}"
    fi
    for party in $FBM_ENROLL; do
      r=${party%%:*}; n=${party#*:}
      if [ -f "$FBM_BUNDLES/$n/bundle.json" ]; then
        echo "setup: $n already enrolled"
        continue
      fi
      fbm-broker enroll "$FBM_WORKSPACE" --role "$r" --id "$n" --out "$FBM_BUNDLES/$n"
      if [ -n "${FBM_BUNDLE_OWNER:-}" ]; then chown -R "$FBM_BUNDLE_OWNER" "$FBM_BUNDLES/$n"; fi
    done
    if [ -n "${FBM_BUNDLE_OWNER:-}" ]; then chown -R "$FBM_BUNDLE_OWNER" "$FBM_WORKSPACE"; fi
    ;;
  broker)
    need FBM_WORKSPACE "the federation workspace folder"
    exec fbm-broker serve "$FBM_WORKSPACE" "$@"
    ;;
  node)
    need FBM_NODE_DIR "the node's folder (config, database, bundle copy)"
    if [ ! -f "$FBM_NODE_DIR/node.toml" ]; then
      need FBM_BUNDLE "the node's bundle folder"
      fbm-node init "$FBM_NODE_DIR" --bundle "$FBM_BUNDLE"
    fi
    if [ -n "${FBM_SAMPLE_DATA:-}" ]; then
      # beside the node's folder, not in it: a node refuses datasets inside its own folder (its key)
      sample_dir="${FBM_SAMPLE_DIR:-${FBM_NODE_DIR%/}-data}"
      [ -f "$sample_dir/sample.csv" ] || python3 "$HERE/sample_data.py" --out "$sample_dir/sample.csv" --seed "$FBM_SAMPLE_DATA"
      fbm-node dataset show sample --dir "$FBM_NODE_DIR" >/dev/null 2>&1 ||
        fbm-node dataset add --dir "$FBM_NODE_DIR" --name sample --type csv --path "$sample_dir/sample.csv" \
          --tag sample --target outcome --description "synthetic cohort (seed $FBM_SAMPLE_DATA)"
    fi
    exec fbm-node start --dir "$FBM_NODE_DIR" "$@"
    ;;
  aggregator)
    need FBM_BUNDLE "the aggregator's bundle folder"
    need FBM_AGG_STATE "where the aggregator keeps its checkpoints"
    exec fbm-aggregator start --bundle "$FBM_BUNDLE" --state-dir "$FBM_AGG_STATE" "$@"
    ;;
  researcher)
    need FBM_BUNDLE "the researcher's bundle folder"
    need FBM_JOB "the job file (TOML)"
    exec fbm-researcher submit "$FBM_JOB" --bundle "$FBM_BUNDLE" --watch --out "${FBM_RESULTS:-results}" "$@"
    ;;
  *)
    echo "usage: entrypoint.sh setup|broker|node|aggregator|researcher [extra arguments]" >&2
    exit 64
    ;;
esac
