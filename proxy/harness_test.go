package proxy

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// TestMain checks that no test leaves a goroutine behind: every server,
// tunnel and upstream request must be gone when its test ends. The one
// exceptions are the parker's loop, which lives as long as the process,
// and net/http's server lingering 500 ms after an answer it closes on
// (closeWriteAndWait), which ends by itself: a test of such an answer run
// last, or alone, would otherwise fail.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		goleak.IgnoreAnyFunction("github.com/cells-proxy/cells-proxy/proxy.(*parker).loop"),
		goleak.IgnoreAnyFunction("net/http.(*conn).closeWriteAndWait"))
}

// upstreamKind is how a test upstream listens.
type upstreamKind int

const (
	upTLS   upstreamKind = iota // TLS, ALPN h2 and http/1.1: Cells' default
	upPlain                     // cleartext HTTP/1.1: CELLS_SITE_NO_TLS=1
	upH2C                       // cleartext HTTP/2 prior knowledge: Cells' gRPC port
)

// testUpstream is a real server on 127.0.0.1 standing in for Cells.
type testUpstream struct {
	URL    *url.URL // scheme https, http or h2c
	CAFile string   // PEM of its certificate, for CELLS_UPSTREAM_CA_FILE
	Srv    *http.Server
	ln     net.Listener
}

// newUpstream starts h on 127.0.0.1:0. It stops when the test ends.
func newUpstream(t testing.TB, kind upstreamKind, h http.Handler) *testUpstream {
	t.Helper()
	return newUpstreamWith(t, kind, h, nil)
}

// newUpstreamWith is newUpstream with configure, if not nil, run on the
// server (its TLS configuration included) before it serves.
func newUpstreamWith(t testing.TB, kind upstreamKind, h http.Handler, configure func(*http.Server)) *testUpstream {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	u := &testUpstream{ln: ln, Srv: &http.Server{
		Handler:  h,
		ErrorLog: slog.NewLogLogger(slog.DiscardHandler, slog.LevelError),
	}}
	u.Srv.Protocols = new(http.Protocols)
	serveLn := ln
	switch kind {
	case upTLS:
		cert, err := SelfSigned("localhost", "127.0.0.1")
		if err != nil {
			t.Fatal(err)
		}
		u.CAFile = writeCertPEM(t, cert)
		u.Srv.Protocols.SetHTTP1(true)
		u.Srv.Protocols.SetHTTP2(true)
		u.Srv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"h2", "http/1.1"}}
		serveLn = tls.NewListener(ln, u.Srv.TLSConfig)
		u.URL = &url.URL{Scheme: "https", Host: ln.Addr().String()}
	case upPlain:
		u.Srv.Protocols.SetHTTP1(true)
		u.URL = &url.URL{Scheme: "http", Host: ln.Addr().String()}
	case upH2C:
		u.Srv.Protocols.SetUnencryptedHTTP2(true)
		u.URL = &url.URL{Scheme: "h2c", Host: ln.Addr().String()}
	}
	if configure != nil {
		configure(u.Srv)
	}
	go u.Srv.Serve(serveLn)
	t.Cleanup(func() { u.Close() })
	return u
}

// Close stops the upstream at once, dropping its connections.
func (u *testUpstream) Close() { u.Srv.Close() }

// Addr is the upstream's host:port.
func (u *testUpstream) Addr() string { return u.ln.Addr().String() }

func writeCertPEM(t testing.TB, cert tls.Certificate) string {
	t.Helper()
	f := filepath.Join(t.TempDir(), "ca.pem")
	b := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Certificate[0]})
	if err := os.WriteFile(f, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return f
}

// testConfig is the configuration of a proxy under test for upstream up:
// every listener on 127.0.0.1:0, the redirect and health listeners on,
// access log off unless a test turns it on.
func testConfig(up *testUpstream) *Config {
	c := &Config{
		HTTPSAddr:       "127.0.0.1:0",
		HTTPAddr:        "127.0.0.1:0",
		HealthAddr:      "127.0.0.1:0",
		RedirectPort:    443,
		TLS:             true,
		IdleTimeout:     time.Minute,
		WSIdleTimeout:   time.Hour,
		ShutdownTimeout: 5 * time.Second,
		LogFormat:       "text",
	}
	if up != nil {
		c.Upstream = &url.URL{Scheme: up.URL.Scheme, Host: up.URL.Host}
		if up.URL.Scheme == "https" {
			c.UpstreamCAFile = up.CAFile
			c.GRPCUpstream = &url.URL{Scheme: "https", Host: up.URL.Host}
		}
	}
	return c
}

