package proxy

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"sync"
	"syscall"
	"time"

	"golang.org/x/net/http/httpguts"
)

// h1Upstream sends requests without a body or with a small one (the web
// UI's assets, its REST calls, downloads) to Cells over HTTP/1.1 on the
// handler's own goroutine: it writes the request, reads the response and
// hands the body back, with no goroutine of its own per connection.
// http.Transport runs a reader and a writer goroutine for each connection
// and passes every request and response between three goroutines; on a
// small GET that hand-off and its allocations cost about a fifth of the
// proxy's CPU. Uploads and other large or unsized bodies, whose writing
// must overlap the response, and Expect: 100-continue go to the Transport
// (fallback), through httputil.ReverseProxy. Websocket handshakes go on
// connections of their own (upgrade).
//
// It keeps what the Transport guarantees for these requests: the response
// header limit, idle connections reused newest first and closed after
// IdleConnTimeout, a request without a body sent again on another
// connection when a reused one turns out to be closed before any byte of
// the response, 1xx responses read and passed on, and the request's
// context ending the exchange. The request's bytes come from a headWriter:
// the direct path's own (direct.go), or net/http's for a websocket
// handshake. Where the Transport's reader notices an idle connection closed
// by Cells, a peek at the socket before reuse does (nginx watches its
// cached upstream connections the same way).
type h1Upstream struct {
	fallback interface{ CloseIdleConnections() } // http.Transport's pool (upstreamTransport)
	network  string
	addr     string
	dialer   *net.Dialer
	tls      *tls.Config // nil: cleartext
	// ca is CELLS_UPSTREAM_CA_FILE: a connection dialled before its
	// last change is not pooled (put, dropStale); nil: none.
	ca *upstreamCA

	handshakeTimeout time.Duration
	idleTimeout      time.Duration
	maxIdle          int
	bufSize          int
	maxHeader        int64

	mu   sync.Mutex
	idle []*upConn // newest last
}

func newH1Upstream(target *url.URL, t *http.Transport, dialer *net.Dialer) *h1Upstream {
	u := &h1Upstream{
		fallback:         t,
		network:          "tcp",
		addr:             hostPortDefault(target),
		dialer:           dialer,
		handshakeTimeout: t.TLSHandshakeTimeout,
		idleTimeout:      t.IdleConnTimeout,
		maxIdle:          t.MaxIdleConnsPerHost,
		bufSize:          t.ReadBufferSize,
		maxHeader:        t.MaxResponseHeaderBytes,
	}
	// http.Transport's meaning of zero for each.
	if u.maxHeader <= 0 {
		u.maxHeader = 10 << 20
	}
	if u.idleTimeout <= 0 {
		u.idleTimeout = 1<<63 - 1
	}
	if u.maxIdle <= 0 {
		u.maxIdle = http.DefaultMaxIdleConnsPerHost
	}
	if u.bufSize <= 0 {
		u.bufSize = 4 << 10
	}
	if target.Scheme == "https" {
		u.tls = t.TLSClientConfig
	}
	return u
}

// hostPortDefault is u's host with the scheme's port when it names none.
func hostPortDefault(u *url.URL) string {
	port := u.Port()
	if port == "" {
		port = "80"
		if u.Scheme == "https" {
			port = "443"
		}
	}
	return net.JoinHostPort(u.Hostname(), port)
}

// upConn is one connection to Cells, owned by one exchange at a time.
type upConn struct {
	u     *h1Upstream
	nc    net.Conn     // *tls.Conn over sock, or sock
	sock  *cellsSocket // the TCP connection
	br    *bufio.Reader
	bw    *bufio.Writer
	raw   syscall.RawConn // nc's socket, for the idle check; nil if none
	read  int64           // bytes read from nc in the current exchange
	limit int64           // bytes the response header may still take
	reuse bool            // taken from the idle list
	gen   uint64          // u.ca's generation when dialled

	idleAt time.Time
	timer  *time.Timer // closes the connection once idle too long
	pooled bool        // in u.idle; guarded by u.mu

	interrupt func()                // ends a blocked read or write: the request's context ended
	peek      func(fd uintptr) bool // quiet's look at the socket, result in readable
	readable  bool
}

