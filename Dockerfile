# syntax=docker/dockerfile:1
#
# bntrain in a CUDA image (README.md, section "Docker", has the how-to).
#
#   docker build -t bntrain .
#   docker run --rm -it --gpus all -v bntrain-data:/data -v "$PWD":/work \
#       --user "$(id -u):$(id -g)" bntrain reproduce
#
# Build arguments:
#   CUDA_VERSION      nvidia/cuda tag version of both stages (default 13.0.1).
#                     nvcc 13.0 writes PTX ISA 9.0, which CUDA 13.0 drivers load;
#                     a newer nvcc writes PTX that older drivers refuse.
#   UBUNTU_VERSION    Ubuntu of both stages (default 24.04).
#   RUST_VERSION      pinned Rust toolchain (default 1.95.0).
#   BNTRAIN_PTX_ARCH  PTX target of the kernels (default compute_75: runs on
#                     compute capability 7.5 and newer).
#   BNTRAIN_SASS_ARCHS  GPUs the binary carries machine code for (default
#                     sm_80,sm_90: A100 and its 8.x kin, H100/H200); on any
#                     other GPU the driver compiles the PTX at start-up.
#
# The binary is built by scripts/build-release.sh, the same script CI runs.

ARG CUDA_VERSION=13.0.1
ARG UBUNTU_VERSION=24.04

# ---------------------------------------------------------------------------
# build: CUDA devel image (nvcc) + a pinned Rust toolchain
# ---------------------------------------------------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu${UBUNTU_VERSION} AS build

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# gcc and libc6-dev: rustc's linker and the C code of some crates (ring).
# curl + ca-certificates: rustup-init and crates.io.
# Ubuntu package versions are not pinned: the archive drops old versions, so
# a pin would break the build within weeks; the base image tag pins the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# rustup-init 1.28.2, checked against its published SHA-256, installs the pinned
# toolchain (minimal profile: rustc, cargo, rust-std).
ARG RUST_VERSION=1.95.0
ENV RUSTUP_HOME=/usr/local/rustup \
    CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:${PATH}
RUN case "$(dpkg --print-architecture)" in \
        amd64) rust_arch=x86_64-unknown-linux-gnu; \
               rustup_sha256=20a06e644b0d9bd2fbdbfd52d42540bdde820ea7df86e92e533c073da0cdd43c ;; \
        arm64) rust_arch=aarch64-unknown-linux-gnu; \
               rustup_sha256=e3853c5a252fca15252d07cb23a1bdd9377a8c6f3efa01531109281ae47f841c ;; \
        *) echo "unsupported architecture: $(dpkg --print-architecture)" >&2; exit 1 ;; \
    esac \
    && curl --proto '=https' --tlsv1.2 -fsSL -o /tmp/rustup-init \
        "https://static.rust-lang.org/rustup/archive/1.28.2/${rust_arch}/rustup-init" \
    && echo "${rustup_sha256}  /tmp/rustup-init" | sha256sum -c - \
    && chmod +x /tmp/rustup-init \
    && /tmp/rustup-init -y --no-modify-path --profile minimal \
        --default-toolchain "${RUST_VERSION}" --default-host "${rust_arch}" \
    && rm /tmp/rustup-init \
    && rustc --version && cargo --version && nvcc --version

WORKDIR /src
COPY . .

# The cache mounts keep downloaded crates and compiled dependencies between
# builds; the binary leaves the target/ cache through /out.
ARG BNTRAIN_PTX_ARCH=compute_75
ARG BNTRAIN_SASS_ARCHS=sm_80,sm_90
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    BNTRAIN_REQUIRE_NVCC=1 BNTRAIN_PTX_ARCH="${BNTRAIN_PTX_ARCH}" \
    BNTRAIN_SASS_ARCHS="${BNTRAIN_SASS_ARCHS}" \
    scripts/build-release.sh /out

# ---------------------------------------------------------------------------
# runtime: CUDA runtime image (cuBLAS, no compiler) + the binary
# ---------------------------------------------------------------------------
# libcuda is not in the image: the NVIDIA container toolkit mounts the host's
# driver with `docker run --gpus all`. Without it, `--device cpu` still works.
FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu${UBUNTU_VERSION}

LABEL org.opencontainers.image.title="bntrain" \
      org.opencontainers.image.description="Batch-normalized MLP trainer (Ioffe & Szegedy 2015, Figure 1) for NVIDIA GPUs with a CPU reference"

COPY --from=build /out/bntrain /usr/local/bin/bntrain

# A non-root user. /data (the MNIST cache) and /work (where runs/ is written)
# are world-writable with the sticky bit, like /tmp, so that both the default
# user and `--user "$(id -u):$(id -g)"` (for a bind-mounted /work) can write;
# a new named volume on /data copies this mode.
RUN useradd --no-log-init --system --uid 10001 --user-group \
        --home-dir /work --shell /usr/sbin/nologin bntrain \
    && mkdir -p /data /work \
    && chown bntrain:bntrain /data /work \
    && chmod 1777 /data /work

# The binary keeps its dataset cache in $BNTRAIN_CACHE/mnist; it downloads
# MNIST there on first use and reads it offline afterwards.
ENV BNTRAIN_CACHE=/data
VOLUME ["/data"]

# Runs land in /work/runs/<name>/ (report.md, figures, metrics).
WORKDIR /work
# bntrain, by number so that runtimes can check it is not root.
USER 10001:10001

ENTRYPOINT ["bntrain"]
CMD ["reproduce"]
