#!/usr/bin/env bash
# The local demo: the operator binary + the in-memory Kubernetes API server + a fake GoTo provider.
# No cluster, no GoTo account. Needs Rust (rust-toolchain.toml) and a C compiler as `cc`; the first
# build downloads crates from crates.io. Options (passed to the demo program):
#   --interactive       open the authorization link in your browser and click Allow yourself. The
#                       operator listens on 127.0.0.1:18080 and the fake GoTo on 127.0.0.1:18081
#                       (loopback only); for a browser on another machine, forward both with
#                       `ssh -N -L 18080:127.0.0.1:18080 -L 18081:127.0.0.1:18081 you@this-machine`
#                       (the demo prints the command) and open the link exactly as printed
#   --port PORT         the operator's port (default 18080 with --interactive, else a free port)
#   --goto-port PORT    the fake GoTo's port (default 18081 with --interactive, else a free port)
#   --verbose           show the operator's log lines
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --locked --bin goto-oauth-operator --example demo
exec "${CARGO_TARGET_DIR:-target}/debug/examples/demo" "$@"
