#!/usr/bin/env bash
# Soak the consensus simulator: many seeds, many steps, all five configurations.
#   scripts/soak-consensus.sh [SEEDS] [FIRST_SEED] [STEPS_PER_SEED]
# Defaults: 2000 seeds from 0, 50000 steps each (5 configurations: ~500 million steps).
# A failure prints the seed and the line that replays it exactly.
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS="${1:-2000}"
FIRST="${2:-0}"
STEPS="${3:-50000}"
SPATE_SIM_SEEDS="$SEEDS" SPATE_SIM_FIRST_SEED="$FIRST" SPATE_SIM_STEPS="$STEPS" \
  cargo nextest run --release -p spate-replication --test simulation soak --no-capture
