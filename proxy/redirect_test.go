package proxy

import (
	"bufio"
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cells-proxy/cells-proxy/internal/testport"
)

// rawPlain sends raw, one complete HTTP/1.x request, to the redirect
// listener over plain TCP and reads one response.
func rawPlain(t testing.TB, tp *testProxy, raw string) *http.Response {
	t.Helper()
	conn, err := net.Dial("tcp", tp.RedirectAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	res := rawResponse(t, conn, raw)
	io.Copy(io.Discard, res.Body)
	res.Body.Close()
	return res
}

// TestRedirect checks the plain listener: 301 to https on the same host
// for GET and HEAD, 308 for the other methods, the configured public port
// (443 left out), the request-target kept byte for byte, IPv6 hosts
// bracketed; Cells is never contacted.
func TestRedirect(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		port   int
		method string
		target string
		host   string
		want   string
	}{
		{"encoded slash and query", 443, "GET", "/a/meta/bulk/path%2Fto%2Ffolder?pydio_jwt=x.y&a=%20;b", "cells.example.com",
			"https://cells.example.com/a/meta/bulk/path%2Fto%2Ffolder?pydio_jwt=x.y&a=%20;b"},
		{"host port dropped", 443, "GET", "/", "cells.example.com:80", "https://cells.example.com/"},
		{"redirect port", 8443, "GET", "/dav/a%20b/?x=1", "cells.example.com:8080", "https://cells.example.com:8443/dav/a%20b/?x=1"},
		{"IPv6", 443, "GET", "/x", "[2001:db8::1]:80", "https://[2001:db8::1]/x"},
		{"IPv6 redirect port", 8443, "GET", "/x", "[2001:db8::1]", "https://[2001:db8::1]:8443/x"},
		{"IPv4", 8443, "GET", "/x", "192.0.2.10:8080", "https://192.0.2.10:8443/x"},
		{"double slashes", 443, "GET", "//a//b/../c", "cells.example.com", "https://cells.example.com//a//b/../c"},
		{"raw UTF-8", 443, "GET", "/io/caf\xc3\xa9", "cells.example.com", "https://cells.example.com/io/caf\xc3\xa9"},
		{"empty query", 443, "GET", "/a/f?", "cells.example.com", "https://cells.example.com/a/f?"},
		{"absolute form", 443, "GET", "http://cells.example.com/x%2Fy?q=1", "cells.example.com", "https://cells.example.com/x%2Fy?q=1"},
		{"HEAD", 443, "HEAD", "/io/f", "cells.example.com", "https://cells.example.com/io/f"},
		{"PUT", 443, "PUT", "/io/f?partNumber=1", "cells.example.com", "https://cells.example.com/io/f?partNumber=1"},
		{"POST", 443, "POST", "/a/tree/create", "cells.example.com", "https://cells.example.com/a/tree/create"},
		{"DELETE", 8443, "DELETE", "/io/f", "cells.example.com", "https://cells.example.com:8443/io/f"},
		{"PROPFIND", 443, "PROPFIND", "/dav/", "cells.example.com", "https://cells.example.com/dav/"},
		{"OPTIONS", 443, "OPTIONS", "/a/frontend/state", "cells.example.com", "https://cells.example.com/a/frontend/state"},
	}
	rec := &recorder{}
	up := newUpstream(t, upTLS, rec)
	proxies := make(map[int]*testProxy)
	for _, port := range []int{443, 8443} {
		cfg := testConfig(up)
		cfg.RedirectPort = port
		proxies[port] = startProxy(t, cfg)
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			raw := tt.method + " " + tt.target + " HTTP/1.1\r\nHost: " + tt.host + "\r\n"
			if tt.method == "PUT" || tt.method == "POST" {
				raw += "Content-Length: 0\r\n"
			}
			res := rawPlain(t, proxies[tt.port], raw+"\r\n")
			want := http.StatusPermanentRedirect
			if tt.method == "GET" || tt.method == "HEAD" {
				want = http.StatusMovedPermanently
			}
			if got := res.StatusCode; got != want {
				t.Errorf("status = %d, want %d", got, want)
			}
			if got := res.Header.Get("Location"); got != tt.want {
				t.Errorf("Location = %q, want %q", got, tt.want)
			}
		})
	}
	if n := rec.count(); n != 0 {
		t.Errorf("upstream saw %d requests, want 0", n)
	}
}

