package proxy

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
	"golang.org/x/net/http2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"
)

// shutdownAsync stops tp as SIGTERM does, without waiting: Run's result
// arrives on the channel.
func shutdownAsync(tp *testProxy) <-chan error {
	done := make(chan error, 1)
	go func() { done <- tp.Shutdown() }()
	return done
}

// readyz is the status of /readyz on the health listener.
func readyz(t *testing.T, tp *testProxy) int {
	t.Helper()
	return healthStatus(t, tp, "/readyz")
}

// healthStatus is the status of the health listener's answer for path.
func healthStatus(t *testing.T, tp *testProxy, path string) int {
	t.Helper()
	c := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 10 * time.Second}
	res, err := c.Get("http://" + tp.HealthAddr().String() + path)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	io.Copy(io.Discard, res.Body)
	res.Body.Close()
	return res.StatusCode
}

// waitDraining waits until /readyz answers 503: the drain has begun.
func waitDraining(t *testing.T, tp *testProxy) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		if readyz(t, tp) == http.StatusServiceUnavailable {
			return
		}
	}
	t.Fatal("/readyz did not turn 503 after shutdown began")
}

// waitRefused waits until a new connection to the public port is refused.
func waitRefused(t *testing.T, tp *testProxy) {
	t.Helper()
	var err error
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		var c net.Conn
		c, err = net.DialTimeout("tcp", tp.Addr().String(), 5*time.Second)
		if err != nil {
			return
		}
		c.Close()
	}
	t.Fatal("the public port still accepts connections while draining")
}

// gate is a handler that answers "done" to every request once released.
// arrived receives each request's path as it reaches the upstream.
type gate struct {
	arrived chan string
	release chan struct{}
	once    sync.Once
}

func newGate(t *testing.T) *gate {
	g := &gate{arrived: make(chan string, 16), release: make(chan struct{})}
	t.Cleanup(g.open)
	return g
}

func (g *gate) open() { g.once.Do(func() { close(g.release) }) }

func (g *gate) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	g.arrived <- r.URL.Path
	select {
	case <-g.release:
	case <-r.Context().Done():
		return
	}
	io.WriteString(w, "done")
}

func (g *gate) wait(t *testing.T) string {
	t.Helper()
	select {
	case p := <-g.arrived:
		return p
	case <-time.After(30 * time.Second):
		t.Fatal("request did not reach the upstream")
		return ""
	}
}

// TestShutdownDrainsUpload stops the proxy while an HTTP/1.1 upload is
// half sent: readiness turns 503 (liveness stays 200), the public port refuses new
// connections, the upload completes (Cells gets every byte, the client
// gets 200), and Run returns nil.
func TestShutdownDrainsUpload(t *testing.T) {
	t.Parallel()
	const size = 8 << 20
	body := randomMessage(websocket.MessageBinary, size)

	firstBytes := make(chan struct{})
	var got struct {
		sync.Mutex
		n   int64
		sum [sha256.Size]byte
	}
	up := newUpstream(t, upTLS, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/io/bucket/file.bin" {
			io.WriteString(w, "ok") // the readiness probe
			return
		}
		h := sha256.New()
		buf := make([]byte, 32<<10)
		var n int64
		var once sync.Once
		for {
			m, err := r.Body.Read(buf)
			h.Write(buf[:m])
			n += int64(m)
			if n > 0 {
				once.Do(func() { close(firstBytes) })
			}
			if err != nil {
				break
			}
		}
		got.Lock()
		got.n = n
		h.Sum(got.sum[:0])
		got.Unlock()
		fmt.Fprintf(w, `{"bytes":%d}`, n)
	}))
	cfg := testConfig(up)
	// Long enough for the second half to cross on a busy machine; the
	// test does not wait for it to pass.
	cfg.ShutdownTimeout = 30 * time.Second
	tp := startProxy(t, cfg)
	if got, want := readyz(t, tp), http.StatusOK; got != want {
		t.Fatalf("/readyz before shutdown = %d, want %d", got, want)
	}

	pr, pw := io.Pipe()
	defer pw.Close()
	req, err := http.NewRequest(http.MethodPut, tp.URL+"/io/bucket/file.bin", pr)
	if err != nil {
		t.Fatal(err)
	}
	req.ContentLength = size
	type result struct {
		status int
		body   string
		err    error
	}
	resc := make(chan result, 1)
	go func() {
		res, err := tp.H1.Do(req)
		if err != nil {
			resc <- result{err: err}
			return
		}
		b, err := io.ReadAll(res.Body)
		res.Body.Close()
		resc <- result{res.StatusCode, string(b), err}
	}()
	if _, err := pw.Write(body[:size/2]); err != nil {
		t.Fatalf("first half of the upload: %v", err)
	}
	<-firstBytes

	stopped := shutdownAsync(tp)
	waitDraining(t, tp)
	waitRefused(t, tp)
	select {
	case r := <-resc:
		t.Fatalf("upload ended before its body was sent: %+v", r)
	default:
	}
	// Alive while it drains: a liveness probe failing now would have an
	// orchestrator kill the proxy and cut this upload.
	if got, want := healthStatus(t, tp, "/livez"), http.StatusOK; got != want {
		t.Errorf("/livez while draining = %d, want %d", got, want)
	}

	if _, err := pw.Write(body[size/2:]); err != nil {
		t.Fatalf("second half of the upload, while draining: %v", err)
	}
	pw.Close()
	r := <-resc
	if r.err != nil {
		t.Fatalf("upload during the drain: %v", r.err)
	}
	if r.status != http.StatusOK || r.body != fmt.Sprintf(`{"bytes":%d}`, size) {
		t.Errorf("upload during the drain: %d %s, want 200 {\"bytes\":%d}", r.status, r.body, size)
	}
	got.Lock()
	if got.n != size || got.sum != sha256.Sum256(body) {
		t.Errorf("upstream received %d bytes (same content: %v), want %d", got.n, got.sum == sha256.Sum256(body), size)
	}
	got.Unlock()
	if err := <-stopped; err != nil {
		t.Errorf("Run = %v, want nil", err)
	}
}

