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
			dialer := &net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error {
				rc.Control(func(fd uintptr) {
					syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4<<10)
				})
				return nil
			}}
			raw, err := dialer.Dial("tcp", tp.Addr().String())
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
			if want := hashCopy(&pattern{n: size}); got.N != want.N || got.Sum != want.Sum {
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
