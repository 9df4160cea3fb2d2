package proxy

import (
	"bytes"
	"context"
	"crypto/tls"
	"io"
	"math"
	"net/http"
	"net/netip"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	grpchealth "google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
)

// h2Response is what rawH2 read back.
type h2Response struct {
	Status int
	Header http.Header
	Body   []byte
}

// rawH2 sends one request on a new HTTP/2 connection to the proxy, with the
// header fields (pseudo-headers first) hpack-encoded exactly as given, so no
// client rewrites :path or :authority, and reads the response of stream 1.
func rawH2(t testing.TB, tp *testProxy, fields []string, body []byte) h2Response {
	t.Helper()
	return rawH2At(t, tp, tp.Addr().String(), fields, body)
}

// rawH2At is rawH2 to the proxy's port at addr (the gRPC port, say).
func rawH2At(t testing.TB, tp *testProxy, addr string, fields []string, body []byte) h2Response {
	t.Helper()
	conn := tp.dialTLSH2(t, addr)
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	fr := h2Start(t, conn)
	fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	fr.MaxHeaderListSize = 1 << 20
	if err := fr.WriteHeaders(http2.HeadersFrameParam{
		StreamID:      1,
		BlockFragment: hpackBlock(fields...),
		EndHeaders:    true,
		EndStream:     len(body) == 0,
	}); err != nil {
		t.Fatal(err)
	}
	if len(body) > 0 {
		// Bodies here are far below the initial 64 KiB window.
		if err := fr.WriteData(1, true, body); err != nil {
			t.Fatal(err)
		}
	}
	res := h2Response{Header: make(http.Header)}
	for {
		f, err := fr.ReadFrame()
		if err != nil {
			t.Fatalf("reading frames: %v", err)
		}
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if !f.IsAck() {
				if err := fr.WriteSettingsAck(); err != nil {
					t.Fatal(err)
				}
			}
		case *http2.PingFrame:
			if !f.IsAck() {
				fr.WritePing(true, f.Data)
			}
		case *http2.GoAwayFrame:
			t.Fatalf("GOAWAY %v: %s", f.ErrCode, f.DebugData())
		case *http2.RSTStreamFrame:
			t.Fatalf("RST_STREAM %v", f.ErrCode)
		case *http2.MetaHeadersFrame:
			if f.StreamID != 1 {
				continue
			}
			if res.Status == 0 || res.Status < 200 {
				res.Status, _ = strconv.Atoi(f.PseudoValue("status"))
				for _, hf := range f.RegularFields() {
					res.Header.Add(hf.Name, hf.Value)
				}
			}
			if f.StreamEnded() {
				return res
			}
		case *http2.DataFrame:
			if f.StreamID != 1 {
				continue
			}
			res.Body = append(res.Body, f.Data()...)
			if n := len(f.Data()); n > 0 {
				fr.WriteWindowUpdate(0, uint32(n))
				fr.WriteWindowUpdate(1, uint32(n))
			}
			if f.StreamEnded() {
				return res
			}
		}
	}
}

// TestMethodsPass sends every method Cells serves, WebDAV's included, with
// their headers and bodies, and checks that Cells receives each unchanged
// and that its answer reaches the client unchanged.
func TestMethodsPass(t *testing.T) {
	t.Parallel()
	rec := &recorder{}
	up := newUpstream(t, upTLS, rec)
	tp := startProxy(t, testConfig(up))
	public := tp.Addr().String()

	const propfind = `<?xml version="1.0" encoding="utf-8"?><D:propfind xmlns:D="DAV:"><D:allprop/></D:propfind>`
	const proppatch = `<?xml version="1.0"?><D:propertyupdate xmlns:D="DAV:"><D:set><D:prop><Z:a xmlns:Z="urn:z">v</Z:a></D:prop></D:set></D:propertyupdate>`
	const lockinfo = `<?xml version="1.0"?><D:lockinfo xmlns:D="DAV:"><D:lockscope><D:exclusive/></D:lockscope><D:locktype><D:write/></D:locktype></D:lockinfo>`
	tests := []struct {
		method  string
		path    string
		header  map[string]string
		body    string
		status  int
		resHdr  map[string]string
		resBody string
	}{
		{"GET", "/a/frontend/bootconf", nil, "", 200, map[string]string{"Content-Type": "application/json"}, `{"ok":true}`},
		{"HEAD", "/io/personal/file.bin", nil, "", 200, map[string]string{"Content-Length": "1234", "Etag": `"abc"`}, ""},
		{"PUT", "/io/personal/new.txt", map[string]string{"Content-Type": "text/plain"}, "hello cells\n", 200, map[string]string{"Etag": `"e1"`}, ""},
		{"POST", "/a/tree/stat", map[string]string{"Content-Type": "application/json"}, `{"Node":{"Path":"personal"}}`, 200, nil, `{}`},
		{"PATCH", "/a/user/me", map[string]string{"Content-Type": "application/merge-patch+json"}, `{"Label":"x"}`, 200, nil, `{}`},
		{"DELETE", "/io/personal/old.txt", nil, "", 204, nil, ""},
		{"OPTIONS", "/oidc/.well-known/openid-configuration", map[string]string{
			"Origin":                         "http://localhost:3636",
			"Access-Control-Request-Method":  "GET",
			"Access-Control-Request-Headers": "authorization, x-pydio-bearer",
		}, "", 204, map[string]string{
			"Access-Control-Allow-Origin":  "http://localhost:3636",
			"Access-Control-Allow-Methods": "GET, POST, OPTIONS",
			"Access-Control-Allow-Headers": "authorization, x-pydio-bearer",
			"Access-Control-Max-Age":       "600",
			"Vary":                         "Origin",
		}, ""},
		{"PROPFIND", "/dav/personal/", map[string]string{"Depth": "1", "Content-Type": "application/xml; charset=utf-8"}, propfind,
			207, map[string]string{"Content-Type": "application/xml; charset=utf-8"}, `<D:multistatus xmlns:D="DAV:"/>`},
		{"PROPPATCH", "/dav/personal/a.txt", map[string]string{"Content-Type": "application/xml"}, proppatch,
			207, map[string]string{"Content-Type": "application/xml"}, `<D:multistatus xmlns:D="DAV:"/>`},
		{"MKCOL", "/dav/personal/new%20folder/", nil, "", 201, nil, ""},
		{"COPY", "/dav/personal/a.txt", map[string]string{
			"Destination": "https://" + public + "/dav/personal/b%20copy.txt",
			"Depth":       "infinity",
			"Overwrite":   "F",
		}, "", 201, nil, ""},
		{"MOVE", "/dav/personal/b%20copy.txt", map[string]string{
			"Destination": "https://" + public + "/dav/personal/sub/c.txt",
			"Overwrite":   "T",
			"If":          "<https://" + public + "/dav/personal/b%20copy.txt> (<opaquelocktoken:e71d4fae-5dec-22d6-fea5-00a0c91e6be4>)",
		}, "", 204, nil, ""},
		{"LOCK", "/dav/personal/a.txt", map[string]string{"Timeout": "Second-3600", "Depth": "0", "Content-Type": "application/xml"}, lockinfo,
			200, map[string]string{"Lock-Token": "<opaquelocktoken:e71d4fae-5dec-22d6-fea5-00a0c91e6be4>", "Content-Type": "application/xml"}, `<D:prop xmlns:D="DAV:"/>`},
		{"UNLOCK", "/dav/personal/a.txt", map[string]string{"Lock-Token": "<opaquelocktoken:e71d4fae-5dec-22d6-fea5-00a0c91e6be4>"}, "", 204, nil, ""},
	}
	byMethod := make(map[string]int)
	for i, tt := range tests {
		byMethod[tt.method] = i
	}
	rec.Respond = func(w http.ResponseWriter, r *http.Request) {
		tt := tests[byMethod[r.Method]]
		for k, v := range tt.resHdr {
			w.Header().Set(k, v)
		}
		w.WriteHeader(tt.status)
		io.WriteString(w, tt.resBody)
	}

	for _, pc := range h1h2Clients(tp) {
		for _, tt := range tests {
			t.Run(pc.name+"/"+tt.method, func(t *testing.T) {
				var body io.Reader
				if tt.body != "" {
					body = strings.NewReader(tt.body)
				}
				req, err := http.NewRequest(tt.method, tp.URL+tt.path, body)
				if err != nil {
					t.Fatal(err)
				}
				for k, v := range tt.header {
					req.Header.Set(k, v)
				}
				res, err := pc.c.Do(req)
				if err != nil {
					t.Fatal(err)
				}
				resBody, err := io.ReadAll(res.Body)
				res.Body.Close()
				if err != nil {
					t.Fatal(err)
				}

				got := rec.last(t)
				if got.Method != tt.method {
					t.Errorf("upstream method = %q, want %q", got.Method, tt.method)
				}
				if got.RequestURI != tt.path {
					t.Errorf("upstream request-target = %q, want %q", got.RequestURI, tt.path)
				}
				if got.Host != public {
					t.Errorf("upstream Host = %q, want %q", got.Host, public)
				}
				for k, v := range tt.header {
					if g := got.Header.Values(k); !slices.Equal(g, []string{v}) {
						t.Errorf("upstream %s = %q, want [%q]", k, g, v)
					}
				}
				if string(got.Body) != tt.body {
					t.Errorf("upstream body = %q, want %q", got.Body, tt.body)
				}

				if res.StatusCode != tt.status {
					t.Errorf("status = %d, want %d", res.StatusCode, tt.status)
				}
				for k, v := range tt.resHdr {
					if k == "Content-Length" {
						if g := res.ContentLength; strconv.FormatInt(g, 10) != v {
							t.Errorf("response Content-Length = %d, want %s", g, v)
						}
						continue
					}
					if g := res.Header.Get(k); g != v {
						t.Errorf("response %s = %q, want %q", k, g, v)
					}
				}
				if string(resBody) != tt.resBody {
					t.Errorf("response body = %q, want %q", resBody, tt.resBody)
				}
			})
		}
	}
}

