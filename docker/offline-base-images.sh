#!/usr/bin/env bash
# Build the Dockerfile's base images without a container registry (podman + debootstrap):
#   localhost/debian:bookworm-slim   debootstrap minbase, trimmed
#   localhost/rust:1-bookworm        the above + build-essential + the host's rustup toolchain
# podman on hosts like ours needs: runtime = "runc", default_ulimits nofile/nproc within the
# hard limits, cgroup_manager = "cgroupfs" (pass CONTAINERS_CONF=docker/containers.conf).
set -euo pipefail
workdir=$(mktemp -d)
trap 'rm -rf "$workdir"' EXIT
export CONTAINERS_CONF=${CONTAINERS_CONF:-$(dirname "$0")/containers.conf}

rootfs=$workdir/rootfs
debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian >/dev/null
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/{doc,man,info}
cat > "$rootfs/etc/apt/apt.conf.d/docker-clean" <<'CONF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";
CONF
tar --numeric-owner -C "$rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - localhost/debian:bookworm-slim

toolchain=$(rustup toolchain list | awk '/default/ {print $1}')
mkdir -p "$workdir/rust"
cp -a "$HOME/.rustup/toolchains/$toolchain" "$workdir/rust/toolchain"
# Hosts behind a TLS-inspecting proxy trust its CA; the build stage must too (pip, cargo).
cp /etc/ssl/certs/ca-certificates.crt "$workdir/rust/host-ca-bundle.crt"
cat > "$workdir/rust/Dockerfile" <<DOCKERFILE
FROM localhost/debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends build-essential ca-certificates pkg-config && rm -rf /var/lib/apt/lists/*
COPY host-ca-bundle.crt /usr/local/share/ca-certificates/host-ca-bundle.crt
RUN update-ca-certificates && printf '[global]\\ncert = /etc/ssl/certs/ca-certificates.crt\\n' > /etc/pip.conf
COPY toolchain /usr/local/rust
ENV PATH=/usr/local/rust/bin:\$PATH CARGO_HOME=/usr/local/cargo
DOCKERFILE
podman build --format docker -t localhost/rust:1-bookworm "$workdir/rust"
