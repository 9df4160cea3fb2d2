package proxy

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"syscall"
)

// Uploads from HTTP/1.1 clients go to Cells in writes of up to 64 KiB, and
// no byte waits for the next.
//
// crypto/tls returns one record (16 KiB at most) per Read and makes one
// write(2) per record it writes, so a plain copy from the client to Cells
// costs a system call per record, and wakes Cells once per record. The
// copy here (uploadConn.ReadFrom, which http.Transport calls for a request
// body of known length) reads what the client has sent into a 64 KiB
// buffer and hands it to Cells' TLS in one Write, whose records leave in
// one write(2) (recordBatch). It never waits for bytes to fill the buffer:
// when the next read from the client would wait, the socket tells the copy
// first (clientSocket.beforeWait), and the copy sends what it holds. That
// is what nginx does with proxy_request_buffering off: read what has
// arrived without waiting, send it. A client that keeps ahead of the proxy
// gets 64 KiB writes; one that the proxy keeps up with gets each record
// sent as it arrives, as before, and so do the last 64 KiB of every body.
//
// Measured alone (a 1 GiB curl -T through the proxy, ten alternating runs,
// medians): 613 -> 666 MB/s, 8% less proxy CPU and 8% less for Cells;
// write(2) to Cells 65,580 -> 33,009 per GiB, with 32 KiB writes (4f15a4e).
// 64 KiB, the most loopback TCP sends as one segment, halved them again:
// 1 GiB curl --http1.1 -T uploads, three alternating sets of three,
// 1.52-1.71 -> 1.36-1.47 proxy CPU-s per GiB, 489-597 -> 516-639 MB/s
// (128 KiB did no better). The bodies of HTTP/2 clients
// reach the handler through a pipe that net/http's HTTP/2 server fills, not
// from the socket; a read of it returns all it holds (up to 64 KiB), and
// goes to Cells in one write(2).

// uploadBuffers hold what an upload's copy has read (uploadCopy) and the
// records TLS makes of it (recordBatch): 128 KiB per upload being written.
var uploadBuffers = newPool(func() *[64 << 10]byte { return new([64 << 10]byte) })

// clientSocket is a connection accepted on the public port, under its TLS
// and cmux. Whoever reads it may set beforeWait: a read that finds nothing
// to read then calls it once before it waits for the client. Whoever
// writes a response through its TLS may hold its writes in batch, so that
// the records of one large write leave in one write(2) (download.go).
type clientSocket struct {
	net.Conn
	beforeWait atomic.Pointer[func()]
	wr         atomic.Pointer[waitReader] // made at the first read with beforeWait
	batch      recordBatch                // over the same connection
}

type socketListener struct{ net.Listener }

func (l socketListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return newClientSocket(c), nil
}

func newClientSocket(c net.Conn) *clientSocket {
	s := &clientSocket{Conn: c}
	s.batch.Conn = c
	return s
}

func (c *clientSocket) Read(p []byte) (int, error) {
	if f := c.beforeWait.Load(); f != nil {
		return c.readNotifying(p, *f)
	}
	return c.Conn.Read(p)
}

func (c *clientSocket) Write(p []byte) (int, error) { return c.batch.Write(p) }

// readNotifying reads into p; when nothing is there to read it calls
// before, once, then waits for the client.
func (c *clientSocket) readNotifying(p []byte, before func()) (int, error) {
	w := c.wr.Load()
	if w == nil {
		w = newWaitReader(c.Conn)
		if !c.wr.CompareAndSwap(nil, w) {
			w = c.wr.Load()
		}
	}
	return w.readNotifying(c.Conn, p, before)
}

// SyscallConn is the socket's, for websocket pumps to park on.
func (c *clientSocket) SyscallConn() (syscall.RawConn, error) {
	sc, ok := c.Conn.(syscall.Conn)
	if !ok {
		return nil, errors.ErrUnsupported
	}
	return sc.SyscallConn()
}

// socketOf finds the clientSocket under the connection a request came on:
// net/http's HTTP/1 server reads a replayConn (from the HTTP/1.1 front),
// over cmux's connection, over TLS.
func socketOf(r *http.Request) *clientSocket {
	g, ok := r.Context().Value(connGuardKey{}).(*connGuard)
	if !ok {
		return nil
	}
	for c := g.conn; c != nil; c = wrapped(c) {
		if s, ok := c.(*clientSocket); ok {
			return s
		}
	}
	return nil
}

// sourceBody is the body of a request to Cells that an HTTP/1.1 client
// sends on sock: uploadConn.ReadFrom recognises it under http.Transport's
// io.LimitReader.
type sourceBody struct {
	io.ReadCloser
	sock *clientSocket
}

