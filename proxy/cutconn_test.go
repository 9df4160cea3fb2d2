package proxy

import (
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"runtime"
	"sync"
	"testing"
	"time"
	"weak"

	"github.com/coder/websocket"
	"golang.org/x/net/http2"
)

// TestCutConnLetsGo: a client that cuts its connection while a request
// is open (waiting for Cells, or in the middle of its upload) leaves
// nothing of that connection reachable once the exchange has ended: not
// its socket, and so neither its TLS state, buffers nor HPACK table.
// net/http's HTTP/2 server re-arms its idle timer after such a
// connection's end (servedConn says how) and keeps the connection for its
// IdleTimeout, set to an hour here so that it cannot pass during the
// test; servedConn lets go of the connection at Close. Without it the
// socket was reachable for that hour, about 60 KiB held per cut
// connection. HTTP/2 on the public port and on the dedicated gRPC port;
// HTTP/1.1 too, served by the front and handed over (a body to stream).
func TestCutConnLetsGo(t *testing.T) {
	t.Parallel()
	arrived := make(chan struct{}, 1)
	up := newUpstream(t, upTLS, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Upgrade") != "" {
			c, err := websocket.Accept(w, r, nil)
			if err != nil {
				return
			}
			defer c.CloseNow()
			c.Read(r.Context()) // until the proxy closes the tunnel
			return
		}
		arrived <- struct{}{}
		// Both end when the proxy drops the request: HTTP/1.1 closes
		// the connection, HTTP/2 (gRPC) resets the stream.
		io.Copy(io.Discard, r.Body)
		<-r.Context().Done()
	}))
	cfg := testConfig(up)
	cfg.GRPCAddr = "127.0.0.1:0"
	// The runtime keeps a stopped timer, and what its function holds,
	// until the time it was set for (a "zombie" in the timer heap of its
	// P, removed early only once zombies are a quarter of that heap): the
	// exchange's and the tunnel's idle watchdogs, stopped when the
	// exchange ends, hold it for what was left of PROXY_IDLE_TIMEOUT and
	// PROXY_WS_IDLE_TIMEOUT. Short ones here, so that the test sees what
	// the proxy holds, not the runtime's bounded delay (a busy server's
	// heaps are cleaned all the time).
	cfg.IdleTimeout, cfg.WSIdleTimeout = 2*time.Second, 2*time.Second
	main, grpcPort := &weakListener{}, &weakListener{}
	tp := startProxy(t, cfg, func(s *Server) {
		s.keepAlive = time.Hour
		main.Listener, s.mainLn = s.mainLn, main
		grpcPort.Listener, s.grpcLn = s.grpcLn, grpcPort
	})
	upload := pseudo(tp, "POST", "/io/personal-files/a.bin", "content-type", "application/octet-stream")
	call := pseudo(tp, "POST", "/cells.sync.Sync/Watch", "content-type", "application/grpc", "te", "trailers")
	h1 := func(head string, body int) func(*testing.T) {
		return func(t *testing.T) {
			cutMidRequest(t, main.Addr().String(), tp.TLSConfig("http/1.1"), head+string(make([]byte, body)), arrived)
		}
	}
	h2 := func(addr string, kv []string, body bool) func(*testing.T) {
		return func(t *testing.T) { cutMidStream(t, addr, tp.TLSConfig("h2"), kv, body, arrived) }
	}
	for _, c := range []struct {
		name string
		ln   *weakListener
		cut  func(*testing.T)
	}{
		{"h2/waiting", main, h2(main.Addr().String(), upload, false)},
		{"h2/mid-upload", main, h2(main.Addr().String(), upload, true)},
		{"h2-gRPC-port/waiting", grpcPort, h2(grpcPort.Addr().String(), call, false)},
		{"h2-gRPC-port/mid-upload", grpcPort, h2(grpcPort.Addr().String(), call, true)},
		{"h1/waiting", main, h1("GET /a HTTP/1.1\r\nHost: cells.example\r\n\r\n", 0)},
		{"h1/mid-upload", main, h1("PUT /a HTTP/1.1\r\nHost: cells.example\r\nContent-Length: 1000000\r\n\r\n", 40000)},
		{"websocket/idle", main, func(t *testing.T) { cutIdleWebsocket(t, tp) }},
		{"h1/mid-upload-chunked", main, h1("PUT /a HTTP/1.1\r\nHost: cells.example\r\nTransfer-Encoding: chunked\r\n\r\n9c40\r\n", 40000)},
	} {
		t.Run(c.name, func(t *testing.T) {
			before := c.ln.accepted()
			c.cut(t)
			waitFor(t, 10*time.Second, func() bool { return tp.fwd.live.Load() == 0 && openTunnels(tp.fwd.ws) == 0 },
				func() string { return "the exchange did not end after the client cut its connection" })
			socket, n := c.ln.last()
			if n != before+1 {
				t.Fatalf("the port accepted %d connections for the test's one", n-before)
			}
			waitFor(t, 30*time.Second, func() bool {
				runtime.GC()
				return socket.Value() == nil
			}, func() string {
				return "the socket of the cut connection is still reachable 30 s after its exchange ended"
			})
		})
	}
}