// Read counts what the exchange read, for telling a closed idle connection
// (nothing read: safe to retry) from a failure mid-response. While the
// header is read, limit caps it as MaxResponseHeaderBytes does in
// http.Transport.
func (c *upConn) Read(p []byte) (int, error) {
	if c.limit <= 0 {
		return 0, fmt.Errorf("cells-proxy: upstream response header larger than %d bytes", c.u.maxHeader)
	}
	if int64(len(p)) > c.limit {
		p = p[:c.limit]
	}
	n, err := c.nc.Read(p)
	c.read += int64(n)
	c.limit -= int64(n)
	return n, err
}

// maxSyncBody is the largest request body sent on the handler's goroutine:
// the JSON of Cells' REST calls (the web UI reads with POST), which the
// socket takes at once, so writing it cannot wait on a Cells that answers
// before reading it. Larger bodies, and bodies of unknown length, go to
// http.Transport, which reads the response while it writes.
const maxSyncBody = 12 << 10

// fastPath reports whether r can take the direct path (direct.go, then
// h1Upstream on the handler's goroutine): no body, or a small one of known
// length, no Expect: 100-continue to wait on, no trailers, no upgrade, and
// an ASCII Host. net/http's HTTP/1 server refuses any other Host; its
// HTTP/2 server lets an :authority outside ASCII through, and net/http's
// request writer turns that to punycode, with IDNA tables the direct path
// would add to the binary a second time (the standard library has its own
// copy): such a rare request goes through ReverseProxy.
func fastPath(r *http.Request) bool {
	for i := 0; i < len(r.Host); i++ {
		if r.Host[i] >= 0x80 {
			return false
		}
	}
	switch {
	case len(r.TransferEncoding) > 0 || len(r.Trailer) > 0:
		return false
	case r.ContentLength < 0 || r.ContentLength > maxSyncBody:
		return false
	case r.ContentLength > 0 && (r.Body == nil || r.Body == http.NoBody):
		return false
	}
	if _, ok := r.Header["Upgrade"]; ok {
		return false
	}
	if _, ok := r.Header["Expect"]; ok {
		return false
	}
	return true
}

// smallBodies holds request bodies of up to maxSyncBody bytes while they
// are written.
var smallBodies = newPool(func() *[]byte { b := make([]byte, maxSyncBody); return &b })

// hasBody reports whether r carries a body, as ReverseProxy sees it: a
// declared length of 0 is none, whatever the Body field holds (an HTTP/2
// request whose HEADERS did not end the stream).
func hasBody(r *http.Request) bool {
	return r.ContentLength != 0 && r.Body != nil && r.Body != http.NoBody
}

// replayable is http.Transport's rule for sending a request again when a
// kept-alive connection turns out dead: no body, and a method that is safe
// to repeat or an idempotency key.
func replayable(r *http.Request) bool {
	if hasBody(r) {
		return false
	}
	switch r.Method {
	case http.MethodGet, http.MethodHead, http.MethodOptions, http.MethodTrace:
		return true
	}
	_, key := r.Header["Idempotency-Key"]
	_, xkey := r.Header["X-Idempotency-Key"]
	return key || xkey
}

// headWriter writes the bytes of a request to Cells into a connection's
// buffer; do flushes them. It may be called more than once (a request sent
// again on another connection) and must write the same bytes each time.
type headWriter interface {
	writeTo(w *bufio.Writer) error
}

// requestWriter writes a request with net/http's writer, as
// http.Transport does.
type requestWriter struct{ *http.Request }

func (r requestWriter) writeTo(w *bufio.Writer) error { return r.Write(w) }

// do sends the request that out writes on behalf of r (whose method, body
// and context count: HEAD has no response body, a request with a body is
// never sent twice, the context ends the exchange) and reads the response
// header. Informational responses (103 Early Hints) go to info's header
// and WriteHeader, as ReverseProxy passes them on; nil drops them. The
// response body gives the connection back when it ends.
func (u *h1Upstream) do(r *http.Request, out headWriter, info http.ResponseWriter) (*http.Response, error) {
	ctx := r.Context()
	for {
		c, err := u.get(ctx)
		if err != nil {
			return nil, err
		}
		res, err := c.roundTrip(r, out, info, false)
		if err == nil {
			return res, nil
		}
		c.close()
		// A kept-alive connection that Cells closed while it sat idle
		// fails before a byte of the response: send again on another,
		// if the request may be repeated.
		if !c.reuse || c.read != 0 || ctx.Err() != nil || !replayable(r) {
			return nil, err
		}
	}
}