// uploadConn is a connection to Cells made for http.Transport.
type uploadConn struct {
	net.Conn              // *tls.Conn over batch, or the TCP connection
	batch    *recordBatch // nil without TLS
}

// uploadReserve is the room left in a 64 KiB batch for the TLS overhead of
// the four records a 64 KiB write makes (RFC 8446 allows 256 bytes each).
const uploadReserve = 4 * 256

// ReadFrom is http.Transport's copy of a request body to Cells.
func (c *uploadConn) ReadFrom(r io.Reader) (int64, error) {
	if lr, ok := r.(*io.LimitedReader); ok {
		if src, ok := lr.R.(*sourceBody); ok {
			return c.readFromClient(lr, src.sock)
		}
	}
	// Any other body (an HTTP/2 client's, read from net/http's pipe,
	// which returns all it holds): each read's bytes in one write(2).
	arr := uploadBuffers.Get()
	defer uploadBuffers.Put(arr)
	buf := arr[:len(arr)-uploadReserve]
	var sent int64
	for {
		n, err := r.Read(buf)
		if n > 0 {
			m, werr := c.write(buf[:n])
			sent += int64(m)
			if werr != nil {
				return sent, werr
			}
		}
		if err == io.EOF {
			return sent, nil
		}
		if err != nil {
			return sent, err
		}
	}
}

// readFromClient copies lr, a body read from sock, to Cells.
func (c *uploadConn) readFromClient(lr *io.LimitedReader, sock *clientSocket) (int64, error) {
	arr := uploadBuffers.Get()
	defer uploadBuffers.Put(arr)
	u := &uploadCopy{conn: c, buf: arr[:len(arr)-uploadReserve]}
	u.send = func() {
		u.mu.Lock()
		u.sendLocked()
		u.mu.Unlock()
	}
	for {
		u.mu.Lock()
		if u.end == len(u.buf) {
			u.sendLocked()
			u.start, u.end = 0, 0
		}
		if u.err == nil && lr.N <= int64(len(u.buf)-u.end) {
			// This read may reach the body's end, after which net/http
			// reads the connection on a goroutine of its own: it goes
			// without beforeWait, so nothing may wait for it.
			u.sendLocked()
		}
		end, sent, err := u.end, u.sent, u.err
		u.mu.Unlock()
		if err != nil {
			return sent, err
		}
		var n int
		if lr.N > int64(len(u.buf)-end) {
			sock.beforeWait.Store(&u.send)
			n, err = lr.Read(u.buf[end:])
			sock.beforeWait.Store(nil)
		} else {
			n, err = lr.Read(u.buf[end:])
		}
		if err != nil {
			u.mu.Lock()
			u.end += n
			u.sendLocked()
			if u.err != nil || err == io.EOF {
				err = u.err
			}
			sent := u.sent
			u.mu.Unlock()
			return sent, err
		}
		u.mu.Lock()
		u.end += n
		u.mu.Unlock()
	}
}

// uploadCopy is what readFromClient has read: buf[start:end] is not yet
// sent. send may run on another goroutine than the copy's: when Cells
// answers before the body's end, net/http's server reads the connection
// as soon as the copy's read returns, and may find beforeWait still set.
type uploadCopy struct {
	conn *uploadConn
	send func()

	mu         sync.Mutex
	buf        []byte
	start, end int
	sent       int64
	err        error // the first write that failed
}

func (u *uploadCopy) sendLocked() {
	if u.start == u.end || u.err != nil {
		return
	}
	n, err := u.conn.write(u.buf[u.start:u.end])
	u.sent += int64(n)
	u.start, u.err = u.end, err
}

// write writes p to Cells, its TLS records in one write(2).
func (c *uploadConn) write(p []byte) (int, error) {
	if c.batch == nil {
		return c.Conn.Write(p)
	}
	c.batch.hold()
	n, err := c.Conn.Write(p)
	if ferr := c.batch.release(); err == nil {
		err = ferr
	}
	return n, err
}

// recordBatch is the TCP connection under an uploadConn's TLS, and the
// writes to a client's (clientSocket.batch). Between hold and release,
// what TLS writes is gathered in a 64 KiB buffer and written at release
// (or when the next record would not fit). One goroutine at a time holds.
//
// Everything the TLS above writes goes through it, and crypto/tls writes
// under a lock of its own (Conn.out): a write that found the batch not
// held ends before a holder's records are gathered, and one that finds it
// held (a close_notify from another goroutine, the answer to a KeyUpdate)
// is gathered behind them, under mu, so the bytes keep their order. One
// made while the holder's system call runs (which may wait on a peer that
// reads nothing) is written right after it, by the holder, and returns at
// once: so tls.Conn.Close, whose close_notify would otherwise wait for
// that call, closes the socket and ends it, as it does when it finds a
// Write of its own in progress.
type recordBatch struct {
	net.Conn

	// held is set from hold to release, and for good once a write failed:
	// writes that find it clear go straight to the connection, without mu.
	held     atomic.Bool
	mu       sync.Mutex
	buf      *[64 << 10]byte
	used     int
	flushing bool   // the holder writes, without mu
	late     []byte // written by others meanwhile, for the holder to write next
	// err is the write that failed: crypto/tls took the records it held
	// for written, so no later record may follow them (the peer would
	// read a gap as a bad record MAC); every write returns it.
	err error
}

