package proxy

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/textproto"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
)

// rawUpstream is a cleartext HTTP/1.1 upstream written by hand: serve
// gets each connection's number (from 1) and the request read from it,
// and writes whatever it likes. It stops when the test ends.
type rawUpstream struct {
	*connServer
	tls    *tls.Config // nil: cleartext
	caFile string      // with tls, the PEM of its certificate
	reqs   atomic.Int64
}

// connServer accepts connections on a loopback port until the test ends,
// numbers them from 1 and hands each to handle on a goroutine of its own;
// it closes each as handle returns, and those still open at the end.
type connServer struct {
	ln    net.Listener
	conns atomic.Int64
	wg    sync.WaitGroup
	mu    sync.Mutex
	open  map[net.Conn]bool
}

func startConnServer(t testing.TB, handle func(n int64, c net.Conn)) *connServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &connServer{ln: ln, open: map[net.Conn]bool{}}
	s.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			n := s.conns.Add(1)
			s.mu.Lock()
			s.open[c] = true
			s.mu.Unlock()
			s.wg.Go(func() {
				defer func() {
					c.Close()
					s.mu.Lock()
					delete(s.open, c)
					s.mu.Unlock()
				}()
				handle(n, c)
			})
		}
	})
	t.Cleanup(func() {
		ln.Close()
		s.mu.Lock()
		for c := range s.open {
			c.Close()
		}
		s.mu.Unlock()
		s.wg.Wait()
	})
	return s
}

// openConns is how many connections the server holds open.
func (s *connServer) openConns() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.open)
}

func newRawUpstream(t *testing.T, serve func(conn int64, req *http.Request, w *bufio.Writer) (keep bool)) *rawUpstream {
	t.Helper()
	return newRawUpstreamTLS(t, nil, serve)
}

// newRawTLSUpstream is newRawUpstream over TLS, as Cells serves by default.
// Each Flush of w makes a TLS record of its own, and the records of one
// answer leave in one TCP write once serve returns: the proxy finds them on
// the socket together, as it does when a server's writes follow closely.
func newRawTLSUpstream(t *testing.T, serve func(conn int64, req *http.Request, w *bufio.Writer) (keep bool)) *rawUpstream {
	t.Helper()
	cert, err := SelfSigned("127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	u := newRawUpstreamTLS(t, &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"http/1.1"}}, serve)
	u.caFile = writeCertPEM(t, cert)
	return u
}

func newRawUpstreamTLS(t *testing.T, conf *tls.Config, serve func(conn int64, req *http.Request, w *bufio.Writer) (keep bool)) *rawUpstream {
	t.Helper()
	u := &rawUpstream{tls: conf}
	u.connServer = startConnServer(t, func(n int64, c net.Conn) {
		var rw io.ReadWriter = c
		held := &heldConn{Conn: c}
		if u.tls != nil {
			tc := tls.Server(held, u.tls)
			if tc.Handshake() != nil {
				return
			}
			rw = tc
		}
		br, bw := bufio.NewReader(rw), bufio.NewWriter(rw)
		for {
			req, err := http.ReadRequest(br)
			if err != nil {
				return
			}
			if _, err := io.Copy(io.Discard, req.Body); err != nil {
				return // a cut body: not a request
			}
			u.reqs.Add(1)
			held.hold = u.tls != nil
			keep := serve(n, req, bw)
			if bw.Flush() != nil || held.release() != nil || !keep {
				return
			}
		}
	})
	return u
}

func (u *rawUpstream) URL() *url.URL {
	if u.tls != nil {
		return &url.URL{Scheme: "https", Host: u.ln.Addr().String()}
	}
	return &url.URL{Scheme: "http", Host: u.ln.Addr().String()}
}

// oneAnswerUpstream answers the first request on each connection with
// "c" and the connection's number, and closes the connection on reading
// the second, without a byte of answer.
func oneAnswerUpstream(t *testing.T) *rawUpstream {
	var served sync.Map
	return newRawUpstream(t, func(conn int64, req *http.Request, w *bufio.Writer) bool {
		if _, again := served.LoadOrStore(conn, true); again {
			return false
		}
		fmt.Fprintf(w, "HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nc%03d", conn)
		return true
	})
}

// mapLen is the number of entries in m.
func mapLen(m *sync.Map) int {
	n := 0
	m.Range(func(any, any) bool { n++; return true })
	return n
}

// fetch is getBody for other goroutines than the test's: errors are
// returned, not fatal.
func fetch(c *http.Client, method, url string) (*http.Response, string, error) {
	req, err := http.NewRequest(method, url, nil)
	if err != nil {
		return nil, "", err
	}
	res, err := c.Do(req)
	if err != nil {
		return nil, "", err
	}
	b, err := io.ReadAll(res.Body)
	res.Body.Close()
	return res, string(b), err
}

func rawProxy(t *testing.T, u *rawUpstream) *testProxy {
	cfg := testConfig(nil)
	cfg.Upstream = u.URL()
	cfg.UpstreamCAFile = u.caFile
	return startProxy(t, cfg)
}

func getBody(t *testing.T, c *http.Client, method, url string) (*http.Response, string) {
	t.Helper()
	res, body, err := fetch(c, method, url)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	return res, body
}

// TestUpstreamKeepAliveClientClose: a client's Connection: close, and an
// HTTP/1.0 client's request (closed by default), end the client's
// connection, not the proxy's to Cells: the next client's request reuses
// it, as openssl s_time's and many a health checker's do.
func TestUpstreamKeepAliveClientClose(t *testing.T) {
	t.Parallel()
	var conns sync.Map // the upstream's connections, by client address
	up := newUpstream(t, upTLS, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		conns.Store(r.RemoteAddr, true)
		io.WriteString(w, "ok")
	}))
	tp := startProxy(t, testConfig(up))
	for i, raw := range []string{
		"GET /a HTTP/1.1\r\nHost: cells.example.com\r\nConnection: close\r\n\r\n",
		"GET /b HTTP/1.0\r\nHost: cells.example.com\r\n\r\n",
		"POST /c HTTP/1.0\r\nHost: cells.example.com\r\nContent-Length: 2\r\n\r\n{}",
		"HEAD /d HTTP/1.1\r\nHost: cells.example.com\r\nConnection: close\r\n\r\n",
	} {
		got := rawExchange(t, tp, raw)
		if len(got.Responses) != 1 || got.Responses[0].StatusCode != 200 {
			t.Fatalf("request %d: %d responses (%v)", i, len(got.Responses), got.Err)
		}
	}
	if n := mapLen(&conns); n != 1 {
		t.Errorf("upstream saw %d connections, want 1 kept alive", n)
	}
}

