package proxy

import (
	"bufio"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/textproto"
	"net/url"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http/httpguts"
)

// sizeUnits are ParseSize's units and what each multiplies by.
var sizeUnits = []struct {
	unit string
	mult int64
}{
	{"", 1}, {"b", 1}, {"k", 1 << 10}, {"KiB", 1 << 10}, {"Ki", 1 << 10}, {"m", 1 << 20}, {"MiB", 1 << 20},
	{"g", 1 << 30}, {"GiB", 1 << 30}, {"t", 1 << 40}, {"TiB", 1 << 40},
	{"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9}, {"TB", 1e12},
}

// FuzzParseSize: whatever ParseSize accepts is a non-negative size that
// does not depend on letter case or surrounding space, and a number
// written with a unit reads back as number times unit, or as an error
// exactly when that overflows.
func FuzzParseSize(f *testing.F) {
	f.Add("200MiB", int64(200), uint8(6))
	f.Add("1G", int64(1), uint8(7))
	f.Add(" 0 ", int64(0), uint8(0))
	f.Add("9223372036854775807", int64(1<<63-1), uint8(1))
	f.Add("8388608TiB", int64(8388608), uint8(10))
	f.Add("-1", int64(-1), uint8(2))
	f.Add("1e3", int64(9223372), uint8(14))
	f.Fuzz(func(t *testing.T, s string, n int64, u uint8) {
		if got, err := ParseSize(s); err == nil {
			if got < 0 {
				t.Fatalf("ParseSize(%q) = %d, want a size >= 0", s, got)
			}
			for _, v := range []string{strings.ToUpper(s), strings.ToLower(s), " " + s + "\t"} {
				if again, err := ParseSize(v); err != nil || again != got {
					t.Errorf("ParseSize(%q) = %d, %v; ParseSize(%q) = %d", s, got, err, v, again)
				}
			}
			if again, err := ParseSize(strconv.FormatInt(got, 10)); err != nil || again != got {
				t.Errorf("ParseSize(%q) = %d, but ParseSize(%d) = %d, %v", s, got, got, again, err)
			}
		}

		if n < 0 {
			n = -(n + 1)
		}
		su := sizeUnits[int(u)%len(sizeUnits)]
		in := strconv.FormatInt(n, 10) + su.unit
		got, err := ParseSize(in)
		overflow := n > (1<<63-1)/su.mult
		switch {
		case overflow && err == nil:
			t.Errorf("ParseSize(%q) = %d, want an error: %d×%d overflows int64", in, got, n, su.mult)
		case !overflow && err != nil:
			t.Errorf("ParseSize(%q): %v", in, err)
		case !overflow && got != n*su.mult:
			t.Errorf("ParseSize(%q) = %d, want %d", in, got, n*su.mult)
		}
	})
}

// FuzzUpstreamURL: a CELLS_UPSTREAM carrying a password is always refused
// and the error never repeats the password, however the password and the
// rest of the URL are shaped. The password is fenced with markers the rest
// cannot contain, so that a partial leak is caught too.
func FuzzUpstreamURL(f *testing.F) {
	f.Add("admin", "s3cret", "cells:8080")
	f.Add("u", "p@ssw0rd", "cells:8080")
	f.Add("u", "pa/ss", "cells:8080")
	f.Add("u", "pa#ss", "cells")
	f.Add("u", "pa?ss", "cells:99999")
	f.Add("u:v", "x", "cells/path")
	f.Add("", "%zz", "[::1]:8080")
	f.Add("u", "pw", "cells@other:1")
	f.Fuzz(func(t *testing.T, user, pw, rest string) {
		const open, shut = "Zq", "Qz"
		if strings.Contains(user+rest, open) || strings.Contains(user+rest, shut) {
			return
		}
		password := open + pw + shut
		for _, scheme := range []string{"https://", "http://", "h2c://", "://", "https:/", "https:", "//", ""} {
			s := scheme + user + ":" + password + "@" + rest
			u, err := parseUpstream(s, "http", "https")
			if err == nil {
				t.Fatalf("parseUpstream(%q) = %v, want an error: it carries a password", s, u)
			}
			if msg := err.Error(); strings.Contains(msg, open) || strings.Contains(msg, shut) {
				t.Fatalf("parseUpstream(%q): the error repeats (part of) the password: %s", s, msg)
			}
			if red := redactURL(s); strings.Contains(red, open) || strings.Contains(red, shut) {
				t.Fatalf("redactURL(%q) = %q, which keeps (part of) the password", s, red)
			}
		}

		// Any string: a password that url.Parse finds is not repeated.
		if u, err := url.Parse(rest); err == nil && u.User != nil {
			if p, ok := u.User.Password(); ok && len(p) >= 4 && strings.Count(rest, p) == 1 {
				if _, err := parseUpstream(rest, "http", "https"); err == nil || strings.Contains(err.Error(), p) {
					t.Fatalf("parseUpstream(%q) = %v, which repeats the password %q", rest, err, p)
				}
			}
		}
	})
}

// FuzzEnvParse: env.parse never panics on any value, every line of its
// error names the variable at fault, and what it accepts is usable.
func FuzzEnvParse(f *testing.F) {
	f.Add("https://cells:8080", "", "", "0", "10m", "", "", "64KiB")
	f.Add("http://cells:8080", "h2c://cells:33060", "33060", "200MiB", "90s", "10.0.0.0/8, ::1", "cells.example.com", "8k")
	f.Add("cells:8080", "ftp://x", "0", "-1", "0s", "10.0.0.0/33", "a:b", "1")
	f.Add("https://u:pw@cells:8080/x?y", "https://", "65536", "1e9", "-5m", ",,", "/", "17MiB")
	f.Add("", "h2c://[::1", "x", "9999999999TiB", "1h", "300.1.1.1", " ", "")
	f.Fuzz(func(t *testing.T, upstream, grpcUp, grpcPort, maxBody, idle, trusted, names, maxHeader string) {
		var e env
		ev := reflect.ValueOf(&e).Elem()
		for i, v := range Variables() {
			ev.Field(i).SetString(v.Default)
		}
		e.Upstream, e.GRPCUpstream, e.GRPCExternal = upstream, grpcUp, grpcPort
		e.MaxBodySize, e.IdleTimeout, e.TrustedProxies = maxBody, idle, trusted
		e.ServerNames, e.MaxHeaderBytes = names, maxHeader
		c, err := e.parse()
		if err != nil {
			for line := range strings.SplitSeq(err.Error(), "\n") {
				named := false
				for _, v := range Variables() {
					named = named || strings.Contains(line, v.Name)
				}
				if !named {
					t.Errorf("error line names no variable: %q", line)
				}
			}
			return
		}
		if c.Upstream == nil || c.Upstream.Host == "" || (c.Upstream.Scheme != "http" && c.Upstream.Scheme != "https") {
			t.Errorf("accepted an unusable upstream %v from %q", c.Upstream, upstream)
		}
		if c.Upstream.User != nil {
			t.Errorf("accepted an upstream with credentials from %q", upstream)
		}
		if c.MaxBodySize < 0 || c.IdleTimeout <= 0 || c.MaxHeaderBytes < 4<<10 || c.MaxHeaderBytes > 16<<20 {
			t.Errorf("accepted MaxBodySize %d, IdleTimeout %v, MaxHeaderBytes %d", c.MaxBodySize, c.IdleTimeout, c.MaxHeaderBytes)
		}
	})
}

// rawCapture stands in for Cells: a cleartext HTTP/1.1 listener on
// loopback that keeps every request, its head as it came off the wire and
// its body (decoded), and answers 200 on the same connection.
type rawCapture struct {
	ln    net.Listener
	mu    sync.Mutex
	heads []string
}

func newRawCapture(tb testing.TB) *rawCapture {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	c := &rawCapture{ln: ln}
	tb.Cleanup(func() { ln.Close() })
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			go c.serve(conn)
		}
	}()
	return c
}