func (b *recordBatch) hold() {
	b.mu.Lock()
	b.buf = uploadBuffers.Get()
	b.used = 0
	b.held.Store(true)
	b.mu.Unlock()
}

func (b *recordBatch) Write(p []byte) (int, error) {
	if !b.held.Load() {
		return b.Conn.Write(p)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	switch {
	case b.err != nil:
		return 0, b.err
	case b.flushing:
		b.late = append(b.late, p...)
		return len(p), nil
	case b.buf == nil: // released meanwhile
		return b.Conn.Write(p)
	}
	if b.used+len(p) > len(b.buf) {
		if err := b.flushLocked(); err != nil {
			return 0, err
		}
		if len(p) > len(b.buf) {
			if err := b.writeLocked(p); err != nil {
				return 0, err
			}
			return len(p), nil
		}
	}
	b.used += copy(b.buf[b.used:], p)
	return len(p), nil
}

func (b *recordBatch) flushLocked() error {
	if b.used > 0 {
		b.writeLocked(b.buf[:b.used])
		b.used = 0
	}
	return b.err
}

// writeLocked writes p, then what others wrote meanwhile; mu is let go
// during each system call.
func (b *recordBatch) writeLocked(p []byte) error {
	for len(p) > 0 && b.err == nil {
		b.flushing = true
		b.mu.Unlock()
		_, err := b.Conn.Write(p)
		b.mu.Lock()
		b.flushing = false
		b.err = err
		p, b.late = b.late, nil
	}
	return b.err
}

// release writes what is held and returns the error of any write made
// since hold.
func (b *recordBatch) release() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	err := b.flushLocked()
	uploadBuffers.Put(b.buf)
	b.buf = nil
	if err == nil {
		b.held.Store(false)
	}
	return err
}

// dialUpload is http.Transport's dial: DialTLSContext for an https://
// upstream, DialContext for an http:// one.
func (u *h1Upstream) dialUpload(ctx context.Context, network, addr string) (net.Conn, error) {
	for conf := u.tls; ; {
		raw, err := u.dialer.DialContext(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		if conf == nil {
			return &uploadConn{Conn: raw}, nil
		}
		b := &recordBatch{Conn: raw}
		tc, err := u.handshake(ctx, b, conf)
		if err == nil {
			return &uploadConn{Conn: tc, batch: b}, nil
		}
		raw.Close()
		// A resumed session refused: once more, with a full
		// handshake (resumeRefused).
		if conf = fullHandshakeAfter(err); conf == nil {
			return nil, err
		}
	}
}

// streamEnd is an HTTP/2 request body of declared length. An HTTP/2
// request is complete only at END_STREAM (RFC 9113 §8.1): its last bytes
// are handed on with the stream's clean end, so that Cells never takes a
// complete body from a stream that then carries more than declared
// (malformed, §8.1.1) or is reset.
type streamEnd struct {
	io.ReadCloser
	left int64
}

var errBodyTooLong = errors.New("cells-proxy: request body longer than its content-length")

func (b *streamEnd) Read(p []byte) (int, error) {
	if b.left <= 0 {
		return b.ReadCloser.Read(p)
	}
	if int64(len(p)) > b.left {
		p = p[:b.left]
	}
	n, err := b.ReadCloser.Read(p)
	b.left -= int64(n)
	if b.left > 0 || err != nil {
		return n, err
	}
	var one [1]byte
	m, err := b.ReadCloser.Read(one[:])
	if m > 0 || err == nil {
		err = errBodyTooLong
	}
	if err != io.EOF {
		return 0, err
	}
	return n, io.EOF
}

// streamEnded waits for the end of an HTTP/2 request body declared empty
// (content-length: 0) whose HEADERS did not end the stream: nil at a clean
// END_STREAM, an error for DATA or a reset. Clients end such a stream at
// once, with an empty DATA frame.
func streamEnded(body io.Reader) error {
	var one [1]byte
	for {
		n, err := body.Read(one[:])
		switch {
		case n > 0:
			return errBodyTooLong
		case err == io.EOF:
			return nil
		case err != nil:
			return err
		}
	}
}