// TestRedirectKeepsUploads: clients that follow redirects, as an S3 or
// WebDAV client set to http:// by mistake does, send their upload again to
// https with its method and body, and it reaches Cells whole. With a 301
// Go's http.Client (as curl -L and browsers) sent a GET without the body:
// the upload was dropped and the client saw no error.
func TestRedirectKeepsUploads(t *testing.T) {
	t.Parallel()
	rec := &recorder{}
	cfg := testConfig(newUpstream(t, upTLS, rec))
	tp := startProxy(t, cfg)
	// Location says https://127.0.0.1/…; port 443 leads to the proxy's
	// public listener, every other address to the redirect listener.
	dialer := &net.Dialer{}
	tr := &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: tp.Roots},
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			if strings.HasSuffix(addr, ":443") {
				return dialer.DialContext(ctx, network, tp.Addr().String())
			}
			return dialer.DialContext(ctx, network, tp.RedirectAddr().String())
		},
	}
	defer tr.CloseIdleConnections()
	var hops []int
	client := &http.Client{Transport: tr, CheckRedirect: func(req *http.Request, via []*http.Request) error {
		hops = append(hops, req.Response.StatusCode)
		return nil
	}}
	body := strings.Repeat("upload-", 10000)
	for _, method := range []string{"PUT", "POST", "PATCH"} {
		hops = hops[:0]
		req, err := http.NewRequest(method, "http://127.0.0.1/io/personal-files/f.bin?partNumber=2", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		res, err := client.Do(req)
		if err != nil {
			t.Fatalf("%s: %v", method, err)
		}
		io.Copy(io.Discard, res.Body)
		res.Body.Close()
		if res.StatusCode != http.StatusOK || len(hops) != 1 || hops[0] != http.StatusPermanentRedirect {
			t.Fatalf("%s: status %d after redirects %v, want 200 after one 308", method, res.StatusCode, hops)
		}
		got := rec.last(t)
		if got.Method != method || got.RequestURI != "/io/personal-files/f.bin?partNumber=2" || string(got.Body) != body {
			t.Errorf("%s reached Cells as %s %s with %d bytes of %d", method, got.Method, got.RequestURI, len(got.Body), len(body))
		}
	}
	if n := rec.count(); n != 3 {
		t.Errorf("Cells saw %d requests, want 3", n)
	}
}

// TestRedirectServerNames: a Host outside ServerNames gets 404 on the
// redirect port, as nginx's default server, and is not sent anywhere.
func TestRedirectServerNames(t *testing.T) {
	t.Parallel()
	rec := &recorder{}
	up := newUpstream(t, upTLS, rec)
	cfg := testConfig(up)
	cfg.ServerNames = []string{"cells.example.com"}
	tp := startProxy(t, cfg)
	tests := []struct {
		name   string
		raw    string
		status int
		loc    string
	}{
		{"foreign host", "GET /x HTTP/1.1\r\nHost: evil.example\r\n\r\n", http.StatusNotFound, ""},
		{"foreign host with port", "GET /x HTTP/1.1\r\nHost: evil.example:80\r\n\r\n", http.StatusNotFound, ""},
		{"suffix of a name", "GET /x HTTP/1.1\r\nHost: example.com\r\n\r\n", http.StatusNotFound, ""},
		// HTTP/1.0 has no Host: the first name, as on the public port.
		{"HTTP/1.0 without host", "GET /x HTTP/1.0\r\n\r\n", http.StatusMovedPermanently, "https://cells.example.com/x"},
		{"empty host", "GET /x HTTP/1.1\r\nHost: \r\n\r\n", http.StatusBadRequest, ""},
		{"absolute form for a foreign host", "GET http://evil.example/x HTTP/1.1\r\nHost: cells.example.com\r\n\r\n", http.StatusNotFound, ""},
		{"known host", "GET /x?y HTTP/1.1\r\nHost: Cells.Example.Com:80\r\n\r\n", http.StatusMovedPermanently, "https://Cells.Example.Com/x?y"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res := rawPlain(t, tp, tt.raw)
			if got := res.StatusCode; got != tt.status {
				t.Errorf("status = %d, want %d", got, tt.status)
			}
			if got := res.Header.Get("Location"); got != tt.loc {
				t.Errorf("Location = %q, want %q", got, tt.loc)
			}
		})
	}
	if n := rec.count(); n != 0 {
		t.Errorf("upstream saw %d requests, want 0", n)
	}
}