// checkHeader is what http.Transport checks before it writes a header: a
// field that is not a token or a value with CR or LF would let one request
// smuggle another onto the connection.
func checkHeader(h http.Header) error {
	for k, vv := range h {
		if !httpguts.ValidHeaderFieldName(k) {
			return fmt.Errorf("net/http: invalid header field name %q", k)
		}
		for _, v := range vv {
			if !httpguts.ValidHeaderFieldValue(v) {
				return fmt.Errorf("net/http: invalid header field value for %q", k)
			}
		}
	}
	return nil
}

// upgrade sends a websocket handshake to Cells on a connection of its own
// (never pooled) and returns Cells' answer and that connection. After a
// 101, the response body is the connection, as an io.ReadWriteCloser that
// first returns what Cells sent right behind its 101; any other answer's
// body closes the connection when closed. The request's context bounds
// the handshake only.
//
// Compared with http.Transport, a tunnel keeps no clone of the TLS
// configuration and no buffer of the handshake's once it has read what
// they held: idle websockets are the proxy's largest standing memory.
func (u *h1Upstream) upgrade(r *http.Request) (*http.Response, net.Conn, error) {
	if err := checkHeader(r.Header); err != nil {
		return nil, nil, err
	}
	// A handshake is small: 4 KiB buffers, dropped with the handshake.
	c, err := u.dialSized(r.Context(), 4<<10, 4<<10)
	if err != nil {
		return nil, nil, err
	}
	res, err := c.roundTrip(r, requestWriter{r}, nil, true)
	if err != nil {
		c.close()
		return nil, nil, err
	}
	return res, c.nc, nil
}

// upgraded is the connection to Cells after a 101: reads take what the
// handshake's reader holds first, then go to the connection itself.
type upgraded struct {
	br *bufio.Reader // nil once empty
	net.Conn
}

func (u *upgraded) Read(p []byte) (int, error) {
	if u.br != nil {
		if n := u.br.Buffered(); n > 0 {
			n, err := u.br.Read(p[:min(len(p), n)])
			if u.br.Buffered() == 0 {
				u.br = nil
			}
			return n, err
		}
		u.br = nil
	}
	return u.Conn.Read(p)
}

// closeConnBody closes the connection with the body, first, so that
// closing does not wait to read what is left of it.
type closeConnBody struct {
	io.ReadCloser
	c    net.Conn
	stop func() bool
}

func (b *closeConnBody) Close() error {
	b.stop()
	err := b.c.Close()
	b.ReadCloser.Close()
	return err
}

// get takes the newest idle connection, or dials one.
func (u *h1Upstream) get(ctx context.Context) (*upConn, error) {
	for {
		u.mu.Lock()
		n := len(u.idle)
		if n == 0 {
			u.mu.Unlock()
			return u.dial(ctx)
		}
		c := u.idle[n-1]
		u.idle[n-1] = nil
		u.idle = u.idle[:n-1]
		c.pooled = false
		c.timer.Stop()
		fresh := time.Since(c.idleAt) < u.idleTimeout
		u.mu.Unlock()
		// A connection made before CELLS_UPSTREAM_CA_FILE last changed
		// may still be here between the change and dropStale.
		if fresh && c.gen == u.ca.generation() && c.quiet() {
			c.reuse, c.read = true, 0
			return c, nil
		}
		// Expired (its timer is about to close it), verified with a CA
		// file since replaced, closed by Cells, or sent something
		// unasked: done with.
		c.close()
	}
}

func (u *h1Upstream) dial(ctx context.Context) (*upConn, error) {
	// One TLS record for writes: a request head and a small body leave
	// together.
	return u.dialSized(ctx, u.bufSize, 16<<10)
}

