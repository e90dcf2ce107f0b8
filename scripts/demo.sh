#!/usr/bin/env bash
# Local Fleetwarden demo on a real control plane (kube-apiserver built from Debian's sources):
#   1. the CRDs and the example OT cell (a DeviceGroup, five Devices, a four-wave UpdateRollout);
#   2. two operator replicas with leader election, and a failover;
#   3. a simulated fleet: 50 devices generate keys, enroll with single-use tokens through the
#      mutual-TLS gateway, get certificates issued by a local CA issuer, and check in;
#   4. a signed firmware rollout in four waves (canary, soak, an approval gate promoted with
#      `kubectl fleet`), every device verifying and installing the image it downloads.
#   5. the example cell as an OT zone: its generated NetworkPolicies, and a quarantined device
#      cut out of the zone's device network and released again.
#
#   scripts/demo.sh          run the demo, then stop everything
#   scripts/demo.sh --keep   leave everything running to explore
set -euo pipefail
cd "$(dirname "$0")/.."

keep=false
[ "${1:-}" = "--keep" ] && keep=true
export FLEETWARDEN_CP_DIR=${FLEETWARDEN_CP_DIR:-${TMPDIR:-/tmp}/fleetwarden-demo}
state=$FLEETWARDEN_CP_DIR
ns=plant-berlin
devices=${DEMO_DEVICES:-50}

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
k() { kubectl --kubeconfig "$state/kubeconfig" --cache-dir "$state/kubectl-cache" "$@"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

say "control plane (first run builds kube-apiserver from source, later runs use the cache)"
# A demo left running (--keep, or interrupted) is replaced by a fresh one.
e2e/control-plane.sh down >/dev/null 2>&1 || true
e2e/control-plane.sh up

say "building Fleetwarden"
cargo build --quiet --bins -p fleetwarden-operator -p fleetwarden-gateway -p fleetwarden-agent \
  -p fleetwarden-cli -p e2e
bin=target/debug

say "installing the CRDs"
# This API server (1.20) predates CEL validation rules, so kubectl's client-side schema check
# does not know x-kubernetes-validations; the server ignores them. Real clusters need no flag.
k apply --validate=false -f charts/fleetwarden/crds/ -f e2e/crds/
k wait --for=condition=Established --timeout=30s \
  crd/devices.fleetwarden.io crd/devicegroups.fleetwarden.io crd/updaterollouts.fleetwarden.io

say "applying the example OT cell into namespace $ns"
k create namespace "$ns" --dry-run=client -o yaml | k apply -f -
k apply -n "$ns" -f examples/
k get fleet -n "$ns"

pids=()
stop_all() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap 'stop_all; e2e/control-plane.sh down' EXIT

say "starting two operator replicas (leader election on a Lease)"
op_ports=()
for i in 1 2; do
  port=$(free_port); op_ports+=("$port")
  KUBECONFIG=$state/kubeconfig $bin/fleetwarden-operator \
    --identity "operator-$i" --lease-namespace "$ns" --metrics-addr "127.0.0.1:$port" \
    --lease-duration 6s --renew-deadline 4s --retry-period 1s >"$state/operator-$i.log" 2>&1 &
  pids+=($!)
done
for _ in $(seq 1 50); do
  leader=$(k get lease fleetwarden-operator -n "$ns" -o jsonpath='{.spec.holderIdentity}' 2>/dev/null || true)
  [ -n "$leader" ] && break; sleep 0.2
done
echo "leader: $leader"

say "failover: SIGKILL the leader ($leader); the standby takes over when the 6s lease expires"
idx=${leader#operator-}
kill -KILL "${pids[$((idx - 1))]}"
start=$SECONDS
for _ in $(seq 1 100); do
  now=$(k get lease fleetwarden-operator -n "$ns" -o jsonpath='{.spec.holderIdentity}')
  [ "$now" != "$leader" ] && break; sleep 0.2
done
echo "new leader: $now after $((SECONDS - start))s"

say "a simulated fleet of $devices devices enrolling through the gateway"
KUBECONFIG=$state/kubeconfig $bin/local-fleet issuer --namespace "$ns" --name local-ca --ca-out "$state/fleet-ca.pem" \
  >"$state/issuer.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 50); do [ -s "$state/fleet-ca.pem" ] && break; sleep 0.1; done
# The vendor's firmware signing key; devices and the DeviceGroup pin its public half.
rm -f "$state/vendor.pem"
trusted=$($bin/kubectl-fleet keygen --key-id vendor-2026 --out "$state/vendor.pem")
pubkey=$(printf '%s\n' "$trusted" | sed -n 's/^ *publicKey: *//p')
cat <<YAML | k apply -n "$ns" -f -
apiVersion: fleetwarden.io/v1alpha1
kind: DeviceGroup
metadata:
  name: demo-cell
spec:
  certificates:
    issuerRef: {name: local-ca, kind: Issuer, group: e2e.fleetwarden.io}
    trustDomain: fleet.demo
  enrollment:
    tokenSecretRef: {name: demo-cell-tokens}
  firmware:
    trustedKeys:
    - {keyId: vendor-2026, publicKey: "$pubkey"}
  checkInInterval: 10s
YAML
$bin/local-fleet gateway-pki --dir "$state/gateway-pki"
gw_port=$(free_port); gw_metrics=$(free_port)
KUBECONFIG=$state/kubeconfig $bin/fleetwarden-gateway --watch-namespace "$ns" \
  --listen "127.0.0.1:$gw_port" --metrics-addr "127.0.0.1:$gw_metrics" \
  --tls-cert "$state/gateway-pki/gateway.pem" --tls-key "$state/gateway-pki/gateway-key.pem" \
  --fleet-ca "$state/fleet-ca.pem" --retry-after 1s >"$state/gateway.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$gw_metrics/readyz" >/dev/null && break; sleep 0.2; done
KUBECONFIG=$state/kubeconfig $bin/local-fleet provision --namespace "$ns" --group demo-cell --model acme-pressctl-v3 \
  --secret demo-cell-tokens --count "$devices" --prefix demo --out "$state/devices.json"
say "signing firmware 4.2.0 and serving it over HTTPS"
head -c 1048576 /dev/urandom >"$state/pressctl-4.2.0.bin"
rm -f "$state/artifacts.url"
$bin/local-fleet artifacts --dir "$state/artifacts-pki" --serve "/fw/pressctl-4.2.0.bin=$state/pressctl-4.2.0.bin" \
  --url-out "$state/artifacts.url" >"$state/artifacts.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 50); do [ -s "$state/artifacts.url" ] && break; sleep 0.1; done
$bin/kubectl-fleet sign --key "$state/vendor.pem" --key-id vendor-2026 --version 4.2.0 --security-version 12 \
  --hardware-model acme-pressctl-v3 --url "$(cat "$state/artifacts.url")/fw/pressctl-4.2.0.bin" \
  "$state/pressctl-4.2.0.bin" | tee "$state/firmware.yaml"

$bin/fleetwarden-agent simulate --gateway "https://127.0.0.1:$gw_port" --gateway-ca "$state/gateway-pki/gateway-ca.pem" \
  --trust-domain fleet.demo --devices "$state/devices.json" --duration 10m --check-in-interval 2s --progress \
  --firmware-version 4.1.3 --security-version 12 --hardware-model acme-pressctl-v3 \
  --firmware-key "vendor-2026=$pubkey" --artifact-ca "$state/artifacts-pki/gateway-ca.pem" \
  >"$state/simulate.json" 2>"$state/simulate.log" &
sim=$!
pids+=("$sim")
for _ in $(seq 1 150); do
  n=$(k get devices -n "$ns" -o jsonpath='{range .items[*]}{.metadata.name}={.status.reported.firmwareVersion}{"\n"}{end}' \
    | grep -c '^demo-.*=4.1.3$' || true)
  [ "$n" -ge "$devices" ] && break; sleep 0.2
done
echo "$n devices enrolled and checking in"
k get devices -n "$ns" | awk 'NR <= 8'
echo "..."

say "rolling out 4.2.0 in four waves"
{ cat <<YAML
apiVersion: fleetwarden.io/v1alpha1
kind: UpdateRollout
metadata:
  name: pressctl-4-2-demo
spec:
  target: {groups: [demo-cell]}
  waves:
  - {name: canary, percent: 10, soak: 5s}
  - {name: early, percent: 30}
  - {name: half, percent: 60, requiresApproval: true}
  - {name: all, percent: 100}
  successThresholdPercent: 100
YAML
sed 's/^/  /' "$state/firmware.yaml"; } | k apply -n "$ns" -f -
for _ in $(seq 1 300); do
  reason=$(k get updaterollout pressctl-4-2-demo -n "$ns" -o jsonpath='{.status.conditions[?(@.type=="Waiting")].reason}')
  [ "$reason" = AwaitingApproval ] && break; sleep 0.2
done
KUBECONFIG=$state/kubeconfig $bin/kubectl-fleet rollout status pressctl-4-2-demo -n "$ns"
say "wave 3 needs approval: kubectl fleet rollout promote"
KUBECONFIG=$state/kubeconfig $bin/kubectl-fleet rollout promote pressctl-4-2-demo -n "$ns"
KUBECONFIG=$state/kubeconfig $bin/kubectl-fleet rollout status pressctl-4-2-demo -n "$ns" --watch --timeout 5m
k get updaterollouts -n "$ns"
k get events -n "$ns" --field-selector involvedObject.name=pressctl-4-2-demo --sort-by=.metadata.creationTimestamp \
  -o custom-columns=REASON:.reason,MESSAGE:.message
say "the simulated fleet's own report"
kill -TERM "$sim"
for _ in $(seq 1 100); do [ -s "$state/simulate.json" ] && break; sleep 0.1; done
python3 -m json.tool <"$state/simulate.json"
echo "gateway status writes: $(curl -s "http://127.0.0.1:$gw_metrics/metrics" | grep '^fleetwarden_gateway_status_writes_total' | tr '\n' ' ')"
echo "gateway check-ins:     $(curl -s "http://127.0.0.1:$gw_metrics/metrics" | grep '^fleetwarden_gateway_checkins_total')"

say "segmentation: the example cell press-line-3 is an OT zone"
k get networkpolicies -n "$ns" -l fleetwarden.io/device-group=press-line-3
excepts() {
  k get networkpolicy fw-press-line-3-devices -n "$ns" \
    -o jsonpath='{.spec.ingress[0].from[*].ipBlock.except}'
}
echo "isolated now (press-3-vib-sensor-01 is Suspended): $(excepts)"
say "quarantining press-3-plc-02: its address leaves the zone's allowed device network"
k patch device press-3-plc-02 -n "$ns" --type merge -p '{"spec":{"lifecycle":"Quarantined"}}'
for _ in $(seq 1 50); do excepts | grep -q 10.30.3.12 && break; sleep 0.1; done
echo "isolated now: $(excepts)"
k patch device press-3-plc-02 -n "$ns" --type merge -p '{"spec":{"lifecycle":"Active"}}'
for _ in $(seq 1 50); do excepts | grep -q 10.30.3.12 || break; sleep 0.1; done
echo "released:     $(excepts)"
k get events -n "$ns" --field-selector involvedObject.name=press-3-plc-02 \
  -o custom-columns=REASON:.reason,MESSAGE:.message | grep -E 'REASON|Isolated|Released'
k get devicegroup press-line-3 -n "$ns" \
  -o jsonpath='{range .status.conditions[*]}{.type}={.status} ({.reason}): {.message}{"\n"}{end}'
k get devicegroup press-line-3 -n "$ns" \
  -o jsonpath='{range .status.segmentation.findings[*]}finding {.kind} {.subject}: {.message}{"\n"}{end}'

if $keep; then
  trap - EXIT
  say "left running"
  echo "export KUBECONFIG=$state/kubeconfig"
  echo "logs: $state/*.log"
  echo "stop with: kill ${pids[*]}; FLEETWARDEN_CP_DIR=$state e2e/control-plane.sh down"
else
  say "stopping"
  stop_all
  trap - EXIT
  e2e/control-plane.sh down
fi
