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

	"golang.org/x/net/http2"
)

// TestH2CutConnLetsGo: a client that cuts its HTTP/2 connection while a
// request is open (waiting for Cells, or in the middle of its upload)
// leaves nothing of that connection reachable once the exchange has
// ended: not its socket, and so neither its TLS state, buffers nor HPACK
// table. net/http's HTTP/2 server re-arms its idle timer after such a
// connection's end (servedConn says how) and keeps the connection for its
// IdleTimeout, set to an hour here so that it cannot pass during the
// test; servedConn lets go of the connection at Close. Without it the
// socket was reachable for that hour, about 60 KiB held per cut
// connection. On the public port and on the dedicated gRPC port.
func TestH2CutConnLetsGo(t *testing.T) {
	t.Parallel()
	arrived := make(chan struct{}, 1)
	up := newUpstream(t, upTLS, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		arrived <- struct{}{}
		// Both end when the proxy drops the request: HTTP/1.1 closes
		// the connection, HTTP/2 (gRPC) resets the stream.
		io.Copy(io.Discard, r.Body)
		<-r.Context().Done()
	}))
	cfg := testConfig(up)
	cfg.GRPCAddr = "127.0.0.1:0"
	main, grpcPort := &weakListener{}, &weakListener{}
	tp := startProxy(t, cfg, func(s *Server) {
		s.keepAlive = time.Hour
		main.Listener, s.mainLn = s.mainLn, main
		grpcPort.Listener, s.grpcLn = s.grpcLn, grpcPort
	})
	for _, port := range []struct {
		name string
		ln   *weakListener
		kv   []string
	}{
		{"public", main, pseudo(tp, "POST", "/io/personal-files/a.bin", "content-type", "application/octet-stream")},
		{"gRPC", grpcPort, pseudo(tp, "POST", "/cells.sync.Sync/Watch", "content-type", "application/grpc", "te", "trailers")},
	} {
		for _, body := range []bool{false, true} {
			name := port.name + "/waiting"
			if body {
				name = port.name + "/mid-upload"
			}
			t.Run(name, func(t *testing.T) {
				before := port.ln.accepted()
				cutMidStream(t, port.ln.Addr().String(), tp.TLSConfig("h2"), port.kv, body, arrived)
				waitFor(t, 10*time.Second, func() bool { return tp.fwd.live.Load() == 0 },
					func() string { return "the exchange did not end after the client cut its connection" })
				socket, n := port.ln.last()
				if n != before+1 {
					t.Fatalf("the port accepted %d connections for the test's one", n-before)
				}
				waitFor(t, 10*time.Second, func() bool {
					runtime.GC()
					return socket.Value() == nil
				}, func() string {
					return "the socket of the cut connection is still reachable 10 s after its exchange ended"
				})
			})
		}
	}
}

// cutMidStream opens an HTTP/2 connection to addr, sends the request head
// kv (and, with body, 32 KiB of a body that does not end), waits for Cells
// to have the request, and closes the connection. Nothing of the test's
// keeps the client's side.
func cutMidStream(t *testing.T, addr string, cfg *tls.Config, kv []string, body bool, arrived <-chan struct{}) {
	t.Helper()
	conn, err := tls.Dial("tcp", addr, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	fr := http2.NewFramer(conn, conn)
	if _, err := io.WriteString(conn, http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	if err := fr.WriteSettings(); err != nil {
		t.Fatal(err)
	}
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
