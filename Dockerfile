# syntax=docker/dockerfile:1
# Images of the hub and the mesh node, from one build:
#   docker build --target hub  -t ghcr.io/omnirelay/omnirelay-hub:0.1.0 .
#   docker build --target node -t ghcr.io/omnirelay/omnirelay-node:0.1.0 .
# The Helm charts' default images are these. Not built on the project's own
# machines (they have no container engine): see helm/omnirelay-hub/README.md.

# The toolchain the project builds and tests with (see README.md).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# protox compiles the .proto files in Rust, so no protoc; aws-lc-sys and the
# bundled SQLite need only the C compiler the image has.
RUN cargo build --release --locked -p omnirelay-hub --bin omnirelay-hub -p omnirelay-cli --bin omnirelay \
 && mkdir -p /out/var/lib/omnirelay

# Runtime: glibc and libgcc only (distroless), no shell, no package manager,
# the unprivileged user 65532 that the charts' securityContext also names.
FROM gcr.io/distroless/cc-debian12:nonroot AS hub
COPY --from=build /src/target/release/omnirelay-hub /usr/local/bin/omnirelay-hub
# The embedded store's folder, for `docker run` without a database; the hub
# chart mounts a volume here.
COPY --from=build --chown=65532:65532 /out/var/lib/omnirelay /var/lib/omnirelay
WORKDIR /var/lib/omnirelay
# A container listens on every address, so the hub needs an identity to
# start: mutual TLS (OMNIRELAY_HUB_TLS_*) and/or an access file
# (OMNIRELAY_HUB_ACCESS); without one it stays in protected mode, which
# refuses a non-loopback listen (docs/security.md).
ENV OMNIRELAY_HUB_LISTEN=0.0.0.0:7400 \
    OMNIRELAY_HUB_ADMIN_LISTEN=0.0.0.0:7401 \
    OMNIRELAY_HUB_SQLITE_PATH=/var/lib/omnirelay/omnirelay-hub.db \
    OMNIRELAY_HUB_LOG_FORMAT=json
USER 65532:65532
EXPOSE 7400 7401
ENTRYPOINT ["/usr/local/bin/omnirelay-hub"]
CMD ["serve"]

FROM gcr.io/distroless/cc-debian12:nonroot AS node
COPY --from=build /src/target/release/omnirelay /usr/local/bin/omnirelay
ENV OMNIRELAY_NODE_LISTEN=0.0.0.0:7420 \
    OMNIRELAY_NODE_CONTROL_LISTEN=0.0.0.0:7421 \
    OMNIRELAY_NODE_LOG_FORMAT=json
USER 65532:65532
EXPOSE 7420 7421
ENTRYPOINT ["/usr/local/bin/omnirelay"]
CMD ["node"]
