package proxy

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync"
	"testing"
	"time"
)

// Helpers of the fuzz targets that send bytes through the proxy and check
// them at the other end: FuzzWebSocketTunnel, FuzzUpload, FuzzDownload and
// FuzzGRPCStream.

// cutPieces cuts body into the pieces that cuts gives: a cut's low six
// bits are the piece's size (in bytes with bit 6 set, else in KiB, plus
// one), and bit 7 asks for a pause before the next piece. The 256th piece
// takes all that is left.
func cutPieces(body, cuts []byte) (pieces [][]byte, pauses []bool) {
	for k := 0; len(body) > 0; k++ {
		c := byte(0x48)
		if len(cuts) > 0 {
			c = cuts[k%len(cuts)]
		}
		size := 1 + int(c&0x3f)
		if c&0x40 == 0 {
			size = 1 + int(c&0x3f)<<10
		}
		if k == 255 {
			size = len(body)
		}
		size = min(size, len(body))
		pieces = append(pieces, body[:size])
		pauses = append(pauses, c&0x80 != 0)
		body = body[size:]
	}
	return pieces, pauses
}

// collected is what a reader (an end of a websocket, a download, a gRPC
// call's answer) has read, until its read fails.
type collected struct {
	mu   sync.Mutex
	got  []byte
	err  error
	more chan struct{} // closed, and replaced, at each read
	done chan struct{}
}

func collect(r io.Reader) *collected {
	e := &collected{more: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(e.done)
		buf := make([]byte, 32<<10)
		for {
			n, err := r.Read(buf)
			e.mu.Lock()
			e.got = append(e.got, buf[:n]...)
			if err != nil {
				e.err = err
			}
			close(e.more)
			e.more = make(chan struct{})
			e.mu.Unlock()
			if err != nil {
				return
			}
		}
	}()
	return e
}

func (e *collected) count() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return len(e.got)
}

// wait waits until e has read n bytes, and reports whether it has: false
// when its read ended first, quit was closed, or 10 s passed.
func (e *collected) wait(n int, quit <-chan struct{}) bool {
	timeout := time.NewTimer(10 * time.Second)
	defer timeout.Stop()
	for {
		e.mu.Lock()
		got, more := len(e.got), e.more
		e.mu.Unlock()
		if got >= n {
			return true
		}
		select {
		case <-more:
		case <-e.done:
			return e.count() >= n
		case <-quit:
			return false
		case <-timeout.C:
			return false
		}
	}
}

func (e *collected) bytes() []byte {
	e.mu.Lock()
	defer e.mu.Unlock()
	return bytes.Clone(e.got)
}

// writePieces writes data in the pieces cutPieces makes of it, each with
// write (which may frame it: a chunk, a write of its own, over TLS a record
// of its own). After a piece that asks for a pause, it waits until the
// other end, whose reads come on peer once it reads at all, has read
// arrived(sent) bytes, sent being how much of data has been written: the
// proxy has then copied all it had and waits for more, and the next piece
// must wake it. A wait over 10 s is an error: bytes the proxy held back.
// It returns, with no error, once quit is closed or arrived reports stop
// (the proxy passes nothing on after that point).
func writePieces(data, cuts []byte, write func(p []byte) error, arrived func(sent int) (n int, stop bool), peer <-chan *collected, quit <-chan struct{}) error {
	pieces, pauses := cutPieces(data, cuts)
	var other *collected
	sent := 0
	for i, p := range pieces {
		if err := write(p); err != nil {
			return err
		}
		sent += len(p)
		want, stop := arrived(sent)
		if stop {
			return nil
		}
		if !pauses[i] {
			continue
		}
		if other == nil {
			select {
			case other = <-peer:
			case <-quit:
				return nil
			case <-time.After(10 * time.Second):
				return fmt.Errorf("after a pause, the other end has not read anything for 10 s (no response header?), with %d bytes sent", sent)
			}
		}
		if !other.wait(want, quit) {
			select {
			case <-quit:
				return nil
			default:
			}
			return fmt.Errorf("after a pause, the other end has read %d of the %d bytes that should have arrived of the %d sent (%v)", other.count(), want, sent, other.err)
		}
	}
	return nil
}

// allArrive is writePieces' arrived for a stream the proxy passes on whole.
func allArrive(sent int) (int, bool) { return sent, false }

// scriptedSide is a proxy in front of a Cells that takes a script of type S
// for each request it serves, from scripts.
type scriptedSide[S any] struct {
	tp      *testProxy
	scripts chan S
}

// scriptedSides are two: one in front of a cleartext Cells, one in front
// of a TLS Cells.
type scriptedSides[S any] [2]scriptedSide[S]

// startScriptedSides starts the two Cells with start, and a proxy in front
// of each.
func startScriptedSides[S any](f *testing.F, start func(t testing.TB, withTLS bool, scripts <-chan S) *connUpstream) scriptedSides[S] {
	var sides scriptedSides[S]
	for i, withTLS := range []bool{false, true} {
		scripts := make(chan S, 1)
		sides[i] = scriptedSide[S]{start(f, withTLS, scripts).proxy(f), scripts}
	}
	return sides
}

func (s *scriptedSides[S]) pick(withTLS bool) scriptedSide[S] {
	if withTLS {
		return s[1]
	}
	return s[0]
}

// scriptedConnCells is a Cells that reads each request on a connection and
// its body, then serves it with the next script from scripts (none within
// 10 s: it closes the connection); serve reports whether the connection
// carries another request.
func scriptedConnCells[S any](t testing.TB, withTLS bool, scripts <-chan S, serve func(c net.Conn, br *bufio.Reader, r *http.Request, s S) (more bool)) *connUpstream {
	return newConnUpstream(t, withTLS, func(_ int64, c net.Conn, br *bufio.Reader) {
		c.SetDeadline(time.Now().Add(time.Minute)) // a guard: the test fails on its own bound first
		for {
			r, err := http.ReadRequest(br)
			if err != nil {
				return
			}
			io.Copy(io.Discard, r.Body)
			var s S
			select {
			case s = <-scripts:
			case <-time.After(10 * time.Second):
				return
			}
			if !serve(c, br, r, s) {
				return
			}
		}
	})
}