// requestTargets are request-targets that Cells needs byte for byte. Each
// is a trap for some normalisation: decoding %2F, re-encoding raw UTF-8 or
// quotes, cleaning dot segments or double slashes, decoding %25, dropping
// a query that url.ParseQuery rejects, or an empty query.
var requestTargets = []struct{ name, target string }{
	{"encoded slash", "/a/meta/bulk/path%2Fto%2Ffolder"},
	{"encoded space", "/dav/personal/My%20Documents/a%20b.txt"},
	{"raw UTF-8", "/io/personal/caf\xc3\xa9/\xe6\x96\x87\xe4\xbb\xb6\xf0\x9f\x93\x81.txt"},
	{"leading double slash and raw UTF-8", "//io/caf\xc3\xa9/x"},
	{"sub-delims", "/a/x,y/'quoted'/;p=1/a+b/!$&()*=:@"},
	{"double slashes", "/io/personal//a//b"},
	{"leading double slash", "//a//b"},
	{"leading double slash and escapes", "//a/%2F/b%20c,'d'"},
	{"dot segments", "/a/../b/./c/.."},
	{"dot segments encoded", "/a/%2E%2E/b/%2e/c"},
	{"double-encoded slash", "/a/meta/bulk/x%252Fy"},
	{"lower-case escapes", "/a/x%2fy%c3%a9"},
	{"4 KiB", "/a/" + strings.Repeat("0123456789abcdef", 256)},
	{"pydio_jwt", "/io/personal/f.txt?pydio_jwt=eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ1In0.c2ln%2B%2F%3D"},
	{"presigned", "/io/personal/f%2Fg.txt?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F20260101%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20260101T000000Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host&X-Amz-Signature=0123456789abcdef"},
	{"semicolon query", "/a/f?a=1;b=2&c=3"},
	{"empty query", "/a/f?"},
	{"query odd bytes", "/a/f?x=%2F+%20&y&&z==&%zz"},
	{"leading double slash and query", "//a//b?x=1"},
}

// checkTarget compares the request-target Cells received with the one sent.
func checkTarget(t *testing.T, got, want string) {
	t.Helper()
	if got == want {
		return
	}
	if strings.HasPrefix(want, "//") {
		// A known limit of net/http, not of the proxy's choosing: an
		// origin-form target that starts with "//" can only be written
		// through URL.RawPath (URL.RequestURI turns such an Opaque into
		// "https://..."), and URL.EscapedPath percent-encodes a RawPath
		// holding any byte outside RFC 3986's pchar, raw UTF-8 for one.
		// What still must hold is that Cells decodes the same path.
		gp, _ := url.PathUnescape(got)
		wp, _ := url.PathUnescape(want)
		if gp != wp || !strings.HasPrefix(got, "//") {
			t.Fatalf("upstream request-target = %q, want %q (or its percent-encoded form)", got, want)
		}
		t.Skipf("reason: net/http's Transport cannot write %q verbatim after a leading \"//\"; Cells got %q, the same path percent-encoded", want, got)
	}
	t.Errorf("upstream request-target = %q, want %q", got, want)
}

// rawGet sends GET target, with Host (h1) or :authority (h2) host, as
// given on a new raw connection to the proxy, and returns the status.
func rawGet(t testing.TB, tp *testProxy, proto, host, target string) int {
	t.Helper()
	if proto == "h2" {
		return rawH2(t, tp, h2Fields("GET", host, target), nil).Status
	}
	res, _ := rawH1(t, tp, "GET "+target+" HTTP/1.1\r\nHost: "+host+"\r\n\r\n")
	return res.StatusCode
}

// testRequestTarget sends each target over proto and compares the
// upstream's RequestURI with it.
func testRequestTarget(t *testing.T, proto string) {
	t.Parallel()
	rec := &recorder{}
	up := newUpstream(t, upTLS, rec)
	tp := startProxy(t, testConfig(up))
	for _, tt := range requestTargets {
		t.Run(tt.name, func(t *testing.T) {
			if status := rawGet(t, tp, proto, tp.Addr().String(), tt.target); status != http.StatusOK {
				t.Fatalf("status = %d, want 200", status)
			}
			checkTarget(t, rec.last(t).RequestURI, tt.target)
		})
	}
}

// TestRequestTargetH1 sends each target as raw HTTP/1.1 and compares the
// upstream's RequestURI with it.
func TestRequestTargetH1(t *testing.T) { testRequestTarget(t, "h1") }

// TestRequestTargetH2 sends each target as an exact :path in a HEADERS
// frame and compares the upstream's RequestURI with it.
func TestRequestTargetH2(t *testing.T) { testRequestTarget(t, "h2") }

