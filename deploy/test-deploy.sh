#!/usr/bin/env bash
# `make test-deploy`: lint the Dockerfile, build the image with podman on a Debian base
# made locally with debootstrap (no image registry is needed), run it, and ask the
# default model for an answer. Needs root (or rootless podman), podman, debootstrap and
# a reachable Debian mirror and Python package index. CI does not have to run it.
set -euo pipefail

cd "$(dirname "$0")/.."
VARIANT=${VARIANT:-cpu}
BASE=${BASE:-localhost/debian:trixie}
IMAGE=${IMAGE:-localhost/corral:${VARIANT}}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
HADOLINT=${HADOLINT:-$(command -v hadolint || echo .venv/bin/hadolint)}
PORT=${PORT:-18080}

echo "== hadolint"
"$HADOLINT" deploy/Dockerfile

for tool in podman debootstrap; do
  command -v "$tool" >/dev/null || { echo "$tool not found (apt-get install $tool)"; exit 2; }
done

if ! podman image exists "$BASE"; then
  echo "== debootstrap $BASE from $MIRROR"
  rootfs=$(mktemp -d)
  trap 'rm -rf "$rootfs"' EXIT
  debootstrap --variant=minbase trixie "$rootfs" "$MIRROR" >/dev/null
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$BASE"
  rm -rf "$rootfs"
fi

# A host with hybrid cgroups (v1 controllers plus a v2 "unified" tree) makes crun
# refuse to create containers; build in a chroot and run without cgroups there.
build_opts=() run_opts=()
# The host's CA bundle, for builds behind a TLS-inspecting proxy (a build secret).
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
if [ -s "$CA_BUNDLE" ]; then
  build_opts+=(--secret "id=ca,src=$CA_BUNDLE")
fi
if [ -d /sys/fs/cgroup/unified ]; then
  build_opts+=(--isolation chroot)
  # crun refuses hybrid cgroups outright; runc (apt-get install runc) copes.
  command -v runc >/dev/null || { echo "hybrid cgroups: install runc"; exit 2; }
  run_opts+=(--runtime runc)
fi

echo "== build $IMAGE"
podman build "${build_opts[@]}" --format docker --network host -f deploy/Dockerfile \
  --build-arg VARIANT="$VARIANT" --build-arg DEBIAN_IMAGE="$BASE" \
  --build-arg PIP_INDEX_URL="${PIP_INDEX_URL:-https://pypi.org/simple}" \
  -t "$IMAGE" .

# Podman's default limits (open files, processes) may exceed what this sandbox lets
# a runtime set: ask for no more than this shell has.
run_opts+=(--ulimit "nofile=$(ulimit -Hn):$(ulimit -Hn)" --ulimit nproc=4096:4096)
# Without systemd, podman cannot time health checks; they are run by hand below.
if [ ! -d /run/systemd/system ]; then
  run_opts+=(--health-interval disable)
fi

echo "== run"
name=corral-test-deploy-$$
cleanup() { podman rm -f -t 40 "$name" >/dev/null 2>&1 || true; }
trap cleanup EXIT
podman run "${run_opts[@]}" -d --name "$name" -p "127.0.0.1:${PORT}:8080" "$IMAGE" >/dev/null
for _ in $(seq 1 120); do
  curl -fsS "http://127.0.0.1:${PORT}/health" >/dev/null 2>&1 && break
  if [ "$(podman inspect --format '{{.State.Running}}' "$name")" != true ]; then
    podman logs "$name"; echo "the container exited"; exit 1
  fi
  sleep 1
done
curl -fsS "http://127.0.0.1:${PORT}/health"; echo
echo "== the image's HEALTHCHECK"
podman healthcheck run "$name" && echo healthy
answer=$(curl -fsS --max-time 300 "http://127.0.0.1:${PORT}/v1/chat/completions" \
  -H 'Content-Type: application/json' \
  -d '{"model": "default", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16}')
echo "$answer"
echo "$answer" | python3 -c 'import json, sys; assert json.load(sys.stdin)["choices"][0]["message"]["content"]'
test "$(podman inspect --format '{{.Config.User}}' "$IMAGE")" = "10001:10001"
echo "== test-deploy passed"