// TestUpstreamKeepAlive: requests without a body, from HTTP/1.1 and HTTP/2
// clients, one after the other, all travel on one kept-alive connection to
// Cells, whatever their response: a length, chunks with trailers, HEAD, 204,
// 304. Bodies and trailers arrive whole.
func TestUpstreamKeepAlive(t *testing.T) {
	t.Parallel()
	var conns sync.Map // the upstream's connections, by client address
	up := newUpstream(t, upTLS, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		conns.Store(r.RemoteAddr, true)
		switch r.URL.Path {
		case "/len":
			w.Header().Set("Content-Length", "5")
			io.WriteString(w, "hello")
		case "/chunked":
			w.Header().Set("Trailer", "X-Sum")
			io.WriteString(w, "chunk-1 ")
			http.NewResponseController(w).Flush()
			io.WriteString(w, "chunk-2")
			w.Header().Set("X-Sum", "42")
		case "/204":
			w.WriteHeader(http.StatusNoContent)
		case "/304":
			w.WriteHeader(http.StatusNotModified)
		default:
			w.Header().Set("Content-Length", "3")
			io.WriteString(w, "abc")
		}
	}))
	tp := startProxy(t, testConfig(up))
	for _, c := range h1h2Clients(tp) {
		for range 3 {
			res, body := getBody(t, c.c, "GET", tp.URL+"/len")
			if res.StatusCode != 200 || body != "hello" {
				t.Errorf("%s /len: %d %q", c.name, res.StatusCode, body)
			}
			res, body = getBody(t, c.c, "GET", tp.URL+"/chunked")
			if body != "chunk-1 chunk-2" || res.Trailer.Get("X-Sum") != "42" {
				t.Errorf("%s /chunked: %q, trailer %q", c.name, body, res.Trailer.Get("X-Sum"))
			}
			res, body = getBody(t, c.c, "HEAD", tp.URL+"/len")
			if res.StatusCode != 200 || body != "" || res.ContentLength != 5 {
				t.Errorf("%s HEAD /len: %d %q length %d", c.name, res.StatusCode, body, res.ContentLength)
			}
			for _, code := range []int{204, 304} {
				res, _ = getBody(t, c.c, "GET", fmt.Sprintf("%s/%d", tp.URL, code))
				if res.StatusCode != code {
					t.Errorf("%s /%d: %d", c.name, code, res.StatusCode)
				}
			}
			res, body = getBody(t, c.c, "OPTIONS", tp.URL+"/x")
			if body != "abc" {
				t.Errorf("%s OPTIONS: %d %q", c.name, res.StatusCode, body)
			}
		}
	}
	if n := mapLen(&conns); n != 1 {
		t.Errorf("upstream saw %d connections, want 1 kept alive", n)
	}
}

// TestUpstreamClosedIdle: Cells closes a kept-alive connection while it
// sits in the proxy's pool (its own idle timeout, a restart). The next GET
// goes on a new one (the peek before reuse sees the close; a GET written to
// the dead connection would be sent again): the client never sees the
// failure.
func TestUpstreamClosedIdle(t *testing.T) {
	t.Parallel()
	up := newRawUpstream(t, func(conn int64, req *http.Request, w *bufio.Writer) bool {
		fmt.Fprintf(w, "HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n%d", conn%10)
		return false // close without saying so, as an idle timeout does
	})
	tp := rawProxy(t, up)
	for i := 1; i <= 5; i++ {
		// Wait until Cells has closed the connection the last one used.
		for up.openConns() > 0 {
			time.Sleep(time.Millisecond)
		}
		res, body := getBody(t, tp.H1, "GET", tp.URL+"/")
		if res.StatusCode != 200 || body != fmt.Sprint(i%10) {
			t.Fatalf("request %d: %d %q, want 200 from connection %d", i, res.StatusCode, body, i)
		}
	}
	if n := up.reqs.Load(); n != 5 {
		t.Errorf("upstream answered %d requests, want 5", n)
	}
}

