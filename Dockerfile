# syntax=docker/dockerfile:1
# token-injector container image.
#
#   docker build -t token-injector .
#
# Stage 1 builds the release binary; dependencies are compiled in a layer of
# their own (from Cargo.toml and Cargo.lock only), so a change to src/ only
# rebuilds the crate itself. Both cargo builds pass --no-default-features:
# the image holds the lean production binary, without the `demo` feature
# (nor rcgen, which only the demo needs); `token-injector demo` in it says
# so and exits 64.
# Stage 2 is distroless (glibc, libgcc, no shell, no package manager) and
# runs as the non-root user 65532. The process writes nothing to disk, so the
# root filesystem can be mounted read-only.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src

# 1. Dependencies only: a dummy lib and main with the real manifest and lock.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && cargo build --release --locked --no-default-features \
 && rm -rf src

# 2. The crate itself. touch: the copied sources may be older than the dummy
# build's outputs, and cargo decides by modification time.
COPY src ./src
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --no-default-features \
 && cp target/release/token-injector /token-injector

FROM gcr.io/distroless/cc-debian12:nonroot

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="token-injector" \
      org.opencontainers.image.description="Egress sidecar that injects cached, proactively renewed OAuth 2.0 client-credentials tokens" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="gcr.io/distroless/cc-debian12:nonroot"

COPY --from=build /token-injector /token-injector

# 4180: proxy listener; 9090: admin (/healthz, /readyz, /metrics).
EXPOSE 4180 9090
USER 65532:65532
# No HEALTHCHECK: Kubernetes probes /healthz and /readyz on the admin port.
ENTRYPOINT ["/token-injector"]
CMD ["run", "--config", "/etc/token-injector/config.toml"]