// testProxy is a running cells-proxy with clients that trust it.
type testProxy struct {
	*Server
	URL     string // https://127.0.0.1:port of the public listener
	Roots   *x509.CertPool
	H1, H2  *http.Client
	Log     *syncBuffer
	stop    context.CancelFunc
	stopped chan error
}

// startProxy runs a Server for cfg until the test ends (or tp.Shutdown),
// logging as text at debug level into tp.Log.
func startProxy(t testing.TB, cfg *Config, setup ...func(*Server)) *testProxy {
	t.Helper()
	logBuf := &syncBuffer{}
	log := slog.New(slog.NewTextHandler(logBuf, &slog.HandlerOptions{Level: slog.LevelDebug}))
	tp := startProxyLog(t, cfg, log, logBuf.String, setup...)
	tp.Log = logBuf
	return tp
}

// startProxyLog is startProxy with the caller's logger; logText gives what
// it wrote, shown when the test fails. The proxy does not probe Cells from
// the start (watchStart), which would put a request at some moment among
// those a test counts, unless setup, which runs between Listen and Run,
// asks for it.
func startProxyLog(t testing.TB, cfg *Config, log *slog.Logger, logText func() string, setup ...func(*Server)) *testProxy {
	t.Helper()
	s, err := New(cfg, log)
	if err != nil {
		t.Fatalf("proxy.New: %v", err)
	}
	if err := s.Listen(); err != nil {
		t.Fatalf("Listen: %v", err)
	}
	s.watchEvery = 0
	for _, f := range setup {
		f(s)
	}
	ctx, cancel := context.WithCancel(context.Background())
	tp := &testProxy{Server: s, Log: &syncBuffer{}, stop: cancel, stopped: make(chan error, 1)}
	go func() { tp.stopped <- s.Run(ctx) }()
	scheme := "https"
	if !cfg.TLS {
		scheme = "http"
	}
	tp.URL = scheme + "://" + s.Addr().String()
	if c := s.cert.Load(); c != nil {
		tp.Roots = x509.NewCertPool()
		tp.Roots.AddCert(c.Leaf)
	}
	tp.H1 = tp.client(false)
	tp.H2 = tp.client(true)
	t.Cleanup(func() {
		tp.H1.CloseIdleConnections()
		tp.H2.CloseIdleConnections()
		if err := tp.Shutdown(); err != nil {
			t.Errorf("proxy Run: %v", err)
		}
		if t.Failed() {
			t.Logf("proxy log:\n%s", logText())
		}
	})
	return tp
}

// Shutdown stops the proxy as SIGTERM does and returns Run's error.
func (tp *testProxy) Shutdown() error {
	tp.stop()
	select {
	case err, ok := <-tp.stopped:
		if ok {
			close(tp.stopped)
			return err
		}
		return nil
	case <-time.After(30 * time.Second):
		return context.DeadlineExceeded
	}
}

// client is an HTTP client for the proxy, HTTP/2 or HTTP/1.1 only.
func (tp *testProxy) client(h2 bool) *http.Client {
	tr := &http.Transport{
		TLSClientConfig:    &tls.Config{RootCAs: tp.Roots},
		DisableCompression: true,
		// Parallel tests and benchmarks reuse connections, as browsers do.
		MaxIdleConnsPerHost: 64,
	}
	tr.Protocols = new(http.Protocols)
	switch {
	case h2 && tp.Roots != nil:
		tr.Protocols.SetHTTP2(true)
	case h2:
		tr.Protocols.SetUnencryptedHTTP2(true)
	default:
		tr.Protocols.SetHTTP1(true)
	}
	return &http.Client{
		Transport:     tr,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
}

// TLSConfig is a client TLS config that trusts the proxy, for raw clients.
func (tp *testProxy) TLSConfig(alpn ...string) *tls.Config {
	return &tls.Config{RootCAs: tp.Roots, NextProtos: alpn, ServerName: "127.0.0.1"}
}

// syncBuffer is a log sink safe for concurrent writers.
type syncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// waitFor calls cond until it holds, and fails t with failure's message if
// it still does not after timeout: a guard, generous for a loaded machine,
// never a measure. cond runs on the caller's goroutine, every millisecond
// at first, then less often (every 20 ms at most) as the wait goes on, so
// that a long wait on a costly cond (a goroutine dump, a copy of the log)
// does not load the machine. failure is called only on the failure, so
// its message can say what cond saw last.
func waitFor(t testing.TB, timeout time.Duration, cond func() bool, failure func() string) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for pause := time.Millisecond; !cond(); pause = min(2*pause, 20*time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal(failure())
		}
		time.Sleep(pause)
	}
}