// TestRequestTargetOtherPaths sends each target on the paths that
// TestRequestTargetH1 and H2 (GETs, the direct path) do not take: an
// HTTP/1.1 chunked upload and an HTTP/2 upload of unknown length, both
// through net/http's servers and ReverseProxy, and an HTTP/1.1 websocket
// upgrade, which the tunnel sends to Cells itself. S3 uploads to /io and
// /data carry %2F and raw UTF-8 in their keys, and a websocket URL may
// carry pydio_jwt in its query. Host and X-Forwarded-For are checked on
// the way: TestHostExact and TestSpoofedForwardingHeaders send GETs only.
func TestRequestTargetOtherPaths(t *testing.T) {
	t.Parallel()
	rec := &recorder{}
	up := newUpstream(t, upTLS, rec)
	tp := startProxy(t, testConfig(up))
	host := tp.Addr().String()
	for _, tt := range requestTargets {
		for _, via := range []struct {
			name string
			send func() int
		}{
			{"h1 chunked upload", func() int {
				res, _ := rawH1(t, tp, "PUT "+tt.target+" HTTP/1.1\r\nHost: "+host+"\r\nTransfer-Encoding: chunked\r\nX-Forwarded-For: 203.0.113.7\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
				return res.StatusCode
			}},
			{"h2 upload", func() int {
				return rawH2(t, tp, h2Fields("PUT", host, tt.target, "x-forwarded-for", "203.0.113.7"), []byte("hello")).Status
			}},
			{"h1 websocket", func() int {
				res, _ := rawH1(t, tp, "GET "+tt.target+" HTTP/1.1\r\nHost: "+host+"\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nX-Forwarded-For: 203.0.113.7\r\n"+
					"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
				return res.StatusCode
			}},
		} {
			t.Run(via.name+"/"+tt.name, func(t *testing.T) {
				before := rec.count()
				// The recorder answers 200, not 101: Cells refusing the
				// upgrade, which the proxy passes on.
				if status := via.send(); status != http.StatusOK {
					t.Fatalf("status = %d, want 200", status)
				}
				if rec.count() == before {
					t.Fatal("Cells got no request")
				}
				got := rec.last(t)
				if got.Host != host {
					t.Errorf("upstream Host = %q, want %q", got.Host, host)
				}
				if xff := strings.Join(got.Header.Values("X-Forwarded-For"), ", "); xff != "127.0.0.1" {
					t.Errorf("upstream X-Forwarded-For = %q, want %q (the client's replaced)", xff, "127.0.0.1")
				}
				checkTarget(t, got.RequestURI, tt.target)
			})
		}
	}
}

// TestRequestTargetOpaqueClient checks the case net/http clients produce
// themselves: a URL.Opaque request-target over h1 and h2.
func TestRequestTargetOpaqueClient(t *testing.T) {
	t.Parallel()
	rec := &recorder{}
	up := newUpstream(t, upTLS, rec)
	tp := startProxy(t, testConfig(up))
	const target = "/a/meta/bulk/path%2Fto%2Ffolder,'x';y+z"
	for _, pc := range h1h2Clients(tp) {
		t.Run(pc.name, func(t *testing.T) {
			req, err := http.NewRequest("GET", tp.URL, nil)
			if err != nil {
				t.Fatal(err)
			}
			req.URL.Opaque = target
			req.URL.RawQuery = "pydio_jwt=a.b.c"
			doDrain(t, pc.c, req)
			if got, want := rec.last(t).RequestURI, target+"?pydio_jwt=a.b.c"; got != want {
				t.Errorf("upstream request-target = %q, want %q", got, want)
			}
		})
	}
}

// TestHostExact checks that Host (h1) and :authority (h2) reach Cells
// exactly as sent, port included, whatever the upstream's own address.
func TestHostExact(t *testing.T) {
	t.Parallel()
	rec := &recorder{}
	up := newUpstream(t, upTLS, rec)
	tp := startProxy(t, testConfig(up))
	hosts := []string{
		tp.Addr().String(),
		"cells.example.com",
		"cells.example.com:443",
		"cells.example.com:8443",
		"Cells.Example.COM:8443",
		"[::1]:8443",
		"[2001:db8::1]",
	}
	for _, host := range hosts {
		for _, proto := range []string{"h1", "h2"} {
			t.Run(proto+"/"+host, func(t *testing.T) {
				rawGet(t, tp, proto, host, "/a/frontend/state")
				if got := rec.last(t).Host; got != host {
					t.Errorf("upstream Host = %q, want %q", got, host)
				}
			})
		}
	}
}

// TestForwardedUntrusted: with no trusted proxies, whatever the client says
// about itself is dropped and the proxy tells Cells the truth.
func TestForwardedUntrusted(t *testing.T) {
	t.Parallel()
	rec := &recorder{}
	up := newUpstream(t, upTLS, rec)
	tp := startProxy(t, testConfig(up))
	spoof := map[string]string{
		"X-Forwarded-For":   "203.0.113.7",
		"X-Real-Ip":         "203.0.113.8",
		"X-Forwarded-Proto": "http",
		"X-Forwarded-Host":  "evil.example",
		"Forwarded":         "for=203.0.113.9;proto=http;host=evil.example",
	}
	for _, pc := range h1h2Clients(tp) {
		t.Run(pc.name, func(t *testing.T) {
			getWith(t, pc.c, tp.URL+"/a/frontend/bootconf", spoof)
			checkUpstreamHeader(t, rec.last(t).Header, map[string][]string{
				"X-Forwarded-For":   {"127.0.0.1"},
				"X-Real-Ip":         {"127.0.0.1"},
				"X-Forwarded-Proto": {"https"},
				"X-Forwarded-Host":  {tp.Addr().String()},
				"Forwarded":         nil,
			})
		})
	}
}

// TestForwardedTrusted: a peer in TrustedProxies has its chain kept from
// the client on (the nearest address that is not a trusted proxy, also
// X-Real-IP) and extended, and its X-Forwarded-Proto and -Host believed.
// What the client wrote left of its own address does not reach Cells, which
// believes the first entry. Forwarded is still dropped: Cells does not read
// it, and nobody checks it.
func TestForwardedTrusted(t *testing.T) {
	t.Parallel()
	rec := &recorder{}
	up := newUpstream(t, upTLS, rec)
	cfg := testConfig(up)
	cfg.TrustedProxies = []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}
	tp := startProxy(t, cfg)
	tests := []struct {
		name     string
		header   map[string]string
		xff      string
		realIP   string
		proto    string
		fwdHost  string
		noHeader bool
	}{
		{
			name:   "chain",
			header: map[string]string{"X-Forwarded-For": "198.51.100.1, 203.0.113.7, 127.0.0.2", "X-Forwarded-Proto": "http", "X-Forwarded-Host": "cells.example.com", "Forwarded": "for=198.51.100.1"},
			// 198.51.100.1 is what the client wrote: a load balancer
			// appends to it. Cells believes the first entry.
			xff:     "203.0.113.7, 127.0.0.2, 127.0.0.1",
			realIP:  "203.0.113.7",
			proto:   "http",
			fwdHost: "cells.example.com",
		},
		{
			name:    "every hop trusted",
			header:  map[string]string{"X-Forwarded-For": "127.0.0.3,127.0.0.2"},
			xff:     "127.0.0.3, 127.0.0.2, 127.0.0.1",
			realIP:  "127.0.0.3",
			proto:   "https",
			fwdHost: tp.Addr().String(),
		},
		{
			// Azure's gateway writes address:port; Cells gets the
			// addresses alone.
			name:    "ports and brackets",
			header:  map[string]string{"X-Forwarded-For": "198.51.100.1, 203.0.113.7:52311, [::ffff:127.0.0.2]:443, [127.0.0.3]"},
			xff:     "203.0.113.7, 127.0.0.2, 127.0.0.3, 127.0.0.1",
			realIP:  "203.0.113.7",
			proto:   "https",
			fwdHost: tp.Addr().String(),
		},
		{
			name:    "an IPv6 client",
			header:  map[string]string{"X-Forwarded-For": "[2001:db8::7]:52311,2001:db8::8"},
			xff:     "2001:db8::8, 127.0.0.1",
			realIP:  "2001:db8::8",
			proto:   "https",
			fwdHost: tp.Addr().String(),
		},
		{
			name:    "not an address on the way",
			header:  map[string]string{"X-Forwarded-For": "203.0.113.7, unknown, 127.0.0.2"},
			xff:     "127.0.0.1",
			realIP:  "127.0.0.1",
			proto:   "https",
			fwdHost: tp.Addr().String(),
		},
		{
			name:    "no chain",
			header:  nil,
			xff:     "127.0.0.1",
			realIP:  "127.0.0.1",
			proto:   "https",
			fwdHost: tp.Addr().String(),
		},
		{
			name:    "bad proto ignored",
			header:  map[string]string{"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "gopher"},
			xff:     "203.0.113.7, 127.0.0.1",
			realIP:  "203.0.113.7",
			proto:   "https",
			fwdHost: tp.Addr().String(),
		},
	}
	for _, pc := range h1h2Clients(tp) {
		for _, tt := range tests {
			t.Run(pc.name+"/"+tt.name, func(t *testing.T) {
				getWith(t, pc.c, tp.URL+"/a/frontend/bootconf", tt.header)
				checkUpstreamHeader(t, rec.last(t).Header, map[string][]string{
					"X-Forwarded-For":   {tt.xff},
					"X-Real-Ip":         {tt.realIP},
					"X-Forwarded-Proto": {tt.proto},
					"X-Forwarded-Host":  {tt.fwdHost},
					"Forwarded":         nil,
				})
			})
		}
	}
}

// TestForwardedGRPC: gRPC calls carry x-forwarded-for, x-real-ip and
// x-forwarded-proto metadata (Cells reads x-forwarded-for from gRPC
// metadata), and :authority arrives as the client sent it.
func TestForwardedGRPC(t *testing.T) {
	t.Parallel()
	mdc := make(chan metadata.MD, 1)
	gs := grpc.NewServer(grpc.UnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		md, _ := metadata.FromIncomingContext(ctx)
		mdc <- md
		return h(ctx, req)
	}))
	healthpb.RegisterHealthServer(gs, grpchealth.NewServer())
	defer gs.Stop()
	up := newUpstream(t, upTLS, gs)
	cfg := testConfig(up)
	// The proxy's self-signed certificate then names cells.example.com,
	// which grpc-go verifies against the authority.
	cfg.ServerNames = []string{"cells.example.com"}
	tp := startProxy(t, cfg)

	const authority = "cells.example.com:443"
	creds := credentials.NewTLS(&tls.Config{RootCAs: tp.Roots})
	cc, err := grpc.NewClient(tp.Addr().String(), grpc.WithTransportCredentials(creds), grpc.WithAuthority(authority))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	ctx := metadata.AppendToOutgoingContext(context.Background(), "x-forwarded-for", "203.0.113.7", "x-pydio-bearer", "tok")
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if _, err := healthpb.NewHealthClient(cc).Check(ctx, &healthpb.HealthCheckRequest{}); err != nil {
		t.Fatalf("Check: %v", err)
	}
	md := <-mdc
	want := map[string][]string{
		"x-forwarded-for":   {"127.0.0.1"},
		"x-real-ip":         {"127.0.0.1"},
		"x-forwarded-proto": {"https"},
		"x-pydio-bearer":    {"tok"},
		":authority":        {authority},
	}
	for k, v := range want {
		if got := md.Get(k); !slices.Equal(got, v) {
			t.Errorf("upstream metadata %s = %q, want %q", k, got, v)
		}
	}
}