func (c *rawCapture) serve(conn net.Conn) {
	defer conn.Close()
	br := bufio.NewReader(conn)
	for {
		var head strings.Builder
		for {
			line, err := br.ReadString('\n')
			if err != nil {
				return
			}
			head.WriteString(line)
			if line == "\r\n" || line == "\n" {
				break
			}
		}
		_, req, err := parseHead(head.String(), br)
		if err != nil {
			return
		}
		body, _ := io.ReadAll(req.Body)
		c.mu.Lock()
		c.heads = append(c.heads, head.String()+string(body))
		c.mu.Unlock()
		if _, err := io.WriteString(conn, "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"); err != nil {
			return
		}
	}
}

// parseHead parses a request head, with its body (if any) to follow from
// body, and returns its request-target as written. net/http's parser would
// refuse some targets that the proxy passes on verbatim (an absolute-form
// "a://h/%" becomes "/%"): the head is parsed with "/" in their place.
func parseHead(head string, body io.Reader) (string, *http.Request, error) {
	method, rest, _ := strings.Cut(head, " ")
	target, rest, _ := strings.Cut(rest, " ")
	req, err := http.ReadRequest(bufio.NewReader(io.MultiReader(strings.NewReader(method+" / "+rest), body)))
	return target, req, err
}

// take returns the requests received since the last call.
func (c *rawCapture) take() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	h := c.heads
	c.heads = nil
	return h
}

