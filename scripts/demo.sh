#!/usr/bin/env bash
# The local demo: the operator binary + the in-memory Kubernetes API server + a fake GoTo provider.
# No cluster, no GoTo account. Options (passed to the demo program):
#   --interactive   open the authorization link in your browser and click Allow yourself
#   --verbose       show the operator's log lines
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --locked --bin goto-oauth-operator --example demo
exec target/debug/examples/demo "$@"
