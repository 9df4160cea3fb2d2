#!/usr/bin/env bash
# ci/docker/test.sh: build the real Dockerfile and run the image and compose.example.yml for real, on a machine
# that reaches no container registry.
#
#   bash ci/docker/test.sh
#
# 1. Installs Docker's engine from Debian (docker.io) and Docker Compose v2 (built from its Go module, once per
#    machine, into $CELLS_PROXY_CI_CACHE, default /var/cache/cells-proxy-ci: minutes of CPU on a new machine,
#    in the background while steps 2 and 3 run), and starts a private dockerd under a temp dir: its own data
#    root and socket, no bridge, no iptables. Every container uses host networking; traffic stays on 127.0.0.1.
# 2. Builds, from local files only, stand-ins under the exact names the Dockerfile's FROM lines use: the golang
#    builder (this machine's Go toolchain, a static busybox as /bin/sh, this machine's CA bundle and Go proxy
#    settings) and the distroless base (/etc/passwd with nonroot 65532, a CA bundle, /tmp).
# 3. Builds the Dockerfile unchanged, runs the image with --read-only --cap-drop ALL against the test upstream
#    (cmd/stub-upstream) and checks through it: HTTPS GET over h2 and h1, the 301 redirect, a websocket echo, a
#    gRPC call, the container turning healthy, `docker stop` ending it with status 0 inside the grace period,
#    and the image size; the same for Cells without TLS and gRPC on its dedicated port. Then runs the binary
#    taken from the image in an empty, read-only root as uid 65532.
# 4. Runs compose.example.yml with ci/docker/compose.test.yml (host networking, Cells replaced by the test
#    upstream) through `docker compose up`, and sees cells-proxy become healthy and proxy requests. (Compose
#    runs the image step 3 built, tagged with the example's image name: its own build would be the same.)
#
# Idempotent; cleans up (containers, dockerd, temp dir) on any exit. Prints PASS/FAIL lines and a closing
# "N passed, N failed" line; exits non-zero on any failure. CELLS_PROXY_CI_LOGS=DIR keeps the logs (builds,
# dockerd, compose, the proxies) in DIR.
set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE=$ROOT/ci/docker
COMPOSE_VERSION=${CELLS_PROXY_COMPOSE_VERSION:-v2.40.3}
CACHE=${CELLS_PROXY_CI_CACHE:-/var/cache/cells-proxy-ci}
IMAGE=cells-proxy:ci-test
STUB_IMAGE=cells-proxy-test/stub-upstream:local
PROJECT=cpcompose
export PATH=/usr/local/go/bin:$PATH
export DOCKER_BUILDKIT=0 # the legacy builder: no buildx in Debian 12, and it takes --network host
DOCKER=/usr/bin/docker   # Debian's client, the same version as its engine

passed=0
failed=0
pass() { passed=$((passed + 1)); printf 'PASS: %s\n' "$*"; }
fail() { failed=$((failed + 1)); printf 'FAIL: %s\n' "$*"; }
step() { printf '\n--- %s (%s)\n' "$*" "$(date +%T)"; }
# check NAME CMD...: PASS or FAIL on the command's status, with its output; the script goes on either way.
check() {
	local name=$1
	shift
	local out
	if out=$("$@" 2>&1); then
		pass "$name${out:+: $out}"
	else
		fail "$name${out:+: $out}"
	fi
	return 0
}
# require NAME CMD...: the same, but a failure ends the script (later steps depend on it).
require() {
	local before=$failed
	check "$@"
	[ "$failed" -eq "$before" ] || exit 1
}
die() {
	fail "$*"
	exit 1
}

WORK=$(mktemp -d /tmp/cells-proxy-docker.XXXXXX)
chmod 755 "$WORK"
PIDS=()           # background processes to stop at the end
GROUPS_TO_KILL=() # background process groups (setsid) to stop at the end