// TestShutdownGOAWAY stops the proxy while an HTTP/2 request is in flight:
// the client gets GOAWAY (no error, the in-flight stream included), then
// the whole response; the net/http HTTP/2 client's in-flight request
// completes too, and its next request cannot get a connection.
func TestShutdownGOAWAY(t *testing.T) {
	t.Parallel()
	g := newGate(t)
	up := newUpstream(t, upTLS, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/" {
			io.WriteString(w, "ok")
			return
		}
		g.ServeHTTP(w, r)
	}))
	cfg := testConfig(up)
	cfg.ShutdownTimeout = 30 * time.Second
	tp := startProxy(t, cfg)

	// A raw HTTP/2 client, to see the frames.
	c := dialH2At(t, tp, tp.Addr().String())
	if err := c.request(1, h2Fields("GET", tp.Addr().String(), "/raw")...); err != nil {
		t.Fatal(err)
	}
	if got, want := g.wait(t), "/raw"; got != want {
		t.Fatalf("upstream got %q, want %q", got, want)
	}

	// The net/http HTTP/2 client, with a request in flight too.
	type result struct {
		proto int
		body  string
		err   error
	}
	resc := make(chan result, 1)
	go func() {
		res, err := tp.H2.Get(tp.URL + "/std")
		if err != nil {
			resc <- result{err: err}
			return
		}
		b, err := io.ReadAll(res.Body)
		res.Body.Close()
		resc <- result{res.ProtoMajor, string(b), err}
	}()
	if got, want := g.wait(t), "/std"; got != want {
		t.Fatalf("upstream got %q, want %q", got, want)
	}

	stopped := shutdownAsync(tp)
	next := func() frameEvent {
		t.Helper()
		select {
		case ev, ok := <-c.events:
			if !ok {
				t.Fatalf("reading frames: %v", c.readErr)
			}
			return ev
		case <-time.After(30 * time.Second):
			t.Fatal("no frame for 30 s")
			return frameEvent{}
		}
	}
	for {
		ev := next()
		if ev.Type == http2.FrameRSTStream {
			t.Fatalf("stream %d reset (%v) before GOAWAY", ev.StreamID, ev.Code)
		}
		if ev.Type != http2.FrameGoAway {
			continue
		}
		if ev.Code != http2.ErrCodeNo {
			t.Errorf("GOAWAY error code = %v, want NO_ERROR", ev.Code)
		}
		if ev.LastID < 1 {
			t.Errorf("GOAWAY last stream = %d: the in-flight stream 1 would be dropped", ev.LastID)
		}
		break
	}
	waitDraining(t, tp)
	waitRefused(t, tp)

	g.open()
	var status, body string
	for ended := false; !ended; {
		ev := next()
		switch {
		case ev.Type == http2.FrameRSTStream:
			t.Fatalf("stream %d reset (%v) while draining", ev.StreamID, ev.Code)
		case ev.StreamID != 1:
		case ev.Type == http2.FrameHeaders:
			status, ended = ev.Status, ev.End
		case ev.Type == http2.FrameData:
			body += string(ev.Data)
			ended = ev.End
		}
	}
	if status != "200" || body != "done" {
		t.Errorf("in-flight raw HTTP/2 stream: %s %q, want 200 \"done\"", status, body)
	}

	r := <-resc
	if r.err != nil || r.proto != 2 || r.body != "done" {
		t.Errorf("in-flight net/http HTTP/2 request: HTTP/%d %q, %v; want HTTP/2 \"done\"", r.proto, r.body, r.err)
	}
	if res, err := tp.H2.Get(tp.URL + "/after"); err == nil {
		res.Body.Close()
		t.Errorf("request after GOAWAY: status %d, want a connection error", res.StatusCode)
	}
	if err := <-stopped; err != nil {
		t.Errorf("Run = %v, want nil", err)
	}
}