// forwarder is a forwarder to c, as the public TLS port's, believing the
// forwarding headers of trusted peers.
func (c *rawCapture) forwarder(tb testing.TB, trusted ...netip.Prefix) *forwarder {
	tb.Helper()
	fwd, err := newForwarder(&Config{
		Upstream:       &url.URL{Scheme: "http", Host: c.ln.Addr().String()},
		TLS:            true,
		IdleTimeout:    time.Minute,
		TrustedProxies: trusted,
	}, slog.New(slog.DiscardHandler))
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(fwd.httpUp.CloseIdleConnections)
	return fwd
}

// fuzzHopHeaders are hop-by-hop headers the fuzzed request always carries,
// on top of the fuzzed one.
const fuzzHopHeaders = "Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\n" +
	"Te: gzip\r\nTrailer: X-T\r\nUpgrade: h2c\r\nProxy-Authorization: Basic eA==\r\n"

// fuzzSpoofHeaders are forged forwarding headers from an untrusted peer.
const fuzzSpoofHeaders = "X-Forwarded-For: 6.6.6.6\r\nX-Real-Ip: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\n" +
	"X-Forwarded-Host: evil.example\r\nX-Forwarded-Proto: http\r\n"

// FuzzRewrite drives the forwarder with requests parsed from arbitrary
// methods, request targets and a header of any name and value, and checks
// the request Cells receives, as its bytes arrive on a loopback listener:
// no hop-by-hop header, the proxy's forwarding headers and none of the
// client's, the Host as sent, and a request-target equal to the client's
// bytes (for an absolute-form target, its path and query); a target that
// is none of the forms Cells is sent gets 400 and reaches nobody. Each request
// goes once without a body, on the direct path (direct.go), and once with
// a chunked one, through httputil.ReverseProxy and http.Transport.
func FuzzRewrite(f *testing.F) {
	f.Add("GET", "/a/meta/bulk/path%2Fto%2Ffolder", "X-Pydio-Bearer", "tok")
	f.Add("PUT", "/io/bucket/a%20b+c;d,e'f?X-Amz-Signature=abc&x=a;b", "Authorization", "AWS4-HMAC-SHA256 Credential=x")
	f.Add("GET", "//double//slash", "Connection", "X-Forwarded-For, Host")
	f.Add("GET", "http://evil.example/steal?q", "Host", "x")
	f.Add("OPTIONS", "*", "Origin", "https://sync.local")
	f.Add("PROPFIND", "/dav/personal/d%C3%A9j%C3%A0", "Depth", "1")
	f.Add("GET", "/a?", "Te", "trailers")
	f.Add("CONNECT", "evil.example:443", "X", "y")
	f.Add("GET", "/\xc3\xa9t\xc3\xa9?%zz", "Upgrade", "websocket")
	f.Add("POST", "/ws/event", "Connection", "upgrade, keep-alive")
	f.Add("GET", "//a\"b<c>", "Connection", "User-Agent")
	f.Add("DELETE", "/x", "User-Agent", " cells-client/4 ")

	up := newRawCapture(f)
	fwd := up.forwarder(f)

	f.Fuzz(func(t *testing.T, method, target, name, value string) {
		head := method + " " + target + " HTTP/1.1\r\nHost: cells.example.com:443\r\n" + name + ": " + value + "\r\n" +
			fuzzHopHeaders + fuzzSpoofHeaders
		for _, body := range []bool{false, true} {
			raw := head + "\r\n"
			if body {
				raw = head + "Transfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n"
			}
			in, err := http.ReadRequest(bufio.NewReader(strings.NewReader(raw)))
			if err != nil {
				return // Go's server would have refused it
			}
			// What the server checks beyond ReadRequest.
			if !httpguts.ValidHostHeader(in.Host) || len(in.Header["Host"]) > 1 || in.Method == "PRI" || isWebSocket(in) || checkHeader(in.Header) != nil {
				return
			}
			// serve drops Upgrade (not a websocket) before it picks a path.
			probe := in.Clone(in.Context())
			probe.Header.Del("Upgrade")
			direct := fastPath(probe)
			if len(in.TransferEncoding) > 0 && direct {
				t.Fatal("a chunked request on the direct path")
			}
			checkRewrite(t, fwd, up, in, target, direct)
		}
	})
}

