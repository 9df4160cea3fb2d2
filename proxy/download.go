package proxy

import (
	"crypto/tls"
	"io"
	"net"
	"net/http"
)

// Downloads reach the client in writes of up to 63 KiB, and no byte waits
// for the next.
//
// crypto/tls returns one record (16 KiB at most) per Read and makes one
// write(2) per record it writes, so a plain copy of a response body from
// Cells to the client costs a system call per record, and wakes the client
// once per record. On the direct path (a response from Cells over HTTP/1.1,
// TLS or not), relay reads what Cells has sent into a 64 KiB buffer and
// hands it to the client in one write, whose records leave in one
// write(2) (the client socket's recordBatch; an HTTP/2 client's
// writeBehind holds its writes the same way). It never waits for bytes to
// fill the buffer: when the next read from Cells would wait, the socket
// tells relay first (cellsSocket.gather), and relay sends what it holds,
// as the upload's copy does (upload.go). A Cells that keeps ahead of the
// client gets 63 KiB writes; server-sent events, a zip Cells builds on the
// fly and a slow Cells get each chunk sent as it comes, as before
// (ReverseProxy's FlushInterval -1).
//
// Measured (a 1 GiB curl download through the proxy, see the commit that
// brought this): write(2) to the client 65,551 -> about 16,600 per GiB
// over HTTP/1.1.

// gather is what relay has read of a response body from Cells:
// buf[start:end] is not yet sent. send runs on relay's goroutine, from its
// loop or from within its read of Cells' socket.
type gather struct {
	ex   *exchange
	sock *clientSocket // whose batch holds the client's records; nil: none

	buf        []byte
	start, end int
	err        error // a write to the client failed
}

func (g *gather) send() {
	if g.start == g.end || g.err != nil {
		return
	}
	if g.sock != nil {
		g.sock.batch.hold()
	}
	_, err := g.ex.Write(g.buf[g.start:g.end])
	if err == nil {
		g.ex.FlushError() // every chunk as it comes (FlushInterval -1)
	}
	if g.sock != nil {
		if ferr := g.sock.batch.release(); err == nil {
			err = ferr
		}
	}
	g.start = g.end
	g.err = err
}

// relayGathered copies a response body read from an upConn to the client,
// as relay's loop does, with its rules for a client gone and a body that
// breaks off.
func (f *forwarder) relayGathered(ex *exchange, r *http.Request, res *http.Response, body *upBody) {
	arr := uploadBuffers.Get()
	defer uploadBuffers.Put(arr)
	g := &ex.gather
	// The room left is for the TLS overhead of the records (uploadReserve).
	*g = gather{ex: ex, sock: recordSocketOf(ex.ResponseWriter, r), buf: arr[:len(arr)-uploadReserve]}
	body.gather = g
	defer func() {
		body.gather = nil
		*g = gather{} // the array goes back to the pool
	}()
	for {
		if g.end == len(g.buf) {
			g.send()
		}
		if g.err != nil {
			// The client is gone: abort, as ReverseProxy does.
			res.Body.Close()
			panic(http.ErrAbortHandler)
		}
		if g.start == g.end {
			g.start, g.end = 0, 0
		}
		n, rerr := body.Read(g.buf[g.end:])
		g.end += n
		if rerr == nil {
			continue
		}
		g.send()
		if g.err != nil {
			res.Body.Close()
			panic(http.ErrAbortHandler)
		}
		if rerr == io.EOF {
			return
		}
		if f.endBroken(ex, r, res, rerr) {
			return
		}
		// Cells' body broke off: the client must not take the response
		// for complete, so the connection is aborted, as ReverseProxy
		// does.
		res.Body.Close()
		panic(http.ErrAbortHandler)
	}
}

// recordSocketOf is the socket under the TLS of the HTTP/1.1 connection
// that w writes to, whose records relay batches; nil for HTTP/2, whose
// writeBehind batches them, and without TLS, where a write is one write(2)
// anyway.
func recordSocketOf(w http.ResponseWriter, r *http.Request) *clientSocket {
	if r.ProtoMajor != 1 {
		return nil
	}
	for {
		switch x := w.(type) {
		case *h1Response:
			return x.c.sock
		case interface{ Unwrap() http.ResponseWriter }:
			w = x.Unwrap()
		default:
			// net/http's HTTP/1 server, serving a connection the front
			// handed over.
			if g, ok := r.Context().Value(connGuardKey{}).(*connGuard); ok {
				return recordSocket(g.conn)
			}
			return nil
		}
	}
}

// recordSocket is the clientSocket under c's TLS; nil if c has none.
func recordSocket(c net.Conn) *clientSocket {
	underTLS := false
	for ; c != nil; c = wrapped(c) {
		switch x := c.(type) {
		case *tls.Conn:
			underTLS = true
		case *clientSocket:
			if underTLS {
				return x
			}
			return nil
		}
	}
	return nil
}