// TestShutdownWebSocket: websockets stay open during the drain and are
// closed with 1001 at both ends once in-flight requests are done.
func TestShutdownWebSocket(t *testing.T) {
	t.Parallel()
	g := newGate(t)
	wsUp := newWSUpstream(nil)
	up := newUpstream(t, upTLS, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/slow" {
			g.ServeHTTP(w, r)
			return
		}
		wsUp.ServeHTTP(w, r)
	}))
	cfg := testConfig(up)
	cfg.ShutdownTimeout = 30 * time.Second
	tp := startProxy(t, cfg)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	// Several sockets: each close races with its own tunnel's end.
	const n = 8
	var socks []*websocket.Conn
	for i := range n {
		c, _ := dialWS(t, tp, fmt.Sprintf("/ws/event?i=%d", i), nil)
		socks = append(socks, c)
	}
	echoAll := func(msg string) error {
		for i, c := range socks {
			if err := c.Write(ctx, websocket.MessageText, []byte(msg)); err != nil {
				return fmt.Errorf("socket %d: %w", i, err)
			}
			_, b, err := c.Read(ctx)
			if err == nil && string(b) != msg {
				err = fmt.Errorf("echo %q, want %q", b, msg)
			}
			if err != nil {
				return fmt.Errorf("socket %d: %w", i, err)
			}
		}
		return nil
	}
	if err := echoAll("before"); err != nil {
		t.Fatal(err)
	}

	slow := make(chan error, 1)
	go func() {
		res, err := tp.H1.Get(tp.URL + "/slow")
		if err == nil {
			var b []byte
			b, err = io.ReadAll(res.Body)
			res.Body.Close()
			if err == nil && (res.StatusCode != 200 || string(b) != "done") {
				err = fmt.Errorf("%d %q, want 200 \"done\"", res.StatusCode, b)
			}
		}
		slow <- err
	}()
	g.wait(t)

	stopped := shutdownAsync(tp)
	waitDraining(t, tp)
	if err := echoAll("during the drain"); err != nil {
		t.Fatalf("websocket during the drain: %v", err)
	}

	g.open()
	if err := <-slow; err != nil {
		t.Errorf("in-flight request during the drain: %v", err)
	}
	for i, c := range socks {
		_, _, err := c.Read(ctx)
		wantGoingAway(t, err, fmt.Sprintf("client %d after the drain", i))
	}
	for range n {
		wantGoingAway(t, wsUp.end(t), "upstream after the drain")
	}
	if err := <-stopped; err != nil {
		t.Errorf("Run = %v, want nil", err)
	}
}

// TestShutdownWebSocketsInHandshake stops the proxy while websocket
// handshakes are in flight: each socket that opens is closed with 1001 at
// both ends, and (under -race) the tunnel bookkeeping does not race with
// shutdown.
func TestShutdownWebSocketsInHandshake(t *testing.T) {
	t.Parallel()
	const n = 16
	g := newGate(t)
	wsUp := newWSUpstream(nil)
	up := newUpstream(t, upTLS, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Upgrade") != "" {
			g.arrived <- r.URL.Path
			<-g.release
		}
		wsUp.ServeHTTP(w, r)
	}))
	cfg := testConfig(up)
	cfg.ShutdownTimeout = 30 * time.Second
	tp := startProxy(t, cfg)

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	errs := make(chan error, n)
	for range n {
		go func() {
			c, _, err := websocket.Dial(ctx, wsURL(tp, "/ws/event"), &websocket.DialOptions{HTTPClient: tp.H1})
			if err != nil {
				errs <- fmt.Errorf("dial: %w", err)
				return
			}
			defer c.CloseNow()
			_, _, err = c.Read(ctx)
			if code, reason := closeErr(err); code != websocket.StatusGoingAway {
				errs <- fmt.Errorf("client: close %d %q, want 1001", code, reason)
				return
			}
			errs <- nil
		}()
	}
	for range n {
		g.wait(t)
	}
	stopped := shutdownAsync(tp)
	waitDraining(t, tp)
	g.open()
	for range n {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
	for range n {
		wantGoingAway(t, wsUp.end(t), "upstream")
	}
	if err := <-stopped; err != nil {
		t.Errorf("Run = %v, want nil", err)
	}
}

// TestShutdownDeadline: when requests outlive PROXY_SHUTDOWN_TIMEOUT, Run
// still returns soon after it, and their clients get an error (a 503 from
// the proxy, or a broken connection or body), never a clean answer.
func TestShutdownDeadline(t *testing.T) {
	t.Parallel()
	const partial = 1000
	arrived := make(chan string, 8)
	up := newUpstream(t, upTLS, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/":
			io.WriteString(w, "ok")
			return
		case "/mid-body":
			// A download that stalls after its first bytes.
			w.Header().Set("Content-Length", strconv.Itoa(100*partial))
			w.Write(bytes.Repeat([]byte("x"), partial))
			w.(http.Flusher).Flush()
		}
		arrived <- r.URL.Path
		<-r.Context().Done() // never answers: only the proxy ends this
	}))
	cfg := testConfig(up)
	cfg.ShutdownTimeout = time.Second
	tp := startProxy(t, cfg)

	type result struct {
		name   string
		status int
		err    error
	}
	results := make(chan result, 3)
	get := func(name string, c *http.Client, path string, prefix int) {
		res, err := c.Get(tp.URL + path)
		if err != nil {
			results <- result{name: name, err: err}
			return
		}
		defer res.Body.Close()
		if prefix > 0 {
			if _, err := io.ReadFull(res.Body, make([]byte, prefix)); err != nil {
				results <- result{name, res.StatusCode, fmt.Errorf("first bytes: %w", err)}
				return
			}
			arrived <- path + " (client)"
		}
		_, err = io.ReadAll(res.Body)
		results <- result{name, res.StatusCode, err}
	}
	go get("h1 waiting for headers", tp.H1, "/no-answer", 0)
	go get("h2 waiting for headers", tp.H2, "/no-answer", 0)
	go get("h1 mid-body", tp.H1, "/mid-body", partial)
	// Four arrivals: both /no-answer, /mid-body at the upstream and its
	// first bytes at the client.
	for i := range 4 {
		select {
		case <-arrived:
		case <-time.After(30 * time.Second):
			t.Fatalf("only %d of 4 requests in flight", i)
		}
	}

	start := time.Now()
	err := tp.Shutdown()
	took := time.Since(start)
	if err != nil {
		t.Errorf("Run = %v, want nil", err)
	}
	if took < cfg.ShutdownTimeout {
		t.Errorf("Run returned after %v, before PROXY_SHUTDOWN_TIMEOUT=%v with requests in flight", took, cfg.ShutdownTimeout)
	}
	// 20 times the expected overrun on a busy machine.
	if limit := cfg.ShutdownTimeout + 5*time.Second; took > limit {
		t.Errorf("Run returned after %v, want within %v", took, limit)
	}
	for range 3 {
		select {
		case r := <-results:
			switch {
			case r.err != nil:
			case r.status == http.StatusServiceUnavailable:
			default:
				t.Errorf("%s: status %d and a complete body, want an error", r.name, r.status)
			}
		case <-time.After(30 * time.Second):
			t.Fatal("a stuck request's client got no error after Run returned")
		}
	}
}

