package proxy

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	"golang.org/x/net/http2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	grpchealth "google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// TestLogReviewInvalidMethodH2: net/http's HTTP/2 server passes on a
// :method that is not a token ("GE T"), which the HTTP/1.1 front refuses
// with 400. Such a request is the client's fault: it gets 400 (a gRPC call
// INTERNAL, as gRPC maps 400), reaches nothing of Cells, and makes no
// warning (found by review: each one was a 502 and a warn "upstream error"
// line blaming Cells, as many as a client cared to send).
func TestLogReviewInvalidMethodH2(t *testing.T) {
	rec := &recorder{}
	up := newUpstream(t, upTLS, rec)
	cfg := testConfig(up)
	cfg.AccessLog = true
	tp := startProxy(t, cfg)
	c := dialH2(t, tp)
	methods := []string{"GE T", `GET"x`, "G(ET", "GET\x80", "G\tET"}
	var id uint32 = 1
	for _, grpc := range []bool{false, true} {
		for _, m := range methods {
			var extra []string
			if grpc {
				extra = []string{"content-type", "application/grpc"}
			}
			if err := c.request(id, pseudo(tp, m, "/p?pydio_jwt=secret-1", extra...)...); err != nil {
				t.Fatal(err)
			}
			ev := c.answer(t, id)
			want := ":status 400"
			if grpc {
				want = ":status 200" // the gRPC status is in the headers
			}
			if got := ev.String(); got != want {
				t.Errorf("method %q (grpc %v): answer %s, want %s", m, grpc, got, want)
			}
			id += 2
		}
	}
	lines := accessLines(t, tp, 2*len(methods))
	for _, f := range lines {
		if f["proto"] != "grpc" && f["status"] != "400" {
			t.Errorf("method %q: access line status %s, want 400", f["method"], f["status"])
		}
	}
	if n := rec.count(); n != 0 {
		t.Errorf("%d requests with an invalid method reached Cells", n)
	}
	log := tp.Log.String()
	if strings.Contains(log, "upstream error") || strings.Contains(log, "secret") {
		t.Errorf("invalid methods logged as Cells' failure, or a secret logged:\n%s", log)
	}
}

// TestLogReviewCutShortBothPaths: a response whose body Cells cuts short
// gives the same warning on both forwarding paths, "upstream response cut
// short" with the request's method, host and redacted path; one the idle
// watchdog cuts gives none, the access line saying what was sent (found by
// review: an upload's response, which goes through httputil.ReverseProxy,
// gave httputil's own line instead, "httputil: ReverseProxy read error
// during body copy: unexpected EOF", naming no request, and one at each
// idle cut).
func TestLogReviewCutShortBothPaths(t *testing.T) {
	up := newUpstream(t, upTLS, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Write(make([]byte, 1000)) // chunked: no length to compare with
		w.(http.Flusher).Flush()
		if strings.HasPrefix(r.URL.Path, "/stall") {
			<-r.Context().Done()
			return
		}
		panic(http.ErrAbortHandler)
	}))
	cfg := testConfig(up)
	cfg.AccessLog = true
	cfg.IdleTimeout = 300 * time.Millisecond
	sink := newLogSink()
	tp := startLoggedProxy(t, cfg, sink, "json")
	from := 0
	for _, pc := range h1h2Clients(tp) {
		for _, body := range []int{0, 20000} { // the direct path, ReverseProxy's
			for _, p := range []string{"/cut", "/stall"} {
				name := fmt.Sprintf("%s %s with a %d-byte body", pc.name, p, body)
				req, _ := http.NewRequest("POST", tp.URL+p+"?pydio_jwt=secret-1", bytes.NewReader(make([]byte, body)))
				res, err := pc.c.Do(req)
				if err != nil {
					t.Fatalf("%s: %v", name, err)
				}
				if _, err := io.Copy(io.Discard, res.Body); err == nil {
					t.Errorf("%s: a body cut short read to its end (status %d)", name, res.StatusCode)
				}
				res.Body.Close()
				_, i := sink.wait(t, from, isAccess(t, p+"?pydio_jwt=REDACTED"))
				var warned []map[string]string
				for _, l := range strings.Split(sink.String(), "\n")[from:i] {
					// Not the test set-up's: a self-signed certificate,
					// the redirect port's 443.
					f := parseLogLine(t, l)
					if f["level"] == "WARN" && !strings.HasPrefix(f["msg"], "no TLS_CERT_FILE") && !strings.HasPrefix(f["msg"], "HTTPS requests name a port") {
						warned = append(warned, f)
					}
				}
				from = i + 1
				if p == "/stall" {
					if len(warned) != 0 {
						t.Errorf("%s: the idle cut warned: %v", name, warned)
					}
					continue
				}
				if len(warned) != 1 {
					t.Errorf("%s: %d warnings, want 1: %v", name, len(warned), warned)
					continue
				}
				f := warned[0]
				if f["msg"] != "upstream response cut short" || f["method"] != "POST" || f["path"] != p+"?pydio_jwt=REDACTED" {
					t.Errorf("%s: warning %v, want upstream response cut short with the method and redacted path", name, f)
				}
			}
		}
	}
}

