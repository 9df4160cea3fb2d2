package proxy

import (
	"strings"
	"testing"
)

// TestHostlessH2: an HTTP/2 request with neither :authority nor a host
// field (RFC 9113 §8.3.1 requires one) is answered 400 and never reaches
// Cells, which would otherwise have got CELLS_UPSTREAM's host in its place
// and built its links with its internal address. A host field without
// :authority names the site as well, and is forwarded with it.
func TestHostlessH2(t *testing.T) {
	t.Parallel()
	rec := &wireRecorder{}
	up := newUpstream(t, upTLS, rec)
	tp := startProxy(t, testConfig(up))

	res := rawH2(t, tp, []string{":method", "GET", ":scheme", "https", ":path", "/a/frontend/bootconf"}, nil)
	if got, want := res.Status, 400; got != want {
		t.Errorf("without :authority and host: status %d, want %d", got, want)
	}
	if got, want := string(res.Body), "cells-proxy: missing Host\n"; got != want {
		t.Errorf("without :authority and host: body %q, want %q", got, want)
	}

	res = rawH2(t, tp, []string{":method", "GET", ":scheme", "https", ":path", "/a/x", "host", "cells.example.com:8443"}, nil)
	if got, want := res.Status, 200; got != want {
		t.Errorf("with host and no :authority: status %d, want %d", got, want)
	}

	quiesce(t, tp, up)
	seen := rec.all()
	if len(seen) != 1 {
		t.Fatalf("Cells saw %d requests, want only the one with a host field: %v", len(seen), seen)
	}
	if got, want := seen[0].RequestURI, "/a/x"; got != want {
		t.Errorf("Cells saw %s, want %s", got, want)
	}
	if got, want := seen[0].Host, "cells.example.com:8443"; got != want {
		t.Errorf("Cells' Host = %q, want the client's %q", got, want)
	}
}

// TestHostlessH1: an HTTP/1.1 request without Host is net/http's to refuse
// (the front hands it over); one with an empty Host reached the handler
// and went to Cells with CELLS_UPSTREAM's host. Both are answered 400, the
// connection closed, and neither is forwarded.
func TestHostlessH1(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ name, raw string }{
		{"no Host", "GET /a/x HTTP/1.1\r\n\r\n"},
		{"empty Host", "GET /a/x HTTP/1.1\r\nHost: \r\n\r\n"},
		{"empty Host on the slow path", "POST /a/x HTTP/1.1\r\nHost:\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			rec := &wireRecorder{}
			up := newUpstream(t, upTLS, rec)
			tp := startProxy(t, testConfig(up))
			got := rawExchange(t, tp, tc.raw)
			quiesce(t, tp, up)
			if len(got.Responses) != 1 {
				t.Fatalf("client got %d responses (%v), want 1", len(got.Responses), got.Err)
			}
			if s := got.Responses[0].StatusCode; s != 400 {
				t.Errorf("status %d, want 400", s)
			}
			if !got.Closed {
				t.Errorf("connection still open after the 400 (read ended with %v)", got.Err)
			}
			if n := len(rec.all()); n != 0 {
				t.Errorf("Cells saw %d requests, want none", n)
			}
		})
	}
}

// TestHostlessH10: HTTP/1.0 has no Host field. Such a request is given
// the first of PROXY_SERVER_NAMES (an IPv6 address in brackets), as nginx
// gives it its server_name; without PROXY_SERVER_NAMES the proxy has no
// name for the site, and it goes with Cells' own address, as before the
// 400 for a request naming no host: what sends HTTP/1.0 without Host
// today is a health check (HAProxy's default option httpchk), which a 400
// would have mark the proxy down.
func TestHostlessH10(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		names    []string
		status   int
		wantHost string // "": not forwarded; "upstream": CELLS_UPSTREAM's host
	}{
		{nil, 200, "upstream"},
		{[]string{"cells.example.com", "files.example.com"}, 200, "cells.example.com"},
		{[]string{"2001:db8::1"}, 200, "[2001:db8::1]"},
	} {
		t.Run(strings.Join(tc.names, ","), func(t *testing.T) {
			t.Parallel()
			rec := &wireRecorder{}
			up := newUpstream(t, upTLS, rec)
			cfg := testConfig(up)
			cfg.ServerNames = tc.names
			tp := startProxy(t, cfg)
			got := rawExchange(t, tp, "GET /a/x HTTP/1.0\r\n\r\n")
			quiesce(t, tp, up)
			if len(got.Responses) != 1 {
				t.Fatalf("client got %d responses (%v), want 1", len(got.Responses), got.Err)
			}
			if s := got.Responses[0].StatusCode; s != tc.status {
				t.Errorf("status %d, want %d", s, tc.status)
			}
			if tc.status == 400 {
				if got, want := got.Bodies[0], "cells-proxy: missing Host\n"; got != want {
					t.Errorf("body %q, want %q", got, want)
				}
			}
			seen := rec.all()
			switch {
			case tc.wantHost == "" && len(seen) != 0:
				t.Errorf("Cells saw %d requests, want none", len(seen))
			case tc.wantHost != "" && len(seen) != 1:
				t.Errorf("Cells saw %d requests, want 1", len(seen))
			case tc.wantHost != "":
				want := tc.wantHost
				if want == "upstream" {
					want = up.URL.Host
				}
				if got := seen[0].Host; got != want {
					t.Errorf("Cells' Host = %q, want %q", got, want)
				}
			}
		})
	}
}

// TestHostlessGRPC: on the gRPC port (PYDIO_GRPC_EXTERNAL), a call without
// :authority gets its refusal as a gRPC status, INTERNAL as gRPC maps a
// 400, in a trailers-only answer, and never reaches Cells' gRPC server.
func TestHostlessGRPC(t *testing.T) {
	t.Parallel()
	e := startGRPC(t, topoTLS, nil)
	addr := e.addr(portDedicated)
	empty := []byte("\x00\x00\x00\x00\x00") // one empty gRPC message
	call := func(authority ...string) []string {
		kv := append([]string{":method", "POST", ":scheme", "https", ":path", "/grpc.testing.TestService/EmptyCall"}, authority...)
		return append(kv, "content-type", "application/grpc", "te", "trailers")
	}

	res := rawH2At(t, e.tp, addr, call(), empty)
	if got, want := res.Status, 200; got != want {
		t.Errorf("without :authority: status %d, want %d", got, want)
	}
	// rawH2At keeps the fields of the first HEADERS only: grpc-status
	// there, and no body, is a trailers-only answer.
	if got, want := res.Header.Get("Grpc-Status"), "13"; got != want {
		t.Errorf("without :authority: grpc-status %q in the first HEADERS, want %q", got, want)
	}
	if got, want := res.Header.Get("Grpc-Message"), "cells-proxy: missing Host"; got != want {
		t.Errorf("without :authority: grpc-message %q, want %q", got, want)
	}
	if len(res.Body) != 0 {
		t.Errorf("without :authority: body %q, want none", res.Body)
	}
	if n := e.grpcReqs.Load(); n != 0 {
		t.Errorf("Cells' gRPC server saw %d calls, want none", n)
	}

	// The same call naming the site goes through.
	res = rawH2At(t, e.tp, addr, call(":authority", addr), empty)
	if res.Status != 200 || string(res.Body) != string(empty) {
		t.Errorf("with :authority: status %d, body %q, want 200 and one empty message", res.Status, res.Body)
	}
	if n := e.grpcReqs.Load(); n != 1 {
		t.Errorf("Cells' gRPC server saw %d calls, want 1", n)
	}
}