// keptAlive is an HTTP/1.1 connection to the public port for several
// requests, and its reader.
func keptAlive(t *testing.T, tp *testProxy) (*tls.Conn, *bufio.Reader) {
	t.Helper()
	conn := tp.dialRaw(t, tp.Addr().String(), "http/1.1")
	conn.SetDeadline(time.Now().Add(30 * time.Second))
	return conn, bufio.NewReader(conn)
}

// waitFrontBusy waits until one of the front's connections is reading or
// serving a request.
func waitFrontBusy(t *testing.T, f *h1Front) {
	t.Helper()
	waitFor(t, 10*time.Second, func() bool {
		f.mu.Lock()
		defer f.mu.Unlock()
		busy := false
		for c := range f.conns {
			busy = busy || c.state.Load() == h1Busy
		}
		return busy
	}, func() string { return "no connection of the front began a request" })
}

// TestShutdownRequestMidHead: on a kept-alive HTTP/1.1 connection, a
// request's head has begun to arrive when the drain begins, and the rest
// comes after. The request is in flight and is served, as net/http's
// Shutdown serves an active connection's, also when it turns out to be one
// the front hands to net/http's server (an upload, an upgrade): that server
// drains only once the front has, so the hand-over still finds it.
func TestShutdownRequestMidHead(t *testing.T) {
	const size = 100_000
	for _, tc := range []struct {
		name, head, rest string
		body             int
		status           int
	}{
		{"small GET", "GET /a/x HTTP/1.1\r\nHost: x\r\n", "Accept: */*\r\n\r\n", 0, http.StatusOK},
		{"upload", "PUT /data/f HTTP/1.1\r\nHost: x\r\n", fmt.Sprintf("Content-Length: %d\r\n\r\n", size), size, http.StatusOK},
		{"websocket", "GET /ws/event HTTP/1.1\r\nHost: x\r\n", "Upgrade: websocket\r\nConnection: Upgrade\r\n" +
			"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n", 0, http.StatusSwitchingProtocols},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var got atomic.Int64
			mux := http.NewServeMux()
			mux.Handle("/ws/", newWSUpstream(nil))
			mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
				n, _ := io.Copy(io.Discard, r.Body)
				got.Store(n)
			})
			up := newUpstream(t, upTLS, mux)
			settle(t, up)
			tp := startProxy(t, testConfig(up))
			conn, br := keptAlive(t, tp)
			io.WriteString(conn, "GET /a/first HTTP/1.1\r\nHost: x\r\n\r\n")
			res, err := http.ReadResponse(br, nil)
			if err != nil {
				t.Fatal(err)
			}
			io.Copy(io.Discard, res.Body)

			io.WriteString(conn, tc.head)
			waitFrontBusy(t, frontOf(t, tp))
			stopped := shutdownAsync(tp)
			waitDraining(t, tp)
			io.WriteString(conn, tc.rest)
			conn.Write(make([]byte, tc.body))
			res, err = http.ReadResponse(br, nil)
			if err != nil {
				t.Fatalf("a request begun before the drain: no answer: %v", err)
			}
			if res.StatusCode != tc.status {
				t.Errorf("status %s, want %d", res.Status, tc.status)
			}
			if res.StatusCode != http.StatusSwitchingProtocols {
				io.Copy(io.Discard, res.Body)
			}
			if n := got.Load(); n != int64(tc.body) {
				t.Errorf("Cells got %d bytes of the body, want %d", n, tc.body)
			}
			if tc.status == http.StatusSwitchingProtocols {
				// The drain ends the websocket with 1001.
				io.Copy(io.Discard, conn)
			}
			if err := <-stopped; err != nil {
				t.Errorf("Run: %v", err)
			}
		})
	}
}

// TestShutdownHandedOverKeepAlive: while the HTTP/1.1 front drains (a slow
// request still runs on it), a kept-alive connection that the front had
// handed to net/http's server takes no more requests: it is closed while
// idle, as Shutdown closes idle connections, or the answer says
// Connection: close. net/http's server waits for the front before its own
// Shutdown, which alone would have left it keeping connections alive.
func TestShutdownHandedOverKeepAlive(t *testing.T) {
	g := newGate(t)
	mux := http.NewServeMux()
	mux.Handle("/slow", g)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		io.WriteString(w, "ok")
	})
	up := newUpstream(t, upTLS, mux)
	settle(t, up)
	tp := startProxy(t, testConfig(up))

	// An upload hands this connection to net/http's server.
	conn, br := keptAlive(t, tp)
	fmt.Fprintf(conn, "PUT /data/f HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n", 100_000)
	conn.Write(make([]byte, 100_000))
	res, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, res.Body)
	if res.Close {
		t.Fatal("the upload's answer closed the connection before the drain")
	}

	// A request on the front that lasts the drain.
	slow := tp.dialRaw(t, tp.Addr().String(), "http/1.1")
	slow.SetDeadline(time.Now().Add(30 * time.Second))
	io.WriteString(slow, "GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
	g.wait(t)
	stopped := shutdownAsync(tp)
	waitDraining(t, tp)

	if _, err := io.WriteString(conn, "GET /a/again HTTP/1.1\r\nHost: x\r\n\r\n"); err == nil {
		if res, err := http.ReadResponse(br, nil); err == nil {
			io.Copy(io.Discard, res.Body)
			if !res.Close {
				t.Errorf("a request during the drain on a handed-over connection: %s, kept alive", res.Status)
			}
		}
	}
	g.open()
	if res, err := http.ReadResponse(bufio.NewReader(slow), nil); err != nil || res.StatusCode != http.StatusOK {
		t.Errorf("the slow request: %v %v", res, err)
	}
	if err := <-stopped; err != nil {
		t.Errorf("Run: %v", err)
	}
}

