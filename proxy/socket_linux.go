package proxy

import (
	"io"
	"net"
	"os"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// ackedBytes returns a function that tells how many bytes the peer of c's
// TCP socket has acknowledged so far (TCP_INFO's bytes_acked): it grows
// whenever the peer takes bytes, also in the middle of a write that waits.
// nil if c has no TCP socket under it.
func ackedBytes(c net.Conn) func() (uint64, bool) {
	tcp := tcpConn(c)
	if tcp == nil {
		return nil
	}
	rc := rawConnOf(tcp)
	if rc == nil {
		return nil
	}
	return func() (n uint64, ok bool) {
		rc.Control(func(fd uintptr) {
			if info, err := unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO); err == nil {
				n, ok = info.Bytes_acked, true
			}
		})
		return n, ok
	}
}

// peekReadable peeks at a socket without waiting and reports whether a read
// would not block: a byte, the end of the stream, an error. upConn.quiet
// uses it on an idle connection to Cells.
func peekReadable(fd uintptr) bool {
	var b [1]byte
	_, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
	return err != syscall.EAGAIN
}

func rawConnOf(c syscall.Conn) syscall.RawConn {
	rc, err := c.SyscallConn()
	if err != nil {
		return nil
	}
	return rc
}

// waitReader reads a socket for clientSocket.Read while beforeWait is set,
// and for cellsSocket.Read while a response body's bytes are gathered
// (download.go). Made at the first such read and kept with the socket, so
// that a read allocates nothing.
type waitReader struct {
	rc   syscall.RawConn // nil: no socket found, reads go to the connection
	read func(fd uintptr) bool

	mu     sync.Mutex // one read at a time uses the fields below
	p      []byte
	before func()
	n      int
	errno  error
}

func newWaitReader(c net.Conn) *waitReader {
	w := &waitReader{}
	if sc, ok := c.(syscall.Conn); ok {
		w.rc = rawConnOf(sc)
	}
	w.read = func(fd uintptr) bool {
		for {
			w.n, w.errno = syscall.Read(int(fd), w.p)
			if w.errno != syscall.EINTR {
				break
			}
		}
		if w.errno == syscall.EAGAIN {
			if f := w.before; f != nil {
				w.before = nil
				f()
			}
			return false // wait until the socket is readable
		}
		return true
	}
	return w
}

// readNotifying reads from c, w's socket, into p; when nothing is there to
// read it calls before, once, then waits as c.Read would. Errors are
// c.Read's.
func (w *waitReader) readNotifying(c net.Conn, p []byte, before func()) (int, error) {
	if w.rc == nil || len(p) == 0 {
		before()
		return c.Read(p)
	}
	w.mu.Lock()
	w.p, w.before = p, before
	err := w.rc.Read(w.read)
	n, errno := w.n, w.errno
	w.p, w.before = nil, nil
	w.mu.Unlock()
	switch {
	case err != nil: // closed, or the read deadline passed
		return 0, err
	case errno != nil:
		return 0, &net.OpError{Op: "read", Net: "tcp", Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: os.NewSyscallError("read", errno)}
	case n == 0:
		return 0, io.EOF
	}
	return n, nil
}