// TestLogReviewMalformedHeaderFromCells: a malformed header or trailer line
// in Cells' answer makes the request fail (502) or its body break off, and
// the warning says so without the line, which may be a session cookie or a
// token (found by review: textproto's error quoted it whole, on both
// forwarding paths).
func TestLogReviewMalformedHeaderFromCells(t *testing.T) {
	up := newRawUpstream(t, func(conn int64, req *http.Request, w *bufio.Writer) bool {
		io.Copy(io.Discard, req.Body)
		switch req.URL.Path {
		case "/ctl":
			io.WriteString(w, "HTTP/1.1 200 OK\r\nSet-Cookie: pydio_session=secret-1\x01\r\nContent-Length: 2\r\n\r\nok")
		case "/colon":
			io.WriteString(w, "HTTP/1.1 200 OK\r\nSet-Cookie pydio_session=secret-2\r\nContent-Length: 2\r\n\r\nok")
		case "/trailer":
			io.WriteString(w, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-Token secret-3\r\n\r\n")
		}
		return false
	})
	cfg := testConfig(nil)
	cfg.Upstream = up.URL()
	cfg.AccessLog = true
	sink := newLogSink()
	tp := startLoggedProxy(t, cfg, sink, "json")
	from := 0
	for _, p := range []string{"/ctl", "/colon", "/trailer"} {
		for _, body := range []int{0, 20000} { // the direct path, ReverseProxy's
			name := fmt.Sprintf("%s with a %d-byte body", p, body)
			req, _ := http.NewRequest("POST", tp.URL+p, bytes.NewReader(make([]byte, body)))
			res, err := tp.H1.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			io.Copy(io.Discard, res.Body)
			res.Body.Close()
			want := "upstream error"
			if p == "/trailer" {
				want = "upstream response cut short"
			}
			line, i := sink.wait(t, from, func(l string) bool {
				f := parseLogLine(t, l)
				return f["msg"] == want && f["path"] == p
			})
			from = i + 1
			if f := parseLogLine(t, line); !strings.Contains(f["err"], "malformed MIME header") {
				t.Errorf("%s: err %q does not say what Cells got wrong", name, f["err"])
			}
		}
	}
	if log := sink.String(); strings.Contains(log, "secret") {
		t.Errorf("a header line of Cells' answer reached the log:\n%s", log)
	}
}

// TestLogReviewWebsocketSecrets: a websocket's token in its query (and in
// its first message, as Cells' /ws/event takes it) stays out of the log:
// the tunnel's access line, written when it ends, and the warning for a
// handshake Cells breaks off, give the path redacted.
func TestLogReviewWebsocketSecrets(t *testing.T) {
	up := newUpstream(t, upTLS, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.HasPrefix(r.URL.Path, "/ws/broken") {
			panic(http.ErrAbortHandler)
		}
		c, err := websocket.Accept(w, r, nil)
		if err != nil {
			return
		}
		_, msg, err := c.Read(r.Context())
		if err == nil {
			c.Write(r.Context(), websocket.MessageText, msg)
		}
		c.Close(websocket.StatusNormalClosure, "")
	}))
	for _, format := range []string{"json", "text"} {
		t.Run(format, func(t *testing.T) {
			cfg := testConfig(up)
			cfg.AccessLog = true
			sink := newLogSink()
			tp := startLoggedProxy(t, cfg, sink, format)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			base := "wss://" + tp.Addr().String()
			c, _, err := websocket.Dial(ctx, base+"/ws/event?pydio_jwt=secret-1&X-Amz-Signature=secret-2", &websocket.DialOptions{
				HTTPClient: tp.H1,
				HTTPHeader: http.Header{"Authorization": {"Bearer secret-3"}, "Cookie": {"pydio_session=secret-4"}},
			})
			if err != nil {
				t.Fatal(err)
			}
			if err := c.Write(ctx, websocket.MessageText, []byte(`{"jwt":"secret-5"}`)); err != nil {
				t.Fatal(err)
			}
			if _, _, err := c.Read(ctx); err != nil {
				t.Fatal(err)
			}
			c.Close(websocket.StatusNormalClosure, "")
			line, _ := sink.wait(t, 0, isAccess(t, "/ws/event?pydio_jwt=REDACTED&X-Amz-Signature=REDACTED"))
			if f := parseLogLine(t, line); f["proto"] != "ws" || f["status"] != "101" || f["bytes_in"] == "0" || f["bytes_out"] == "0" {
				t.Errorf("websocket access line %v: want proto ws, status 101, bytes both ways", f)
			}
			if _, _, err := websocket.Dial(ctx, base+"/ws/broken?pydio_jwt=secret-6", &websocket.DialOptions{HTTPClient: tp.H1}); err == nil {
				t.Fatal("a handshake Cells broke off succeeded")
			}
			sink.wait(t, 0, func(l string) bool {
				f := parseLogLine(t, l)
				return f["msg"] == "upstream error" && f["path"] == "/ws/broken?pydio_jwt=REDACTED"
			})
			tp.H1.CloseIdleConnections()
			if err := tp.Shutdown(); err != nil {
				t.Fatal(err)
			}
			if log := sink.String(); strings.Contains(log, "secret") {
				t.Errorf("a secret reached the log:\n%s", log)
			}
		})
	}
}

