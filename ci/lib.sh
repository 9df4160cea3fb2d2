# ci/lib.sh: what ci/h2spec.sh and ci/tlsscan.sh share. Sourced, not run.
#
# Gives: TMP (a temporary directory, removed at exit with every process in PIDS killed), step, wait_for,
# need_tools,
# start_upstream (builds cells-proxy and cmd/stub-upstream into TMP and starts the stub as a TLS upstream:
# sets UPSTREAM) and start_proxy (sets PROXY_PID, MAIN and GRPC). The caller defines die.

TMP=$(mktemp -d)
PIDS=()
cleanup() {
	for pid in "${PIDS[@]}"; do
		kill "$pid" 2>/dev/null || true
	done
	for pid in "${PIDS[@]}"; do
		wait "$pid" 2>/dev/null || true
	done
	rm -rf "$TMP"
}
trap cleanup EXIT

step() { printf '\n--- %s (%s)\n' "$*" "$(date +%T)"; }

# wait_for FILE REGEX: wait up to 15 s for a line matching REGEX in FILE, print it.
wait_for() {
	local i
	for i in $(seq 150); do
		if grep -E -m1 "$2" "$1" 2>/dev/null; then
			return 0
		fi
		sleep 0.1
	done
	return 1
}

# need_tools COMMAND:PACKAGE...: apt-get install the package of each command that is missing (apt-get update
# first only if the install fails: a fresh machine's lists may be empty or stale).
need_tools() {
	local tool need=()
	for tool in "$@"; do
		command -v "${tool%%:*}" >/dev/null || need+=("${tool#*:}")
	done
	[ ${#need[@]} -gt 0 ] || return 0
	export DEBIAN_FRONTEND=noninteractive # no debconf question may wait for an answer
	apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null 2>&1 ||
		{ apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; }
}

# start_upstream: build both binaries from ROOT and start the stub on 127.0.0.1 with TLS; sets UPSTREAM
# (host:port) and writes its certificate to TMP/upstream-ca.pem.
start_upstream() {
	cd "$ROOT"
	go build -o "$TMP/cells-proxy" .
	go build -o "$TMP/stub-upstream" ./cmd/stub-upstream
	"$TMP/stub-upstream" -https 127.0.0.1:0 -write-ca "$TMP/upstream-ca.pem" >"$TMP/stub.out" 2>"$TMP/stub.err" &
	PIDS+=($!)
	UPSTREAM=$(wait_for "$TMP/stub.out" '^listening https ' | awk '{print $3}') ||
		die "stub-upstream did not start: $(cat "$TMP/stub.err")"
	echo "upstream: https://$UPSTREAM"
}

# start_proxy NAME [VAR=VALUE...]: run cells-proxy in front of UPSTREAM, with its dedicated gRPC port and
# the extra variables; its log is TMP/NAME.log. Sets PROXY_PID, MAIN (public port) and GRPC (gRPC port).
start_proxy() {
	local name=$1 attempt line
	shift
	MAIN="" GRPC=""
	# PYDIO_GRPC_EXTERNAL takes a port number, not 0: try a few random ones.
	for attempt in 1 2 3 4 5; do
		GRPC=$((20000 + RANDOM % 40000))
		env -i PATH="$PATH" \
			CELLS_UPSTREAM="https://$UPSTREAM" CELLS_UPSTREAM_CA_FILE="$TMP/upstream-ca.pem" \
			PROXY_HTTPS_ADDR=127.0.0.1:0 PYDIO_GRPC_EXTERNAL=$GRPC PROXY_HTTP_ADDR=off PROXY_HEALTH_ADDR=off \
			PROXY_ACCESS_LOG=false PROXY_LOG_FORMAT=text "$@" \
			"$TMP/cells-proxy" >"$TMP/$name.log" 2>&1 &
		PROXY_PID=$!
		if line=$(wait_for "$TMP/$name.log" 'msg=listening addr=[^ ]+ tls=true'); then
			PIDS+=($PROXY_PID)
			MAIN=$(sed -E 's/.*addr=127\.0\.0\.1:([0-9]+).*/\1/' <<<"$line")
			wait_for "$TMP/$name.log" 'msg=listening addr=[^ ]+ grpc_upstream=' >/dev/null || die "$name: no gRPC listener"
			echo "$name: public port $MAIN, gRPC port $GRPC"
			return 0
		fi
		kill "$PROXY_PID" 2>/dev/null || true
		wait "$PROXY_PID" 2>/dev/null || true
		echo "attempt $attempt: cells-proxy did not start:"
		cat "$TMP/$name.log"
	done
	die "$name: cells-proxy did not start"
}
