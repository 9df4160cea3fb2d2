#!/usr/bin/env bash
# bench/endurance.sh: does cells-proxy give back what it takes? A long run of every kind of traffic, clients
# that vanish at the worst moments among it, and the proxy's memory, file descriptors and threads sampled
# throughout, then compared at two idle points an identical load apart.
#
#   bench/endurance.sh                       # 60 minutes of load (about 70 minutes in all)
#   ENDURANCE_MINUTES=5 bench/endurance.sh   # a short run
#
# Cells is cmd/stub-upstream with TLS (topology A of docs: gRPC split by content type on the same port);
# cells-proxy, built as it ships, serves the public port and PYDIO_GRPC_EXTERNAL from certificate files. The
# load, each loop bounded by the end time: wrk and h2load small GETs, gRPC unary calls on the public port and
# bidirectional streams on the gRPC port, 32 MiB downloads and uploads over HTTP/1.1 and HTTP/2, websockets
# opened, echoed and closed, new TLS connections (openssl s_time); and the aborts: TCP connections closed
# with no byte, ClientHellos cut short, downloads and chunked uploads the client gives up on mid-body, gRPC
# clients and websocket clients killed (SIGKILL) with their streams and sockets open. Every 10 s a SIGHUP
# reloads the certificate files; every 60 s CELLS_UPSTREAM_CA_FILE changes (the stub's CA alone, or with
# another CA after it), which renews the proxy's transport to Cells.
#
# Timeline: 3 minutes of the load (pools, caches and the heap reach their working size), then 150 s idle
# (idle point 1), then ENDURANCE_MINUTES of the same load, then 150 s idle again (idle point 2). The idle
# pauses outlast the keep-alive timeouts and the Go runtime's forced collection every 2 minutes, so the heap
# figure of each idle point comes from a collection made with nothing in flight (GODEBUG=gctrace=1; the
# runtime prints heap sizes in whole MB). At the end the proxy gets SIGQUIT, and its goroutines are counted
# from the dump.
#
# Prints a sample every 30 s (VmRSS, RssAnon, the live heap after the last collection, open file descriptors,
# threads, CPU seconds), the two idle points side by side, and the goroutines at the end by where they wait.
# Fails (exit 1) if at idle point 2 the live heap is more than 2 MB above idle point 1's, or the open file
# descriptors more than 8 above, or more than 64 goroutines remain: a leak of a connection's state per aborted
# client would pass those bounds within minutes (tens of thousands of aborts an hour, tens of KiB each).
# Linux only (it reads /proc). Everything runs on 127.0.0.1.
set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PATH=/usr/local/go/bin:$PATH
MINUTES=${ENDURANCE_MINUTES:-60}
WARM=${ENDURANCE_WARM_SECONDS:-180}
IDLE=${ENDURANCE_IDLE_SECONDS:-150}

# shellcheck source=ci/lib.sh
source "$ROOT/ci/lib.sh"
die() {
	printf 'FAIL: %s\n' "$*"
	exit 1
}

step "tools"
need_tools wrk:wrk h2load:nghttp2-client curl:curl openssl:openssl
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

step "build and start"
start_upstream
cd "$ROOT"
CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o "$TMP/cells-proxy" .
go build -o "$TMP/grpcload" ./bench/grpcload
go build -o "$TMP/wsload" ./bench/wsload
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 -subj /CN=127.0.0.1 \
	-addext subjectAltName=IP:127.0.0.1 -keyout "$TMP/key.pem" -out "$TMP/cert.pem" >/dev/null 2>&1
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 -subj /CN=other-ca \
	-keyout "$TMP/other.key" -out "$TMP/other-ca.pem" >/dev/null 2>&1
cp "$TMP/upstream-ca.pem" "$TMP/ca-alone.pem"
cat "$TMP/upstream-ca.pem" "$TMP/other-ca.pem" >"$TMP/ca-both.pem"
cp "$TMP/ca-alone.pem" "$TMP/ca.pem"
head -c $((32 << 20)) /dev/urandom >"$TMP/up.bin"

start_proxy endurance TLS_CERT_FILE="$TMP/cert.pem" TLS_KEY_FILE="$TMP/key.pem" \
	CELLS_UPSTREAM_CA_FILE="$TMP/ca.pem" GODEBUG=gctrace=1 GOTRACEBACK=all
LOG=$TMP/endurance.log
URL=https://127.0.0.1:$MAIN
PID=$PROXY_PID
echo "cells-proxy pid $PID, $(stat -c %s "$TMP/cells-proxy") bytes"