// TestUpstreamClosedOnRequest: Cells reads a request from a kept-alive
// connection and closes it without a byte of answer (a server that timed
// the connection out as the request came in). A GET is sent again on a new
// connection, as http.Transport does for requests it may replay.
func TestUpstreamClosedOnRequest(t *testing.T) {
	t.Parallel()
	up := oneAnswerUpstream(t)
	tp := rawProxy(t, up)
	for i := 1; i <= 3; i++ {
		res, body := getBody(t, tp.H1, "GET", tp.URL+"/")
		if want := fmt.Sprintf("c%03d", i); res.StatusCode != 200 || body != want {
			t.Fatalf("request %d: %d %q, want 200 %q", i, res.StatusCode, body, want)
		}
	}
}

// TestUpstreamNoRetryAfterResponseStarted: a connection that breaks after
// Cells has started its response is not a dead idle connection: the
// request is not sent again (it may have had effects) and the client gets
// 502.
func TestUpstreamNoRetryAfterResponseStarted(t *testing.T) {
	t.Parallel()
	up := newRawUpstream(t, func(conn int64, req *http.Request, w *bufio.Writer) bool {
		if req.URL.Path == "/ok" {
			io.WriteString(w, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
			return true
		}
		io.WriteString(w, "HTTP/1.1 200 O")
		return false
	})
	tp := rawProxy(t, up)
	getBody(t, tp.H1, "GET", tp.URL+"/ok") // a connection in the pool
	res, _ := getBody(t, tp.H1, "GET", tp.URL+"/broken")
	if res.StatusCode != http.StatusBadGateway {
		t.Errorf("status %d, want 502", res.StatusCode)
	}
	if n := up.reqs.Load(); n != 2 {
		t.Errorf("upstream got %d requests, want 2 (no retry of /broken)", n)
	}
}

// TestUpstreamNotReused: a connection is reused only after a response that
// ended cleanly. After Connection: close, a body cut short by the client,
// or bytes beyond the response, the next request takes a new connection
// and gets its own response, never the leftovers of the previous one.
func TestUpstreamNotReused(t *testing.T) {
	t.Parallel()
	release := make(chan struct{})
	lateSent := make(chan struct{})
	up := newRawUpstream(t, func(conn int64, req *http.Request, w *bufio.Writer) bool {
		switch req.URL.Path {
		case "/late":
			// Bytes that come after the response has ended, while the
			// connection sits idle in the pool.
			io.WriteString(w, "HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlate")
			w.Flush()
			time.Sleep(20 * time.Millisecond)
			io.WriteString(w, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nWRONG")
			w.Flush()
			lateSent <- struct{}{}
		case "/close":
			io.WriteString(w, "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\nclose")
			w.Flush()
			<-release // a Cells slow to close: the proxy must not wait
			return false
		case "/extra":
			io.WriteString(w, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nextraHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nWRONG")
		case "/big":
			io.WriteString(w, "HTTP/1.1 200 OK\r\nContent-Length: 8388608\r\n\r\n")
			w.Write(make([]byte, 8<<20))
		default:
			fmt.Fprintf(w, "HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nc%03d", conn)
		}
		return true
	})
	defer close(release)
	tp := rawProxy(t, up)

	_, body := getBody(t, tp.H1, "GET", tp.URL+"/close")
	if body != "close" {
		t.Fatalf("/close: %q", body)
	}
	if _, body = getBody(t, tp.H1, "GET", tp.URL+"/next"); body != "c002" {
		t.Errorf("after Connection: close: %q, want c002 (a new connection)", body)
	}

	_, body = getBody(t, tp.H1, "GET", tp.URL+"/extra")
	if body != "extra" {
		t.Fatalf("/extra: %q", body)
	}
	if _, body = getBody(t, tp.H1, "GET", tp.URL+"/next"); body != "c003" {
		t.Errorf("after bytes beyond the response: %q, want c003 (a new connection)", body)
	}

	_, body = getBody(t, tp.H1, "GET", tp.URL+"/late")
	if body != "late" {
		t.Fatalf("/late: %q", body)
	}
	<-lateSent
	if _, body = getBody(t, tp.H1, "GET", tp.URL+"/next"); body != "c004" {
		t.Errorf("after bytes sent to an idle connection: %q, want c004 (a new connection)", body)
	}

	res, err := tp.H1.Get(tp.URL + "/big")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(res.Body, make([]byte, 1000)); err != nil {
		t.Fatal(err)
	}
	res.Body.Close() // the rest of /big is never read
	tp.H1.CloseIdleConnections()
	if _, body = getBody(t, tp.H1, "GET", tp.URL+"/next"); body != "c005" {
		t.Errorf("after a body left unread: %q, want c005 (a new connection)", body)
	}
	if _, body = getBody(t, tp.H1, "GET", tp.URL+"/next"); body != "c005" {
		t.Errorf("next request: %q, want c004 (kept alive)", body)
	}
}

// TestUpstreamNotReusedTLS: bytes beyond a response from a TLS upstream
// (Cells' default) end the connection too. crypto/tls reads all the socket
// holds, so when they come in a record of their own right behind the
// response's, they wait inside crypto/tls, where neither the proxy's read
// buffer nor a look at the socket sees them; the next client on the
// connection would get them as its answer.
func TestUpstreamNotReusedTLS(t *testing.T) {
	t.Parallel()
	up := newRawTLSUpstream(t, func(conn int64, req *http.Request, w *bufio.Writer) bool {
		switch {
		case req.URL.Path == "/extra":
			io.WriteString(w, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nextra")
			w.Flush() // a record of its own
			io.WriteString(w, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nWRONG")
		case req.Method == http.MethodHead:
			// A body to a HEAD: a server that writes what it would
			// send to a GET.
			io.WriteString(w, "HTTP/1.1 200 OK\r\nContent-Length: 43\r\n\r\n")
			w.Flush()
			io.WriteString(w, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nWRONG")
		default:
			fmt.Fprintf(w, "HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nc%03d", conn)
		}
		return true
	})
	tp := rawProxy(t, up)
	if _, body := getBody(t, tp.H1, "GET", tp.URL+"/next"); body != "c001" {
		t.Fatalf("/next: %q", body)
	}
	if _, body := getBody(t, tp.H1, "GET", tp.URL+"/next"); body != "c001" {
		t.Fatalf("/next again: %q, want c001 (kept alive)", body)
	}
	if _, body := getBody(t, tp.H1, "GET", tp.URL+"/extra"); body != "extra" {
		t.Fatalf("/extra: %q", body)
	}
	if _, body := getBody(t, tp.H1, "GET", tp.URL+"/next"); body != "c002" {
		t.Errorf("after a record beyond the response: %q, want c002 (a new connection)", body)
	}
	if res, _ := getBody(t, tp.H1, "HEAD", tp.URL+"/obj"); res.StatusCode != http.StatusOK {
		t.Fatalf("HEAD: %s", res.Status)
	}
	if _, body := getBody(t, tp.H1, "GET", tp.URL+"/next"); body != "c003" {
		t.Errorf("after a HEAD answered with a body: %q, want c003 (a new connection)", body)
	}
}

// TestUpstreamStatusBelow100: a status line with a code below 100, which
// Go's response reader accepts, is no answer to pass on (net/http's
// WriteHeader panics on it): the client gets a 502 on every path, and the
// connection to Cells is closed, not left open or pooled.
func TestUpstreamStatusBelow100(t *testing.T) {
	t.Parallel()
	up := newRawUpstream(t, func(conn int64, req *http.Request, w *bufio.Writer) bool {
		io.WriteString(w, "HTTP/1.1 099 Odd\r\nContent-Length: 2\r\n\r\nok")
		return true
	})
	tp := rawProxy(t, up)
	big := strings.Repeat("x", 64<<10) // past the direct path: ReverseProxy
	for _, c := range h1h2Clients(tp) {
		for _, body := range []string{"", big} {
			req, _ := http.NewRequest(http.MethodPost, tp.URL+"/x", strings.NewReader(body))
			res := doDrain(t, c.c, req)
			if res.StatusCode != http.StatusBadGateway {
				t.Errorf("%s, %d-byte body: %s, want 502", c.name, len(body), res.Status)
			}
		}
	}
	// Every connection the proxy opened is closed.
	var n int
	waitFor(t, 10*time.Second, func() bool { n = up.openConns(); return n == 0 }, func() string {
		return fmt.Sprintf("Cells still holds %d of the proxy's %d connections open", n, up.conns.Load())
	})
}

// TestUpstreamEarlyHints: a 103 Early Hints before the response reaches
// the client with its Link header, then the response itself.
func TestUpstreamEarlyHints(t *testing.T) {
	t.Parallel()
	up := newUpstream(t, upTLS, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Link", "</app.css>; rel=preload; as=style")
		w.WriteHeader(http.StatusEarlyHints)
		w.Header().Del("Link")
		io.WriteString(w, "page")
	}))
	tp := startProxy(t, testConfig(up))
	for _, c := range h1h2Clients(tp) {
		var hints []string
		trace := &httptrace.ClientTrace{Got1xxResponse: func(code int, h textproto.MIMEHeader) error {
			hints = append(hints, fmt.Sprintf("%d %s", code, h.Get("Link")))
			return nil
		}}
		req, _ := http.NewRequestWithContext(httptrace.WithClientTrace(context.Background(), trace), "GET", tp.URL+"/", nil)
		res, err := c.c.Do(req)
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		body, _ := io.ReadAll(res.Body)
		res.Body.Close()
		if string(body) != "page" || len(hints) != 1 || hints[0] != "103 </app.css>; rel=preload; as=style" {
			t.Errorf("%s: body %q, informational responses %q", c.name, body, hints)
		}
	}
}

// TestUpstreamHeaderLimit: a response header from Cells larger than the
// limit (http.Transport's MaxResponseHeaderBytes, which both paths share)
// is refused, as the Transport refuses it, rather than read without end.
func TestUpstreamHeaderLimit(t *testing.T) {
	t.Parallel()
	up := newRawUpstream(t, func(conn int64, req *http.Request, w *bufio.Writer) bool {
		io.WriteString(w, "HTTP/1.1 200 OK\r\n")
		for range 100 {
			fmt.Fprintf(w, "X-Filler: %s\r\n", strings.Repeat("f", 100))
		}
		io.WriteString(w, "Content-Length: 2\r\n\r\nok")
		return true
	})
	tr := &http.Transport{MaxResponseHeaderBytes: 4 << 10, MaxIdleConnsPerHost: 4, IdleConnTimeout: time.Minute}
	u := newH1Upstream(up.URL(), tr, &net.Dialer{})
	defer u.CloseIdleConnections()
	req, _ := http.NewRequest("GET", up.URL().String()+"/", nil)
	if res, err := u.do(req, requestWriter{req}, nil); err == nil {
		res.Body.Close()
		t.Fatalf("a %d-byte header was accepted", 100*111)
	} else if !strings.Contains(err.Error(), "header larger than 4096 bytes") {
		t.Errorf("error %q, want the header limit", err)
	}
	if res, err := tr.RoundTrip(req); err == nil {
		res.Body.Close()
		t.Error("http.Transport accepted it: the two paths disagree")
	}
}

// TestUpstreamInvalidHeader: a header value with a line break never reaches
// the wire, as with http.Transport: it would start a second request.
func TestUpstreamInvalidHeader(t *testing.T) {
	t.Parallel()
	up := newRawUpstream(t, func(conn int64, req *http.Request, w *bufio.Writer) bool {
		io.WriteString(w, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
		return true
	})
	u := newH1Upstream(up.URL(), &http.Transport{IdleConnTimeout: time.Minute}, &net.Dialer{})
	defer u.CloseIdleConnections()
	f := &forwarder{cfg: &Config{}, proto: "https", httpTarget: up.URL(), httpUp: u}
	for _, h := range [][2]string{{"X-A", "1\r\nGET /smuggled HTTP/1.1"}, {"X A", "1"}} {
		req, _ := http.NewRequest("GET", up.URL().String()+"/", nil)
		req.RemoteAddr = "127.0.0.1:1234"
		req.Header[h[0]] = []string{h[1]}
		var out outbound
		if err := out.init(f, req); err == nil {
			if res, err := u.do(req, &out, nil); err == nil {
				res.Body.Close()
			}
			t.Errorf("header %q: %q was sent", h[0], h[1])
		}
	}
	if n := up.reqs.Load(); n != 0 {
		t.Errorf("upstream got %d requests, want none", n)
	}
}

// TestUpstreamIdleExpiry: a pooled connection is closed once it has been
// idle for IdleConnTimeout, without a request to notice it.
func TestUpstreamIdleExpiry(t *testing.T) {
	t.Parallel()
	up := newRawUpstream(t, func(conn int64, req *http.Request, w *bufio.Writer) bool {
		io.WriteString(w, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
		return true
	})
	u := newH1Upstream(up.URL(), &http.Transport{IdleConnTimeout: 50 * time.Millisecond, MaxIdleConnsPerHost: 4}, &net.Dialer{})
	defer u.CloseIdleConnections()
	req, _ := http.NewRequest("GET", up.URL().String()+"/", nil)
	res, err := u.do(req, requestWriter{req}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if b, _ := io.ReadAll(res.Body); string(b) != "ok" {
		t.Fatalf("body %q", b)
	}
	res.Body.Close()
	waitFor(t, 10*time.Second, func() bool { return up.openConns() == 0 }, func() string {
		return "the idle connection is still open after 10 s"
	})
	u.mu.Lock()
	n := len(u.idle)
	u.mu.Unlock()
	if n != 0 {
		t.Errorf("%d connections left in the pool", n)
	}
}

// TestUpstreamSmallBodies: REST calls with small bodies (the web UI reads
// with POST) go on the kept-alive connections too, from HTTP/1.1 and HTTP/2
// clients, and reach Cells whole with their Content-Length; bodies beyond
// the limit, or of unknown length, reach it whole as well.
func TestUpstreamSmallBodies(t *testing.T) {
	t.Parallel()
	var conns sync.Map
	up := newUpstream(t, upTLS, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, err := io.ReadAll(r.Body)
		if err != nil {
			http.Error(w, err.Error(), 400)
			return
		}
		if r.URL.Path == "/small" {
			conns.Store(r.RemoteAddr, true)
		}
		fmt.Fprintf(w, "%s %d %s %x", r.Method, r.ContentLength, r.Header.Get("Content-Type"), b)
	}))
	tp := startProxy(t, testConfig(up))
	for _, c := range h1h2Clients(tp) {
		for _, size := range []int{0, 1, 4 << 10, maxSyncBody, maxSyncBody + 1, 1 << 20} {
			for _, method := range []string{"POST", "PUT", "PATCH", "DELETE", "PROPFIND"} {
				body := strings.Repeat("x", size)
				path := "/small"
				if size > maxSyncBody {
					path = "/large"
				}
				req, _ := http.NewRequest(method, tp.URL+path, strings.NewReader(body))
				req.Header.Set("Content-Type", "application/json")
				res, err := c.c.Do(req)
				if err != nil {
					t.Fatalf("%s %s %d bytes: %v", c.name, method, size, err)
				}
				got, _ := io.ReadAll(res.Body)
				res.Body.Close()
				if want := fmt.Sprintf("%s %d application/json %x", method, size, body); string(got) != want {
					t.Errorf("%s %s %d bytes: upstream saw %.60q, want %.60q", c.name, method, size, got, want)
				}
			}
		}
	}
	if n := mapLen(&conns); n != 1 {
		t.Errorf("small bodies came on %d upstream connections, want 1 kept alive", n)
	}
}

// TestUpstreamSmallBodyCut: a client that stops half-way through a small
// body. Cells sees nothing of the request (the proxy takes a small body
// whole before it writes anything to Cells), and an HTTP/2 client, whose
// connection is still there, gets 400.
func TestUpstreamSmallBodyCut(t *testing.T) {
	t.Parallel()
	up := newRawUpstream(t, func(conn int64, req *http.Request, w *bufio.Writer) bool {
		fmt.Fprintf(w, "HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nc%03d", conn)
		return true
	})
	tp := rawProxy(t, up)
	// HTTP/1.1: half the body, then the client's end of the stream (TLS
	// close_notify): the proxy reads an unexpected EOF.
	conn := tp.dialTLS(t, tp.Server.Addr().String(), "http/1.1")
	fmt.Fprintf(conn, "POST /cut HTTP/1.1\r\nHost: cells\r\nContent-Length: 100\r\n\r\n%s", strings.Repeat("y", 50))
	if err := conn.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	// net/http takes a read error on the connection for a client gone:
	// the proxy hangs up without an answer. Either way, once it has, the
	// exchange is over.
	if res, err := http.ReadResponse(bufio.NewReader(conn), nil); err == nil {
		res.Body.Close()
		if res.StatusCode != http.StatusBadRequest {
			t.Errorf("HTTP/1.1 body cut short: %d, want 400 or no answer", res.StatusCode)
		}
	}
	conn.Close()
	if n := up.conns.Load(); n != 0 {
		t.Errorf("the proxy opened %d connections to Cells for a body that never came whole, want none", n)
	}
	if _, body := getBody(t, tp.H1, "GET", tp.URL+"/next"); body != "c001" {
		t.Errorf("next request: %q, want c001", body)
	}

	// HTTP/2: the stream ends after 50 of 100 declared bytes. The client,
	// still there, gets 400: its request was at fault, not Cells.
	fc := dialH2(t, tp)
	fc.wmu.Lock()
	fc.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, EndHeaders: true,
		BlockFragment: fc.block(pseudo(tp, "POST", "/cut-h2", "content-length", "100")...)})
	fc.fr.WriteData(1, true, make([]byte, 50))
	fc.wmu.Unlock()
	if ev := fc.answer(t, 1); ev.String() != ":status 400" {
		t.Errorf("HTTP/2 body shorter than its content-length: %v, want :status 400", ev)
	}
	if n, m := up.conns.Load(), up.reqs.Load(); n != 1 || m != 1 {
		t.Errorf("Cells saw %d connections and %d requests, want 1 and 1 (only /next)", n, m)
	}
}

// TestUpstreamNoRetryWithBody: a request with a body, or a POST, that meets
// a kept-alive connection Cells closes on reading it, is not sent again (it
// may have had effects): the client gets 502 and Cells saw it once.
func TestUpstreamNoRetryWithBody(t *testing.T) {
	t.Parallel()
	up := oneAnswerUpstream(t)
	tp := rawProxy(t, up)
	for _, tc := range []struct{ method, body string }{{"POST", ""}, {"POST", "{}"}, {"PUT", "{}"}} {
		getBody(t, tp.H1, "GET", tp.URL+"/warm") // a kept-alive connection
		before := up.reqs.Load()
		req, _ := http.NewRequest(tc.method, tp.URL+"/call", strings.NewReader(tc.body))
		res, err := tp.H1.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		if res.StatusCode != http.StatusBadGateway {
			t.Errorf("%s with %q: %d, want 502", tc.method, tc.body, res.StatusCode)
		}
		if n := up.reqs.Load() - before; n != 1 {
			t.Errorf("%s with %q: Cells read it %d times, want once", tc.method, tc.body, n)
		}
	}
}

// TestUpstreamAnswersBeforeBody: Cells refuses a large upload at once
// (401, 403, 413) without reading it. The client gets that answer, not a
// 502 from a proxy stuck writing a body nobody reads.
func TestUpstreamAnswersBeforeBody(t *testing.T) {
	t.Parallel()
	up := newUpstream(t, upTLS, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "denied", http.StatusForbidden)
	}))
	tp := startProxy(t, testConfig(up))
	for _, c := range h1h2Clients(tp) {
		req, _ := http.NewRequest("PUT", tp.URL+"/io/bucket/big.bin", strings.NewReader(strings.Repeat("z", 8<<20)))
		res, err := c.c.Do(req)
		if err != nil {
			// The client may fail writing a body the proxy stopped
			// reading; what matters is that it was not a 502.
			t.Logf("%s: %v", c.name, err)
			continue
		}
		res.Body.Close()
		if res.StatusCode != http.StatusForbidden {
			t.Errorf("%s: %d, want Cells' 403", c.name, res.StatusCode)
		}
	}
}

