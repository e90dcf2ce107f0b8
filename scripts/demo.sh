#!/usr/bin/env bash
# Local Fleetwarden demo on a real control plane (kube-apiserver built from Debian's sources):
# installs the CRDs, applies the example OT cell (a DeviceGroup, five Devices, a four-wave
# UpdateRollout), runs two operator replicas with leader election and shows a failover.
#
#   scripts/demo.sh          run the demo, then stop everything
#   scripts/demo.sh --keep   leave the control plane and operators running to explore
set -euo pipefail
cd "$(dirname "$0")/.."

keep=false
[ "${1:-}" = "--keep" ] && keep=true
export FLEETWARDEN_CP_DIR=${FLEETWARDEN_CP_DIR:-${TMPDIR:-/tmp}/fleetwarden-demo}
state=$FLEETWARDEN_CP_DIR
ns=plant-berlin

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
k() { kubectl --kubeconfig "$state/kubeconfig" --cache-dir "$state/kubectl-cache" "$@"; }

say "control plane (first run builds kube-apiserver from source, later runs use the cache)"
e2e/control-plane.sh up

say "building Fleetwarden"
cargo build --quiet --bins -p fleetwarden-operator

say "installing the CRDs"
# This API server (1.20) predates CEL validation rules, so kubectl's client-side schema check
# does not know x-kubernetes-validations; the server ignores them. Real clusters need no flag.
k apply --validate=false -f charts/fleetwarden/crds/
k wait --for=condition=Established --timeout=30s \
  crd/devices.fleetwarden.io crd/devicegroups.fleetwarden.io crd/updaterollouts.fleetwarden.io

say "applying the example OT cell into namespace $ns"
k create namespace "$ns" --dry-run=client -o yaml | k apply -f -
k apply -n "$ns" -f examples/
k get fleet -n "$ns"

say "starting two operator replicas (leader election on a Lease)"
pids=()
stop_operators() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap 'stop_operators' EXIT
for i in 1 2; do
  KUBECONFIG=$state/kubeconfig target/debug/fleetwarden-operator \
    --identity "operator-$i" --lease-namespace "$ns" --metrics-addr "127.0.0.1:$((18079 + i))" \
    --lease-duration 6s --renew-deadline 4s --retry-period 1s >"$state/operator-$i.log" 2>&1 &
  pids+=($!)
done
for _ in $(seq 1 50); do
  leader=$(k get lease fleetwarden-operator -n "$ns" -o jsonpath='{.spec.holderIdentity}' 2>/dev/null || true)
  [ -n "$leader" ] && break; sleep 0.2
done
echo "leader: $leader"
curl -s "http://127.0.0.1:18080/metrics" | grep '^fleetwarden_operator_leader ' | sed 's/^/operator-1 /'
curl -s "http://127.0.0.1:18081/metrics" | grep '^fleetwarden_operator_leader ' | sed 's/^/operator-2 /'

say "failover: SIGKILL the leader ($leader); the standby takes over when the 6s lease expires"
idx=${leader#operator-}
kill -KILL "${pids[$((idx - 1))]}"
start=$SECONDS
for _ in $(seq 1 100); do
  now=$(k get lease fleetwarden-operator -n "$ns" -o jsonpath='{.spec.holderIdentity}')
  [ "$now" != "$leader" ] && break; sleep 0.2
done
echo "new leader: $now after $((SECONDS - start))s"

if $keep; then
  trap - EXIT
  say "left running"
  echo "export KUBECONFIG=$state/kubeconfig"
  echo "operator logs: $state/operator-*.log"
  echo "stop with: kill ${pids[*]}; FLEETWARDEN_CP_DIR=$state e2e/control-plane.sh down"
else
  say "stopping"
  stop_operators
  trap - EXIT
  e2e/control-plane.sh down
fi