cleanup() {
	local rc=$?
	set +e
	trap - EXIT INT TERM ERR
	step "cleanup"
	if [ -S "$WORK/docker.sock" ]; then
		if [ -n "${COMPOSE_ARGS:-}" ]; then
			$DOCKER compose "${COMPOSE_ARGS[@]}" down -v --timeout 5 >"$WORK/compose-down.log" 2>&1
		fi
		local ids
		ids=$($DOCKER ps -aq 2>/dev/null)
		[ -n "$ids" ] && $DOCKER rm -f $ids >/dev/null 2>&1
	fi
	for pid in "${PIDS[@]}"; do
		kill "$pid" 2>/dev/null
	done
	for pgid in "${GROUPS_TO_KILL[@]}"; do
		kill -- "-$pgid" 2>/dev/null
	done
	if [ -f "$WORK/docker.pid" ]; then
		local dpid
		dpid=$(cat "$WORK/docker.pid")
		kill "$dpid" 2>/dev/null
		for _ in $(seq 100); do
			kill -0 "$dpid" 2>/dev/null || break
			sleep 0.1
		done
		kill -0 "$dpid" 2>/dev/null && kill -9 "$dpid" 2>/dev/null
	fi
	wait 2>/dev/null
	# dockerd unmounts what it mounted when it stops; anything left (a killed daemon) goes here, deepest first.
	awk -v w="$WORK/" 'index($2, w) == 1 { print $2 }' /proc/mounts | sort -r | while read -r m; do
		umount -l "$m" 2>/dev/null
	done
	if [ -n "${CELLS_PROXY_CI_LOGS:-}" ]; then
		mkdir -p "$CELLS_PROXY_CI_LOGS" && cp "$WORK"/*.log "$WORK"/*.out "$WORK"/*.err "$CELLS_PROXY_CI_LOGS"/ 2>/dev/null
	fi
	if [ "$rc" -ne 0 ] && [ -f "$WORK/dockerd.log" ]; then
		echo "last lines of dockerd's log:"
		grep -v 'module=grpc' "$WORK/dockerd.log" | tail -n 15
	fi
	rm -rf "$WORK"
	printf '\ndocker: %d passed, %d failed\n' "$passed" "$failed"
	if [ "$failed" -ne 0 ] && [ "$rc" -eq 0 ]; then rc=1; fi
	exit "$rc"
}
trap cleanup EXIT
trap 'fail "unexpected error at line $LINENO: $BASH_COMMAND"' ERR
trap 'fail "interrupted"; exit 130' INT TERM

# wait_for SECONDS DESCRIPTION CMD...: retry CMD every 0.2s until it succeeds or time runs out.
wait_for() {
	local secs=$1 what=$2
	shift 2
	local deadline=$((SECONDS + secs))
	until "$@" >/dev/null 2>&1; do
		if [ $SECONDS -ge $deadline ]; then
			fail "$what: not within ${secs}s"
			return 1
		fi
		sleep 0.2
	done
}

health_of() { $DOCKER inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "$1"; }
is_healthy() { [ "$(health_of "$1")" = healthy ]; }

# ---------------------------------------------------------------------------------------------------------
step "1. Docker engine and Compose"

need=()
[ -x /usr/sbin/dockerd ] && [ -x $DOCKER ] || need+=(docker.io)
[ -x /bin/busybox ] && file -L /bin/busybox 2>/dev/null | grep -q 'statically linked' || need+=(busybox-static)
command -v unshare >/dev/null || need+=(util-linux)
command -v file >/dev/null || need+=(file)
if [ ${#need[@]} -gt 0 ]; then
	echo "installing ${need[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq >"$WORK/apt.log" 2>&1 || { tail "$WORK/apt.log"; die "apt-get update"; }
	apt-get install -y -qq --no-install-recommends "${need[@]}" >>"$WORK/apt.log" 2>&1 ||
		{ tail "$WORK/apt.log"; die "apt-get install ${need[*]}"; }
fi
file -L /bin/busybox | grep -q 'statically linked' || die "/bin/busybox is not the static busybox"

# Compose v2: Debian 12 has only the Python docker-compose 1.29, whose client refuses host networking together
# with published ports, so the test override could not run compose.example.yml unchanged. Unless the machine
# has the v2 plugin, build it from its Go module (served by the Go module proxy), once per machine, in the
# background: it is needed only in step 4, and its downloads overlap the image build.
export DOCKER_CONFIG=$WORK/docker-config
mkdir -p "$DOCKER_CONFIG/cli-plugins"
compose_bin=$CACHE/docker-compose-$COMPOSE_VERSION
compose_pid=
if $DOCKER compose version >/dev/null 2>&1; then
	echo "using the machine's Docker Compose plugin"
elif [ -x "$compose_bin" ]; then
	ln -sf "$compose_bin" "$DOCKER_CONFIG/cli-plugins/docker-compose"
else
	echo "building Docker Compose $COMPOSE_VERSION from its Go module in the background (once per machine)"
	mkdir -p "$CACHE"
	# Its go.mod has exclude directives, so `go install pkg@version` refuses it: build inside a copy.
	build_compose() {
		local dir
		dir=$(go mod download -json "github.com/docker/compose/v2@$COMPOSE_VERSION" |
			sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
		[ -d "$dir" ]
		cp -r "$dir" "$WORK/compose-src"
		chmod -R u+w "$WORK/compose-src"
		cd "$WORK/compose-src"
		CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath \
			-ldflags "-s -w -X github.com/docker/compose/v2/internal.Version=$COMPOSE_VERSION" \
			-o "$compose_bin.tmp" ./cmd
		mv "$compose_bin.tmp" "$compose_bin"
		rm -rf "$WORK/compose-src"
	}
	# setsid: a process group of its own, which cleanup can stop whole.
	COMPOSE_VERSION=$COMPOSE_VERSION WORK=$WORK compose_bin=$compose_bin \
		setsid -w bash -euc "$(declare -f build_compose); build_compose" >"$WORK/compose-build.log" 2>&1 </dev/null &
	compose_pid=$!
	GROUPS_TO_KILL+=("$compose_pid")
fi

export DOCKER_HOST=unix://$WORK/docker.sock
dockerd --data-root "$WORK/data" --exec-root "$WORK/exec" --pidfile "$WORK/docker.pid" \
	--host "$DOCKER_HOST" --bridge=none --iptables=false --ip6tables=false \
	>"$WORK/dockerd.log" 2>&1 &
PIDS+=($!)
wait_for 60 "dockerd answers on $DOCKER_HOST" $DOCKER version || exit 1
pass "dockerd $($DOCKER version -f '{{.Server.Version}}') on $DOCKER_HOST (no bridge, no iptables)"

# ---------------------------------------------------------------------------------------------------------
step "2. stand-in base images, from local files"

mapfile -t froms < <(awk 'toupper($1) == "FROM" { print $2 }' "$ROOT/Dockerfile")
[ ${#froms[@]} -eq 2 ] || die "Dockerfile: want two FROM lines (builder, final), got ${froms[*]}"
BUILDER=${froms[0]}
BASE=${froms[1]}
gomod_go=$(awk '$1 == "go" { print $2; exit }' "$ROOT/go.mod")
local_go=$(go env GOVERSION)
case $BUILDER in
golang:"$gomod_go"-* | golang:"$gomod_go") pass "builder $BUILDER matches go.mod (go $gomod_go)" ;;
*) fail "builder $BUILDER does not match go.mod (go $gomod_go)" ;;
esac
[ "$local_go" = "go$gomod_go" ] || echo "note: this machine has $local_go, go.mod names $gomod_go"
[ "$BASE" = gcr.io/distroless/static-debian12:nonroot ] || fail "final stage is $BASE, want gcr.io/distroless/static-debian12:nonroot"

ca_bundle=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
[ -r "$ca_bundle" ] || die "no CA bundle at $ca_bundle"

# The builder: GOROOT at /usr/local/go as in the golang image, busybox for RUN's /bin/sh, and this machine's
# CA bundle and Go proxy settings, without which module downloads fail here.
goroot=$(go env GOROOT)
b=$WORK/builder-root
mkdir -p "$b/bin" "$b/etc/ssl/certs" "$b/tmp" "$b/root" "$b/go/bin" "$b/usr/local"
chmod 1777 "$b/tmp"
cp /bin/busybox "$b/bin/busybox"
for applet in $(/bin/busybox --list); do
	[ -e "$b/bin/$applet" ] || ln -s busybox "$b/bin/$applet"
done
cp "$ca_bundle" "$b/etc/ssl/certs/ca-certificates.crt"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$b/etc/passwd"
printf 'root:x:0:\n' >"$b/etc/group"
cp -a "$goroot" "$b/usr/local/go"
changes=(
	--change "ENV PATH=/go/bin:/usr/local/go/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	--change "ENV GOLANG_VERSION=${local_go#go}"
	--change "ENV GOPATH=/go"
	--change "ENV HOME=/root"
	--change "ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"
	--change "ENV GOTOOLCHAIN=local"
	--change "WORKDIR /go"
	--change "LABEL org.opencontainers.image.description=local-stand-in-for-$BUILDER"
)
for v in GOPROXY GOSUMDB GONOSUMDB GONOPROXY GOPRIVATE GOINSECURE GOFLAGS; do
	val=$(go env "$v")
	[ -n "$val" ] && changes+=(--change "ENV $v=$val")
done
tar -C "$b" -cf - . | $DOCKER import "${changes[@]}" - "$BUILDER" >/dev/null ||
	die "import the builder stand-in $BUILDER"
rm -rf "$b"
pass "builder stand-in $BUILDER ($local_go, busybox sh)"

# The base: what the Dockerfile and the binary may rely on in distroless static:nonroot.
r=$WORK/base-root
mkdir -p "$r/etc/ssl/certs" "$r/tmp" "$r/home/nonroot"
chmod 1777 "$r/tmp"
chmod 700 "$r/home/nonroot"
chown 65532:65532 "$r/home/nonroot"
cat >"$r/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
printf 'root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n' >"$r/etc/group"
printf 'hosts: files dns\n' >"$r/etc/nsswitch.conf"
cp /etc/ssl/certs/ca-certificates.crt "$r/etc/ssl/certs/ca-certificates.crt"
tar -C "$r" -cf - . | $DOCKER import \
	--change "USER 65532" --change "WORKDIR /home/nonroot" \
	--change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
	--change "ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt" \
	--change "LABEL org.opencontainers.image.description=local-stand-in-for-$BASE" \
	- "$BASE" >/dev/null || die "import the base stand-in $BASE"
rm -rf "$r"
base_size=$($DOCKER image inspect -f '{{.Size}}' "$BASE")
pass "base stand-in $BASE ($base_size bytes: passwd, group, CA bundle, /tmp)"

# ---------------------------------------------------------------------------------------------------------
step "3. the image"

mkdir -p "$WORK/bin"
(cd "$ROOT" && CGO_ENABLED=0 go build -o "$WORK/bin/" ./cmd/stub-upstream ./ci/docker/probe) >"$WORK/go-build.log" 2>&1 ||
	{ cat "$WORK/go-build.log"; die "go build the test upstream and the probe"; }
probe=$WORK/bin/probe

version=ci-$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo test)
t0=$SECONDS
if $DOCKER build --network host --build-arg "VERSION=$version" -t "$IMAGE" "$ROOT" >"$WORK/build.log" 2>&1; then
	pass "docker build of the unchanged Dockerfile ($((SECONDS - t0))s)"
else
	tail -n 30 "$WORK/build.log"
	die "docker build of the Dockerfile"
fi

size=$($DOCKER image inspect -f '{{.Size}}' "$IMAGE")
size_mb=$(awk -v s="$size" 'BEGIN { printf "%.1f", s / 1e6 }')
echo "IMAGE SIZE: $size bytes ($size_mb MB) with the stand-in base of $base_size bytes; the real distroless static-debian12:nonroot adds about 2 MB more"
if [ "$size" -le 12000000 ]; then pass "image size $size_mb MB <= 12 MB"; else fail "image size $size_mb MB > 12 MB"; fi

check "image user 65532:65532" test "$($DOCKER image inspect -f '{{.Config.User}}' "$IMAGE")" = 65532:65532
check "exec-form ENTRYPOINT" test "$($DOCKER image inspect -f '{{json .Config.Entrypoint}}' "$IMAGE")" = '["/cells-proxy"]'
check "exec-form HEALTHCHECK running the binary" \
	test "$($DOCKER image inspect -f '{{json .Config.Healthcheck.Test}}' "$IMAGE")" = '["CMD","/cells-proxy","healthcheck"]'
check "EXPOSE 8443 8080 33060" \
	test "$($DOCKER image inspect -f '{{range $p, $_ := .Config.ExposedPorts}}{{$p}} {{end}}' "$IMAGE")" = "33060/tcp 8080/tcp 8443/tcp "
got_version=$($DOCKER run --rm --network host --read-only --cap-drop ALL "$IMAGE" version 2>&1 || true)
check "cells-proxy version in the image says $version" grep -q -- "$version" <<<"$got_version"

# The test upstream, on loopback, with its certificate written where the container can read it.
start_stub() { # start_stub NAME ARGS...: start the stub, wait for its "listening" lines
	local name=$1
	shift
	"$WORK/bin/stub-upstream" "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" &
	PIDS+=($!)
	wait_for 10 "$name listens" grep -q '^listening' "$WORK/$name.out"
}
mkdir -p "$WORK/upstream"
start_stub stub -https 127.0.0.1:0 -write-ca "$WORK/upstream/rootCA.pem" || exit 1
chmod 644 "$WORK/upstream/rootCA.pem"
up_port=$(awk '$2 == "https" { sub(/.*:/, "", $3); print $3 }' "$WORK/stub.out")
read -r https_port http_port health_port < <($probe freeports 3 | xargs)
# A certbot --webroot directory as certbot leaves it: root's, files 0644.
acme_token=Lw9c3xQ_8bR-acme-token
mkdir -p "$WORK/acme/.well-known/acme-challenge"
printf '%s.thumbprint' "$acme_token" >"$WORK/acme/.well-known/acme-challenge/$acme_token"
chmod -R a+rX,go-w "$WORK/acme"

$DOCKER run -d --name cp-image-test --network host \
	--read-only --cap-drop ALL --security-opt no-new-privileges:true \
	--health-interval 1s --stop-timeout 40 \
	-v "$WORK/upstream/rootCA.pem:/etc/cells-proxy/upstream-ca.pem:ro" \
	-v "$WORK/acme:/acme:ro" -e PROXY_ACME_WEBROOT=/acme \
	-e CELLS_UPSTREAM="https://127.0.0.1:$up_port" \
	-e CELLS_UPSTREAM_CA_FILE=/etc/cells-proxy/upstream-ca.pem \
	-e PROXY_HTTPS_ADDR="127.0.0.1:$https_port" \
	-e PROXY_HTTP_ADDR="127.0.0.1:$http_port" \
	-e PROXY_HEALTH_ADDR="127.0.0.1:$health_port" \
	-e PROXY_REDIRECT_HTTPS_PORT="$https_port" \
	"$IMAGE" >/dev/null || die "docker run $IMAGE"

if wait_for 30 "container healthy" is_healthy cp-image-test; then
	pass "container reports healthy"
else
	echo "health: $(health_of cp-image-test)"
	$DOCKER inspect -f '{{json .State.Health}}' cp-image-test | head -c 2000
	$DOCKER logs cp-image-test 2>&1 | tail -n 20
fi
base=https://127.0.0.1:$https_port
check "HTTPS GET over HTTP/2" $probe get -insecure -proto HTTP/2.0 -contains '"uri":"/a/frontend/bootconf?x=%2F"' "$base/a/frontend/bootconf?x=%2F"
check "HTTPS GET over HTTP/1.1" $probe get -insecure -h1 -proto HTTP/1.1 -contains 'hello from cells' "$base/small"
check "redirect port answers 301" $probe get -status 301 "http://127.0.0.1:$http_port/login?a=b"
check "redirect port serves an ACME challenge from the mounted webroot" \
	$probe get -contains "$acme_token.thumbprint" "http://127.0.0.1:$http_port/.well-known/acme-challenge/$acme_token"
check "websocket echo" $probe ws -insecure "wss://127.0.0.1:$https_port/ws/event"
check "gRPC call" $probe grpc -insecure "127.0.0.1:$https_port"
check "cells-proxy healthcheck by docker exec" $DOCKER exec cp-image-test /cells-proxy healthcheck
pid=$($DOCKER inspect -f '{{.State.Pid}}' cp-image-test)
check "process runs as uid 65532" grep -Eq '^Uid:[[:space:]]+65532[[:space:]]+65532' "/proc/$pid/status"
check "no capabilities" grep -Eq '^CapEff:[[:space:]]+0+$' "/proc/$pid/status"
check "root filesystem read-only" test "$($DOCKER inspect -f '{{.HostConfig.ReadonlyRootfs}}' cp-image-test)" = true

t0=$(date +%s.%N)
$DOCKER stop -t 40 cp-image-test >/dev/null
elapsed=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
code=$($DOCKER inspect -f '{{.State.ExitCode}}' cp-image-test)
if [ "$code" = 0 ] && awk -v e="$elapsed" 'BEGIN { exit !(e < 40) }'; then
	pass "docker stop: exit 0 after ${elapsed}s (grace period 40s)"
else
	fail "docker stop: exit $code after ${elapsed}s (want 0 within the 40s grace period)"
	$DOCKER logs cp-image-test 2>&1 | tail -n 20
fi
$DOCKER logs cp-image-test >"$WORK/image-test.log" 2>&1
$DOCKER rm cp-image-test >/dev/null

# ---------------------------------------------------------------------------------------------------------
step "3b. the image, topology B: Cells without TLS, gRPC on a dedicated port"

# Cells with CELLS_SITE_NO_TLS=1 serves HTTP in clear and gRPC as h2c on its own port; the proxy serves that
# port with TLS (PYDIO_GRPC_EXTERNAL, the 33060 of the EXPOSE line). On one host network the two cannot share a
# port number, so the gRPC upstream is named explicitly.
start_stub stub-b -http 127.0.0.1:0 -h2c 127.0.0.1:0 || exit 1
upb_http=$(awk '$2 == "http" { sub(/.*:/, "", $3); print $3 }' "$WORK/stub-b.out")
upb_h2c=$(awk '$2 == "h2c" { sub(/.*:/, "", $3); print $3 }' "$WORK/stub-b.out")
read -r https_port grpc_port health_port < <($probe freeports 3 | xargs)
# This container also runs under a memory limit, which cells-proxy gives its garbage collector (README, "Memory").
memory=()
if [ "$($DOCKER info --format '{{.MemoryLimit}}')" = true ]; then
	memory=(--memory 256m)
fi
$DOCKER run -d --name cp-image-test-b --network host --read-only --cap-drop ALL --health-interval 1s "${memory[@]}" \
	-e CELLS_UPSTREAM="http://127.0.0.1:$upb_http" \
	-e CELLS_GRPC_UPSTREAM="h2c://127.0.0.1:$upb_h2c" \
	-e PYDIO_GRPC_EXTERNAL="$grpc_port" \
	-e PROXY_HTTPS_ADDR="127.0.0.1:$https_port" -e PROXY_HTTP_ADDR=off \
	-e PROXY_HEALTH_ADDR="127.0.0.1:$health_port" \
	"$IMAGE" >/dev/null || die "docker run $IMAGE (topology B)"
if wait_for 30 "topology B container healthy" is_healthy cp-image-test-b; then
	pass "topology B: container reports healthy"
else
	$DOCKER logs cp-image-test-b 2>&1 | tail -n 20
fi
check "topology B: HTTPS GET to a plain-HTTP Cells" $probe get -insecure -contains '"tls":false' "https://127.0.0.1:$https_port/a/x"
check "topology B: websocket echo" $probe ws -insecure "wss://127.0.0.1:$https_port/ws/event"
check "topology B: gRPC call on the dedicated TLS port" $probe grpc -insecure "127.0.0.1:$grpc_port"
$DOCKER stop -t 40 cp-image-test-b >/dev/null
check "topology B: docker stop gives exit 0" test "$($DOCKER inspect -f '{{.State.ExitCode}}' cp-image-test-b)" = 0
$DOCKER logs cp-image-test-b >"$WORK/image-test-b.log" 2>&1
if [ ${#memory[@]} -gt 0 ]; then
	check "topology B: --memory 256m gives the collector 90% of it" \
		grep -q '"msg":"memory limit","cgroup":268435456,"gomemlimit":241591911' "$WORK/image-test-b.log"
else
	echo "SKIP: this Docker engine cannot limit memory (docker info: MemoryLimit false)"
fi
$DOCKER rm cp-image-test-b >/dev/null

# ---------------------------------------------------------------------------------------------------------
step "3c. the binary alone: empty read-only root, uid 65532"

# The root holds the binary (taken from the image) and the one certificate it is configured with, nothing else:
# no /etc, no /tmp, no /proc, no /dev. A private mount namespace makes it read-only.
e=$WORK/empty-root
mkdir -p "$e"
cid=$($DOCKER create "$IMAGE")
$DOCKER cp "$cid:/cells-proxy" "$e/cells-proxy" && $DOCKER rm "$cid" >/dev/null
echo "BINARY SIZE: $(stat -c %s "$e/cells-proxy") bytes"
cp "$WORK/upstream/rootCA.pem" "$e/upstream-ca.pem"
chmod 755 "$e"
chmod 444 "$e/upstream-ca.pem"
read -r https_port http_port health_port < <($probe freeports 3 | xargs)
empty_env=(
	PATH=/usr/sbin:/usr/bin:/sbin:/bin
	CELLS_UPSTREAM="https://127.0.0.1:$up_port" CELLS_UPSTREAM_CA_FILE=/upstream-ca.pem
	PROXY_HTTPS_ADDR="127.0.0.1:$https_port" PROXY_HTTP_ADDR="127.0.0.1:$http_port"
	PROXY_HEALTH_ADDR="127.0.0.1:$health_port"
)
# A private mount namespace in which the root is a read-only bind mount of itself, then chroot as 65532:65532.
empty_root_sh='mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec chroot --userspec=65532:65532 "$0" /cells-proxy "$@"'
in_empty_root() { env -i "${empty_env[@]}" unshare --mount --fork --kill-child -- /bin/sh -c "$empty_root_sh" "$e" "$@"; }
echo "root contents: $(cd "$e" && find . -mindepth 1 | sort | xargs)"
# In the background, exec'd so that $! is unshare's pid and the proxy is its child.
(exec env -i "${empty_env[@]}" unshare --mount --fork --kill-child -- /bin/sh -c "$empty_root_sh" "$e") >"$WORK/empty-root.log" 2>&1 &
upid=$!
PIDS+=($upid)
if wait_for 15 "proxy in the empty root ready" in_empty_root healthcheck; then
	pass "cells-proxy healthcheck in the empty root"
else
	tail -n 20 "$WORK/empty-root.log"
fi
check "HTTPS GET through the proxy in the empty root" $probe get -insecure -contains '"uri":"/a/x"' "https://127.0.0.1:$https_port/a/x"
check "gRPC call through the proxy in the empty root" $probe grpc -insecure "127.0.0.1:$https_port"
child=$(pgrep -P "$upid" | head -n 1)
if [ -n "$child" ]; then
	check "it runs as uid 65532" grep -Eq '^Uid:[[:space:]]+65532[[:space:]]' "/proc/$child/status"
	kill -TERM "$child"
fi
rc=0
wait "$upid" || rc=$?
if [ "$rc" -eq 0 ]; then pass "SIGTERM: exit 0"; else
	fail "SIGTERM in the empty root: exit $rc"
	tail -n 20 "$WORK/empty-root.log"
fi

# ---------------------------------------------------------------------------------------------------------
step "4. compose.example.yml with docker compose up"

if [ -n "$compose_pid" ]; then
	t0=$SECONDS
	if wait "$compose_pid"; then
		ln -sf "$compose_bin" "$DOCKER_CONFIG/cli-plugins/docker-compose"
		pass "built Docker Compose $COMPOSE_VERSION (waited $((SECONDS - t0))s for it here)"
	else
		tail -n 20 "$WORK/compose-build.log"
		die "build Docker Compose $COMPOSE_VERSION"
	fi
fi
require "docker compose" $DOCKER compose version --short

s=$WORK/stub-image
mkdir -p "$s"
cp "$WORK/bin/stub-upstream" "$s/stub-upstream"
printf 'FROM %s\nCOPY stub-upstream /stub-upstream\nENTRYPOINT ["/stub-upstream"]\n' "$BASE" >"$s/Dockerfile"
$DOCKER build -q -t "$STUB_IMAGE" "$s" >/dev/null || die "build the test upstream image"

export CP_TEST_DIR=$WORK/compose
mkdir -p "$CP_TEST_DIR/ca"
chown 65532:65532 "$CP_TEST_DIR/ca" # the stub runs as nonroot and writes its certificate here
read -r CP_UPSTREAM_PORT CP_MYSQL_PORT CP_HTTPS_PORT CP_HTTP_PORT CP_HEALTH_PORT < <($probe freeports 5 | xargs)
export CP_UPSTREAM_PORT CP_MYSQL_PORT CP_HTTPS_PORT CP_HTTP_PORT CP_HEALTH_PORT
COMPOSE_ARGS=(-p "$PROJECT" --project-directory "$ROOT" -f "$ROOT/compose.example.yml" -f "$HERE/compose.test.yml")

check "compose.example.yml is valid" $DOCKER compose -f "$ROOT/compose.example.yml" config -q
# Cells first: cells-proxy reads the certificate Cells writes at its first start.
$DOCKER compose "${COMPOSE_ARGS[@]}" up -d cells mysql >"$WORK/compose-up.log" 2>&1 ||
	{ cat "$WORK/compose-up.log"; die "docker compose up cells mysql"; }
wait_for 15 "the test upstream writes its certificate" test -s "$CP_TEST_DIR/ca/rootCA.pem" || exit 1
# The image is the one step 3 built from the same Dockerfile, under the name the example gives it: a second
# build through Compose would miss the layer cache (Compose packs the context differently) and cost minutes.
proxy_image=$(awk '/^  [^ #]/ { svc = $1 } svc == "cells-proxy:" && $1 == "image:" { print $2; exit }' "$ROOT/compose.example.yml")
[ -n "$proxy_image" ] || die "compose.example.yml: no image: for cells-proxy"
$DOCKER tag "$IMAGE" "$proxy_image"
check "compose builds cells-proxy from this repository's Dockerfile" \
	grep -Eq "^ +context: $ROOT\$" <(sed -n '/^  cells-proxy:/,/^  [^ ]/p' <($DOCKER compose "${COMPOSE_ARGS[@]}" config))
t0=$SECONDS
if $DOCKER compose "${COMPOSE_ARGS[@]}" up -d --no-build >>"$WORK/compose-up.log" 2>&1; then
	pass "docker compose up -d ($((SECONDS - t0))s)"
else
	tail -n 30 "$WORK/compose-up.log"
	die "docker compose up"
fi
proxy_cid=$($DOCKER compose "${COMPOSE_ARGS[@]}" ps -q cells-proxy)
[ -n "$proxy_cid" ] || die "no cells-proxy container"
if wait_for 30 "compose cells-proxy healthy" is_healthy "$proxy_cid"; then
	pass "compose: cells-proxy healthy"
else
	$DOCKER compose "${COMPOSE_ARGS[@]}" ps
	$DOCKER compose "${COMPOSE_ARGS[@]}" logs --tail 20 cells-proxy
fi
check "compose: HTTPS GET through cells-proxy" \
	$probe get -insecure -contains '"uri":"/a/config/discovery"' "https://127.0.0.1:$CP_HTTPS_PORT/a/config/discovery"
check "compose: websocket echo" $probe ws -insecure "wss://127.0.0.1:$CP_HTTPS_PORT/ws/chat"
check "compose: gRPC call" $probe grpc -insecure "127.0.0.1:$CP_HTTPS_PORT"
check "compose: read-only, no capabilities, no-new-privileges" test \
	"$($DOCKER inspect -f '{{.HostConfig.ReadonlyRootfs}} {{.HostConfig.CapDrop}} {{.HostConfig.SecurityOpt}}' "$proxy_cid")" \
	= "true [ALL] [no-new-privileges:true]"
$DOCKER compose "${COMPOSE_ARGS[@]}" stop cells-proxy >>"$WORK/compose-up.log" 2>&1
check "compose: cells-proxy stops with exit 0" test "$($DOCKER inspect -f '{{.State.ExitCode}}' "$proxy_cid")" = 0
$DOCKER compose "${COMPOSE_ARGS[@]}" down -v --timeout 5 >>"$WORK/compose-up.log" 2>&1 && unset COMPOSE_ARGS

[ "$failed" -eq 0 ] || exit 1