// TestUpstreamWebSocketHandshakeSilent: Cells takes a websocket handshake
// and never answers. The client gets 504 once PROXY_IDLE_TIMEOUT passes,
// and the connection to Cells is closed.
func TestUpstreamWebSocketHandshakeSilent(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	closed := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			closed <- err
			return
		}
		defer c.Close()
		// Read the handshake and whatever follows, never answering,
		// until the proxy hangs up.
		_, err = io.Copy(io.Discard, c)
		closed <- err
	}()
	cfg := testConfig(nil)
	cfg.Upstream = &url.URL{Scheme: "http", Host: ln.Addr().String()}
	cfg.IdleTimeout = 500 * time.Millisecond
	tp := startProxy(t, cfg)
	req, _ := http.NewRequest("GET", tp.URL+"/ws/chat", nil)
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Upgrade", "websocket")
	req.Header.Set("Sec-WebSocket-Version", "13")
	req.Header.Set("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
	res, err := tp.H1.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != http.StatusGatewayTimeout {
		t.Errorf("status %d, want 504", res.StatusCode)
	}
	select {
	case err := <-closed:
		if err != nil {
			t.Errorf("upstream connection: %v, want a clean close", err)
		}
	case <-time.After(10 * time.Second):
		t.Error("the connection to Cells is still open 10 s after the 504")
	}
}

