# syntax=docker/dockerfile:1
#
# tokenfan image: a release build on Debian bookworm, run on distroless cc-debian12 (glibc,
# libgcc; no shell, no package manager). TLS to the upstream is rustls with bundled webpki roots,
# so the image needs no OpenSSL.
#
#   docker build -t tokenfan:0.1.0 .
#
# Both stages are Debian 12, so the glibc the binary was linked against is the one it runs on.

FROM rust:1-bookworm AS build
WORKDIR /src

# Dependencies first, in their own layer: cargo needs every workspace member's manifest (the root
# package `tokenfan` and `loadtest/` = `tokenfan-loadtest`) and a target file for each, so stub
# sources stand in for the real ones. This layer is rebuilt only when a manifest or the lock
# file changes, not on every source edit.
COPY Cargo.toml Cargo.lock ./
COPY loadtest/Cargo.toml loadtest/
RUN mkdir -p src loadtest/src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && echo 'fn main() {}' > loadtest/src/main.rs \
    && cargo build --release --locked --bin tokenfan \
    && rm -rf src \
        target/release/tokenfan target/release/deps/tokenfan-* target/release/deps/libtokenfan-* \
        target/release/.fingerprint/tokenfan-*

# The real sources. The stub artifacts of the `tokenfan` package were removed above, so cargo
# rebuilds it whatever the mtimes of the copied files. loadtest/src keeps its stub: building
# `--bin tokenfan` never compiles it, and copying it would only spoil the cache.
# `tokenfan_build_info{commit}`: the image has no `.git`, so build.rs reads the commit from
# `docker build --build-arg TOKENFAN_COMMIT=$(git rev-parse --short=12 HEAD)`.
ARG TOKENFAN_COMMIT=unknown
COPY build.rs ./
COPY src src
RUN cargo build --release --locked --bin tokenfan \
    && install -D -m 0755 target/release/tokenfan /out/tokenfan

# :nonroot runs as uid/gid 65532; the Kubernetes manifests pin the same ids (runAsNonRoot needs
# a numeric uid to verify).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/tokenfan /usr/local/bin/tokenfan
USER 65532:65532
# The binary defaults to 127.0.0.1:8080, which nobody outside the container could reach.
ENV TOKENFAN_LISTEN=0.0.0.0:8080
EXPOSE 8080
# Exec form: tokenfan is PID 1 and receives SIGTERM itself, which starts its drain.
ENTRYPOINT ["/usr/local/bin/tokenfan"]
CMD ["serve"]
