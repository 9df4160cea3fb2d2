package proxy

import (
	"bufio"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"slices"
	"strings"
	"testing"
)

// TestDirectMatchesReverseProxy sends requests a Cells client sends through
// the direct path and through httputil.ReverseProxy with http.Transport
// (which served them before, and still serves every request with a body to
// stream), and compares what Cells receives from each, as bytes on a
// loopback connection: the same request line, the same header fields with
// the same values (their order across names aside), the same body.
func TestDirectMatchesReverseProxy(t *testing.T) {
	up := newRawCapture(t)
	fwd := up.forwarder(t, netip.MustParsePrefix("10.0.0.0/8"))

	const host = "Host: cells.example.com\r\n"
	cases := []struct {
		name, remote, raw string
	}{
		{"browser GET", "203.0.113.9:41000", "GET /a/frontend/bundle.js?v=4.4.3 HTTP/1.1\r\n" + host +
			"User-Agent: Mozilla/5.0 (X11; Linux x86_64)\r\nAccept: */*\r\nAccept-Encoding: gzip, br\r\n" +
			"Cookie: pydio_jwt=abc\r\nCookie: lang=fr\r\nConnection: keep-alive\r\nIf-None-Match: \"x\"\r\n\r\n"},
		{"REST POST", "203.0.113.9:41000", "POST /a/tree/stats HTTP/1.1\r\n" + host +
			"Content-Type: application/json\r\nAuthorization: Bearer tok\r\nContent-Length: 17\r\n\r\n{\"NodePaths\":[1]}"},
		{"PUT without a body", "203.0.113.9:41000", "PUT /a/x HTTP/1.1\r\n" + host + "Content-Length: 0\r\n\r\n"},
		{"DELETE", "203.0.113.9:41000", "DELETE /a/workspace/x HTTP/1.1\r\n" + host + "X-Pydio-Language: fr\r\n\r\n"},
		{"WebDAV PROPFIND", "[2001:db8::7]:5000", "PROPFIND /dav/personal/d%C3%A9j%C3%A0/ HTTP/1.1\r\n" + host +
			"Depth: 1\r\nUser-Agent:  davfs2/1.6  \r\n\r\n"},
		{"HEAD, query kept verbatim", "203.0.113.9:41000", "HEAD /io/b/k?X-Amz-Signature=a;b&x=%zz HTTP/1.1\r\n" + host + "\r\n"},
		{"OPTIONS *", "203.0.113.9:41000", "OPTIONS * HTTP/1.1\r\n" + host + "Origin: https://sync.local\r\n\r\n"},
		{"absolute form", "203.0.113.9:41000", "GET http://evil.example/steal?q HTTP/1.1\r\n" + host + "\r\n"},
		{"empty query", "203.0.113.9:41000", "GET /a? HTTP/1.1\r\n" + host + "Te: trailers, deflate\r\n\r\n"},
		{"hop-by-hop and spoofed", "203.0.113.9:41000", "GET /x HTTP/1.1\r\n" + host + fuzzHopHeaders + fuzzSpoofHeaders +
			"Connection: User-Agent\r\nUser-Agent: gone\r\n\r\n"},
		{"trusted proxy's chain", "10.1.2.3:1000", "GET /x HTTP/1.1\r\n" + host +
			"X-Forwarded-For: 198.51.100.4, 10.9.9.9\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: cells.example.org\r\n\r\n"},
		{"HTTP/1.0", "203.0.113.9:41000", "GET /old HTTP/1.0\r\n" + host + "\r\n"},
		{"IPv6 Host", "203.0.113.9:41000", "GET / HTTP/1.1\r\nHost: [2001:db8::1]:8443\r\nIdempotency-Key: 7\r\n\r\n"},
	}
	for _, c := range cases {
		var heads [2]string
		for i, direct := range []bool{true, false} {
			in, err := http.ReadRequest(bufio.NewReader(strings.NewReader(c.raw)))
			if err != nil {
				t.Fatalf("%s: %v", c.name, err)
			}
			in.RemoteAddr = c.remote
			in.Header.Del("Upgrade") // as serve does, but for websockets
			if !fastPath(in) {
				t.Fatalf("%s: not on the direct path", c.name)
			}
			w := httptest.NewRecorder()
			if direct {
				fwd.ServeHTTP(w, in)
			} else {
				// serve with ReverseProxy in place of direct.
				ex := &exchange{ResponseWriter: w, declared: -1, req: in}
				fwd.http.ServeHTTP(ex, in)
			}
			got := up.take()
			if w.Code != 200 || len(got) != 1 {
				t.Fatalf("%s (direct %v): status %d, %d requests to Cells", c.name, direct, w.Code, len(got))
			}
			heads[i] = got[0]
		}
		d, rp := splitHead(heads[0]), splitHead(heads[1])
		if !slices.Equal(d, rp) {
			t.Errorf("%s: Cells received\n%q\nfrom the direct path and\n%q\nthrough ReverseProxy", c.name, d, rp)
		}
	}
}

// splitHead is a request's request line, its field lines sorted, and its
// body.
func splitHead(req string) []string {
	head, body, _ := strings.Cut(req, "\r\n\r\n")
	lines := strings.Split(head, "\r\n")
	slices.Sort(lines[1:])
	return append(lines, body)
}

// TestNotForwardedCoversHopHeaders: the direct path's switch drops every
// hop-by-hop field the websocket path and removeHopByHop drop.
func TestNotForwardedCoversHopHeaders(t *testing.T) {
	for _, h := range append(slices.Clone(hopHeaders), "Forwarded", "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto", "X-Real-Ip") {
		if !notForwarded(h) {
			t.Errorf("notForwarded(%q) = false: the direct path would pass it to Cells", h)
		}
	}
}

// TestLinkLocalPeer: a peer on an IPv6 link-local address comes with its
// zone (fe80::1%eth0), which no CIDR of PROXY_TRUSTED_PROXIES can name and
// no address parser of Cells' takes. It is matched and forwarded without
// it, as nginx's $remote_addr shows it.
func TestLinkLocalPeer(t *testing.T) {
	up := newRawCapture(t)
	fwd := up.forwarder(t, netip.MustParsePrefix("fe80::/64"))
	for _, c := range []struct{ remote, xff, realIP string }{
		{"[fe80::1%eth0]:5000", "198.51.100.4, fe80::1", "198.51.100.4"}, // the trusted load balancer
		{"[fe80:0:0:1::9%eth0]:5000", "fe80:0:0:1::9", "fe80:0:0:1::9"},  // outside the CIDR
	} {
		in, err := http.ReadRequest(bufio.NewReader(strings.NewReader("GET /x HTTP/1.1\r\nHost: cells.example.com\r\nX-Forwarded-For: 198.51.100.4\r\n\r\n")))
		if err != nil {
			t.Fatal(err)
		}
		in.RemoteAddr = c.remote
		w := httptest.NewRecorder()
		fwd.ServeHTTP(w, in)
		got := up.take()
		if w.Code != 200 || len(got) != 1 {
			t.Fatalf("%s: status %d, %d requests to Cells", c.remote, w.Code, len(got))
		}
		for _, want := range []string{"X-Forwarded-For: " + c.xff + "\r\n", "X-Real-Ip: " + c.realIP + "\r\n"} {
			if !strings.Contains(got[0], want) {
				t.Errorf("peer %s: Cells received\n%s\nwithout %q", c.remote, got[0], want)
			}
		}
	}
}