// TestLogReviewTextInjection: what a client controls in a request line
// (an HTTP/2 :path, :authority or :method can hold spaces, quotes, "=",
// bytes outside UTF-8) never forges a record or a field: in either format
// each record is one line that reads back with the value sent.
func TestLogReviewTextInjection(t *testing.T) {
	up := newUpstream(t, upTLS, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	forged := ` msg=request level=ERROR path=/forged"` + "\x80"
	for _, format := range []string{"json", "text"} {
		t.Run(format, func(t *testing.T) {
			cfg := testConfig(up)
			cfg.AccessLog = true
			sink := newLogSink()
			tp := startLoggedProxy(t, cfg, sink, format)
			c := dialH2(t, tp)
			reqs := [][]string{
				h2Fields("GET", tp.Addr().String(), "/a"+forged),               // 400: a space in the target
				h2Fields("GET", tp.Addr().String(), `/a"b=c\d?e="f"`),          // forwarded
				h2Fields("GET", "h"+forged, "/b"),                              // 400: invalid :authority
				h2Fields("GET"+forged, tp.Addr().String(), "/c"),               // 400: invalid :method
				h2Fields("GET", tp.Addr().String(), "/caf\xc3\xa9\xff?q=\xfe"), // forwarded
			}
			for i, kv := range reqs {
				id := uint32(2*i + 1)
				if err := c.request(id, kv...); err != nil {
					t.Fatal(err)
				}
				t.Logf("request %d: %v", i, c.answer(t, id))
			}
			accessLinesIn(t, sink, len(reqs))
			for _, l := range strings.Split(sink.String(), "\n") {
				f := parseLogLine(t, l)
				if f["level"] == "ERROR" || strings.HasPrefix(f["path"], "/forged") {
					t.Errorf("a forged field: %q", l)
				}
				if f["msg"] == "request" && f["level"] != "INFO" {
					t.Errorf("access line at %s: %q", f["level"], l)
				}
			}
			lines := 0
			for _, l := range strings.Split(sink.String(), "\n") {
				if parseLogLine(t, l)["msg"] == "request" {
					lines++
				}
			}
			if lines != len(reqs) {
				t.Errorf("%d access lines for %d requests:\n%s", lines, len(reqs), sink.String())
			}
		})
	}
}

// TestLogReviewGRPCMetadata: a gRPC call's metadata (x-pydio-bearer,
// authorization) stays out of the log, at debug too, whether Cells
// answers, breaks the call off, or cannot be reached.
func TestLogReviewGRPCMetadata(t *testing.T) {
	gs := grpc.NewServer()
	healthpb.RegisterHealthServer(gs, grpchealth.NewServer())
	defer gs.Stop()
	up := newUpstream(t, upTLS, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("X-Break") != "" {
			w.Header().Set("Content-Type", "application/grpc")
			w.WriteHeader(http.StatusOK)
			w.(http.Flusher).Flush()
			panic(http.ErrAbortHandler)
		}
		gs.ServeHTTP(w, r)
	}))
	down := testConfig(up)
	down.GRPCUpstream = &url.URL{Scheme: "https", Host: refusedAddr(t)}
	for name, cfg := range map[string]*Config{"up": testConfig(up), "down": down} {
		t.Run(name, func(t *testing.T) {
			cfg.AccessLog = true
			sink := newLogSink()
			tp := startLoggedProxy(t, cfg, sink, "json")
			cc := dialProxy(t, tp, tp.Addr().String())
			for _, brk := range []string{"", "1"} {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				ctx = metadata.AppendToOutgoingContext(ctx, "x-pydio-bearer", "secret-1", "authorization", "Bearer secret-2", "x-break", brk)
				_, err := healthpb.NewHealthClient(cc).Check(ctx, &healthpb.HealthCheckRequest{Service: ""})
				cancel()
				t.Logf("%s, break %q: %v", name, brk, err)
			}
			cc.Close()
			accessLinesIn(t, sink, 2)
			if log := sink.String(); strings.Contains(log, "secret") {
				t.Errorf("metadata reached the log:\n%s", log)
			}
		})
	}
}