func (u *h1Upstream) dialSized(ctx context.Context, rsize, wsize int) (*upConn, error) {
	gen := u.ca.generation() // before the handshake: see upstreamCA.gen
	var raw, nc net.Conn
	var sock *cellsSocket
	for conf := u.tls; ; {
		var err error
		if raw, err = u.dialer.DialContext(ctx, u.network, u.addr); err != nil {
			return nil, err
		}
		sock = newCellsSocket(raw)
		nc = sock
		if conf == nil {
			break
		}
		tc, err := u.handshake(ctx, sock, conf)
		if err == nil {
			nc = tc
			break
		}
		raw.Close()
		// A resumed session refused: once more, with a full
		// handshake (resumeRefused).
		if conf = fullHandshakeAfter(err); conf == nil {
			return nil, err
		}
	}
	c := &upConn{u: u, nc: nc, sock: sock, gen: gen}
	if sc, ok := raw.(syscall.Conn); ok {
		c.raw = rawConnOf(sc)
	}
	// Made once per connection, not per request. The socket is closed,
	// not only given a past deadline: a handler blocked writing to a
	// client that reads nothing does not read Cells either, and Cells'
	// connection must not wait for it (http.Transport closes it too).
	c.interrupt = func() { c.nc.SetDeadline(time.Unix(1, 0)); raw.Close() }
	c.peek = func(fd uintptr) bool {
		c.readable = peekReadable(fd)
		return true
	}
	c.br = bufio.NewReaderSize(c, rsize)
	c.bw = bufio.NewWriterSize(nc, wsize)
	return c, nil
}

// handshake runs TLS with Cells over nc with conf (u.tls, or the config
// fullHandshakeAfter gives), within the Transport's TLSHandshakeTimeout.
func (u *h1Upstream) handshake(ctx context.Context, nc net.Conn, conf *tls.Config) (*tls.Conn, error) {
	tc := tls.Client(nc, conf)
	if u.handshakeTimeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, u.handshakeTimeout)
		defer cancel()
	}
	if err := tc.HandshakeContext(ctx); err != nil {
		return nil, err
	}
	return tc, nil
}

// roundTrip writes what out writes for r and reads the response header.
// The body is read by the caller through the returned response, which
// gives the connection back when it ends. With upgrade, a 101 is the
// answer looked for.
func (c *upConn) roundTrip(r *http.Request, out headWriter, info http.ResponseWriter, upgrade bool) (*http.Response, error) {
	ctx := r.Context()
	// The request's end (client gone, idle watchdog, shutdown) must
	// interrupt a read or write on the connection, which then cannot be
	// reused: stop reports whether that happened.
	stop := context.AfterFunc(ctx, c.interrupt)
	if err := out.writeTo(c.bw); err != nil {
		stop()
		return nil, err
	}
	if err := c.bw.Flush(); err != nil {
		stop()
		return nil, err
	}
	var res *http.Response
	c.limit = c.u.maxHeader
	for {
		var err error
		res, err = http.ReadResponse(c.br, r)
		if err != nil {
			stop()
			return nil, err
		}
		code := res.StatusCode
		if code < 100 {
			// ReadResponse takes any three digits; no client may get
			// this one (net/http's WriteHeader panics on it).
			stop()
			return nil, errStatus(code)
		}
		if code >= 200 || code == http.StatusSwitchingProtocols {
			if err := checkFieldNames(res.Header); err != nil {
				stop()
				return nil, err
			}
		}
		if code >= 200 {
			break
		}
		if code == http.StatusSwitchingProtocols {
			if upgrade {
				break
			}
			stop()
			return nil, fmt.Errorf("cells-proxy: upstream switched protocols unasked")
		}
		// Informational (103 Early Hints): to the client as ReverseProxy
		// passes them on, read as http.Transport reads them.
		if info != nil {
			h := info.Header()
			copyHeader(h, res.Header)
			info.WriteHeader(code)
			// WriteHeader does not clear the header after a 1xx.
			clear(h)
			// Passed on, so not counted against the final response's
			// header (http.Transport's rule for 1xx it delivers).
			c.limit = c.u.maxHeader
		}
	}
	c.limit = 1<<63 - 1
	if upgrade {
		if res.StatusCode != http.StatusSwitchingProtocols {
			// Cells said no: its answer is passed on, read under
			// the request's context, and the connection closed
			// after it.
			res.Body = &closeConnBody{ReadCloser: res.Body, c: c.nc, stop: stop}
			return res, nil
		}
		if !stop() {
			return nil, context.Cause(ctx)
		}
		res.Body = &upgraded{br: c.br, Conn: c.nc}
		return res, nil
	}
	// Only Cells' answer decides: r's Close is the client's own hop
	// (Connection: close, HTTP/1.0), never written by the direct path;
	// net/http's writer would have asked Cells to close, and then
	// res.Close says so.
	reusable := !res.Close
	if res.Body == http.NoBody {
		c.release(stop, reusable)
		return res, nil
	}
	res.Body = &upBody{body: res.Body, c: c, stop: stop, reusable: reusable}
	return res, nil
}