// TestHopByHop: the headers of one connection do not reach Cells (RFC 9110
// section 7.6.1), nor those the client names in Connection; end-to-end
// credentials and conditions do, untouched.
func TestHopByHop(t *testing.T) {
	t.Parallel()
	// Cells' side of the hop has its own connection headers, which must
	// not reach the client either.
	rec := &recorder{Respond: func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Connection", "X-Up-Secret")
		w.Header().Set("X-Up-Secret", "upstream hop only")
		w.Header().Set("Keep-Alive", "timeout=9")
		w.Header().Set("X-Up-Kept", "end to end")
		io.WriteString(w, "ok")
	}}
	up := newUpstream(t, upTLS, rec)
	tp := startProxy(t, testConfig(up))
	host := tp.Addr().String()
	wantResponse := func(t *testing.T, h http.Header) {
		t.Helper()
		for _, k := range []string{"X-Up-Secret", "Keep-Alive"} {
			if v := h.Values(k); v != nil {
				t.Errorf("response %s = %q, want none", k, v)
			}
		}
		if v := h.Get("X-Up-Kept"); v != "end to end" {
			t.Errorf("response X-Up-Kept = %q, want %q", v, "end to end")
		}
	}
	passed := map[string]string{
		"Authorization":        "AWS4-HMAC-SHA256 Credential=AKIA/20260101/us-east-1/s3/aws4_request, SignedHeaders=host;x-amz-date, Signature=00ff",
		"X-Amz-Date":           "20260101T000000Z",
		"X-Amz-Content-Sha256": "UNSIGNED-PAYLOAD",
		"X-Amz-Meta-Note":      "  spaced  value ",
		"X-Pydio-Bearer":       "eyJ.payload.sig",
		"Range":                "bytes=0-99,200-",
		"If-Range":             `"etag-1"`,
		"Origin":               "http://localhost:3636",
		"Cookie":               "pydio_session=abc; lang=fr",
	}
	wantPassed := func(t *testing.T, h http.Header) {
		t.Helper()
		for k, v := range passed {
			want := strings.TrimSpace(v) // field values lose only their outer whitespace
			if got := h.Values(k); !slices.Equal(got, []string{want}) {
				t.Errorf("upstream %s = %q, want [%q]", k, got, want)
			}
		}
	}

	t.Run("h1", func(t *testing.T) {
		var b strings.Builder
		b.WriteString("POST /a/x HTTP/1.1\r\nHost: " + host + "\r\n")
		b.WriteString("Connection: keep-alive, X-Secret, x-other\r\n")
		b.WriteString("Connection: close\r\n")
		b.WriteString("Keep-Alive: timeout=5, max=100\r\n")
		b.WriteString("Proxy-Connection: keep-alive\r\n")
		b.WriteString("Proxy-Authorization: Basic dTpw\r\n")
		b.WriteString("TE: trailers, deflate;q=0.5\r\n")
		b.WriteString("Trailer: X-Checksum\r\n")
		b.WriteString("X-Secret: named in Connection\r\n")
		b.WriteString("X-Other: also named\r\n")
		b.WriteString("X-Kept: end to end\r\n")
		for k, v := range passed {
			b.WriteString(k + ": " + v + "\r\n")
		}
		b.WriteString("Transfer-Encoding: chunked\r\n\r\n")
		b.WriteString("5\r\nhello\r\n6\r\n world\r\n0\r\nX-Checksum: 5eb63bbbe01eeed0\r\n\r\n")
		res, _ := rawH1(t, tp, b.String())
		if res.StatusCode != http.StatusOK {
			t.Fatalf("status = %d, want 200", res.StatusCode)
		}
		got := rec.last(t)
		for _, k := range []string{"Connection", "Keep-Alive", "Proxy-Connection", "Proxy-Authorization", "Transfer-Encoding", "Upgrade", "Trailer", "X-Secret", "X-Other"} {
			if v := got.Header.Values(k); v != nil {
				t.Errorf("upstream %s = %q, want none", k, v)
			}
		}
		// TE is hop-by-hop, but "trailers" says the client reads trailers
		// (gRPC needs it), so the proxy says the same on its own hop.
		if v := got.Header.Values("Te"); !slices.Equal(v, []string{"trailers"}) {
			t.Errorf("upstream TE = %q, want [\"trailers\"]", v)
		}
		if v := got.Header.Get("X-Kept"); v != "end to end" {
			t.Errorf("upstream X-Kept = %q, want %q", v, "end to end")
		}
		if string(got.Body) != "hello world" {
			t.Errorf("upstream body = %q, want %q", got.Body, "hello world")
		}
		// Request trailers are dropped whole, as on the gRPC path; they
		// reached Cells as names without their values.
		if got.Trailer != nil {
			t.Errorf("upstream trailers = %q, want none", got.Trailer)
		}
		wantPassed(t, got.Header)
		wantResponse(t, res.Header)
		if v := res.Header.Get("Connection"); v != "" && v != "close" {
			t.Errorf("response Connection = %q, want close or none", v)
		}
	})

	t.Run("h1/TE without trailers", func(t *testing.T) {
		rawH1(t, tp, "GET /a/x HTTP/1.1\r\nHost: "+host+"\r\nTE: gzip\r\nConnection: close\r\n\r\n")
		if v := rec.last(t).Header.Values("Te"); v != nil {
			t.Errorf("upstream TE = %q, want none", v)
		}
	})

	t.Run("h2", func(t *testing.T) {
		// HTTP/2 has no connection-specific fields (RFC 9113 section
		// 8.2.2): the TE: trailers and end-to-end fields are what is left.
		fields := []string{"te", "trailers", "x-kept", "end to end"}
		for k, v := range passed {
			fields = append(fields, strings.ToLower(k), strings.TrimSpace(v))
		}
		res := rawH2(t, tp, h2Fields("GET", host, "/a/x", fields...), nil)
		if res.Status != http.StatusOK {
			t.Fatalf("status = %d, want 200", res.Status)
		}
		got := rec.last(t)
		if v := got.Header.Values("Te"); !slices.Equal(v, []string{"trailers"}) {
			t.Errorf("upstream TE = %q, want [\"trailers\"]", v)
		}
		if v := got.Header.Get("X-Kept"); v != "end to end" {
			t.Errorf("upstream X-Kept = %q, want %q", v, "end to end")
		}
		wantPassed(t, got.Header)
		wantResponse(t, res.Header)
		if v := res.Header.Values("Connection"); v != nil {
			t.Errorf("response Connection = %q, want none", v)
		}
	})

	for _, h2 := range []bool{false, true} {
		t.Run("trailers/h2="+strconv.FormatBool(h2), func(t *testing.T) {
			// net/http's client, over either protocol, sends a request's
			// trailers after its body.
			pr, pw := io.Pipe()
			req, _ := http.NewRequest("PUT", "https://"+host+"/io/personal-files/a.bin", pr)
			req.Trailer = http.Header{"X-Checksum": nil}
			go func() {
				io.WriteString(pw, "hello world")
				req.Trailer.Set("X-Checksum", "5eb63bbbe01eeed0")
				pw.Close()
			}()
			client := tp.H1
			if h2 {
				client = tp.H2
			}
			res, err := client.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			res.Body.Close()
			got := rec.last(t)
			if string(got.Body) != "hello world" {
				t.Errorf("upstream body = %q, want %q", got.Body, "hello world")
			}
			if got.Trailer != nil || got.Header.Get("Trailer") != "" {
				t.Errorf("upstream trailers = %q, Trailer field %q, want none", got.Trailer, got.Header.Values("Trailer"))
			}
		})
	}
}