# sample: one line of figures; the live heap is the middle figure of gctrace's "a->b->c MB".
sample() {
	local rss anon fds threads cpu heap
	rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$PID/status")
	anon=$(awk '/^RssAnon:/ {print $2}' "/proc/$PID/status")
	threads=$(awk '/^Threads:/ {print $2}' "/proc/$PID/status")
	fds=$(find "/proc/$PID/fd" -mindepth 1 -maxdepth 1 | wc -l)
	cpu=$(awk '{printf "%.1f", ($14 + $15) / 100}' "/proc/$PID/stat")
	heap=$(grep -E '^gc [0-9]+ ' "$LOG" | tail -n 1 | sed -E 's/.* ([0-9]+)->([0-9]+)->([0-9]+) MB.*/\3/' || true)
	printf '%s %s %s %s %s %s\n' "$rss" "$anon" "${heap:-?}" "$fds" "$threads" "$cpu"
}
gcs() { grep -cE '^gc [0-9]+ ' "$LOG" || true; }

# load SECONDS: every kind of traffic and of abort until SECONDS from now, sampled every 30 s.
load() {
	local end=$((SECONDS + $1)) start=$SECONDS pids=() n
	(while [ $SECONDS -lt $end ]; do wrk -t1 -c16 -d5s --timeout 10s "$URL/small" >/dev/null 2>&1 || sleep 1; done) &
	pids+=($!)
	(while [ $SECONDS -lt $end ]; do h2load -c4 -m16 -D5 "$URL/small" >/dev/null 2>&1 || sleep 1; done) &
	pids+=($!)
	(while [ $SECONDS -lt $end ]; do
		"$TMP/grpcload" -addr "127.0.0.1:$MAIN" -mode unary -conc 8 -duration 4s >/dev/null 2>&1 || true
		"$TMP/grpcload" -addr "127.0.0.1:$GRPC" -mode bidi -streams 4 -duration 4s >/dev/null 2>&1 || true
	done) &
	pids+=($!)
	(while [ $SECONDS -lt $end ]; do
		for proto in --http1.1 --http2; do
			curl -sk "$proto" -o /dev/null --max-time 60 "$URL/bytes/$((32 << 20))" || true
			curl -sk "$proto" -o /dev/null -T "$TMP/up.bin" --max-time 60 "$URL/upload" || true
		done
	done) &
	pids+=($!)
	(while [ $SECONDS -lt $end ]; do
		"$TMP/wsload" -url "wss://127.0.0.1:$MAIN/ws/event" -n 100 -settle 1s -rounds 3 -timeout 30s >/dev/null 2>&1 || true
	done) &
	pids+=($!)
	(while [ $SECONDS -lt $end ]; do openssl s_time -connect "127.0.0.1:$MAIN" -new -time 3 -www /small >/dev/null 2>&1 || sleep 1; done) &
	pids+=($!)
	# The aborts.
	(while [ $SECONDS -lt $end ]; do
		for port in "$MAIN" "$GRPC"; do
			# A TCP connection closed with no byte, and a ClientHello cut short.
			(exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || true
			(exec 3<>"/dev/tcp/127.0.0.1/$port" && printf '\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03' >&3) 2>/dev/null || true
		done
		for proto in --http1.1 --http2; do
			# Given up on mid-body: a download, a chunked upload, an upload with a length.
			curl -sk "$proto" -o /dev/null --max-time 0.3 "$URL/bytes/$((1 << 30))" || true
			head -c $((1 << 30)) /dev/zero | curl -sk "$proto" -o /dev/null --max-time 0.3 -T - "$URL/upload" || true
			curl -sk "$proto" -o /dev/null --max-time 1 --limit-rate 1M -T "$TMP/up.bin" "$URL/upload" || true
		done
		# Clients that die with their streams and sockets open.
		timeout -s KILL 1 "$TMP/grpcload" -addr "127.0.0.1:$GRPC" -mode bidi -streams 4 -duration 10s >/dev/null 2>&1 || true
		timeout -s KILL 1 "$TMP/grpcload" -addr "127.0.0.1:$MAIN" -mode unary -conc 8 -duration 10s >/dev/null 2>&1 || true
		timeout -s KILL 2 "$TMP/wsload" -url "wss://127.0.0.1:$MAIN/ws/event" -n 50 -settle 10s -timeout 30s >/dev/null 2>&1 || true
		echo >>"$TMP/abort-rounds"
	done) 2>/dev/null &
	pids+=($!)
	# Reloads: the certificate files every 10 s, the CA file every 60 s.
	(n=0; while [ $SECONDS -lt $end ]; do
		sleep 10
		kill -HUP "$PID"
		n=$((n + 1))
		if [ $((n % 6)) = 0 ]; then
			if [ $((n % 12)) = 0 ]; then src=ca-alone; else src=ca-both; fi
			cp "$TMP/$src.pem" "$TMP/ca.pem.new" && mv "$TMP/ca.pem.new" "$TMP/ca.pem"
		fi
	done) &
	pids+=($!)
	PIDS+=("${pids[@]}")
	while [ $SECONDS -lt $end ]; do
		sleep 30
		kill -0 "$PID" 2>/dev/null || die "cells-proxy is gone: $(tail -n 20 "$LOG")"
		printf '%7s  %s\n' "$((SECONDS - start))" "$(sample)"
	done
	for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
}

# idle: wait IDLE seconds with no traffic, and until the runtime has collected once with nothing in flight.
idle() {
	local before
	sleep 20
	before=$(gcs)
	sleep $((IDLE - 20))
	local i
	for i in $(seq 60); do
		[ "$(gcs)" -gt "$before" ] && break
		sleep 5
	done
	sample
}

cols="      s  VmRSS_KiB RssAnon_KiB live_heap_MB fds threads cpu_s"
step "warm-up: ${WARM}s of load"
echo "$cols"
load "$WARM"
step "idle point 1 (${IDLE}s idle)"
idle1=$(idle)
echo "$idle1"
step "load: $MINUTES minutes"
echo "$cols"
load $((MINUTES * 60))
step "idle point 2 (${IDLE}s idle)"
idle2=$(idle)
echo "$idle2"

step "goroutines at idle point 2 (SIGQUIT)"
kill -QUIT "$PID"
wait "$PID" 2>/dev/null || true
# Each goroutine of the proxy's (runtime's own left out) by where it waits: its first frame outside the
# runtime, sync and internal packages. The dump's blocks are separated by blank lines.
awk -v RS= '/^goroutine [0-9]+ / {
	n = split($0, l, "\n")
	for (i = 2; i <= n; i++) {
		if (l[i] ~ /^\t/ || l[i] ~ /^(runtime\.|internal\/|sync\.|created by)/) continue
		sub(/\([^(]*\)$/, "", l[i]); print l[i]; break
	}
}' "$LOG" | sort | uniq -c | sort -rn >"$TMP/goroutines"
goroutines=$(awk '{n += $1} END {print n + 0}' "$TMP/goroutines")
cat "$TMP/goroutines"
if grep -qE '^(panic|fatal error)' "$LOG"; then die "the proxy panicked: $(grep -m1 -A20 -E '^(panic|fatal error)' "$LOG")"; fi

step "verdict"
read -r rss1 anon1 heap1 fds1 thr1 _ <<<"$idle1"
read -r rss2 anon2 heap2 fds2 thr2 cpu2 <<<"$idle2"
printf '| | idle point 1 | idle point 2 (after %s minutes) |\n|---|---:|---:|\n' "$MINUTES"
printf '| VmRSS, KiB | %s | %s |\n| RssAnon, KiB | %s | %s |\n| live heap, MB | %s | %s |\n' "$rss1" "$rss2" "$anon1" "$anon2" "$heap1" "$heap2"
printf '| open file descriptors | %s | %s |\n| threads | %s | %s |\n' "$fds1" "$fds2" "$thr1" "$thr2"
echo "proxy CPU: $cpu2 s in all; goroutines at idle point 2: $goroutines; collections: $(gcs)"
echo "rounds of aborts: $(wc -l <"$TMP/abort-rounds") (each: 2 connections closed with no byte, 2 ClientHellos cut" \
	"short, 6 transfers given up on, 2 gRPC clients and 50 websockets killed)"
fail=0
[ "$heap1" != "?" ] && [ "$heap2" != "?" ] || { echo "no collection seen at an idle point"; fail=1; }
[ "$fail" = 1 ] || [ "$heap2" -le $((heap1 + 2)) ] || { echo "live heap grew from $heap1 to $heap2 MB"; fail=1; }
[ "$fds2" -le $((fds1 + 8)) ] || { echo "open file descriptors grew from $fds1 to $fds2"; fail=1; }
[ "$goroutines" -le 64 ] || { echo "$goroutines goroutines at idle"; fail=1; }
[ "$fail" = 0 ] || die "cells-proxy kept what it should have given back"
echo "endurance: ok"