// seen is what a recording upstream saw of one request.
type seen struct {
	Method     string
	Host       string
	RequestURI string
	Proto      string
	Header     http.Header
	Body       []byte
	Remote     netip.AddrPort
	Trailer    http.Header // after the body
}

// recorder is an upstream handler that records every request and answers
// 200 with "ok" (or what Respond says).
type recorder struct {
	mu      sync.Mutex
	reqs    []seen
	Respond func(w http.ResponseWriter, r *http.Request)
}

func (rec *recorder) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	ap, _ := netip.ParseAddrPort(r.RemoteAddr)
	rec.mu.Lock()
	rec.reqs = append(rec.reqs, seen{r.Method, r.Host, r.RequestURI, r.Proto, r.Header.Clone(), body, ap, r.Trailer.Clone()})
	rec.mu.Unlock()
	if rec.Respond != nil {
		rec.Respond(w, r)
		return
	}
	io.WriteString(w, "ok")
}

// last is the last request seen; the test fails if there was none.
func (rec *recorder) last(t testing.TB) seen {
	t.Helper()
	rec.mu.Lock()
	defer rec.mu.Unlock()
	if len(rec.reqs) == 0 {
		t.Fatal("upstream saw no request")
	}
	return rec.reqs[len(rec.reqs)-1]
}

// all is every request seen so far.
func (rec *recorder) all() []seen {
	rec.mu.Lock()
	defer rec.mu.Unlock()
	return slices.Clone(rec.reqs)
}

// count is how many requests reached the upstream.
func (rec *recorder) count() int {
	rec.mu.Lock()
	defer rec.mu.Unlock()
	return len(rec.reqs)
}