// TestRedirectHostless: a request that names no host, without
// PROXY_SERVER_NAMES to give it one, is a 400 that says so, as on the
// public port. It was a 404 telling the operator to look at
// PROXY_SERVER_NAMES, which was not set: an HTTP/1.0 health check without
// Host, an empty Host, and an HTTP/2 client speaking in clear to port 80.
func TestRedirectHostless(t *testing.T) {
	t.Parallel()
	tp := startProxy(t, testConfig(newUpstream(t, upTLS, &recorder{})))
	for _, tt := range []struct{ name, raw string }{
		{"HTTP/1.0", "OPTIONS / HTTP/1.0\r\n\r\n"},
		{"empty Host", "GET /x HTTP/1.1\r\nHost: \r\n\r\n"},
		{"HTTP/2 preface", "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			conn, err := net.Dial("tcp", tp.RedirectAddr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			conn.SetDeadline(time.Now().Add(10 * time.Second))
			io.WriteString(conn, tt.raw)
			res, err := http.ReadResponse(bufio.NewReader(conn), nil)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(res.Body)
			res.Body.Close()
			if got, want := res.StatusCode, http.StatusBadRequest; got != want {
				t.Errorf("status = %d, want %d", got, want)
			}
			if got, want := string(body), "cells-proxy: missing Host\n"; got != want {
				t.Errorf("body = %q, want %q", got, want)
			}
		})
	}
}

// TestRedirectAccessLog: with PROXY_ACCESS_LOG=true the redirect port's
// answers have their line too, as every proxied request does (redirect
// loops and plain-HTTP clients show in the log), secrets in the query
// redacted.
func TestRedirectAccessLog(t *testing.T) {
	t.Parallel()
	sink := newLogSink()
	cfg := testConfig(newUpstream(t, upTLS, &recorder{}))
	cfg.AccessLog = true
	cfg.ServerNames = []string{"cells.example.com"}
	tp := startLoggedProxy(t, cfg, sink, "json")
	rawPlain(t, tp, "GET /x?pydio_jwt=secret HTTP/1.1\r\nHost: cells.example.com\r\n\r\n")
	rawPlain(t, tp, "GET /y HTTP/1.1\r\nHost: evil.example\r\n\r\n")
	for path, want := range map[string][2]string{"/x?pydio_jwt=REDACTED": {"301", "0"}, "/y": {"404", "47"}} {
		l, _ := sink.wait(t, 0, isAccess(t, path))
		if f := parseLogLine(t, l); f["status"] != want[0] || f["bytes_out"] != want[1] || f["proto"] != "redirect" || f["method"] != "GET" {
			t.Errorf("access line %s, want status %s, bytes_out %s (\"cells-proxy: unknown host (PROXY_SERVER_NAMES)\\n\"), proto redirect", l, want[0], want[1])
		}
	}
	if strings.Contains(sink.String(), "secret") {
		t.Errorf("a secret reached the log:\n%s", sink.String())
	}
}

// TestRedirectUnknownHostSaysWhy: a browser sent to http:// with a name
// missing from PROXY_SERVER_NAMES got "404 page not found", with no clue;
// its body now names the variable, as the 421 of the HTTPS port does.
func TestRedirectUnknownHostSaysWhy(t *testing.T) {
	t.Parallel()
	cfg := testConfig(newUpstream(t, upTLS, &recorder{}))
	cfg.ServerNames = []string{"cells.example.com"}
	tp := startProxy(t, cfg)
	conn, err := net.Dial("tcp", tp.RedirectAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	res := rawResponse(t, conn, "GET /x HTTP/1.1\r\nHost: files.example.com\r\n\r\n")
	body, _ := io.ReadAll(res.Body)
	res.Body.Close()
	if res.StatusCode != http.StatusNotFound || !strings.Contains(string(body), "PROXY_SERVER_NAMES") {
		t.Errorf("unknown host on the redirect port: %s %q, want 404 naming PROXY_SERVER_NAMES", res.Status, body)
	}
}

// TestRedirectPortMismatch: requests on the HTTPS port name port P (users
// reach the proxy on P) while PROXY_REDIRECT_HTTPS_PORT is left at 443:
// every http:// link would be redirected to a port nothing answers on. The
// log says so, once; not when the two agree.
func TestRedirectPortMismatch(t *testing.T) {
	t.Parallel()
	const warning = "HTTPS requests name a port other than PROXY_REDIRECT_HTTPS_PORT"
	for _, agree := range []bool{false, true} {
		t.Run("agree="+strconv.FormatBool(agree), func(t *testing.T) {
			cfg := testConfig(newUpstream(t, upTLS, &recorder{}))
			if agree {
				cfg.HTTPSAddr = testport.Reserve(t)
				_, port, _ := net.SplitHostPort(cfg.HTTPSAddr)
				cfg.RedirectPort, _ = strconv.Atoi(port)
			}
			tp := startProxy(t, cfg)
			for range 3 {
				// Host as browsers send it for https://127.0.0.1:port/.
				res, err := tp.H1.Get(tp.URL + "/a/frontend/state")
				if err != nil {
					t.Fatal(err)
				}
				res.Body.Close()
			}
			want := map[bool]int{false: 1}[agree]
			if n := strings.Count(tp.Log.String(), warning); n != want {
				t.Errorf("warned %d times, want %d:\n%s", n, want, tp.Log)
			}
		})
	}
}
