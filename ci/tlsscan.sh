#!/usr/bin/env bash
# ci/tlsscan.sh: scan cells-proxy's TLS listeners with sslscan, as an outside client would.
#
#   bash ci/tlsscan.sh
#
# Installs sslscan (Debian package) if missing, builds cells-proxy and cmd/stub-upstream, and runs the binary
# on 127.0.0.1 with the dedicated gRPC port on, twice: with its self-signed ECDSA certificate, and with an RSA
# certificate from TLS_CERT_FILE (only with RSA can a client even ask for ECDHE_RSA and static-RSA suites).
# On both ports of both runs it fails if sslscan finds any protocol below TLS 1.2, or any accepted suite that
# is not ECDHE with AES-GCM or ChaCha20-Poly1305 (TLS 1.2) or one of the three TLS 1.3 suites: so no CBC, RC4,
# 3DES, NULL, export, anonymous or non-forward-secret suite. It also checks, end to end on the binary,
# PROXY_HSTS=auto (header with TLS_CERT_FILE, none with the self-signed certificate) and the certificate
# reload: SIGHUP serves a renewed pair at once and refuses a broken one, keeping the old.
#
# Prints PASS/FAIL lines and a closing "N passed, N failed" line; exits non-zero on any failure. ~20 s.
set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PATH=/usr/local/go/bin:$PATH

passed=0
failed=0
pass() {
	passed=$((passed + 1))
	printf 'PASS: %s\n' "$*"
}
fail() {
	failed=$((failed + 1))
	printf 'FAIL: %s\n' "$*"
}
die() {
	fail "$*"
	exit 1
}

# shellcheck source=ci/lib.sh
source "$ROOT/ci/lib.sh"

step "tools"
if ! command -v sslscan >/dev/null; then
	export DEBIAN_FRONTEND=noninteractive
	apt-get install -y -qq sslscan >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq sslscan >/dev/null; }
fi
sslscan --version | sed 's/\x1b\[[0-9;]*m//g; s/^[[:space:]]*//' | grep -v '^$'
# sslscan offers what the local OpenSSL knows; say which weak suites that covers.
weak=$(openssl ciphers 'ALL:COMPLEMENTOFALL:@SECLEVEL=0' 2>/dev/null | tr ':' '\n' | grep -Ec 'CBC|RC4|DES|NULL|EXP|ADH|AECDH|^AES|^CAMELLIA|^SEED|^IDEA' || true)
echo "local OpenSSL can offer $weak weak suites (CBC, RC4, 3DES, NULL, anonymous, static RSA) for the scan"

step "build cells-proxy and stub-upstream"
start_upstream

# rsa_pair DIR: a self-signed RSA 2048 certificate for 127.0.0.1 in DIR/cert.pem and DIR/key.pem.
rsa_pair() {
	mkdir -p "$1"
	openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=cells-proxy tlsscan" \
		-addext "subjectAltName=IP:127.0.0.1,DNS:localhost" \
		-keyout "$1/key.pem" -out "$1/cert.pem" 2>/dev/null
}

# stop NAME: SIGTERM, and the process must exit 0.
stop() {
	local status=0
	kill -TERM "$PROXY_PID"
	wait "$PROXY_PID" || status=$?
	if [ "$status" -eq 0 ]; then pass "$1: exits 0 on SIGTERM"; else fail "$1: exit status $status on SIGTERM"; fi
}

# scan WHAT PORT KEY: sslscan 127.0.0.1:PORT and check protocols and suites; KEY is ECDSA or RSA.
scan() {
	local what=$1 port=$2 key=$3 xml="$TMP/scan-$1-$2.xml" v bad=0 line ver name
	if ! sslscan --no-colour --xml="$xml" "127.0.0.1:$port" >"$TMP/scan-$what-$port.txt" 2>&1; then
		cat "$TMP/scan-$what-$port.txt"
		fail "$what: sslscan 127.0.0.1:$port failed"
		return
	fi
	for v in ssl:2 ssl:3 tls:1.0 tls:1.1; do
		if ! grep -q "<protocol type=\"${v%%:*}\" version=\"${v#*:}\" enabled=\"0\"" "$xml"; then
			fail "$what: ${v%%:*} ${v#*:} not refused: $(grep "<protocol type=\"${v%%:*}\" version=\"${v#*:}\"" "$xml")"
			bad=1
		fi
	done
	for v in 1.2 1.3; do
		grep -q "<protocol type=\"tls\" version=\"$v\" enabled=\"1\"" "$xml" || {
			fail "$what: TLS $v not offered"
			bad=1
		}
	done
	local suites
	suites=$(sed -nE 's/.*<cipher status="(accepted|preferred)" sslversion="([^"]+)".* cipher="([^"]+)".*/\2 \3/p' "$xml")
	[ -n "$suites" ] || {
		fail "$what: sslscan found no suite at all"
		bad=1
	}
	while read -r ver name; do
		[ -n "$ver" ] || continue
		case "$ver $name" in
		"TLSv1.3 TLS_AES_128_GCM_SHA256" | "TLSv1.3 TLS_AES_256_GCM_SHA384" | "TLSv1.3 TLS_CHACHA20_POLY1305_SHA256") ;;
		"TLSv1.2 ECDHE-$key-AES128-GCM-SHA256" | "TLSv1.2 ECDHE-$key-AES256-GCM-SHA384" | "TLSv1.2 ECDHE-$key-CHACHA20-POLY1305") ;;
		*)
			fail "$what: weak or unexpected suite accepted: $ver $name"
			bad=1
			;;
		esac
	done <<<"$suites"
	for name in "ECDHE-$key-AES128-GCM-SHA256" "ECDHE-$key-AES256-GCM-SHA384" "ECDHE-$key-CHACHA20-POLY1305"; do
		grep -q " $name\$" <<<"$suites" || {
			fail "$what: $name not accepted"
			bad=1
		}
	done
	grep -q '<renegotiation supported="0"' "$xml" || {
		fail "$what: renegotiation supported"
		bad=1
	}
	if grep -q 'vulnerable="1"' "$xml"; then
		fail "$what: sslscan reports a vulnerability: $(grep 'vulnerable="1"' "$xml")"
		bad=1
	fi
	if [ "$bad" -eq 0 ]; then
		pass "$what (127.0.0.1:$port): TLS 1.2 and 1.3 only; suites: $(awk '{print $2}' <<<"$suites" | paste -sd' ')"
	fi
}