// TestHostPortDefault: the address h1Upstream dials for CELLS_UPSTREAM.
func TestHostPortDefault(t *testing.T) {
	for in, want := range map[string]string{
		"https://cells":          "cells:443",
		"http://cells":           "cells:80",
		"https://cells:8080":     "cells:8080",
		"http://10.0.0.5:8080":   "10.0.0.5:8080",
		"https://[::1]":          "[::1]:443",
		"http://[fd00::5]:8080":  "[fd00::5]:8080",
		"https://Cells.Example.": "Cells.Example.:443",
	} {
		u, err := url.Parse(in)
		if err != nil {
			t.Fatal(err)
		}
		if got := hostPortDefault(u); got != want {
			t.Errorf("%s: %s, want %s", in, got, want)
		}
	}
}

// TestUpstreamConcurrentNoMixup: many clients at once, over HTTP/1.1 and
// HTTP/2, mixing GET, HEAD and small POSTs, some of them given up half-way
// (before the answer, or after the first bytes of a long body). Every
// answer that arrives is the answer to its own request: a pooled
// connection never carries the rest of an earlier exchange.
func TestUpstreamConcurrentNoMixup(t *testing.T) {
	t.Parallel()
	up := newUpstream(t, upTLS, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		id := r.URL.Query().Get("id")
		if r.URL.Path == "/wait" {
			// Held until the proxy gives up on it.
			select {
			case <-r.Context().Done():
			case <-time.After(5 * time.Second):
			}
			return
		}
		if r.URL.Path == "/long" {
			// Long enough that a client giving up leaves most unread.
			w.Header().Set("Content-Length", strconv.Itoa(len(id)+256<<10))
			io.WriteString(w, id)
			w.Write(make([]byte, 256<<10))
			return
		}
		w.Header().Set("X-Id", id)
		fmt.Fprintf(w, "%s %s %s", r.Method, id, b)
	}))
	tp := startProxy(t, testConfig(up))
	var wg sync.WaitGroup
	// A mixed-up pool tends to hang two exchanges on one connection:
	// fail within 30 s rather than at the test binary's timeout.
	h1 := &http.Client{Transport: tp.H1.Transport, Timeout: 30 * time.Second}
	h2 := &http.Client{Transport: tp.H2.Transport, Timeout: 30 * time.Second}
	for g := range 8 {
		c := h1
		if g%2 == 1 {
			c = h2
		}
		wg.Go(func() {
			for i := range 60 {
				id := fmt.Sprintf("g%d-%d", g, i)
				switch i % 6 {
				case 0, 1:
					res, body, err := fetch(c, "GET", tp.URL+"/get?id="+id)
					if want := "GET " + id + " "; err != nil || body != want || res.Header.Get("X-Id") != id {
						t.Errorf("GET %s: %q (%v), want %q", id, body, err, want)
					}
				case 2:
					res, body, err := fetch(c, "HEAD", tp.URL+"/head?id="+id)
					if err != nil || body != "" || res.Header.Get("X-Id") != id {
						t.Errorf("HEAD %s: %v, body %q", id, err, body)
					}
				case 3:
					payload := strings.Repeat(id, 100)
					req, _ := http.NewRequest("POST", tp.URL+"/post?id="+id, strings.NewReader(payload))
					res, err := c.Do(req)
					if err != nil {
						t.Errorf("POST %s: %v", id, err)
						continue
					}
					b, _ := io.ReadAll(res.Body)
					res.Body.Close()
					if want := "POST " + id + " " + payload; string(b) != want {
						t.Errorf("POST %s: %.40q, want %.40q", id, b, want)
					}
				case 4:
					// Given up after the first bytes of a long body.
					res, err := c.Get(tp.URL + "/long?id=" + id)
					if err != nil {
						t.Errorf("long %s: %v", id, err)
						continue
					}
					b := make([]byte, len(id))
					if _, err := io.ReadFull(res.Body, b); err != nil || string(b) != id {
						t.Errorf("long %s: starts %q (%v)", id, b, err)
					}
					res.Body.Close()
				case 5:
					// Given up while Cells takes its time.
					ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
					req, _ := http.NewRequestWithContext(ctx, "GET", tp.URL+"/wait?id="+id, nil)
					if res, err := c.Do(req); err == nil {
						res.Body.Close()
					}
					cancel()
				}
			}
		})
	}
	wg.Wait()
}