// TestShutdownEndsGRPCStreams: gRPC streams that never end by themselves,
// as Cells Sync's StreamChanges, do not hold the drain to
// PROXY_SHUTDOWN_TIMEOUT. Once the gRPC grace has passed they end with
// UNAVAILABLE (on the public port and the dedicated one) and Cells sees
// them cancelled, while an HTTP request in flight keeps the rest of the
// drain and completes; Run then returns at once.
func TestShutdownEndsGRPCStreams(t *testing.T) {
	t.Parallel()
	svc, gs := newProbeServer(t)
	g := newGate(t)
	up := newUpstream(t, upTLS, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.ProtoMajor == 2 && strings.HasPrefix(r.Header.Get("Content-Type"), "application/grpc"):
			gs.ServeHTTP(w, r)
		case r.URL.Path == "/":
			io.WriteString(w, "ok") // the readiness probe
		default:
			g.ServeHTTP(w, r)
		}
	}))
	cfg := testConfig(up)
	cfg.GRPCAddr = "127.0.0.1:0"
	// Far beyond the test harness's 30 s wait for Run: waiting for the
	// streams would fail the test.
	cfg.ShutdownTimeout = time.Hour
	tp := startProxy(t, cfg)
	tp.grpcGrace = 300 * time.Millisecond // read by the drain, after Shutdown

	type ended struct {
		port string
		err  error
	}
	streamEnds := make(chan ended, 2)
	var held []*heldCall
	for _, addr := range []string{tp.Addr().String(), tp.GRPCAddr().String()} {
		tc := testgrpc.NewTestServiceClient(dialProxy(t, tp, addr))
		stream, err := tc.FullDuplexCall(probe(testCtx(t), "hold"))
		if err != nil {
			t.Fatalf("%s: FullDuplexCall: %v", addr, err)
		}
		held = append(held, waitHeld(t, svc))
		go func() {
			_, err := stream.Recv()
			streamEnds <- ended{addr, err}
		}()
	}

	resc := make(chan string, 1)
	go func() {
		res, err := tp.H2.Get(tp.URL + "/download")
		if err != nil {
			resc <- err.Error()
			return
		}
		b, err := io.ReadAll(res.Body)
		res.Body.Close()
		resc <- fmt.Sprintf("%d %s %v", res.StatusCode, b, err)
	}()
	if got := g.wait(t); got != "/download" {
		t.Fatalf("upstream got %q, want /download", got)
	}

	stopped := shutdownAsync(tp)
	for range 2 {
		select {
		case e := <-streamEnds:
			st := status.Convert(e.err)
			if st.Code() != codes.Unavailable || !strings.Contains(st.Message(), "shutting down") {
				t.Errorf("%s: held stream ended with %v, want UNAVAILABLE \"cells-proxy: shutting down\"", e.port, e.err)
			}
		case <-time.After(20 * time.Second):
			t.Fatal("a held gRPC stream was not ended during the drain")
		}
	}
	for _, h := range held {
		if err := waitEnded(t, h); err != context.Canceled {
			t.Errorf("Cells' side of a held stream ended with %v, want context.Canceled", err)
		}
	}
	select {
	case r := <-resc:
		t.Fatalf("the HTTP request in flight ended with the gRPC calls: %s", r)
	case err := <-stopped:
		t.Fatalf("Run returned (%v) with an HTTP request in flight", err)
	default:
	}
	g.open()
	if got, want := <-resc, "200 done <nil>"; got != want {
		t.Errorf("HTTP request in flight during the drain: %q, want %q", got, want)
	}
	if err := <-stopped; err != nil {
		t.Errorf("Run = %v, want nil", err)
	}
	if log := tp.Log.String(); !strings.Contains(log, "gRPC calls still open end with UNAVAILABLE") || !strings.Contains(log, "calls=2") {
		t.Errorf("the drain did not log the 2 gRPC calls it ended; log:\n%s", log)
	}
}

// unreadUpstream is how many response bytes the gRPC upstream has delivered
// to the proxy that the proxy has not yet passed on to its client.
func unreadUpstream(u *grpcUpstream) int {
	return upstreamCount(u, func(s *grpcStream) int { return s.buf.Len() })
}

// upstreamCount sums f over the calls open on u's connections, each under
// its connection's lock.
func upstreamCount(u *grpcUpstream, f func(*grpcStream) int) int {
	n := 0
	for _, c := range grpcConns(u) {
		c.mu.Lock()
		for _, s := range c.streams {
			n += f(s)
		}
		c.mu.Unlock()
	}
	return n
}

// heldUnread is how much of an answer the drain tests wait for the proxy to
// hold unread: a quarter of its stream window (128 KiB at 512 KiB).
func heldUnread(u *grpcUpstream) int { return int(u.streamWindow) / 4 }