// cutIdleWebsocket opens a websocket to /ws/event through tp, waits until
// both of its pumps wait for data (in the parker, where there is one),
// and closes the client's connection.
func cutIdleWebsocket(t *testing.T, tp *testProxy) {
	t.Helper()
	conn := dialUnkept(t, tp.Addr().String(), tp.TLSConfig("http/1.1"))
	defer conn.Close()
	if res := wsHandshake(t, conn, tp.Addr().String()); res.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("websocket handshake: status %d, want 101", res.StatusCode)
	}
	if _, ok := parkedPumps(tp.fwd.ws); ok {
		waitFor(t, 10*time.Second, func() bool { n, _ := parkedPumps(tp.fwd.ws); return n == 2 },
			func() string { return "the idle websocket's pumps did not park" })
	}
}

// openTunnels is how many websockets ts holds open.
func openTunnels(ts *tunnels) int {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	return len(ts.open)
}

// cutMidRequest sends raw, the start of an HTTP/1.1 request, on a new TLS
// connection to addr, waits for Cells to have the request, and closes the
// connection.
func cutMidRequest(t *testing.T, addr string, cfg *tls.Config, raw string, arrived <-chan struct{}) {
	t.Helper()
	conn := dialUnkept(t, addr, cfg)
	defer conn.Close()
	if _, err := io.WriteString(conn, raw); err != nil {
		t.Fatal(err)
	}
	waitArrived(t, arrived)
}

// cutMidStream opens an HTTP/2 connection to addr, sends the request head
// kv (and, with body, 32 KiB of a body that does not end), waits for Cells
// to have the request, and closes the connection. Nothing of the test's
// keeps the client's side.
func cutMidStream(t *testing.T, addr string, cfg *tls.Config, kv []string, body bool, arrived <-chan struct{}) {
	t.Helper()
	conn := dialUnkept(t, addr, cfg)
	defer conn.Close()
	fr := h2Start(t, conn)
	if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: hpackBlock(kv...), EndStream: !body, EndHeaders: true}); err != nil {
		t.Fatal(err)
	}
	if body {
		for range 2 {
			if err := fr.WriteData(1, false, make([]byte, 16<<10)); err != nil {
				t.Fatal(err)
			}
		}
	}
	waitArrived(t, arrived)
}

func waitArrived(t *testing.T, arrived <-chan struct{}) {
	t.Helper()
	select {
	case <-arrived:
	case <-time.After(10 * time.Second):
		t.Fatal("the request did not reach Cells")
	}
}

// weakListener remembers, without keeping them, the sockets it accepted.
type weakListener struct {
	net.Listener
	mu    sync.Mutex
	conns []weak.Pointer[net.TCPConn]
}

func (l *weakListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if tc, ok := c.(*net.TCPConn); ok {
		l.mu.Lock()
		l.conns = append(l.conns, weak.Make(tc))
		l.mu.Unlock()
	}
	return c, err
}

// accepted is how many sockets l has accepted.
func (l *weakListener) accepted() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.conns)
}

// last is the socket accepted last, and how many were.
func (l *weakListener) last() (weak.Pointer[net.TCPConn], int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.conns) == 0 {
		return weak.Pointer[net.TCPConn]{}, 0
	}
	return l.conns[len(l.conns)-1], len(l.conns)
}

// dialUnkept is a TLS connection to addr with a 10 s deadline, which,
// unlike dialTLS's, nothing of the test's keeps: the caller closes it.
func dialUnkept(t *testing.T, addr string, cfg *tls.Config) *tls.Conn {
	t.Helper()
	conn, err := tls.Dial("tcp", addr, cfg)
	if err != nil {
		t.Fatal(err)
	}
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	return conn
}