func checkRewrite(t *testing.T, fwd *forwarder, up *rawCapture, in *http.Request, target string, direct bool) {
	in.RemoteAddr = "203.0.113.9:41000"
	clientHeader := in.Header.Clone()
	clientHost := in.Host
	body := len(in.TransferEncoding) > 0
	path := "direct"
	if !direct {
		path = "ReverseProxy"
	}

	forwardable := targetOK(in) // TestRequestTargetForms pins what it accepts
	up.take()
	w := httptest.NewRecorder()
	fwd.ServeHTTP(w, in)
	heads := up.take()

	if in.Method == http.MethodConnect {
		if w.Code != http.StatusMethodNotAllowed || len(heads) != 0 {
			t.Fatalf("CONNECT: status %d and %d upstream requests, want 405 and none", w.Code, len(heads))
		}
		return
	}
	if !forwardable {
		if w.Code != http.StatusBadRequest || len(heads) != 0 {
			t.Fatalf("target %q: status %d and %d upstream requests, want 400 and none", target, w.Code, len(heads))
		}
		return
	}
	if len(heads) != 1 {
		t.Fatalf("%s: %d upstream requests (status %d), want 1", path, len(heads), w.Code)
	}
	uri, out, err := parseHead(heads[0], strings.NewReader(""))
	if err != nil {
		t.Fatalf("%s: Cells could not parse %q: %v", path, heads[0], err)
	}

	// The request-target, byte for byte.
	switch {
	case !direct && strings.HasPrefix(target, "//") && !verbatimPath(target):
		// net/http writes a request-target that starts with "//" only
		// from URL.RawPath (an Opaque would gain a scheme), and it
		// ignores a RawPath holding bytes RFC 3986 does not allow in a
		// path or an escape it cannot decode: such a target is
		// re-encoded ("//\"" becomes "//%22", "//%" becomes "/").
		// Known limitation of requests that go through ReverseProxy,
		// documented in SECURITY.md; the direct path writes it as sent.
		t.Skip("reason: a //-target with bytes outside RFC 3986 paths or an undecodable escape cannot be sent verbatim by net/http")
	case strings.HasPrefix(target, "/") || target == "*":
		if uri != target {
			t.Errorf("%s: upstream request-target = %q, want the client's %q", path, uri, target)
		}
	default:
		// Absolute form: the path after the authority (or "/") and the
		// query, byte for byte; never a scheme or a host.
		tpath, tquery, tq := strings.Cut(target, "?")
		upath, uquery, uq := strings.Cut(uri, "?")
		if !strings.HasPrefix(uri, "/") || tq != uq || tquery != uquery {
			t.Errorf("%s: absolute-form %q became upstream request-target %q, want its path and query", path, target, uri)
		}
		if _, rest, ok := strings.Cut(tpath, "://"); ok {
			want := "/"
			if i := strings.IndexByte(rest, '/'); i >= 0 {
				want = rest[i:]
			}
			if !direct && strings.HasPrefix(want, "//") && !verbatimPath(want) {
				t.Skip("reason: a //-path with bytes outside RFC 3986 paths or an undecodable escape cannot be sent verbatim by net/http (see above)")
			}
			if upath != want {
				t.Errorf("%s: absolute-form %q became upstream path %q, want %q", path, target, upath, want)
			}
		}
	}
	if out.Host != clientHost || len(out.Header["Host"]) > 0 {
		t.Errorf("%s: upstream Host = %q, want the client's %q once", path, out.Host, clientHost)
	}

	// No hop-by-hop header, nor any the client named in Connection.
	hop := []string{"Connection", "Proxy-Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "Trailer", "Upgrade", "X-Hop"}
	if !body {
		hop = append(hop, "Transfer-Encoding")
	}
	for _, v := range clientHeader["Connection"] {
		for _, n := range strings.Split(v, ",") {
			if n = strings.TrimSpace(n); httpguts.ValidHeaderFieldName(n) {
				hop = append(hop, n)
			}
		}
	}
	forwarding := map[string]bool{"X-Forwarded-For": true, "X-Real-Ip": true, "X-Forwarded-Proto": true, "X-Forwarded-Host": true, "Host": true}
	for _, h := range hop {
		if forwarding[http.CanonicalHeaderKey(h)] {
			continue // set by the proxy, checked below
		}
		if v, ok := out.Header[http.CanonicalHeaderKey(h)]; ok {
			t.Errorf("%s: upstream got hop-by-hop header %s: %q", path, h, v)
		}
	}
	if te := out.Header.Values("Te"); len(te) > 0 && (len(te) != 1 || te[0] != "trailers") {
		t.Errorf("%s: upstream got Te %q, want none or \"trailers\"", path, te)
	}
	if body && (len(out.TransferEncoding) != 1 || out.TransferEncoding[0] != "chunked") {
		t.Errorf("%s: upstream Transfer-Encoding %q, want chunked", path, out.TransferEncoding)
	}
	// The client's User-Agent, its first value, or none.
	ua := out.Header.Values("User-Agent")
	if cua := clientHeader.Values("User-Agent"); len(cua) > 0 && !slices.Contains(hop, "User-Agent") && strings.TrimSpace(cua[0]) != "" {
		if len(ua) != 1 || ua[0] != strings.TrimSpace(cua[0]) {
			t.Errorf("%s: upstream User-Agent %q, want the client's first, %q", path, ua, cua[0])
		}
	} else if len(ua) > 0 && ua[0] != "" {
		t.Errorf("%s: upstream User-Agent %q, want none", path, ua)
	}
	// Every other field of the client's, with its values.
	for k, vv := range clientHeader {
		if notForwarded(k) || slices.ContainsFunc(hop, func(h string) bool { return strings.EqualFold(h, k) }) {
			continue
		}
		want := make([]string, len(vv)) // as net/http writes them: trimmed
		for i, v := range vv {
			want[i] = textproto.TrimString(v)
		}
		if got := out.Header[k]; !reflect.DeepEqual(got, want) {
			t.Errorf("%s: upstream %s = %q, want the client's %q", path, k, got, want)
		}
	}

	// The proxy's forwarding headers, none of the client's.
	for _, want := range []struct{ name, value string }{
		{"X-Forwarded-For", "203.0.113.9"},
		{"X-Real-Ip", "203.0.113.9"},
		{"X-Forwarded-Proto", "https"},
		{"X-Forwarded-Host", clientHost},
	} {
		if got := out.Header.Values(want.name); len(got) != 1 || got[0] != want.value {
			t.Errorf("%s: upstream %s = %q, want [%q]", path, want.name, got, want.value)
		}
	}
	if v := out.Header.Values("Forwarded"); len(v) > 0 {
		t.Errorf("%s: upstream got the client's Forwarded %q", path, v)
	}
}

// verbatimPath reports whether net/http can write a request-target that
// starts with "//" as it is (from URL.RawPath): only bytes RFC 3986 allows
// in a path, and escapes that decode.
func verbatimPath(target string) bool {
	p, _, _ := strings.Cut(target, "?")
	_, err := url.PathUnescape(p)
	return rfc3986Path(target) && err == nil
}

// rfc3986Path reports whether the path of target (up to '?') holds only
// bytes RFC 3986 allows in a path: unreserved, sub-delims, ':', '@', '/'
// and '%'.
func rfc3986Path(target string) bool {
	p, _, _ := strings.Cut(target, "?")
	for i := 0; i < len(p); i++ {
		c := p[i]
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		case strings.IndexByte("-._~!$&'()*+,;=:@/%", c) >= 0:
		default:
			return false
		}
	}
	return true
}