// errStatus is a status from Cells that is not one: below 100.
func errStatus(code int) error {
	return fmt.Errorf("cells-proxy: upstream answered status %03d, not an HTTP status", code)
}

// checkFieldNames refuses a response header from Cells that holds a field
// name with a space in it ("X-Foo : v", "X Foo: v"), as nginx answers 502
// ("upstream sent invalid header"). Go's reader takes such a name
// (go.dev/issue/34540) where it refuses every other byte that is not a
// token's, and both writers to the client would leave the field out
// unsaid; RFC 9112, section 5.1, has a proxy remove the space instead, but
// "Content-Length : 5" is then a framing that Go's reader did not use (it
// reads such a body until Cells closes): no guess is safe, and Cells, a Go
// server, never sends one.
func checkFieldNames(h http.Header) error {
	for k := range h {
		if !httpguts.ValidHeaderFieldName(k) {
			return fmt.Errorf("cells-proxy: upstream sent invalid header field name %q", k)
		}
	}
	return nil
}

// release ends an exchange whose response was read in full.
func (c *upConn) release(stop func() bool, reusable bool) {
	if !stop() || !reusable || c.br.Buffered() > 0 || c.tlsHolds() {
		// Cancelled (the deadline is set), not kept alive, or Cells sent
		// more than the response: the connection is done.
		c.close()
		return
	}
	c.u.put(c)
}

// tlsHolds reports whether crypto/tls holds something Cells sent after the
// response: it reads from the socket all that is there, beyond the record
// it needs, so bytes that came with the response's last record (a body
// longer than its Content-Length, a body to a HEAD, a response nobody asked
// for) are neither in br nor on the socket for quiet to see; the next
// request on the connection would get them as its answer. A read while the
// socket under it is probing returns what crypto/tls holds, and nothing
// else. A close_notify from Cells ends the connection here too.
func (c *upConn) tlsHolds() bool {
	tc, ok := c.nc.(*tls.Conn)
	if !ok {
		return false
	}
	s := c.sock
	var b [1]byte
	s.probing = true
	n, err := tc.Read(b[:])
	s.probing = false
	return n > 0 || err != errProbe
}

// cellsSocket is the TCP connection to Cells, under its TLS if any. While
// probing, a read returns errProbe at once instead of asking the socket:
// tlsHolds sees what crypto/tls holds without a system call, a deadline to
// set and clear, or the error a deadline allocates. While relay gathers a
// response body (download.go), a read that finds nothing to read first
// has it send what it holds. Both are set and cleared by the goroutine
// that owns the exchange, around its reads.
type cellsSocket struct {
	net.Conn
	probing bool
	gather  *gather
	notify  func()      // gather.send, made once
	wr      *waitReader // made at the first read while gathering
}

func newCellsSocket(c net.Conn) *cellsSocket {
	s := &cellsSocket{Conn: c}
	s.notify = func() {
		g := s.gather
		g.send()
		if g.err != nil {
			// The client is gone: this read must not wait for Cells,
			// and relay aborts once it returns.
			s.SetReadDeadline(aLongTimeAgo)
		}
	}
	return s
}

func (s *cellsSocket) Read(p []byte) (int, error) {
	if s.probing {
		return 0, errProbe
	}
	if s.gather != nil {
		if s.wr == nil {
			s.wr = newWaitReader(s.Conn)
		}
		return s.wr.readNotifying(s.Conn, p, s.notify)
	}
	return s.Conn.Read(p)
}