// drainingGRPC starts a Cells and a proxy whose drain gives gRPC calls
// 300 ms of a one-hour PROXY_SHUTDOWN_TIMEOUT, and a grpc-go client of it
// with 64 KiB windows and no BDP growth: a client that does not read holds
// little.
func drainingGRPC(t *testing.T) (*testProxy, testgrpc.TestServiceClient, *grpc.ClientConn) {
	t.Helper()
	e := startGRPC(t, topoTLS, func(c *Config) { c.ShutdownTimeout = time.Hour })
	e.tp.grpcGrace = 300 * time.Millisecond // read by the drain, after Shutdown
	cc := e.dial(t, portMain, grpc.WithInitialWindowSize(65535), grpc.WithInitialConnWindowSize(65535))
	return e.tp, testgrpc.NewTestServiceClient(cc), cc
}

// TestShutdownGRPCClientNotReading: a gRPC stream whose client has
// stopped reading (its window is full: a Sync client on a laptop gone to
// sleep) does not hold the drain past the gRPC grace either: closing the
// call's side to Cells is not enough, as its handler is blocked writing to
// the client (found by review: the drain waited the whole
// PROXY_SHUTDOWN_TIMEOUT).
func TestShutdownGRPCClientNotReading(t *testing.T) {
	t.Parallel()
	tp, tc, cc := drainingGRPC(t)
	streamingCall(t, testCtx(t), tc, 32, 256<<10) // never read
	// Wait until the proxy holds a quarter of its stream window (128 KiB at
	// 512 KiB) of the answer it cannot pass on.
	held := heldUnread(tp.fwd.grpcUp)
	var unread int
	waitFor(t, 20*time.Second, func() bool { unread = unreadUpstream(tp.fwd.grpcUp); return unread >= held }, func() string {
		return fmt.Sprintf("the proxy never held %d bytes unread (%d)", held, unread)
	})
	stopped := shutdownAsync(tp)
	select {
	case err := <-stopped:
		if err != nil {
			t.Errorf("Run = %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Errorf("Run has not returned 20 s into the drain (gRPC grace 300ms): a gRPC call still holds it; log says:\n%s",
			grepLines(tp.Log.String(), "gRPC calls still open"))
		cc.Close() // let the drain end
		<-stopped
	}
}

func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// TestShutdownGRPCCallDialling: a gRPC call whose connection to Cells
// is still being set up when the grace passes (Cells accepted but has not
// sent its SETTINGS) ends then, with UNAVAILABLE "shutting down" (found by
// review: it waited out the 10 s handshake timeout, holding the drain, and
// its client was told "upstream timed out").
func TestShutdownGRPCCallDialling(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	accepted := make(chan net.Conn, 4)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			t.Cleanup(func() { c.Close() })
			accepted <- c // never answers: no SETTINGS
		}
	}()
	up := newUpstream(t, upPlain, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") }))
	cfg := testConfig(up)
	cfg.GRPCUpstream = &url.URL{Scheme: "h2c", Host: ln.Addr().String()}
	cfg.ShutdownTimeout = time.Hour
	tp := startProxy(t, cfg)
	tp.grpcGrace = 300 * time.Millisecond
	tc := testgrpc.NewTestServiceClient(dialProxy(t, tp, tp.Addr().String()))
	done := make(chan error, 1)
	go func() {
		_, err := tc.EmptyCall(testCtx(t), &testgrpc.Empty{})
		done <- err
	}()
	select {
	case <-accepted:
	case <-time.After(20 * time.Second):
		t.Fatal("the proxy never dialled Cells' gRPC port")
	}
	stopped := shutdownAsync(tp)
	select {
	case err := <-done:
		if st := status.Convert(err); st.Code() != codes.Unavailable || !strings.Contains(st.Message(), "shutting down") {
			t.Errorf("call dialling at the grace: %v, want UNAVAILABLE \"cells-proxy: shutting down\"", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the call never ended")
	}
	if err := <-stopped; err != nil {
		t.Errorf("Run = %v", err)
	}
	if log := tp.Log.String(); strings.Contains(log, "upstream error") {
		t.Errorf("the drain's ending of a call logged as Cells failing:\n%s", grepLines(log, "upstream error"))
	}
}

// TestShutdownGRPCAnsweredCallSlowReader: a gRPC call that Cells has
// answered completely before the drain's gRPC grace (the proxy holds the
// rest of the answer, the client reads it steadily but slowly) is not one
// the grace should end: Close leaves such a call alone (failLocked keeps a
// complete response), and so does the grace's write deadline (found by
// review: it reset the call 1 s into the grace).
func TestShutdownGRPCAnsweredCallSlowReader(t *testing.T) {
	t.Parallel()
	tp, tc, _ := drainingGRPC(t)
	// An answer Cells can send whole into the proxy's stream window, with
	// its gRPC framing, while the client reads nothing, and still leave a
	// quarter of the window unread in the proxy besides what the client's
	// 64 KiB window and the handler's 32 KiB copy buffer take: half the
	// window and 64 KiB (320 KiB at 512 KiB).
	held := heldUnread(tp.fwd.grpcUp)
	const msgs = 64
	size := int32((int(tp.fwd.grpcUp.streamWindow)/2 + 64<<10) / msgs)
	stream := streamingCall(t, testCtx(t), tc, msgs, size)
	// Wait until the proxy holds a quarter of its window unread, or until a
	// call seen on the connection has left it (with a small window, Cells
	// sends the answer in less time than a poll), then until Cells'
	// END_STREAM has come (the call is no longer on the connection): Cells
	// is done.
	for deadline, seen := time.Now().Add(20*time.Second), false; ; time.Sleep(time.Millisecond) {
		open := upstreamCount(tp.fwd.grpcUp, func(*grpcStream) int { return 1 })
		if unreadUpstream(tp.fwd.grpcUp) >= held || seen && open == 0 {
			break
		}
		seen = seen || open > 0
		if time.Now().After(deadline) {
			t.Fatalf("the proxy never held %d bytes unread (%d)", held, unreadUpstream(tp.fwd.grpcUp))
		}
	}
	waitFor(t, 20*time.Second, func() bool { return upstreamCount(tp.fwd.grpcUp, func(*grpcStream) int { return 1 }) == 0 }, func() string {
		return "Cells never ended the call"
	})
	stopped := shutdownAsync(tp)
	select {
	case <-tp.fwd.grpcCut.Done():
	case <-time.After(20 * time.Second):
		t.Fatal("the gRPC grace never passed")
	}
	// The client reads on, steadily: about 2.5 s for the whole answer.
	got := 0
	for {
		_, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Errorf("after %d of %d messages (answer complete at Cells before the drain): %v (%v)", got, msgs, err, status.Code(err))
			break
		}
		got++
		time.Sleep(40 * time.Millisecond)
	}
	if got != msgs {
		t.Errorf("client got %d messages, want %d", got, msgs)
	}
	if err := <-stopped; err != nil {
		t.Errorf("Run = %v", err)
	}
}

// TestShutdownDeadlineAccessLog: the exchanges that the drain deadline
// cuts are the ones an operator looks for in the access log after a
// restart (which upload did it break?). Each has its line, written before
// Run returns and before "stopped": downloads whose client reads nothing
// (HTTP/1.1 on the front, HTTP/2 with no window left) and uploads whose
// client stalled mid-body (HTTP/1.1 through net/http's server, HTTP/2).
// Before, Run returned as soon as srv.Close had closed their connections,
// and the process could exit before their handlers logged.
func TestShutdownDeadlineAccessLog(t *testing.T) {
	t.Parallel()
	arrived := make(chan string, 128)
	up := newUpstream(t, upTLS, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		arrived <- r.URL.Path
		if strings.HasSuffix(r.URL.Path, "-up") {
			io.Copy(io.Discard, r.Body)
			return
		}
		buf := make([]byte, 32<<10)
		for {
			if _, err := w.Write(buf); err != nil {
				return
			}
		}
	}))
	tp, sink := startDrainLogged(t, up)

	// n of each: HTTP/1.1 downloads never read and uploads stalled after
	// 64 KiB of 1 MiB; on HTTP/2 connections, downloads that get no window
	// beyond the first 64 KiB and uploads stalled after 16 KiB.
	const n = 25
	var paths []string
	for k := range n {
		down := tp.dialTLS(t, tp.Addr().String(), "http/1.1")
		fmt.Fprintf(down, "GET /h1-%d-down HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", k)
		upc := tp.dialTLS(t, tp.Addr().String(), "http/1.1")
		fmt.Fprintf(upc, "PUT /h1-%d-up HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1048576\r\n\r\n", k)
		upc.Write(make([]byte, 64<<10))
		h2c := tp.dialTLSH2(t, tp.Addr().String())
		fr := http2.NewFramer(h2c, h2c)
		io.WriteString(h2c, http2.ClientPreface)
		fr.WriteSettings()
		for i, method := range []string{"GET", "PUT"} {
			id := uint32(2*i + 1)
			path := fmt.Sprintf("/h2-%d-%s", k, map[string]string{"GET": "down", "PUT": "up"}[method])
			block := hpackBlock(":method", method, ":scheme", "https", ":path", path, ":authority", tp.Addr().String())
			if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: block, EndStream: method == "GET", EndHeaders: true}); err != nil {
				t.Fatal(err)
			}
			if method == "PUT" {
				fr.WriteData(id, false, make([]byte, 16<<10))
			}
		}
		paths = append(paths, fmt.Sprintf("/h1-%d-down", k), fmt.Sprintf("/h1-%d-up", k), fmt.Sprintf("/h2-%d-down", k), fmt.Sprintf("/h2-%d-up", k))
	}
	for i := range paths {
		select {
		case <-arrived:
		case <-time.After(30 * time.Second):
			t.Fatalf("only %d of %d requests reached Cells", i, len(paths))
		}
	}

	shutdownLogs(t, tp, sink, paths)
}

