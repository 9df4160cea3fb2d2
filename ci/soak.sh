#!/usr/bin/env bash
# ci/soak.sh: cells-proxy built with the race detector, under every kind of traffic at once, reloaded and
# stopped while the traffic runs.
#
#   bash ci/soak.sh            # SOAK_SECONDS=30 of load for each of Cells' two topologies
#
# Builds cells-proxy with -race, cmd/stub-upstream, bench/grpcload and bench/wsload. For each topology of
# docs/cells-behaviour.md, a stub as Cells (A: one TLS port, gRPC split by content type; B: plain HTTP and
# cleartext HTTP/2 gRPC) and cells-proxy in front of it on 127.0.0.1 (its own certificate files, the
# dedicated gRPC port, the access log on), then runs together, each in a loop bounded in time: wrk (HTTP/1.1) and h2load
# (HTTP/2) small GETs, gRPC unary calls on the public port and bidirectional streams on the gRPC port,
# 32 MiB downloads and uploads over HTTP/1.1 and HTTP/2 (and HTTP/2 downloads the client gives up on
# after a second), 100 websockets with echoes, and openssl s_time (a new TLS connection each). Meanwhile it
# sends SIGHUP every two seconds and, halfway, replaces the certificate files. It then sends SIGTERM while
# the load still runs.
#
# Fails on: a data race or a panic in the proxy; an upload whose byte count at Cells is not the file's, or
# a download cut short, before SIGTERM; a failed gRPC call or stream, or a websocket that failed to open or
# echo, before SIGTERM; the new certificate not served after the swap; an exit status other than 0, or
# a stop that takes longer than PROXY_SHUTDOWN_TIMEOUT allows; no traffic of some kind in the access log.
# About two minutes with the builds.
set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PATH=/usr/local/go/bin:$PATH
SECS=${SOAK_SECONDS:-30}

# shellcheck source=ci/lib.sh
source "$ROOT/ci/lib.sh"
die() {
	printf 'FAIL: %s\n' "$*"
	if [ -n "${LOG:-}" ] && [ -f "$LOG" ]; then
		echo "--- last lines of the proxy's log"
		tail -n 40 "$LOG"
	fi
	exit 1
}

step "tools"
need_tools wrk:wrk h2load:nghttp2-client curl:curl openssl:openssl

step "build (cells-proxy with -race) and start"
start_upstream
cd "$ROOT"
go build -race -o "$TMP/cells-proxy" .
go build -o "$TMP/grpcload" ./bench/grpcload
go build -o "$TMP/wsload" ./bench/wsload
for n in a b; do
	openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=127.0.0.1 \
		-addext subjectAltName=IP:127.0.0.1 -keyout "$TMP/$n.key" -out "$TMP/$n.crt" >/dev/null 2>&1
done
head -c $((32 << 20)) /dev/urandom >"$TMP/up.bin"

