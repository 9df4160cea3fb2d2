//go:build linux

package proxy

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"strconv"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
)

// countingListener counts the writes made on the connections it accepts;
// conns gets each one.
type countingListener struct {
	net.Listener
	conns chan *countingConn
}

func (l countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	// A small send buffer: the proxy's writes wait for the client as soon
	// as it stops reading (see TestDownloadBatched).
	c.(*net.TCPConn).SetWriteBuffer(4 << 10)
	cc := &countingConn{Conn: c}
	select {
	case l.conns <- cc:
	default:
	}
	return cc, nil
}

type connKey struct{}

// TestDownloadBatched relays a 1 MiB body from Cells to an HTTP/1.1 client
// and counts the writes made on the client's connection: every byte
// arrives, in few writes: 18 and 21 (chunked: the head flushed first, the
// last chunk at the end), handshake included, where relaying each read of
// Cells as it came made 136. So that the count does not
// depend on how the proxy keeps pace with Cells (a read of Cells' socket
// that would wait sends what is held, see TestDownloadChunkNotHeld), the
// client reads nothing until Cells' whole body sits in the proxy's socket:
// the proxy's writes to the client then wait, and once the client reads,
// every read of Cells finds bytes there.
func TestDownloadBatched(t *testing.T) {
	const size = 1 << 20
	for _, chunked := range []bool{false, true} {
		t.Run(map[bool]string{false: "content-length", true: "chunked"}[chunked], func(t *testing.T) {
			sent := make(chan error, 1)
			up := newUpstreamWith(t, upTLS, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if !chunked {
					w.Header().Set("Content-Length", strconv.Itoa(size))
				}
				w.Header().Set("Content-Type", "application/octet-stream")
				io.Copy(w, &pattern{n: size})
				http.NewResponseController(w).Flush()
				// Wait until the proxy's kernel has taken it all.
				tcp := r.Context().Value(connKey{}).(*tls.Conn).NetConn()
				for deadline := time.Now().Add(20 * time.Second); unsent(t, tcp) > 0; time.Sleep(time.Millisecond) {
					if time.Now().After(deadline) {
						sent <- errors.New("the proxy did not take Cells' whole body")
						return
					}
				}
				sent <- nil
			}), func(s *http.Server) {
				s.ConnContext = func(ctx context.Context, c net.Conn) context.Context {
					return context.WithValue(ctx, connKey{}, c)
				}
			})
			settle(t, up)
			conns := make(chan *countingConn, 1)
			tp := startProxy(t, testConfig(up), func(s *Server) {
				s.mainLn = countingListener{Listener: s.mainLn, conns: conns}
				// Room in the proxy's socket for Cells' whole body.
				s.fwd.httpUp.dialer.Control = func(_, _ string, rc syscall.RawConn) error {
					rc.Control(func(fd uintptr) {
						syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4<<20)
					})
					return nil
				}
			})
			// A small receive buffer: the client's TCP takes little
			// while it reads nothing.
			raw, err := smallReceiveDialer().Dial("tcp", tp.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			conn := tls.Client(raw, tp.TLSConfig("http/1.1"))
			defer conn.Close()
			conn.SetDeadline(time.Now().Add(60 * time.Second))
			if _, err := io.WriteString(conn, "GET /file HTTP/1.1\r\nHost: cells.example\r\n\r\n"); err != nil {
				t.Fatal(err)
			}
			select {
			case err := <-sent:
				if err != nil {
					t.Fatal(err)
				}
			case <-time.After(30 * time.Second):
				t.Fatal("Cells could not send the whole body")
			}
			counted := <-conns
			res, err := http.ReadResponse(bufio.NewReader(conn), nil)
			if err != nil {
				t.Fatal(err)
			}
			got := hashCopy(res.Body)
			res.Body.Close()
			if want, ok := matchesPattern(got, size); !ok {
				t.Fatalf("client received %v, want %v", got, want)
			}
			// The handshake's writes included. The first of the body's
			// may be smaller: Cells sends while the proxy reads.
			writes := counted.writes.Load()
			if max := int64(136 / 4); writes > max {
				t.Errorf("%d writes to the client for %d KiB, want at most %d (17 at 63 KiB each, and a few)", writes, size>>10, max)
			}
			t.Logf("%d writes to the client for %d KiB", writes, size>>10)
		})
	}
}