// startDrainLogged starts a proxy for up with the access log in sink and a
// 300 ms drain.
func startDrainLogged(t *testing.T, up *testUpstream) (*testProxy, *logSink) {
	sink := newLogSink()
	cfg := testConfig(up)
	cfg.AccessLog = true
	cfg.ShutdownTimeout = 300 * time.Millisecond
	return startLoggedProxy(t, cfg, sink, "json"), sink
}

// shutdownLogs stops tp as SIGTERM does and wants, once Run has returned,
// the access line of each of paths before "stopped": what is not logged
// then may never be.
func shutdownLogs(t *testing.T, tp *testProxy, sink *logSink, paths []string) {
	t.Helper()
	if err := tp.Shutdown(); err != nil {
		t.Errorf("Run = %v, want nil", err)
	}
	logged := sink.String()
	lines := strings.Split(logged, "\n")
	stopped := slices.IndexFunc(lines, func(l string) bool { return parseLogLine(t, l)["msg"] == "stopped" })
	if stopped < 0 {
		t.Fatalf("no \"stopped\" line; log:\n%s", logged)
	}
	for _, p := range paths {
		if i := slices.IndexFunc(lines, isAccess(t, p)); i < 0 || i > stopped {
			t.Errorf("%s: access line at %d, want one before \"stopped\" (%d)", p, i, stopped)
		}
	}
	if t.Failed() {
		t.Logf("log:\n%s", logged)
	}
}