// TestNo1xxToHTTP10Client: RFC 9110 §15.2: a server MUST NOT send a
// 1xx response to an HTTP/1.0 client, which takes the first status line
// it reads for the answer. Cells gets the request as HTTP/1.1 and may
// send 103 Early Hints (or a 100 without Expect); the proxy must not pass
// it on to an HTTP/1.0 client.
func TestNo1xxToHTTP10Client(t *testing.T) {
	t.Parallel()
	tp := answeringProxy(t, "HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")
	for _, size := range []int{0, 64 << 10} { // direct path, then ReverseProxy
		conn := tp.dialRaw(t, tp.Addr().String(), "http/1.1")
		req := "GET /x HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n"
		if size > 0 {
			req = "POST /x HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Length: 65536\r\n\r\n" + strings.Repeat("x", size)
		}
		if _, err := io.WriteString(conn, req); err != nil {
			t.Fatal(err)
		}
		all, _ := io.ReadAll(conn)
		conn.Close()
		first, _, _ := strings.Cut(string(all), "\r\n")
		if !strings.HasPrefix(first, "HTTP/1.0 200") {
			t.Errorf("%d-byte body: an HTTP/1.0 client reads status line %q, want 200; whole answer:\n%s", size, first, all)
		}
	}
}

// TestCloseAfterSurvives1xx: the smuggling rule (SECURITY.md, README
// "chunked HTTP/1.1 request, HTTP/1.0 request with a body: the connection
// closes after the answer") must hold when Cells sends a 1xx before its
// answer: the Connection: close the proxy set for the final response is
// not the 1xx's to take away.
func TestCloseAfterSurvives1xx(t *testing.T) {
	t.Parallel()
	// A 1xx that reaches the client: the proxy drops Cells' 100 Continue.
	tp := answeringProxy(t, "HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")
	for _, tc := range []struct{ name, req string }{
		// The direct path: a small body of known length.
		{"HTTP/1.0 keep-alive with body", "POST /x HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\nContent-Length: 5\r\n\r\nhello"},
		// ReverseProxy: a chunked body.
		{"HTTP/1.1 chunked", "POST /x HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"},
	} {
		conn := tp.dialRaw(t, tp.Addr().String(), "http/1.1")
		if _, err := io.WriteString(conn, tc.req); err != nil {
			t.Fatal(err)
		}
		br := bufio.NewReader(conn)
		var res *http.Response
		for {
			var err error
			res, err = http.ReadResponse(br, nil)
			if err != nil {
				t.Fatalf("%s: %v", tc.name, err)
			}
			if res.StatusCode >= 200 {
				break
			}
		}
		io.ReadAll(res.Body)
		// The connection must be closed: a second request gets no answer.
		io.WriteString(conn, "GET /second HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
		if res2, err := http.ReadResponse(br, nil); err == nil {
			t.Errorf("%s: final response %s with Connection %q, and the connection carried another request (%s)",
				tc.name, res.Status, res.Header["Connection"], res2.Status)
		}
		conn.Close()
	}
}

// answeringProxy is a proxy in front of a raw Cells that answers every
// request with first (a 1xx) and then 200 "page", keeping the connection.
func answeringProxy(t *testing.T, first string) *testProxy {
	t.Helper()
	return rawProxy(t, newRawUpstream(t, func(conn int64, req *http.Request, w *bufio.Writer) bool {
		io.WriteString(w, first)
		io.WriteString(w, "HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\npage")
		return true
	}))
}

// TestNoHopByHopIn1xx: a 1xx from Cells is forwarded like any response,
// without its hop-by-hop fields (RFC 9110 §7.6.1): those of Connection,
// Keep-Alive and the like are Cells' hop to the proxy. An HTTP/1.1 client
// would read them as said to it; to an HTTP/2 client a connection-specific
// field makes the response malformed (RFC 9113 §8.2.2).
func TestNoHopByHopIn1xx(t *testing.T) {
	t.Parallel()
	tp := answeringProxy(t, "HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n"+
		"Connection: X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\n\r\n")
	for _, c := range h1h2Clients(tp) {
		for _, size := range []int{0, 64 << 10} { // direct path, then ReverseProxy
			var hints []textproto.MIMEHeader
			trace := &httptrace.ClientTrace{Got1xxResponse: func(code int, h textproto.MIMEHeader) error {
				hints = append(hints, h)
				return nil
			}}
			ctx := httptrace.WithClientTrace(context.Background(), trace)
			req, _ := http.NewRequestWithContext(ctx, "POST", tp.URL+"/x", strings.NewReader(strings.Repeat("x", size)))
			res, err := c.c.Do(req)
			if err != nil {
				t.Errorf("%s, %d-byte body: %v", c.name, size, err)
				continue
			}
			body, _ := io.ReadAll(res.Body)
			res.Body.Close()
			if string(body) != "page" || len(hints) != 1 {
				t.Errorf("%s, %d-byte body: body %q after %d informational responses, want page after 1", c.name, size, body, len(hints))
				continue
			}
			h := hints[0]
			if h.Get("Link") != "</a.css>; rel=preload" {
				t.Errorf("%s, %d-byte body: the 103 lost its Link: %q", c.name, size, h)
			}
			for _, name := range []string{"Connection", "X-Hop", "Keep-Alive", "Proxy-Connection"} {
				if v, ok := h[name]; ok {
					t.Errorf("%s, %d-byte body: the 103 reached the client with %s: %q", c.name, size, name, v)
				}
			}
		}
	}
}