// TestH2DownloadBatched streams 1 MiB of gRPC messages from Cells to a
// client on each port and counts the writes made on the client's
// connection. The HTTP/2 server's writes pass through writeBehind, which
// sends what is pending in one TLS write; the records of each such write
// must leave in one write(2). A 16 KiB DATA frame and its 9-byte header
// make two records, so a pending batch of two frames makes three write(2)
// unbatched: 88 for the stream, against about 36 batched. The client takes
// its socket's bytes slowly and steadily, so that the proxy's writes wait
// for it and the frames queue behind them. On the dedicated gRPC port
// (Cells Sync's 33060) the connection had no clientSocket under its TLS
// (133 write(2) when writeBehindMax was 32 KiB).
func TestH2DownloadBatched(t *testing.T) {
	t.Parallel()
	conns := map[grpcPort]chan *countingConn{portMain: make(chan *countingConn, 1), portDedicated: make(chan *countingConn, 1)}
	e := startGRPC(t, topoH2C, nil, func(s *Server) {
		s.mainLn = countingListener{Listener: s.mainLn, conns: conns[portMain]}
		s.grpcLn = countingListener{Listener: s.grpcLn, conns: conns[portDedicated]}
	})
	const msgs, size = 256, 4 << 10
	for _, port := range grpcPorts {
		t.Run(string(port), func(t *testing.T) {
			cc := e.dial(t, port,
				grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
					c, err := smallReceiveDialer().DialContext(ctx, "tcp", addr)
					if err != nil {
						return nil, err
					}
					return steadyReader(c), nil
				}),
				// Large windows: the client's socket is what holds the
				// stream back, not flow control.
				grpc.WithInitialWindowSize(32<<20), grpc.WithInitialConnWindowSize(64<<20))
			tc := testgrpc.NewTestServiceClient(cc)
			stream := streamingCall(t, testCtx(t), tc, msgs, size)
			got := 0
			for {
				res, err := stream.Recv()
				if err == io.EOF {
					break
				}
				if err != nil {
					t.Fatalf("Recv after %d KiB: %v", got>>10, err)
				}
				got += len(res.GetPayload().GetBody())
			}
			if got != msgs*size {
				t.Fatalf("received %d bytes, want %d", got, msgs*size)
			}
			counted := <-conns[port]
			// The handshake's and the call's other frames included.
			writes := counted.writes.Load()
			if max := int64(60); writes > max {
				t.Errorf("%d writes to the client for %d KiB, want at most %d (one per pending batch, about 36; 88 unbatched)", writes, got>>10, max)
			}
			t.Logf("%d writes to the client for %d KiB", writes, got>>10)
		})
	}
}

// smallReceiveDialer dials with a 4 KiB receive buffer: the client's TCP
// holds little that the client has not read.
func smallReceiveDialer() *net.Dialer {
	return &net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error {
		rc.Control(func(fd uintptr) {
			syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4<<10)
		})
		return nil
	}}
}

// steadyReader paces a client at 16 KiB every 5 ms, about 3 MB/s: slower
// than the proxy writes on loopback.
func steadyReader(c net.Conn) net.Conn {
	return &pacedConn{Conn: c, chunk: 16 << 10, every: 5 * time.Millisecond}
}

// TestH2DownloadWrites: a 1 MiB download from Cells to an HTTP/2 client
// that reads slowly and steadily reaches it in about one write(2) per
// 63 KiB that relay hands the server (17 for the body, and the handshake's
// and the settings' few), all bytes intact. writeBehind takes the four DATA
// frames of such a write at once (writeBehindMax 65 KiB); at 32 KiB the
// server waited for room in the middle of each, and every frame left in a
// write(2) of its own: 51 for the same download.
func TestH2DownloadWrites(t *testing.T) {
	t.Parallel()
	const size = 1 << 20
	up := newUpstream(t, upTLS, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", strconv.Itoa(size))
		io.Copy(w, &pattern{n: size})
	}))
	conns := make(chan *countingConn, 1)
	tp := startProxy(t, testConfig(up), func(s *Server) {
		s.mainLn = countingListener{Listener: s.mainLn, conns: conns}
	})
	c := tp.client(true)
	c.Transport.(*http.Transport).DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
		conn, err := smallReceiveDialer().DialContext(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		return steadyReader(conn), nil
	}
	defer c.CloseIdleConnections()
	res, err := c.Get(tp.URL + "/file")
	if err != nil {
		t.Fatal(err)
	}
	got := hashCopy(res.Body)
	res.Body.Close()
	if want, ok := matchesPattern(got, size); !ok {
		t.Fatalf("client received %v, want %v", got, want)
	}
	if res.ProtoMajor != 2 {
		t.Fatalf("%s, want HTTP/2", res.Proto)
	}
	writes := (<-conns).writes.Load()
	if max := int64(40); writes > max {
		t.Errorf("%d writes to the client for %d KiB, want at most %d (one per 63 KiB, and a few)", writes, size>>10, max)
	}
	t.Logf("%d writes to the client for %d KiB", writes, size>>10)
}
