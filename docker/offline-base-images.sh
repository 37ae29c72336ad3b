#!/usr/bin/env bash
# Build the Dockerfile's base images without a container registry (podman + debootstrap):
#   localhost/debian:bookworm-slim   debootstrap minbase, trimmed
#   localhost/rust:1-bookworm        the above + build-essential + the host's rustup toolchain
# Host packages (Debian 12): podman runc catatonit debootstrap (docker/README.md says why each).
# podman on hosts like ours needs: runtime = "runc", default_ulimits nofile/nproc within the
# hard limits, cgroup_manager = "cgroupfs" (pass CONTAINERS_CONF=docker/containers.conf).
#
# The Debian mirror is the host's own, read the way apt reads it: `apt-get indextargets` lists
# the `deb` sources of /etc/apt/sources.list and /etc/apt/sources.list.d/ (one-line *.list and
# deb822 *.sources alike); the one for bookworm is the mirror, and the bookworm-updates and
# bookworm-security entries go into the image's own apt sources next to it. apt's proxy
# (Acquire::http::Proxy, Acquire::https::Proxy) is used too. DEBIAN_MIRROR=URL overrides the
# mirror (security and updates then come from the host's sources if it has them).
set -euo pipefail
suite=bookworm
workdir=$(mktemp -d)
trap 'rm -rf "$workdir"' EXIT
# Absolute: podman's helper processes do not run in this directory.
export CONTAINERS_CONF=${CONTAINERS_CONF:-$(cd "$(dirname "$0")" && pwd)/containers.conf}

# "URI SUITE" for every `deb` source apt has configured (the lists need not be downloaded).
apt_sources() {
  command -v apt-get >/dev/null || return 0
  apt-get indextargets --no-release-info --format '$(REPO_URI) $(RELEASE)' \
    'Created-By: Packages' 'Target-Of: deb'
}
source_for() {  # the first configured URI for a suite, without its trailing slash
  apt_sources | awk -v s="$1" '$2 == s {sub(/\/$/, "", $1); print $1; exit}'
}

mirror=${DEBIAN_MIRROR:-$(source_for "$suite")}
if [[ -z "$mirror" ]]; then
  echo "no apt source for Debian $suite on this host (apt-get indextargets lists none);" >&2
  echo "set DEBIAN_MIRROR=http://<a Debian mirror>/debian" >&2
  exit 1
fi
case "$mirror" in
  http://* | https://* | file://*) ;;
  *) echo "debootstrap cannot use the apt source $mirror; set DEBIAN_MIRROR" >&2; exit 1 ;;
esac
eval "$(apt-config shell apt_http_proxy Acquire::http::Proxy apt_https_proxy Acquire::https::Proxy)"
if [[ -n "${apt_http_proxy:-}" && "${apt_http_proxy}" != DIRECT ]]; then
  export http_proxy=${http_proxy:-$apt_http_proxy}
fi
if [[ -n "${apt_https_proxy:-}" && "${apt_https_proxy}" != DIRECT ]]; then
  export https_proxy=${https_proxy:-$apt_https_proxy}
fi
from="the host's apt sources"
[[ -z "${DEBIAN_MIRROR:-}" ]] || from=DEBIAN_MIRROR
echo "Debian mirror: $mirror (from $from)"

rootfs=$workdir/rootfs
debootstrap --variant=minbase "$suite" "$rootfs" "$mirror" >/dev/null
# The image's apt sources: the same mirror, plus the host's updates and security sources.
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
{
  for s in "$suite" "$suite-updates" "$suite-security"; do
    uri=$([[ $s == "$suite" ]] && echo "$mirror" || source_for "$s")
    [[ -n "$uri" ]] || continue
    printf 'Types: deb\nURIs: %s\nSuites: %s\nComponents: main\n' "$uri" "$s"
    [[ -f "$rootfs$keyring" ]] && printf 'Signed-By: %s\n' "$keyring"
    echo
  done
} > "$rootfs/etc/apt/sources.list.d/debian.sources"
rm -f "$rootfs/etc/apt/sources.list"
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