// accessLinesIn waits until sink holds n access lines.
func accessLinesIn(t *testing.T, sink *logSink, n int) {
	t.Helper()
	isRequest := func(l string) bool { return parseLogLine(t, l)["msg"] == "request" }
	for i, from := 0, 0; i < n; i++ {
		_, at := sink.wait(t, from, isRequest)
		from = at + 1
	}
}

// TestLogReviewGRPCBrokenWarns: a gRPC call whose stream Cells breaks off
// after its response headers (net/http's server resets it with
// INTERNAL_ERROR when the handler aborts) ends INTERNAL for the client, as
// grpc-go's client gives for that reset connected to Cells, and is
// logged as an HTTP response cut short is, once (found by review: only
// its access line said anything, status 200). A stream the stop ends
// is no failure of Cells': no warning.
func TestLogReviewGRPCBrokenWarns(t *testing.T) {
	gs := grpc.NewServer()
	healthpb.RegisterHealthServer(gs, grpchealth.NewServer())
	defer gs.Stop()
	up := newUpstream(t, upTLS, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.HasSuffix(r.URL.Path, "/Watch") {
			gs.ServeHTTP(w, r)
			return
		}
		w.Header().Set("Content-Type", "application/grpc")
		w.WriteHeader(http.StatusOK)
		w.(http.Flusher).Flush()
		panic(http.ErrAbortHandler)
	}))
	cfg := testConfig(up)
	cfg.AccessLog = true
	sink := newLogSink()
	tp := startLoggedProxy(t, cfg, sink, "json")
	cc := dialProxy(t, tp, tp.Addr().String())
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := healthpb.NewHealthClient(cc).Check(ctx, &healthpb.HealthCheckRequest{})
	if got, want := status.Code(err), codes.Internal; got != want {
		t.Errorf("call broken off by Cells: %v, want %v", err, want)
	}
	const path = "/grpc.health.v1.Health/Check"
	_, at := sink.wait(t, 0, isAccess(t, path))
	n := 0
	for _, l := range strings.Split(sink.String(), "\n")[:at] {
		if f := parseLogLine(t, l); f["level"] == "WARN" && f["msg"] == "upstream response cut short" && f["path"] == path {
			n++
		}
	}
	if n != 1 {
		t.Errorf("%d warnings for a call Cells broke off, want 1; log:\n%s", n, sink.String())
	}

	watch, err := healthpb.NewHealthClient(cc).Watch(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := watch.Recv(); err != nil {
		t.Fatal(err)
	}
	stopped := make(chan error, 1)
	go func() { stopped <- tp.Shutdown() }()
	if _, err := watch.Recv(); status.Code(err) != codes.Unavailable {
		t.Errorf("stream ended by the stop: %v, want Unavailable", err)
	}
	if err := <-stopped; err != nil {
		t.Fatal(err)
	}
	sink.wait(t, at+1, isAccess(t, "/grpc.health.v1.Health/Watch"))
	if strings.Count(sink.String(), "upstream response cut short") != 1 {
		t.Errorf("the stop's end of a stream logged as Cells breaking it off:\n%s", sink.String())
	}
}