// dialTLS opens a TLS connection to addr that trusts the proxy and offers
// alpn, for raw clients. It is closed when the test ends, if the caller has
// not closed it before.
func (tp *testProxy) dialTLS(t testing.TB, addr string, alpn ...string) *tls.Conn {
	t.Helper()
	conn, err := tls.Dial("tcp", addr, tp.TLSConfig(alpn...))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// tlsOver is an HTTP/1.1 client's TLS connection to the proxy's public
// port, over wrap of the TCP connection (closed at the test's end).
func (tp *testProxy) tlsOver(t testing.TB, wrap func(net.Conn) net.Conn) *tls.Conn {
	t.Helper()
	tcp, err := net.Dial("tcp", tp.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	conn := tls.Client(wrap(tcp), tp.TLSConfig("http/1.1"))
	t.Cleanup(func() { conn.Close() })
	return conn
}

// dialTLSH2 is dialTLS offering only h2; the test fails unless the server
// agreed it.
func (tp *testProxy) dialTLSH2(t testing.TB, addr string) *tls.Conn {
	t.Helper()
	conn := tp.dialTLS(t, addr, "h2")
	if got, want := conn.ConnectionState().NegotiatedProtocol, "h2"; got != want {
		t.Fatalf("ALPN = %q, want %q", got, want)
	}
	return conn
}

// dialRaw is dialTLS with a 10 s deadline for the whole exchange.
func (tp *testProxy) dialRaw(t testing.TB, addr string, alpn ...string) *tls.Conn {
	t.Helper()
	conn := tp.dialTLS(t, addr, alpn...)
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	return conn
}

// rawH1 sends raw, one complete HTTP/1.1 request, on a new TLS connection to
// the proxy and reads one response. Go's client would normalise the
// request-target and drop hop-by-hop headers; this sends the bytes as given.
func rawH1(t testing.TB, tp *testProxy, raw string) (*http.Response, []byte) {
	t.Helper()
	conn := tp.dialRaw(t, tp.Addr().String(), "http/1.1")
	defer conn.Close()
	res := rawResponse(t, conn, raw)
	defer res.Body.Close()
	body, err := io.ReadAll(res.Body)
	if err != nil {
		t.Fatalf("reading the response body: %v", err)
	}
	return res, body
}

// rawResponse writes raw, one complete HTTP/1.x request, to conn and reads
// the head of its response; the caller reads and closes the body.
func rawResponse(t testing.TB, conn net.Conn, raw string) *http.Response {
	t.Helper()
	if _, err := io.WriteString(conn, raw); err != nil {
		t.Fatal(err)
	}
	method, _, _ := strings.Cut(raw, " ")
	res, err := http.ReadResponse(bufio.NewReader(conn), &http.Request{Method: method})
	if err != nil {
		t.Fatalf("reading the response to %.60q: %v", raw, err)
	}
	return res
}

// protoClient is one of the proxy's clients, named for subtests.
type protoClient struct {
	name string
	c    *http.Client
}

// h1h2Clients are the proxy's HTTP/1.1 and HTTP/2 clients, named, for
// tables run over both.
func h1h2Clients(tp *testProxy) []protoClient {
	return []protoClient{{"h1", tp.H1}, {"h2", tp.H2}}
}

// doDrain sends req through c, reads the response body to its end and
// closes it. The test fails at once if the request fails.
func doDrain(t testing.TB, c *http.Client, req *http.Request) *http.Response {
	t.Helper()
	res, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, res.Body)
	res.Body.Close()
	return res
}

// getWith is doDrain for a GET of url with header set on the request.
func getWith(t testing.TB, c *http.Client, url string, header map[string]string) *http.Response {
	t.Helper()
	req, err := http.NewRequest("GET", url, nil)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range header {
		req.Header.Set(k, v)
	}
	return doDrain(t, c, req)
}

// checkUpstreamHeader reports every field of want whose values in h, the
// header the upstream saw, differ; a nil want is a field that must be
// absent.
func checkUpstreamHeader(t testing.TB, h http.Header, want map[string][]string) {
	t.Helper()
	for k, v := range want {
		if got := h.Values(k); !slices.Equal(got, v) {
			t.Errorf("upstream %s = %q, want %q", k, got, v)
		}
	}
}

// h2Fields is the header list of a request, name then value: pseudo-headers,
// then fields.
func h2Fields(method, authority, path string, fields ...string) []string {
	kv := []string{":method", method, ":scheme", "https", ":authority", authority, ":path", path}
	for i := 0; i+1 < len(fields); i += 2 {
		kv = append(kv, fields[i], fields[i+1])
	}
	return kv
}

// hpackBlock is the header block of kv (name, value, ...), encoded as given
// by a new encoder, for raw HTTP/2 clients.
func hpackBlock(kv ...string) []byte {
	var b bytes.Buffer
	enc := hpack.NewEncoder(&b)
	for i := 0; i+1 < len(kv); i += 2 {
		enc.WriteField(hpack.HeaderField{Name: kv[i], Value: kv[i+1]})
	}
	return b.Bytes()
}

// loopbackPair is a TCP connection on 127.0.0.1: the dialled end and the
// accepted one, both closed when the test ends.
func loopbackPair(t testing.TB) (dialled, accepted net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	dialled, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dialled.Close() })
	accepted, err = ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { accepted.Close() })
	return dialled, accepted
}

// h2Start sends the client preface and an empty SETTINGS frame on conn,
// and returns a framer over it.
func h2Start(t testing.TB, conn net.Conn) *http2.Framer {
	t.Helper()
	if _, err := io.WriteString(conn, http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	fr := http2.NewFramer(conn, conn)
	if err := fr.WriteSettings(); err != nil {
		t.Fatal(err)
	}
	return fr
}

// wsHandshake sends a websocket upgrade request for /ws/event at host on
// conn, and reads the head of the answer.
func wsHandshake(t testing.TB, conn net.Conn, host string) *http.Response {
	t.Helper()
	io.WriteString(conn, "GET /ws/event HTTP/1.1\r\nHost: "+host+
		"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
	res, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatalf("websocket handshake: %v", err)
	}
	return res
}
