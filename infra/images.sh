#!/usr/bin/env bash
# `make images`: build the serving and pipeline images from infra/Dockerfile*; `postgres`
# builds docker-compose.yml's PostgreSQL from Debian's packages (infra/Dockerfile.postgres)
# for machines that cannot pull postgres:16.
#
# With Docker Hub in reach, the Dockerfiles' default base (python:3.11-slim) is used:
#   BASE_IMAGE=python:3.11-slim ENGINE=docker infra/images.sh
# Without it (these machines: no Docker daemon, no Docker Hub), a Debian bookworm base is
# made from Debian's own packages with mmdebstrap, imported into podman, and both images are
# built on it. The machine's extra CA certificates (a TLS-inspecting proxy's) go into that
# base so pip inside the build reaches the registry as the host does.
#
#   infra/images.sh [serving|pipeline|postgres|all]     (default: all: serving, pipeline)
#
# Settings (environment): ENGINE (podman), BASE_IMAGE (built here when unset),
# ONNXFLOW_IMAGES_DIR (where the base tarball is cached: /var/tmp/onnxflow-images),
# TAG (latest). The local wheel folders of this machine (/opt/pypi*, /opt/wheels) are
# mounted into the pipeline build when they exist, so torch comes from disk.
set -euo pipefail

cd "$(dirname "$0")/.."
WHAT=${1:-all}
ENGINE=${ENGINE:-podman}
TAG=${TAG:-latest}
STATE=${ONNXFLOW_IMAGES_DIR:-/var/tmp/onnxflow-images}
LOCAL_BASE=localhost/onnxflow-base:bookworm

say() { printf '==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

command -v "$ENGINE" >/dev/null || die "$ENGINE is not installed (Debian: apt-get install podman runc mmdebstrap)"

engine_flags=()
if [ "$ENGINE" = podman ]; then
  # Rootless overlay and crun are not available in these sandboxes; runc as root is.
  command -v runc >/dev/null && engine_flags+=(--runtime runc)
  engine_flags+=(--network host --ulimit nofile=10000:10000 --ulimit nproc=4096:4096)
  # Docker's image format keeps HEALTHCHECK (OCI images drop it).
  engine_flags+=(--format docker)
fi

if [ -z "${BASE_IMAGE:-}" ]; then
  BASE_IMAGE=$LOCAL_BASE
  if ! "$ENGINE" image exists "$LOCAL_BASE" 2>/dev/null; then
    command -v mmdebstrap >/dev/null || die "no BASE_IMAGE given and mmdebstrap is not installed"
    mkdir -p "$STATE"
    tarball=$STATE/base-bookworm.tar
    if [ ! -s "$tarball" ]; then
      say "making a Debian bookworm base with mmdebstrap (about a minute)"
      hooks=()
      for ca in /usr/local/share/ca-certificates/*.crt; do
        [ -e "$ca" ] || continue
        hooks+=(--customize-hook="upload $ca /usr/local/share/ca-certificates/$(basename "$ca")")
      done
      [ ${#hooks[@]} -gt 0 ] && hooks+=(--customize-hook='chroot "$1" update-ca-certificates')
      mmdebstrap --variant=minbase --format=tar \
        --include=python3.11,python3.11-venv,python3-pip,ca-certificates,passwd \
        "${hooks[@]}" bookworm "$tarball.part"
      mv "$tarball.part" "$tarball"
    fi
    say "importing $tarball as $LOCAL_BASE"
    "$ENGINE" import "$tarball" "$LOCAL_BASE" >/dev/null
  fi
fi
say "base image: $BASE_IMAGE"

build_serving() {
  say "building onnxflow-serving:$TAG (infra/Dockerfile.serving)"
  "$ENGINE" build "${engine_flags[@]}" -f infra/Dockerfile.serving \
    --build-arg BASE_IMAGE="$BASE_IMAGE" -t "localhost/onnxflow-serving:$TAG" .
}

build_pipeline() {
  local args=(--build-arg BASE_IMAGE="$BASE_IMAGE")
  if [ -d /opt/pypi-more/simple ]; then
    # This machine's own package folders: torch and its CUDA libraries come from disk.
    for d in /opt/pypi /opt/pypi-more /opt/wheels; do
      [ -d "$d" ] && args+=(--volume "$d:$d:ro")
    done
    args+=(--build-arg TORCH_INDEX_URL=file:///opt/pypi-more/simple)
  fi
  say "building onnxflow:$TAG (infra/Dockerfile)"
  "$ENGINE" build "${engine_flags[@]}" -f infra/Dockerfile "${args[@]}" \
    -t "localhost/onnxflow:$TAG" .
}

build_postgres() {
  say "building onnxflow-postgres:$TAG (infra/Dockerfile.postgres)"
  "$ENGINE" build "${engine_flags[@]}" -f infra/Dockerfile.postgres \
    --build-arg BASE_IMAGE="$BASE_IMAGE" -t "localhost/onnxflow-postgres:$TAG" .
}

case "$WHAT" in
  serving) build_serving ;;
  pipeline) build_pipeline ;;
  postgres) build_postgres ;;
  all) build_serving; build_pipeline ;;
  *) die "unknown target '$WHAT' (serving, pipeline, postgres or all)" ;;
esac
say "done: $("$ENGINE" images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep onnxflow | tr '\n' ' ')"