// errProbe is temporary, so that crypto/tls does not keep it as the
// connection's error.
var errProbe net.Error = probeError{}

type probeError struct{}

func (probeError) Error() string   { return "cells-proxy: nothing more buffered" }
func (probeError) Timeout() bool   { return true }
func (probeError) Temporary() bool { return true }

func (c *upConn) close() { c.nc.Close() }

// quiet reports whether an idle connection has nothing to read: no end of
// stream (Cells closed it) and no bytes (a response nobody asked for).
// nginx watches its cached upstream connections for the same events; a
// non-blocking peek at the socket is one system call, cheaper than a
// request written to a dead connection and sent again.
func (c *upConn) quiet() bool {
	if c.raw == nil {
		return true // no socket to look at: the retry covers it
	}
	c.readable = false
	err := c.raw.Read(c.peek)
	return err == nil && !c.readable
}

func (u *h1Upstream) put(c *upConn) {
	u.mu.Lock()
	// Made before CELLS_UPSTREAM_CA_FILE last changed: done with, as
	// dropStale did with the idle ones. Under mu, so that a connection
	// put here before dropStale is dropped there.
	if len(u.idle) >= u.maxIdle || c.gen != u.ca.generation() {
		u.mu.Unlock()
		c.close()
		return
	}
	c.idleAt = time.Now()
	c.pooled = true
	u.idle = append(u.idle, c)
	if c.timer == nil {
		c.timer = time.AfterFunc(u.idleTimeout, c.expire)
	} else {
		c.timer.Reset(u.idleTimeout)
	}
	u.mu.Unlock()
}

// expire closes a connection that stayed idle for IdleConnTimeout.
func (c *upConn) expire() {
	u := c.u
	u.mu.Lock()
	if !c.pooled || time.Since(c.idleAt) < u.idleTimeout {
		u.mu.Unlock()
		return
	}
	for i, p := range u.idle {
		if p == c {
			u.idle = append(u.idle[:i], u.idle[i+1:]...)
			break
		}
	}
	c.pooled = false
	u.mu.Unlock()
	c.close()
}

// dropStale closes the idle connections dialled before
// CELLS_UPSTREAM_CA_FILE last changed (upstreamCA.onChange).
func (u *h1Upstream) dropStale() {
	u.mu.Lock()
	gen := u.ca.generation()
	var stale []*upConn
	kept := u.idle[:0]
	for _, c := range u.idle {
		if c.gen == gen {
			kept = append(kept, c)
			continue
		}
		c.pooled = false
		c.timer.Stop()
		stale = append(stale, c)
	}
	clear(u.idle[len(kept):])
	u.idle = kept
	u.mu.Unlock()
	for _, c := range stale {
		c.close()
	}
}

// CloseIdleConnections closes the idle connections of both paths.
func (u *h1Upstream) CloseIdleConnections() {
	u.mu.Lock()
	idle := u.idle
	u.idle = nil
	for _, c := range idle {
		c.pooled = false
	}
	u.mu.Unlock()
	for _, c := range idle {
		c.close()
	}
	u.fallback.CloseIdleConnections()
}

// upBody is a response body read from an upConn.
type upBody struct {
	body     io.ReadCloser
	c        *upConn
	stop     func() bool
	reusable bool
	err      error   // the error that ended the body; the connection is gone
	gather   *gather // relay's, while it reads the body (download.go)
}

func (b *upBody) Read(p []byte) (int, error) {
	if b.err != nil {
		return 0, b.err
	}
	// Set for this read only: once the body ends, the connection goes
	// back to the idle list, for another exchange to use.
	b.c.sock.gather = b.gather
	n, err := b.body.Read(p)
	b.c.sock.gather = nil
	if err != nil {
		b.err = err
		if err == io.EOF {
			b.c.release(b.stop, b.reusable)
		} else {
			b.stop()
			b.c.close()
		}
	}
	return n, err
}

// Close before the end closes the connection: what is left of the body is
// not read (http.Transport does the same).
func (b *upBody) Close() error {
	if b.err == nil {
		b.err = errBodyClosed
		b.stop()
		b.c.close()
	}
	return nil
}

var errBodyClosed = errors.New("cells-proxy: read on closed response body")
