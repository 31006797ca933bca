# syntax=docker/dockerfile:1
#
# The one Disparo image: controller, webhook, migrations, and the sender Jobs the
# controller creates all run /usr/local/bin/disparo with a different subcommand.
#
#   docker build -t ghcr.io/disparo/disparo:0.1.0 .
#
# (The kubectl plugin is the same binary installed on a workstation as
# kubectl-disparo; the image does not need it.)

FROM rust:1.95-bookworm AS builder
WORKDIR /src
# Queries are plain sqlx::query (no compile-time checking against a live database);
# should checked macros appear, `cargo sqlx prepare` data in .sqlx/ is used offline.
ENV SQLX_OFFLINE=true \
    CARGO_TERM_COLOR=never
COPY . .
# Only the product crate is built (`-p disparo`): the workspace's node agent and test
# kit never reach the image. Cache mounts keep the registry and the target dir
# between builds, so an edit to src/ recompiles the crate, not its ~300 dependencies.
# The binary is copied out in the same step because the cached target dir is not part
# of the layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p disparo --bin disparo \
 && install -D -m 0755 target/release/disparo /out/disparo

# glibc, libgcc and CA certificates, no shell, no package manager; runs as
# nonroot (65532:65532) like the chart's securityContext.
FROM gcr.io/distroless/cc-debian12:nonroot
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="disparo" \
      org.opencontainers.image.description="WhatsApp messaging campaigns as Kubernetes custom resources" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"
COPY --from=builder /out/disparo /usr/local/bin/disparo
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/disparo"]
CMD ["--help"]