// TestUpgradeNotWebsocket: an Upgrade other than websocket is not passed on.
// h2c in particular would turn the proxy into a tunnel to Cells past every
// check; the request must arrive as an ordinary one and get an ordinary
// answer.
func TestUpgradeNotWebsocket(t *testing.T) {
	t.Parallel()
	rec := &recorder{}
	// An upstream that would accept the upgrade if it saw one.
	rec.Respond = func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Upgrade") != "" {
			w.Header().Set("Connection", "Upgrade")
			w.Header().Set("Upgrade", r.Header.Get("Upgrade"))
			w.WriteHeader(http.StatusSwitchingProtocols)
			return
		}
		io.WriteString(w, "plain")
	}
	up := newUpstream(t, upPlain, rec)
	tp := startProxy(t, testConfig(up))
	host := tp.Addr().String()
	tests := []struct{ name, raw string }{
		{"h2c", "GET /a/x HTTP/1.1\r\nHost: " + host + "\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"},
		{"h2c with body", "POST /a/x HTTP/1.1\r\nHost: " + host + "\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nContent-Length: 4\r\n\r\nbody"},
		{"other protocol", "GET /a/x HTTP/1.1\r\nHost: " + host + "\r\nConnection: Upgrade\r\nUpgrade: IRC/6.9\r\n\r\n"},
		{"upgrade without connection", "GET /a/x HTTP/1.1\r\nHost: " + host + "\r\nUpgrade: h2c\r\n\r\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res, body := rawH1(t, tp, tt.raw)
			if got, want := res.StatusCode, http.StatusOK; got != want {
				t.Fatalf("status = %d, want %d", got, want)
			}
			if got, want := string(body), "plain"; got != want {
				t.Errorf("body = %q, want %q", got, want)
			}
			if v := res.Header.Get("Upgrade"); v != "" {
				t.Errorf("response Upgrade = %q, want none", v)
			}
			h := rec.last(t).Header
			for _, k := range []string{"Upgrade", "Connection", "Http2-Settings"} {
				if v := h.Values(k); v != nil {
					t.Errorf("upstream %s = %q, want none", k, v)
				}
			}
		})
	}
}

// TestUpstreamErrorsPass: Cells' error answers reach the client as Cells
// wrote them: S3 clients parse the XML, the web UI the JSON.
func TestUpstreamErrorsPass(t *testing.T) {
	t.Parallel()
	const s3Err = `<?xml version="1.0" encoding="UTF-8"?>` + "\n" +
		`<Error><Code>NoSuchKey</Code><Message>The specified key does not exist.</Message><Key>dir/f.txt</Key><BucketName>io</BucketName><Resource>/io/dir/f.txt</Resource><RequestId>17A</RequestId><HostId>h</HostId></Error>`
	const jsonErr = `{"Title":"internal error","Detail":"tree: node not found","Code":500}` + "\n"
	errs := map[string]struct {
		status int
		ctype  string
		body   string
	}{
		"/io/dir/f.txt":   {404, "application/xml", s3Err},
		"/a/tree/stat":    {500, "application/json; charset=utf-8", jsonErr},
		"/a/forbidden":    {403, "application/json", `{"Title":"forbidden"}`},
		"/io/empty-error": {503, "text/plain", ""},
	}
	rec := &recorder{Respond: func(w http.ResponseWriter, r *http.Request) {
		e := errs[r.URL.Path]
		w.Header().Set("Content-Type", e.ctype)
		w.Header().Set("X-Amz-Request-Id", "17A")
		w.WriteHeader(e.status)
		io.WriteString(w, e.body)
	}}
	up := newUpstream(t, upTLS, rec)
	tp := startProxy(t, testConfig(up))
	for _, pc := range h1h2Clients(tp) {
		for path, e := range errs {
			t.Run(pc.name+path, func(t *testing.T) {
				res, err := pc.c.Get(tp.URL + path)
				if err != nil {
					t.Fatal(err)
				}
				body, err := io.ReadAll(res.Body)
				res.Body.Close()
				if err != nil {
					t.Fatal(err)
				}
				if res.StatusCode != e.status {
					t.Errorf("status = %d, want %d", res.StatusCode, e.status)
				}
				if got := res.Header.Get("Content-Type"); got != e.ctype {
					t.Errorf("Content-Type = %q, want %q", got, e.ctype)
				}
				if got := res.Header.Get("X-Amz-Request-Id"); got != "17A" {
					t.Errorf("X-Amz-Request-Id = %q, want %q", got, "17A")
				}
				if !bytes.Equal(body, []byte(e.body)) {
					t.Errorf("body = %q, want %q", body, e.body)
				}
			})
		}
	}
}

