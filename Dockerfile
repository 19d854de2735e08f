# syntax=docker/dockerfile:1
# Release image of goto-oauth-operator: a static musl binary on distroless/static (CA
# certificates, tzdata, /etc/passwd with nonroot=65532; no shell, no package manager).
#
#   docker build -t goto-oauth-operator:0.3.0 .

# ---- build ------------------------------------------------------------------------------------
FROM rust:1.95-bookworm AS build

ARG TARGET=x86_64-unknown-linux-musl
# musl-gcc compiles the C parts of dependencies (ring, jemalloc) for the static target.
RUN apt-get update \
    && apt-get install -y --no-install-recommends musl-tools \
    && rm -rf /var/lib/apt/lists/* \
    && rustup target add "${TARGET}"
ENV CC_x86_64_unknown_linux_musl=musl-gcc \
    CARGO_TERM_COLOR=never

WORKDIR /src

# Dependencies first, against placeholder sources, so that a source change reuses this layer.
# rust-toolchain.toml is deliberately not copied: it names the moving "stable" channel, which
# would make rustup download another toolchain here instead of using the image's 1.95.
COPY Cargo.toml Cargo.lock ./
# The workspace members (test support only, never built here) are needed for cargo to read the
# workspace and its lock file: their manifests, each with an empty placeholder library.
COPY crates/fake-apiserver/Cargo.toml crates/fake-apiserver/
COPY crates/fake-goto/Cargo.toml crates/fake-goto/
COPY crates/kube-fault-proxy/Cargo.toml crates/kube-fault-proxy/
# Placeholder sources: src/ plus a stub for every [[bench]]/[[example]]/[[test]] a manifest
# declares, since cargo refuses a manifest whose declared targets are missing. The stubs of
# benches/examples/tests and the members' libraries stay; only the binary is ever built here.
# (tests/manifests.rs runs these COPY lines and this very RUN line to check they satisfy cargo.)
RUN mkdir -p src \
    && echo 'fn main() {}' > src/main.rs \
    && : > src/lib.rs \
    && for manifest in Cargo.toml crates/*/Cargo.toml; do \
         dir="$(dirname "${manifest}")"; \
         mkdir -p "${dir}/src" "${dir}/benches" "${dir}/examples" "${dir}/tests"; \
         [ -e "${dir}/src/lib.rs" ] || : > "${dir}/src/lib.rs"; \
         for kind in bench:benches example:examples test:tests; do \
           for name in $(awk -v s="[[${kind%%:*}]]" '/^\[/ { on = ($0 == s) } on && /^name *=/ { gsub(/^name *= *"|".*$/, ""); print }' "${manifest}"); do \
             echo 'fn main() {}' > "${dir}/${kind#*:}/${name}.rs"; \
           done; \
         done; \
       done
RUN cargo build --release --locked --target "${TARGET}" --bin goto-oauth-operator \
    && rm -rf src

# The real sources. Touch them so cargo does not take the placeholder artefacts as up to date.
COPY src ./src
RUN find src -name '*.rs' -exec touch {} + \
    && cargo build --release --locked --target "${TARGET}" --bin goto-oauth-operator \
    && cp "target/${TARGET}/release/goto-oauth-operator" /goto-oauth-operator \
    && /goto-oauth-operator --version

# ---- runtime ----------------------------------------------------------------------------------
FROM gcr.io/distroless/static-debian12:nonroot

LABEL org.opencontainers.image.title="goto-oauth-operator" \
      org.opencontainers.image.description="Kubernetes operator that keeps GoTo (LogMeIn) OAuth tokens alive as Secrets" \
      org.opencontainers.image.source="https://github.com/goto-oauth-operator/goto-oauth-operator" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.3.0"

COPY --from=build /goto-oauth-operator /goto-oauth-operator

# Numeric, so that Kubernetes' runAsNonRoot can verify it without /etc/passwd.
USER 65532:65532

# 8080: authorize/callback (port name http); 9090: /healthz, /readyz, /metrics (port name metrics).
EXPOSE 8080 9090

ENTRYPOINT ["/goto-oauth-operator"]
CMD ["run"]