// TestShutdownDeadlineAccessLogSocketFull: as TestShutdownDeadlineAccessLog,
// on one HTTP/2 connection whose client reads nothing at all: one download
// with every window open has filled the socket (writeBehind's writer waits
// on it), the other has no window left (its handler waits on the server's
// serve loop). The drain deadline closes the connection; both handlers must
// end, and log, before "stopped". writeBehind's Close left such a
// connection open for writeBehindLinger, reads included, so the serve loop
// and the second handler outlived the 2 s that shutdown waits.
func TestShutdownDeadlineAccessLogSocketFull(t *testing.T) {
	t.Parallel()
	arrived := make(chan string, 2)
	var sent atomic.Int64
	up := newUpstream(t, upTLS, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		arrived <- r.URL.Path
		buf := make([]byte, 32<<10)
		for {
			n, err := w.Write(buf)
			sent.Add(int64(n))
			if err != nil {
				return
			}
		}
	}))
	tp, sink := startDrainLogged(t, up)

	conn := tp.dialTLSH2(t, tp.Addr().String())
	fr := http2.NewFramer(conn, conn)
	io.WriteString(conn, http2.ClientPreface)
	fr.WriteSettings()
	fr.WriteWindowUpdate(0, 1<<31-1-65535)
	for _, id := range []uint32{1, 3} {
		block := hpackBlock(":method", "GET", ":scheme", "https", ":path", fmt.Sprintf("/full-%d", id), ":authority", tp.Addr().String())
		if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: block, EndStream: true, EndHeaders: true}); err != nil {
			t.Fatal(err)
		}
	}
	fr.WriteWindowUpdate(1, 1<<31-1-65535) // stream 3 keeps the initial 64 KiB
	for range 2 {
		select {
		case <-arrived:
		case <-time.After(30 * time.Second):
			t.Fatal("the downloads did not reach Cells")
		}
	}
	// Cells has sent nothing more for 300 ms: the sockets are full.
	for last, still, deadline := int64(-1), 0, time.Now().Add(30*time.Second); still < 6; time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("Cells still sending after 30 s to a client that reads nothing")
		}
		if n := sent.Load(); n != last {
			last, still = n, 0
		} else {
			still++
		}
	}

	shutdownLogs(t, tp, sink, []string{"/full-1", "/full-3"})
}

// TestShutdownConnectionsNotYetServed: connections whose TLS handshake or
// first bytes have not arrived belong to no server yet, and nothing in
// them is to drain. They are closed when the stop begins. On the public
// port cmux waited for each, up to the handshake limit (10 s; an hour
// here), before Run could return: a port scanner's connection, or a
// client's idle preconnect, held every stop that long. On the gRPC and
// redirect ports net/http's Shutdown counts such a connection as idle only
// once it is 5 s old: the drain, given 3 s here, ran out of time for them.
// A keep-alive connection that has had its answer is closed by the drain
// as always.
func TestShutdownConnectionsNotYetServed(t *testing.T) {
	up := newUpstream(t, upPlain, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	cfg := testConfig(up)
	cfg.GRPCAddr = "127.0.0.1:0"
	// Shorter than the 5 s after which net/http counts a silent
	// connection as idle: the drain must not need them to be that old.
	cfg.ShutdownTimeout = 3 * time.Second
	logBuf := &syncBuffer{}
	s, err := New(cfg, slog.New(slog.NewTextHandler(logBuf, nil)))
	if err != nil {
		t.Fatal(err)
	}
	s.handshake = time.Hour
	if err := s.Listen(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	stopped := make(chan error, 1)
	go func() { stopped <- s.Run(ctx) }()

	roots := x509.NewCertPool()
	roots.AddCert(s.cert.Load().Leaf)
	dial := func(addr string) net.Conn {
		t.Helper()
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	handshake := func(addr, alpn string) net.Conn {
		t.Helper()
		c, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: roots, ServerName: "localhost", NextProtos: []string{alpn}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	// On each port a connection that sends nothing, then one that the
	// proxy has answered something (a handshake, a response): each port
	// accepts in order, so once the second is answered both are in the
	// proxy's hands.
	open := map[string]net.Conn{}
	open["silent connection"] = dial(s.Addr().String())
	open["connection after its handshake"] = handshake(s.Addr().String(), "http/1.1")
	open["silent connection to the gRPC port"] = dial(s.GRPCAddr().String())
	open["gRPC port connection after its handshake"] = handshake(s.GRPCAddr().String(), "h2")
	open["silent connection to the redirect port"] = dial(s.RedirectAddr().String())
	answered := dial(s.RedirectAddr().String())
	if res := rawResponse(t, answered, "HEAD / HTTP/1.1\r\nHost: cells.example.com\r\n\r\n"); res.StatusCode != http.StatusMovedPermanently {
		t.Fatalf("redirect port: %s, want 301", res.Status)
	}
	open["redirect port connection after its answer"] = answered

	cancel()
	select {
	case err := <-stopped:
		if err != nil {
			t.Errorf("Run: %v", err)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("Run still waits 60 s after the stop began, for connections that sent nothing")
	}
	if strings.Contains(logBuf.String(), "drain deadline passed") {
		t.Errorf("the drain waited for connections that sent nothing until its deadline:\n%s", logBuf)
	}
	for name, c := range open {
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if n, err := c.Read(make([]byte, 1)); n != 0 || err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
			t.Errorf("%s after the stop: read %d, %v; want it closed", name, n, err)
		}
	}
}
