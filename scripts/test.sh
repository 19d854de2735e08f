#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs the pinned test tools, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-test-deps.sh
export PATH="$PWD/.tools/bin:$PATH"
cargo test --locked --workspace --all-targets