# serial PORT: the serial of the certificate a new handshake on PORT gets.
serial() {
	openssl s_client -connect "127.0.0.1:$1" -servername localhost </dev/null 2>/dev/null | openssl x509 -noout -serial 2>/dev/null | cut -d= -f2
}

# hsts PORT: the Strict-Transport-Security header of a response on PORT, or nothing.
hsts() {
	curl -sk --max-time 10 -o /dev/null -D - "https://127.0.0.1:$1/a/frontend/bootconf" | tr -d '\r' |
		sed -n 's/^[Ss]trict-[Tt]ransport-[Ss]ecurity: //p'
}

step "self-signed ECDSA certificate"
start_proxy selfsigned
scan "self-signed, public port" "$MAIN" ECDSA
scan "self-signed, gRPC port" "$GRPC" ECDSA
got=$(hsts "$MAIN")
if [ -z "$got" ]; then pass "PROXY_HSTS=auto, self-signed: no Strict-Transport-Security"; else fail "PROXY_HSTS=auto, self-signed: Strict-Transport-Security: $got, want none"; fi
stop selfsigned

step "RSA certificate from TLS_CERT_FILE"
rsa_pair "$TMP/a"
rsa_pair "$TMP/b"
mkdir -p "$TMP/live"
cp "$TMP/a/cert.pem" "$TMP/a/key.pem" "$TMP/live/"
start_proxy rsa TLS_CERT_FILE="$TMP/live/cert.pem" TLS_KEY_FILE="$TMP/live/key.pem"
scan "RSA, public port" "$MAIN" RSA
scan "RSA, gRPC port" "$GRPC" RSA
got=$(hsts "$MAIN")
if [ "$got" = "max-age=31536000" ]; then pass "PROXY_HSTS=auto, TLS_CERT_FILE: Strict-Transport-Security: $got"; else fail "PROXY_HSTS=auto, TLS_CERT_FILE: Strict-Transport-Security: '$got', want max-age=31536000"; fi

step "certificate reload on SIGHUP"
want_a=$(openssl x509 -noout -serial -in "$TMP/a/cert.pem" | cut -d= -f2)
want_b=$(openssl x509 -noout -serial -in "$TMP/b/cert.pem" | cut -d= -f2)
[ "$(serial "$MAIN")" = "$want_a" ] || fail "before the renewal: serial $(serial "$MAIN"), want $want_a"
cp "$TMP/b/cert.pem" "$TMP/b/key.pem" "$TMP/live/"
kill -HUP "$PROXY_PID"
if wait_for "$TMP/rsa.log" 'msg="TLS certificate reloaded" trigger=reload' >/dev/null; then
	got_main=$(serial "$MAIN") got_grpc=$(serial "$GRPC")
	if [ "$got_main" = "$want_b" ] && [ "$got_grpc" = "$want_b" ]; then
		pass "SIGHUP: both ports serve the renewed certificate (serial $want_b)"
	else
		fail "SIGHUP: serials $got_main (public), $got_grpc (gRPC), want $want_b"
	fi
else
	fail "SIGHUP: no \"TLS certificate reloaded trigger=reload\" in the log"
fi
echo "not a certificate" >"$TMP/live/cert.pem"
kill -HUP "$PROXY_PID"
if line=$(wait_for "$TMP/rsa.log" 'TLS certificate not reloaded.*TLS_CERT_FILE'); then
	if [ "$(serial "$MAIN")" = "$want_b" ] && kill -0 "$PROXY_PID"; then
		pass "SIGHUP with a broken pair: refused, logged, the current certificate keeps serving: ${line:0:160}"
	else
		fail "SIGHUP with a broken pair: serial $(serial "$MAIN"), want $want_b still"
	fi
else
	fail "SIGHUP with a broken pair: no error naming TLS_CERT_FILE in the log"
fi
stop rsa

echo
echo "$passed passed, $failed failed"
if [ "$failed" -ne 0 ]; then
	for f in "$TMP"/*.log; do
		echo "--- $f"
		cat "$f"
	done
	exit 1
fi
