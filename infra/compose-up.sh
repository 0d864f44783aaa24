#!/usr/bin/env bash
# `make compose-up`: docker-compose.yml with podman-compose, on images built here
# (infra/images.sh serving pipeline postgres). Waits for each healthcheck in the compose
# file's order, then for the one-shot `deployments` to finish, and prints what runs.
#
# Why a script and not a bare `podman-compose up -d`: podman-compose ignores
# `depends_on: {condition: service_healthy}` on podman < 4.6 (Debian bookworm has 4.3), and
# without systemd podman runs healthchecks only when asked (`podman healthcheck run`). So the
# services come up in stages, each gate being the compose file's own healthcheck.
# The ulimits are these sandboxes' (podman's default nofile is above their hard limit); no pod
# (its infra container would need them too).
#
# Settings (environment): POSTGRES_IMAGE (localhost/onnxflow-postgres:latest), BASE_IMAGE
# (localhost/onnxflow-base:bookworm, used only if compose has to build), COMPOSE
# (podman-compose), HEALTH_TIMEOUT_S (900), COMPOSE_PROJECT_NAME (infra), and the compose file's
# MLFLOW_HOST_PORT, PREFECT_HOST_PORT, ENDPOINT_HOST_PORT.
set -euo pipefail

cd "$(dirname "$0")/.."
export POSTGRES_IMAGE=${POSTGRES_IMAGE:-localhost/onnxflow-postgres:latest}
export BASE_IMAGE=${BASE_IMAGE:-localhost/onnxflow-base:bookworm}
COMPOSE=${COMPOSE:-podman-compose}
TIMEOUT=${HEALTH_TIMEOUT_S:-900}
PROJECT=${COMPOSE_PROJECT_NAME:-infra}

say() { printf '==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

compose() {
  "$COMPOSE" -f infra/docker-compose.yml -p "$PROJECT" --in-pod false \
    --podman-run-args="--ulimit nofile=10000:10000 --ulimit nproc=4096:4096" "$@"
}

container_of() {
  podman ps -a --format '{{.Names}}' --filter "label=com.docker.compose.project=$PROJECT" \
    --filter "label=com.docker.compose.service=$1" | head -n1
}

wait_healthy() {
  local name started=$SECONDS
  name=$(container_of "$1")
  [ -n "$name" ] || die "no container for service $1"
  until podman healthcheck run "$name" >/dev/null 2>&1; do
    if [ $((SECONDS - started)) -ge "$TIMEOUT" ]; then
      podman logs --tail 40 "$name" >&2 || true
      die "$1 ($name) not healthy after ${TIMEOUT}s"
    fi
    sleep 3
  done
  say "$1 healthy after $((SECONDS - started))s"
}

say "postgres ($POSTGRES_IMAGE)"
compose up -d postgres
wait_healthy postgres
say "mlflow, prefect-server"
compose up -d mlflow prefect-server
wait_healthy mlflow
wait_healthy prefect-server
say "deployments, worker, endpoint"
compose up -d
deployments=$(container_of deployments)
code=$(podman wait "$deployments")
podman logs "$deployments" 2>&1 | tail -n 3
[ "$code" = 0 ] || die "deployments exited with $code"
wait_healthy endpoint
podman ps -a --filter "label=com.docker.compose.project=$PROJECT" \
  --format '{{.Names}}\t{{.Status}}\t{{.Ports}}'