// TestMisdirectedHost: with ServerNames set, the main port answers 421 to
// another Host (or :authority) and Cells never sees the request.
func TestMisdirectedHost(t *testing.T) {
	t.Parallel()
	rec := &recorder{}
	up := newUpstream(t, upTLS, rec)
	cfg := testConfig(up)
	cfg.ServerNames = []string{"cells.example.com"}
	tp := startProxy(t, cfg)

	t.Run("h1", func(t *testing.T) {
		res, _ := rawH1(t, tp, "GET /a/x HTTP/1.1\r\nHost: evil.example:8443\r\nConnection: close\r\n\r\n")
		if got, want := res.StatusCode, http.StatusMisdirectedRequest; got != want {
			t.Errorf("status = %d, want %d", got, want)
		}
	})
	t.Run("h2", func(t *testing.T) {
		res := rawH2(t, tp, h2Fields("GET", "evil.example", "/a/x"), nil)
		if got, want := res.Status, http.StatusMisdirectedRequest; got != want {
			t.Errorf("status = %d, want %d", got, want)
		}
	})
	t.Run("h2 client", func(t *testing.T) {
		req, _ := http.NewRequest("GET", tp.URL+"/a/x", nil)
		req.Host = "other.example.com"
		res, err := tp.H2.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		if got, want := res.StatusCode, http.StatusMisdirectedRequest; got != want {
			t.Errorf("status = %d, want %d", got, want)
		}
	})
	if n := rec.count(); n != 0 {
		t.Errorf("upstream saw %d requests for a foreign host, want 0", n)
	}

	// The accepted name, with any port and case, passes.
	for _, host := range []string{"cells.example.com", "Cells.Example.Com:8443", "cells.example.com.:443"} {
		t.Run("accepted/"+host, func(t *testing.T) {
			res, _ := rawH1(t, tp, "GET /a/x HTTP/1.1\r\nHost: "+host+"\r\nConnection: close\r\n\r\n")
			if got, want := res.StatusCode, http.StatusOK; got != want {
				t.Errorf("status = %d, want %d", got, want)
			}
			if got := rec.last(t).Host; got != host {
				t.Errorf("upstream Host = %q, want %q", got, host)
			}
		})
	}
}

// TestMalformedRequests: what net/http lets through to the handler but
// must not reach Cells gets 400 from the proxy, on HTTP/1.1 and HTTP/2,
// and is not logged as Cells failing. An HTTP/2 content-length that is not
// a number or is past int64 (net/http's HTTP/2 server takes it for 0), or
// that a request whose HEADERS end the stream carries (net/http ignores
// it), would have made Cells store an empty file; a port that is not
// a number passes PROXY_SERVER_NAMES, which compares names, and Cells
// builds its external URLs from Host; an :authority that net/http's client
// refuses was answered 502, as if Cells had failed.
func TestMalformedRequests(t *testing.T) {
	t.Parallel()
	rec := &recorder{}
	up := newUpstream(t, upTLS, rec)
	cfg := testConfig(up)
	cfg.ServerNames = []string{"cells.example.com", "127.0.0.1"}
	tp := startProxy(t, cfg)
	put := func(cl string) []string {
		return h2Fields("PUT", "cells.example.com", "/io/personal/f.txt", "content-length", cl)
	}
	for _, tc := range []struct {
		name   string
		fields []string // HTTP/2; and HTTP/1.1 from the same fields when h1 is set
		h1     bool
	}{
		{"content-length abc", put("abc"), false},
		{"content-length +5", put("+5"), false},
		{"content-length 5,5", put("5,5"), false},
		{"content-length 5 and 6", append(put("5"), "content-length", "6"), false},
		{"content-length past int64", put("9223372036854775808"), false},
		{"port not a number", h2Fields("GET", "cells.example.com:evil.example", "/a/frontend/bootconf"), true},
		{"port %2f", h2Fields("GET", "cells.example.com:%2f%2fevil.example", "/a/frontend/bootconf"), true},
		{"authority with a space", h2Fields("GET", "bad host", "/a/x"), false},
		{"authority with a quote", h2Fields("GET", `a"b`, "/a/x"), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := rec.count()
			// The body is held back until the answer: net/http's
			// server resets a stream whose DATA exceeds the length it
			// took, which could come first.
			fc := dialH2(t, tp)
			fc.wmu.Lock()
			fc.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, EndHeaders: true, BlockFragment: fc.block(tc.fields...)})
			fc.wmu.Unlock()
			if ev := fc.answer(t, 1); ev.String() != ":status 400" {
				t.Errorf("HTTP/2: %v, want :status 400", ev)
			}
			if tc.h1 {
				res, _ := rawH1(t, tp, "GET /a/frontend/bootconf HTTP/1.1\r\nHost: "+tc.fields[5]+"\r\nConnection: close\r\n\r\n")
				if res.StatusCode != http.StatusBadRequest {
					t.Errorf("HTTP/1.1: %s, want 400", res.Status)
				}
			}
			if rec.count() > before {
				s := rec.last(t)
				t.Errorf("Cells got %s %s Host %q Content-Length %q body %q", s.Method, s.RequestURI, s.Host, s.Header.Get("Content-Length"), s.Body)
			}
		})
	}
	t.Run("content-length 5, stream ended", func(t *testing.T) {
		// net/http's HTTP/2 server ignores the content-length of a
		// request whose HEADERS end the stream: Cells was sent an empty
		// PUT, and stored an empty file where 5 bytes were announced.
		before := rec.count()
		fc := dialH2(t, tp)
		fc.wmu.Lock()
		fc.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, EndHeaders: true, EndStream: true, BlockFragment: fc.block(put("5")...)})
		fc.wmu.Unlock()
		if ev := fc.answer(t, 1); ev.String() != ":status 400" {
			t.Errorf("HTTP/2: %v, want :status 400", ev)
		}
		if rec.count() > before {
			s := rec.last(t)
			t.Errorf("Cells got %s %s Content-Length %q body %q", s.Method, s.RequestURI, s.Header.Get("Content-Length"), s.Body)
		}
	})
	// The well-formed neighbours pass.
	fc := dialH2(t, tp)
	fc.wmu.Lock()
	fc.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, EndHeaders: true, BlockFragment: fc.block(put("5")...)})
	fc.fr.WriteData(1, true, []byte("hello"))
	fc.wmu.Unlock()
	if ev := fc.answer(t, 1); ev.String() != ":status 200" {
		t.Errorf("content-length 5: %v, want :status 200", ev)
	}
	if res, _ := rawH1(t, tp, "GET /a/frontend/bootconf HTTP/1.1\r\nHost: cells.example.com:8443\r\nConnection: close\r\n\r\n"); res.StatusCode != http.StatusOK {
		t.Errorf("a numeric port: %s, want 200", res.Status)
	}
	if strings.Contains(tp.Log.String(), "upstream error") {
		t.Errorf("a client's malformed request logged as an upstream error:\n%s", tp.Log)
	}
}

