//go:build linux

package proxy

import (
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unsafe"
)

// countingConn counts the writes made on a connection.
type countingConn struct {
	net.Conn
	writes atomic.Int64
}

func (c *countingConn) Write(p []byte) (int, error) {
	c.writes.Add(1)
	return c.Conn.Write(p)
}

// TestUploadBatched copies bodies to Cells through uploadConn.ReadFrom as
// http.Transport calls it. Every byte arrives, in few write(2) calls:
// without the batching each TLS record costs one (crypto/tls starts a
// connection with records of 1.2 KiB and grows them to 16 KiB).
// (TestUploadReachesUpstreamBeforeItEnds checks that no byte waits for the
// next when the client pauses.)
func TestUploadBatched(t *testing.T) {
	const size = 256 << 10
	cert := newCert(t)

	// An HTTP/1.1 client's body, which the client has wholly sent: it
	// waits in the public side's socket (24 writes unbatched).
	t.Run("http1", func(t *testing.T) {
		dialled, accepted := loopbackPair(t)
		if err := accepted.(*net.TCPConn).SetReadBuffer(4 << 20); err != nil {
			t.Fatal(err)
		}
		sock := newClientSocket(accepted)
		public := tls.Server(sock, &tls.Config{Certificates: []tls.Certificate{cert}})
		client := tls.Client(dialled, &tls.Config{InsecureSkipVerify: true})
		sent := make(chan error, 1)
		go func() {
			_, err := io.Copy(client, &pattern{n: size})
			sent <- err
		}()
		if err := public.Handshake(); err != nil {
			t.Fatal(err)
		}
		select {
		case err := <-sent:
			if err != nil {
				t.Fatal(err)
			}
		case <-time.After(20 * time.Second):
			t.Fatal("the client could not send the whole body before the copy began")
		}
		// And the body is in the public side's socket: nothing is left
		// unacknowledged on the client's.
		var n int
		waitFor(t, 20*time.Second, func() bool { n = unsent(t, dialled); return n == 0 }, func() string {
			return fmt.Sprintf("%d bytes still unsent by the client", n)
		})
		body := &sourceBody{ReadCloser: io.NopCloser(public), sock: sock}
		copyToCells(t, cert, &io.LimitedReader{R: body, N: size}, size, 6)
	})

	// Any other body, such as an HTTP/2 client's from net/http's pipe:
	// each read in one write(2) (25 writes unbatched).
	t.Run("other", func(t *testing.T) {
		copyToCells(t, cert, &io.LimitedReader{R: &pattern{n: size}, N: size}, size, 6)
	})
}

// copyToCells copies body (size bytes of pattern) through an uploadConn to
// a TLS server that checks every byte, and fails if that took more than
// maxWrites write(2) calls.
func copyToCells(t *testing.T, cert tls.Certificate, body io.Reader, size int64, maxWrites int64) {
	t.Helper()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert}})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	received := make(chan checksum, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			received <- checksum{Err: err}
			return
		}
		defer c.Close()
		received <- hashCopy(c)
	}()
	raw, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	counted := &countingConn{Conn: raw}
	batch := &recordBatch{Conn: counted}
	toCells := tls.Client(batch, &tls.Config{InsecureSkipVerify: true})
	if err := toCells.Handshake(); err != nil {
		t.Fatal(err)
	}
	handshakeWrites := counted.writes.Load()

	up := &uploadConn{Conn: toCells, batch: batch}
	n, err := up.ReadFrom(body)
	if n != size || err != nil {
		t.Fatalf("ReadFrom = %d, %v; want %d, nil", n, err, size)
	}
	writes := counted.writes.Load() - handshakeWrites
	toCells.Close()
	got := <-received
	if want, ok := matchesPattern(got, size); !ok {
		t.Fatalf("Cells received %v, want %v", got, want)
	}
	if writes > maxWrites {
		t.Errorf("%d write(2) to Cells for %d KiB, want at most %d (5: 64 KiB each)", writes, size>>10, maxWrites)
	}
	t.Logf("%d write(2) to Cells for %d KiB", writes, size>>10)
}

// unsent is what the socket under c has not had acknowledged (SIOCOUTQ).
func unsent(t testing.TB, c net.Conn) int {
	rc, err := c.(syscall.Conn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var n int32
	var errno syscall.Errno
	rc.Control(func(fd uintptr) {
		_, _, errno = syscall.Syscall(syscall.SYS_IOCTL, fd, syscall.TIOCOUTQ, uintptr(unsafe.Pointer(&n)))
	})
	if errno != 0 {
		t.Fatal(errno)
	}
	return int(n)
}
