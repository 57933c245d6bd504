#!/usr/bin/env bash
# The one test command (README.md and .ci/run both call this).
# Installs what the tests need on a fresh machine, then runs every test in release mode.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v kcat >/dev/null 2>&1 || need_apt+=(kcat)
command -v fio >/dev/null 2>&1 || need_apt+=(fio)
command -v node >/dev/null 2>&1 || need_apt+=(nodejs)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  echo "installing apt packages: ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
if ! python3 -c 'import confluent_kafka, kafka' >/dev/null 2>&1; then
  echo "installing python packages: confluent-kafka kafka-python"
  python3 -m pip install --quiet --disable-pip-version-check confluent-kafka kafka-python
fi
# KafkaJS, pinned by tests/js/package-lock.json.
if [ ! -d tests/js/node_modules/kafkajs ]; then
  echo "installing npm packages: kafkajs"
  npm ci --prefix tests/js --no-audit --no-fund --loglevel=error
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install --locked cargo-nextest
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --release -- -D warnings
# Benches run only as a compile check here; figures come from perf/bench.sh.
cargo build --workspace --release --all-targets
cargo nextest run --workspace --release --no-fail-fast "$@"