// TestRequestTargetForms: a request-target that is neither a path, nor "*"
// for OPTIONS, nor (HTTP/1.1 only) an absolute URL gets 400, on HTTP/1.1
// and HTTP/2, instead of reaching Cells as another path: net/http parses
// "a:b" as an opaque URL, which used to reach Cells as "/", and an HTTP/2
// :path "http://host/p" as "/p" (RFC 9113 allows a path only). The forms
// Cells is sent keep their bytes. (OPTIONS * is answered by net/http's
// servers themselves.)
func TestRequestTargetForms(t *testing.T) {
	t.Parallel()
	rec := &recorder{}
	tp := startProxy(t, testConfig(newUpstream(t, upTLS, rec)))
	for _, tc := range []struct {
		method, target string
		h1, h2         string // the request-target Cells gets, or "400"
	}{
		{"GET", "/a/frontend/bootconf?x=1", "/a/frontend/bootconf?x=1", "/a/frontend/bootconf?x=1"},
		{"GET", "//io/a%2Fb", "//io/a%2Fb", "//io/a%2Fb"},
		{"GET", "*", "400", "400"},
		{"GET", "a:b", "400", "400"},
		{"GET", "mailto:x@example.com", "400", "400"},
		{"GET", "http:/io/x", "400", "400"},
		{"GET", "https://cells.example.com/io/x?y=1", "/io/x?y=1", "400"},
		{"GET", "/a b", "400", "400"}, // HTTP/1.1: net/http's parser refuses it
	} {
		t.Run(tc.method+" "+tc.target, func(t *testing.T) {
			before := rec.count()
			res, _ := rawH1(t, tp, tc.method+" "+tc.target+" HTTP/1.1\r\nHost: cells.example.com\r\nConnection: close\r\n\r\n")
			if tc.h1 == "400" {
				if res.StatusCode != http.StatusBadRequest {
					t.Errorf("HTTP/1.1: %s, want 400", res.Status)
				}
			} else if res.StatusCode != http.StatusOK || rec.count() == before || rec.last(t).RequestURI != tc.h1 {
				t.Errorf("HTTP/1.1: %s, Cells got %d requests; want 200 and %q", res.Status, rec.count()-before, tc.h1)
			}

			fc := dialH2(t, tp)
			fc.wmu.Lock()
			fc.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, EndHeaders: true, EndStream: true,
				BlockFragment: fc.block(h2Fields(tc.method, "cells.example.com", tc.target)...)})
			fc.wmu.Unlock()
			ev := fc.answer(t, 1)
			if tc.h2 == "400" {
				if ev.String() != ":status 400" {
					t.Errorf("HTTP/2: %v, want :status 400", ev)
				}
			} else if ev.String() != ":status 200" || rec.last(t).RequestURI != tc.h2 {
				t.Errorf("HTTP/2: %v, Cells got %q; want :status 200 and %q", ev, rec.last(t).RequestURI, tc.h2)
			}
			if n := rec.count() - before; n != okCount(tc.h1, tc.h2) {
				t.Errorf("Cells got %d requests, want %d", n, okCount(tc.h1, tc.h2))
			}
		})
	}
}

// okCount is how many of the wanted outcomes are forwarded requests.
func okCount(outcomes ...string) int {
	n := 0
	for _, o := range outcomes {
		if o != "400" {
			n++
		}
	}
	return n
}

// TestTrailerAlsoInHeader: a field Cells sends in its header and again as
// a trailer (X-Foo: a in the header, X-Foo: b after the body) reaches the
// client as Cells sent it, over HTTP/1.1 (chunked) and HTTP/2, on the
// direct path and through ReverseProxy: the header's value in the header,
// the trailer's alone in the trailers. Cells may declare every trailer in
// Trailer, or not all of them (X-Bar), which the proxy passes on under
// http.TrailerPrefix.
func TestTrailerAlsoInHeader(t *testing.T) {
	t.Parallel()
	up := newUpstream(t, upPlain, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		h := w.Header()
		h.Set("Trailer", "X-Foo")
		h.Set("X-Foo", "a")
		if r.URL.Path == "/undeclared" {
			h.Set("X-Bar", "a")
		}
		w.WriteHeader(http.StatusOK)
		io.WriteString(w, "body")
		h.Set("X-Foo", "b")
		if r.URL.Path == "/undeclared" {
			h.Set(http.TrailerPrefix+"X-Bar", "b")
		}
	}))
	check := func(name string, c *http.Client, url string, size int) {
		t.Helper()
		var body io.Reader
		if size > 0 {
			body = bytes.NewReader(bytes.Repeat([]byte("u"), size))
		}
		req, err := http.NewRequest("POST", url, body)
		if err != nil {
			t.Fatal(err)
		}
		// A connection of its own: the proxy's HTTP/1.1 front hands a
		// connection to net/http for good at its first upload.
		tr := c.Transport.(*http.Transport).Clone()
		defer tr.CloseIdleConnections()
		res, err := (&http.Client{Transport: tr}).Do(req)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		b, err := io.ReadAll(res.Body)
		res.Body.Close()
		if err != nil || string(b) != "body" {
			t.Fatalf("%s: body %q, %v", name, b, err)
		}
		names := []string{"X-Foo"}
		if strings.HasSuffix(url, "/undeclared") {
			names = append(names, "X-Bar")
		}
		for _, k := range names {
			if got, want := res.Header[k], []string{"a"}; !slices.Equal(got, want) {
				t.Errorf("%s: header %s = %q, want %q", name, k, got, want)
			}
			if got, want := res.Trailer[k], []string{"b"}; !slices.Equal(got, want) {
				t.Errorf("%s: trailer %s = %q, want %q", name, k, got, want)
			}
		}
	}
	tp := startProxy(t, testConfig(up))
	for _, path := range []string{"/declared", "/undeclared"} {
		// What Cells sends, seen without the proxy.
		check("Cells itself "+path, &http.Client{Transport: &http.Transport{}}, up.URL.String()+path, 0)
		for _, pc := range h1h2Clients(tp) {
			check(pc.name+", direct path "+path, pc.c, tp.URL+path, 0)
			check(pc.name+", ReverseProxy "+path, pc.c, tp.URL+path, 64<<10)
		}
	}
}

// TestTrailerDeclaredNotSent: Cells declares a trailer and sends none (a
// Go handler that sets Trailer and returns early on an error: net/http
// sends the field and an empty trailer section), or sends one empty, or
// one whose name holds a space (which Go's reader takes, go.dev/issue/
// 34540). The response reaches the client whole and ends, over HTTP/1.1
// and HTTP/2, on the direct path and through ReverseProxy; no trailer
// whose name is not a field name reaches it.
// net/http's HTTP/2 server sends nothing, not even END_STREAM, when the
// trailers it has are all left out as it encodes them (a name with no
// value, an invalid name): the stream stayed open for good, and the
// client (every browser) waited for the response's end until it gave up.
// Found by FuzzUpstreamResponse.
func TestTrailerDeclaredNotSent(t *testing.T) {
	t.Parallel()
	trailers := map[string]string{
		"/none":    "Trailer: X-Sum\r\n\r\n2\r\nok\r\n0\r\n\r\n",
		"/empty":   "Trailer: X-Sum, X-Empty\r\n\r\n2\r\nok\r\n0\r\nX-Empty: \r\n\r\n",
		"/invalid": "Trailer: X-Sum\r\n\r\n2\r\nok\r\n0\r\nX Sum: 1\r\n\r\n",
	}
	up := newAnsweringUpstream(t, func(r *http.Request) string {
		return "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n" + trailers[r.URL.Path]
	})
	putBothPaths(t, up.proxy(t), []string{"/none", "/empty", "/invalid"}, func(what, cells string, res *http.Response, b []byte, err error) {
		if err != nil || string(b) != "ok" {
			t.Errorf("%s: body %q, %v; want the whole body and its end", what, b, err)
			return
		}
		for k, v := range res.Trailer {
			if strings.Contains(k, " ") {
				t.Errorf("%s: trailer %q: %q, want no name with a space", what, k, v)
			}
		}
		if v, ok := res.Trailer["X-Empty"]; cells == "/empty" && (!ok || !slices.Equal(v, []string{""})) {
			t.Errorf("%s: trailer X-Empty %q (present %v), want one empty value", what, v, ok)
		}
	})
}

