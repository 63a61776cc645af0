#!/usr/bin/env bash
# Regenerates this example mesh: a root and the cacerts of two clusters, east and west.
# For tests and demos only. Run from anywhere:  bash keys-example/generate.sh
set -euo pipefail
cd "$(dirname "$0")"
CACTL="${CACTL:-cargo run --quiet --manifest-path ../Cargo.toml --}"
rm -rf cactl-state east west root-cert.pem
$CACTL --config cactl.yaml init
for cluster in east west; do
  $CACTL --config cactl.yaml issue "$cluster"
  $CACTL --config cactl.yaml export "$cluster" --out .
done
$CACTL --config cactl.yaml bundle > root-cert.pem
rm -f cactl-state/lock