// TestLogReviewScannerQuiet: what a scanner does to the public port (bytes
// that are not TLS, an old TLS version, plain HTTP to the TLS port, a bad
// HTTP/2 preface after ALPN h2, HTTP/2 frames that break the protocol, a
// connection closed at once, and on the gRPC port HTTP/1.1) writes nothing
// at info or above, on the public port and the gRPC port: net/http's
// own lines about clients are at debug, and none of these is a request.
func TestLogReviewScannerQuiet(t *testing.T) {
	up := newUpstream(t, upTLS, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	cfg := testConfig(up)
	cfg.AccessLog = true
	cfg.GRPCAddr = "127.0.0.1:0"
	sink := newLogSink()
	tp := startLoggedProxy(t, cfg, sink, "json")
	scan(t, tp, tp.Addr().String(), false)
	scan(t, tp, tp.GRPCAddr().String(), true)
	// A request, so that the log has an end to wait for.
	res, err := tp.H2.Get(tp.URL + "/last")
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	_, at := sink.wait(t, 0, isAccess(t, "/last"))
	for _, l := range strings.Split(sink.String(), "\n")[:at] {
		// Not the start's lines, nor the test set-up's warnings (a
		// self-signed certificate, the redirect port's 443).
		f := parseLogLine(t, l)
		if f["level"] != "DEBUG" && f["msg"] != "listening" && !strings.HasPrefix(f["msg"], "no TLS_CERT_FILE") && !strings.HasPrefix(f["msg"], "HTTPS requests name a port") {
			t.Errorf("a scanner's connection logged at %s: %s", f["level"], l)
		}
	}
}

// scan connects to addr as scanners do; to the gRPC port, with an
// HTTP/1.1 request too.
func scan(t *testing.T, tp *testProxy, addr string, grpcPort bool) {
	tcp := func(send string) {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		if send == "" {
			return // closed at once
		}
		io.WriteString(c, send)
		io.Copy(io.Discard, c) // until the proxy closes it
	}
	tcp("")
	tcp("\x16\x03\x01\x00\x05hello")
	tcp("GET / HTTP/1.1\r\nHost: x\r\n\r\n")
	tcp("SSH-2.0-OpenSSH_9.6\r\n")
	old := tp.TLSConfig()
	old.MinVersion, old.MaxVersion = tls.VersionTLS10, tls.VersionTLS11
	if c, err := tls.Dial("tcp", addr, old); err == nil {
		c.Close()
		t.Error("a TLS 1.1 client connected")
	}
	for _, send := range []string{"GET / HTTP/1.1\r\n\r\n", http2.ClientPreface + "\x00\x00\x01\x09\x00\x00\x00\x00\x01x"} {
		c := tp.dialRaw(t, addr, "h2")
		io.WriteString(c, send)
		io.Copy(io.Discard, c)
		c.Close()
	}
	if grpcPort {
		c := tp.dialRaw(t, addr, "http/1.1")
		io.WriteString(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
		io.Copy(io.Discard, c)
		c.Close()
	}
}

// TestLogReviewSlowPathSecrets: the requests the HTTP/1.1 front hands to
// net/http's server (a chunked upload, Expect: 100-continue, a query with
// ';', which net/http's server remarks on) keep their credentials out of
// the log at debug too, whether Cells answers or breaks its answer off.
func TestLogReviewSlowPathSecrets(t *testing.T) {
	up := newUpstream(t, upTLS, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Write([]byte("partial"))
		w.(http.Flusher).Flush()
		if strings.HasPrefix(r.URL.Path, "/broken") {
			panic(http.ErrAbortHandler)
		}
	}))
	cfg := testConfig(up)
	cfg.AccessLog = true
	sink := newLogSink()
	tp := startLoggedProxy(t, cfg, sink, "text")
	const query = "?a=1;pydio_jwt=secret-1&X-Amz-Credential=secret-2"
	from := 0
	for _, pc := range h1h2Clients(tp) {
		for _, p := range []string{"/ok", "/broken"} {
			body := io.MultiReader(strings.NewReader("chunk"), bytes.NewReader(make([]byte, 30000)))
			req, _ := http.NewRequest("PUT", tp.URL+p+query, body) // no length: chunked on HTTP/1.1
			req.Header.Set("Authorization", "AWS4-HMAC-SHA256 Credential=secret-3, Signature=secret-4")
			req.Header.Set("Cookie", "pydio_session=secret-5")
			req.Header.Set("X-Pydio-Bearer", "secret-6")
			req.Header.Set("Expect", "100-continue")
			if res, err := pc.c.Do(req); err == nil {
				io.Copy(io.Discard, res.Body)
				res.Body.Close()
			}
			_, at := sink.wait(t, from, isAccess(t, p+"?a=1;pydio_jwt=REDACTED&X-Amz-Credential=REDACTED"))
			from = at + 1
		}
	}
	tp.H1.CloseIdleConnections()
	tp.H2.CloseIdleConnections()
	if err := tp.Shutdown(); err != nil {
		t.Fatal(err)
	}
	log := sink.String()
	if strings.Count(log, "upstream response cut short") != 2 {
		t.Errorf("want a warning for each broken answer:\n%s", log)
	}
	if strings.Contains(log, "secret") {
		t.Errorf("a secret reached the log:\n%s", log)
	}
}
