#!/usr/bin/env bash
# Build a Python 3.11 base image from Debian's own packages (debootstrap), for machines without Docker Hub:
#   sudo docker/local-base.sh [IMAGE]          (default IMAGE: local/bookworm:py; needs root, debootstrap, docker)
# then build the node image on it:  docker build --network host --build-arg BASE_IMAGE=local/bookworm:py .
# The host's CA bundle goes into the image with PIP_CERT/SSL_CERT_FILE set, so pip in the build trusts the same
# certificate authorities as the host (e.g. a TLS-intercepting proxy's). Does nothing when IMAGE already exists.
set -euo pipefail
IMAGE=${1:-local/bookworm:py}
if docker image inspect "$IMAGE" >/dev/null 2>&1; then
    echo "$IMAGE already exists"
    exit 0
fi
# the Debian mirror apt uses on this host (deb822 or one-line sources), else the public one
MIRROR=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
[ -n "$MIRROR" ] || MIRROR=$(awk '$1 == "deb" && $3 == "bookworm" {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
[ -n "$MIRROR" ] || MIRROR=http://deb.debian.org/debian
ROOTFS=$(mktemp -d /tmp/swarm-node-rootfs.XXXXXX)
cleanup() {
    for m in proc sys dev/pts dev; do umount "$ROOTFS/$m" 2>/dev/null || true; done
    rm -rf --one-file-system "$ROOTFS"
}
trap cleanup EXIT
debootstrap --variant=minbase bookworm "$ROOTFS" "$MIRROR"
cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
chroot "$ROOTFS" apt-get install -y --no-install-recommends python3 python3-venv python3-pip ca-certificates
cp /etc/ssl/certs/ca-certificates.crt "$ROOTFS/etc/ssl/certs/ca-certificates.crt"  # after the package made its own
chroot "$ROOTFS" apt-get clean
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS/etc/resolv.conf"
tar -C "$ROOTFS" -c . | docker import \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["python3"]' - "$IMAGE"
echo "built $IMAGE"
