package proxy

import (
	"io"
	"net"
	"os"
	"syscall"
)

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

// readNotifying reads from c's socket into p; when nothing is there to read
// it calls before, once, then waits as c.Read would. Errors are c.Read's.
func readNotifying(c net.Conn, p []byte, before func()) (int, error) {
	sc, ok := c.(syscall.Conn)
	var rc syscall.RawConn
	if ok {
		rc = rawConnOf(sc)
	}
	if rc == nil || len(p) == 0 {
		before()
		return c.Read(p)
	}
	var n int
	var errno error
	called := false
	err := rc.Read(func(fd uintptr) bool {
		for {
			n, errno = syscall.Read(int(fd), p)
			if errno != syscall.EINTR {
				break
			}
		}
		if errno == syscall.EAGAIN {
			if !called {
				called = true
				before()
			}
			return false
		}
		return true
	})
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