# soak NAME [VAR=VALUE...]: one run against a proxy started with the variables given.
soak() {
	local name=$1
	shift
	cp "$TMP/a.crt" "$TMP/cert.pem"
	cp "$TMP/a.key" "$TMP/key.pem"
	rm -f "$TMP/swapped" "$TMP/stopping"
	step "$name: start"
	start_proxy "$name" TLS_CERT_FILE="$TMP/cert.pem" TLS_KEY_FILE="$TMP/key.pem" PROXY_ACCESS_LOG=true \
		PROXY_SHUTDOWN_TIMEOUT=10s "$@"
	LOG=$TMP/$name.log
	URL=https://127.0.0.1:$MAIN
	R=$TMP/$name-results
	mkdir -p "$R"

	# Each worker loops until END and writes what it saw under R; a line written after the
	# stop began (TMP/stopping exists) is not judged.
	END=$((SECONDS + SECS + 20))
	judged() { [ ! -e "$TMP/stopping" ]; }
	loads=()
	(while [ $SECONDS -lt $END ]; do wrk -t1 -c16 -d5s --timeout 10s "$URL/small" >/dev/null 2>&1 || sleep 1; done) &
	loads+=($!)
	(while [ $SECONDS -lt $END ]; do h2load -c4 -m16 -D5 "$URL/small" >/dev/null 2>&1 || sleep 1; done) &
	loads+=($!)
	(while [ $SECONDS -lt $END ]; do
		out=$("$TMP/grpcload" -addr "127.0.0.1:$MAIN" -mode unary -conc 8 -duration 4s 2>&1 || true)
		judged && echo "unary $out" >>"$R/grpc"
		out=$("$TMP/grpcload" -addr "127.0.0.1:$GRPC" -mode bidi -streams 4 -duration 4s 2>&1 || true)
		judged && echo "bidi $out" >>"$R/grpc"
	done) &
	loads+=($!)
	(while [ $SECONDS -lt $END ]; do
		for proto in --http1.1 --http2; do
			got=$(curl -sk "$proto" -o /dev/null -w '%{size_download}' --max-time 60 "$URL/bytes/$((32 << 20))" || true)
			judged && echo "download $proto $got" >>"$R/transfers"
			got=$(curl -sk "$proto" -T "$TMP/up.bin" --max-time 60 "$URL/upload" || true)
			judged && echo "upload $proto $got" >>"$R/transfers"
		done
		curl -sk --http2 -o /dev/null --max-time 1 "$URL/bytes/$((32 << 20))" || true
	done) &
	loads+=($!)
	(while [ $SECONDS -lt $END ]; do
		out=$("$TMP/wsload" -url "wss://127.0.0.1:$MAIN/ws/event" -n 100 -settle 1s -rounds 3 -timeout 30s 2>&1 || true)
		judged && echo "$out" >>"$R/ws"
	done) &
	loads+=($!)
	(while [ $SECONDS -lt $END ]; do openssl s_time -connect "127.0.0.1:$MAIN" -new -time 3 -www /small >/dev/null 2>&1 || sleep 1; done) &
	loads+=($!)
	PIDS+=("${loads[@]}")

	step "$name: load for ${SECS}s, SIGHUP every 2 s, the certificate replaced halfway"
	start=$SECONDS
	while [ $((SECONDS - start)) -lt "$SECS" ]; do
		sleep 2
		kill -HUP "$PROXY_PID"
		if [ $((SECONDS - start)) -ge $((SECS / 2)) ] && [ ! -e "$TMP/swapped" ]; then
			cp "$TMP/b.key" "$TMP/key.pem.new"
			cp "$TMP/b.crt" "$TMP/cert.pem.new"
			mv "$TMP/key.pem.new" "$TMP/key.pem"
			mv "$TMP/cert.pem.new" "$TMP/cert.pem"
			touch "$TMP/swapped"
		fi
	done
	kill -HUP "$PROXY_PID"
	sleep 1
	served=$(openssl s_client -connect "127.0.0.1:$MAIN" </dev/null 2>/dev/null | openssl x509 -noout -fingerprint -sha256 || true)
	want=$(openssl x509 -in "$TMP/b.crt" -noout -fingerprint -sha256)

	step "$name: SIGTERM under load"
	touch "$TMP/stopping"
	t0=$(date +%s%N)
	kill -TERM "$PROXY_PID"
	rc=0
	wait "$PROXY_PID" || rc=$?
	took=$((($(date +%s%N) - t0) / 1000000))
	for pid in "${loads[@]}"; do kill "$pid" 2>/dev/null || true; done
	echo "exit status $rc after ${took} ms"

	step "$name: checks"
	races=$(grep -c 'WARNING: DATA RACE' "$LOG" || true)
	[ "$races" = 0 ] || { grep -A40 -m3 'WARNING: DATA RACE' "$LOG"; die "$races data race(s)"; }
	! grep -Eq '^(panic|fatal error)' "$LOG" || die "the proxy panicked"
	[ "$rc" = 0 ] || die "exit status $rc after SIGTERM"
	# PROXY_SHUTDOWN_TIMEOUT=10s, and the connections' last writes after it.
	[ "$took" -lt 15000 ] || die "stopping took ${took} ms"
	[ -n "$served" ] && [ "$served" = "$want" ] || die "after the swap the proxy serves ${served:-nothing}, want $want"
	reloads=$(grep -c 'msg="TLS certificate reloaded"' "$LOG" || true)
	[ "$reloads" -ge 1 ] || die "no certificate reload logged"
	echo "certificate reloads logged: $reloads; served after the swap: ${served#*=}"

	size=$((32 << 20))
	transfers=$(wc -l <"$R/transfers")
	bad=$(awk -v n=$size '$1 == "download" && $3 != n { print } $1 == "upload" && $3 != "{\"bytes\":" n "}" { print }' "$R/transfers")
	[ -z "$bad" ] || die "transfers that lost bytes: $bad"
	[ "$transfers" -ge 2 ] || die "only $transfers transfers completed"
	echo "transfers: $transfers, every byte counted"

	calls=$(grep -c . "$R/grpc")
	bad=$(grep -v '"failed":0,' "$R/grpc" || true)
	[ -z "$bad" ] || die "gRPC failures: $bad"
	[ "$calls" -ge 2 ] || die "only $calls gRPC runs completed"
	echo "gRPC runs: $calls, no failed call or stream"

	runs=$(grep -c . "$R/ws")
	bad=$(grep -v '"failed":0,' "$R/ws" | head -3 || true)
	bad+=$(grep -v '"rtt_failed":0,' "$R/ws" | head -3 || true)
	[ -z "$bad" ] || die "websocket failures: $bad"
	[ "$runs" -ge 1 ] || die "no websocket run completed"
	echo "websocket runs: $runs, every socket opened and echoed"

	for proto in h1 h2 grpc ws; do
		n=$(grep -c "msg=request proto=$proto " "$LOG" || true)
		[ "$n" -gt 0 ] || die "no $proto request in the access log"
		echo "access log: $n $proto requests"
	done
	echo "$name: ok"
}

soak tls-upstream
# Topology B: Cells' main port in plain HTTP, its gRPC port in cleartext HTTP/2.
"$TMP/stub-upstream" -http 127.0.0.1:0 -h2c 127.0.0.1:0 >"$TMP/stub-b.out" 2>"$TMP/stub-b.err" &
PIDS+=($!)
plain=$(wait_for "$TMP/stub-b.out" '^listening http ' | awk '{print $3}') || die "plain stub did not start"
h2c=$(wait_for "$TMP/stub-b.out" '^listening h2c ' | awk '{print $3}') || die "h2c stub did not start"
soak plain-upstream CELLS_UPSTREAM="http://$plain" CELLS_GRPC_UPSTREAM="h2c://$h2c"
echo "soak: ok"