// putBothPaths sends a PUT to each of paths through tp, over HTTP/1.1 and
// HTTP/2, each once without a body (the direct path) and once with 64 KiB
// (ReverseProxy), and hands each answer, its whole body read, to check
// with a description (what) of how it went. Each request has a connection
// of its own: the proxy's HTTP/1.1 front hands a connection to net/http for
// good at its first upload. A request that gets no response fails t.
func putBothPaths(t *testing.T, tp *testProxy, paths []string, check func(what, path string, res *http.Response, body []byte, err error)) {
	t.Helper()
	for _, pc := range h1h2Clients(tp) {
		for _, size := range []int{0, 64 << 10} {
			for _, path := range paths {
				what := pc.name + ", direct path " + path
				var body io.Reader
				if size > 0 {
					what = pc.name + ", ReverseProxy " + path
					body = bytes.NewReader(bytes.Repeat([]byte("u"), size))
				}
				ctx, cancel := context.WithTimeout(testCtx(t), 10*time.Second)
				req, err := http.NewRequestWithContext(ctx, "PUT", tp.URL+path, body)
				if err != nil {
					t.Fatal(err)
				}
				tr := pc.c.Transport.(*http.Transport).Clone()
				res, err := (&http.Client{Transport: tr}).Do(req)
				if err != nil {
					cancel()
					t.Fatalf("%s: %v", what, err)
				}
				b, err := io.ReadAll(res.Body)
				res.Body.Close()
				tr.CloseIdleConnections()
				cancel()
				check(what, path, res, b, err)
			}
		}
	}
}

// TestInvalidFieldNameFromCells: a response header from Cells with a space
// in a field name, before the colon or inside the name, is answered 502
// as nginx answers it ("upstream sent invalid header"), on both protocols,
// on the direct path, through ReverseProxy and for a websocket handshake.
// Go's reader takes such a name (go.dev/issue/34540): the field used to be
// left out unsaid, and "Content-Length : 2" on a kept-alive connection,
// which Go's reader does not take for a length, left the client waiting
// for the body's end until Cells closed. The next request is served.
func TestInvalidFieldNameFromCells(t *testing.T) {
	t.Parallel()
	answers := map[string]string{
		"/before-colon": "HTTP/1.1 200 OK\r\nX-Foo : v\r\nContent-Length: 2\r\n\r\nok",
		"/inside":       "HTTP/1.1 200 OK\r\nX Foo: v\r\nContent-Length: 2\r\n\r\nok",
		"/length":       "HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok",
		"/ok":           "HTTP/1.1 200 OK\r\nX-Foo: v\r\nContent-Length: 2\r\n\r\nok",
	}
	up := newAnsweringUpstream(t, func(r *http.Request) string {
		if r.URL.Path == "/ws/event" {
			return "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nX Foo: v\r\n" +
				"Sec-WebSocket-Accept: " + wsAccept(r.Header.Get("Sec-WebSocket-Key")) + "\r\n\r\n"
		}
		return answers[r.URL.Path]
	})
	tp := up.proxy(t)
	putBothPaths(t, tp, []string{"/before-colon", "/inside", "/length", "/ok"}, func(what, cells string, res *http.Response, b []byte, err error) {
		want := http.StatusBadGateway
		if cells == "/ok" {
			want = http.StatusOK
		}
		if err != nil || res.StatusCode != want {
			t.Errorf("%s: status %d, body %q, %v; want %d and the whole body", what, res.StatusCode, b, err, want)
		}
		if cells == "/ok" && (string(b) != "ok" || res.Header.Get("X-Foo") != "v") {
			t.Errorf("%s: body %q, X-Foo %q; want \"ok\" and \"v\"", what, b, res.Header.Get("X-Foo"))
		}
	})
	conn := tp.dialTLS(t, tp.Addr().String(), "http/1.1")
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	if res := wsHandshake(t, conn, tp.Addr().String()); res.StatusCode != http.StatusBadGateway {
		t.Errorf("websocket handshake: status %d, want %d", res.StatusCode, http.StatusBadGateway)
	}
}

// TestEncodeGRPCTimeout: the time left that a call sent again carries to
// Cells is written as grpc-go's client writes a grpc-timeout: at most 8
// digits, the finest unit that fits, rounded up, so that a call with time
// left never reaches Cells as expired, nor with less time than it has.
func TestEncodeGRPCTimeout(t *testing.T) {
	for _, c := range []struct {
		d    time.Duration
		want string
	}{
		{1, "1n"},
		{99999999, "99999999n"},
		{100 * time.Millisecond, "100000u"},
		{100*time.Millisecond + 1, "100001u"},
		{30*time.Second - 1, "30000000u"},
		{30 * time.Second, "30000000u"},
		{100 * time.Second, "100000m"},
		{time.Hour, "3600000m"},
		{28 * time.Hour, "100800S"},
		{1200 * 24 * time.Hour, "1728000M"},
		{math.MaxInt64, "2562048H"},
	} {
		got := encodeGRPCTimeout(c.d)
		if got != c.want {
			t.Errorf("encodeGRPCTimeout(%v) = %q, want %q", c.d, got, c.want)
		}
		// Beyond what a Duration holds, the proxy reads no deadline:
		// grpc-go's server takes the longest one.
		if back, ok := parseGRPCTimeout(got); c.d != math.MaxInt64 && (!ok || back < c.d) {
			t.Errorf("encodeGRPCTimeout(%v) = %q, which reads back as %v (ok %v): less than the time left", c.d, got, back, ok)
		}
	}
}

// TestRequestTargetGRPC sends each target as the :path of a gRPC call, on
// the public port and on the PYDIO_GRPC_EXTERNAL port, and compares the
// :path Cells' gRPC server receives with it. The other request-target
// tests only reach CELLS_UPSTREAM; gRPC goes through the proxy's own
// HTTP/2 client (grpcupstream.go).
func TestRequestTargetGRPC(t *testing.T) {
	t.Parallel()
	paths := make(chan string, 1)
	p := newH2Peer(t, h2PeerConfig{}, func(s *h2Stream) {
		for _, f := range s.Header {
			if f.Name == ":path" {
				paths <- f.Value
			}
		}
		echo(s)
	})
	cfg := testConfig(newUpstream(t, upPlain, &recorder{}))
	cfg.GRPCUpstream = &url.URL{Scheme: "h2c", Host: p.Addr}
	cfg.GRPCAddr = "127.0.0.1:0"
	tp := startProxy(t, cfg)
	msg := grpcMsg([]byte("x"))
	for _, port := range []struct{ name, addr string }{
		{"public", tp.Addr().String()},
		{"PYDIO_GRPC_EXTERNAL", tp.GRPCAddr().String()},
	} {
		for _, tt := range requestTargets {
			t.Run(port.name+"/"+tt.name, func(t *testing.T) {
				res := rawH2At(t, tp, port.addr, h2Fields("POST", port.addr, tt.target, "content-type", "application/grpc", "te", "trailers"), msg)
				if res.Status != http.StatusOK || !bytes.Equal(res.Body, msg) {
					t.Fatalf("status %d, body %q; want 200 and the message echoed", res.Status, res.Body)
				}
				select {
				case got := <-paths:
					if got != tt.target {
						t.Errorf("upstream :path = %q, want %q", got, tt.target)
					}
				default:
					t.Fatal("Cells' gRPC server got no call")
				}
			})
		}
	}
}
