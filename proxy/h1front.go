package proxy

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http/httpguts"
)

// h1Front serves the public port's HTTP/1.1 connections itself while their
// requests are the direct path's (fastPath: no body or a small one, no
// upgrade, no Expect) and hands a connection to net/http's HTTP/1 server,
// for the rest of its life, at the first request that is not: uploads to
// stream, websockets, HTTP/1.0, anything net/http would answer with an
// error of its own. The handed-over connection replays the bytes already
// read, the request's head included, so net/http sees the connection as
// the client sent it.
//
// What net/http's server does for every request and the front does not,
// measured as about a sixth of the proxy's CPU on a small GET (a quarter
// for a loop without the watchdog, access log and client watch): a
// goroutine per request reading the client's connection in the background
// (then stopped with a read deadline in the past, and waited for), a
// context per request, and a copy of the response header. The front writes
// the response from the handler's header as it stands, and watches for a
// client gone away (net/http's background read, cancelling the request)
// only when an exchange lasts longer than clientWatchDelay.
//
// The handler is the one net/http's server calls (the forwarder, under
// HSTS), with an http.ResponseWriter of the front's (h1Response); the
// rules it keeps are net/http's: keep-alive and Connection: close, the
// Date field, Content-Length or chunked framing, HEAD and bodiless
// statuses, 1xx responses, trailers, ReadHeaderTimeout and IdleTimeout,
// and a graceful Shutdown.
type h1Front struct {
	handler    http.Handler
	base       context.Context
	log        *slog.Logger
	readHeader time.Duration
	idle       time.Duration
	slow       *handoffListener // net/http's HTTP/1 server accepts from it

	mu       sync.Mutex
	conns    map[*h1Conn]struct{}
	draining atomic.Bool
	handoffs atomic.Int64 // connections handed to net/http
}

// h1HeadMax is the largest request head the front reads (its read
// buffer); a longer one goes to net/http, whose limit is MaxHeaderBytes.
const h1HeadMax = 4 << 10

// clientWatchDelay is how long an exchange runs before the front starts
// reading the client's connection to notice it gone (net/http reads from
// the start of every request).
const clientWatchDelay = 100 * time.Millisecond

func newH1Front(h http.Handler, base context.Context, log *slog.Logger, readHeader, idle time.Duration, addr net.Addr) *h1Front {
	return &h1Front{
		handler:    h,
		base:       base,
		log:        log,
		readHeader: readHeader,
		idle:       idle,
		slow:       newHandoffListener(addr),
		conns:      make(map[*h1Conn]struct{}),
	}
}

// Serve accepts connections on ln until it is closed. ln is cmux's, whose
// Accept fails only once it is closed (cmux itself deals with the root
// listener's errors).
func (f *h1Front) Serve(ln net.Listener) error {
	for {
		nc, err := ln.Accept()
		if err != nil {
			if f.draining.Load() {
				return http.ErrServerClosed
			}
			return err
		}
		c := &h1Conn{front: f, nc: nc}
		if !f.track(c) {
			nc.Close()
			continue
		}
		go c.serve()
	}
}

func (f *h1Front) track(c *h1Conn) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.draining.Load() {
		return false
	}
	f.conns[c] = struct{}{}
	return true
}

func (f *h1Front) untrack(c *h1Conn) {
	f.mu.Lock()
	delete(f.conns, c)
	f.mu.Unlock()
}

// Shutdown stops keep-alive, closes the connections waiting for a request,
// and waits for the others to finish the request they serve, as
// http.Server.Shutdown does. The listener is cmux's, closed by the caller.
func (f *h1Front) Shutdown(ctx context.Context) error {
	f.draining.Store(true)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		if f.closeIdle() {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
		}
	}
}

// closeIdle closes the connections between requests and reports whether
// none is left.
func (f *h1Front) closeIdle() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	for c := range f.conns {
		if c.state.CompareAndSwap(h1Idle, h1Closed) {
			c.nc.Close()
		}
	}
	return len(f.conns) == 0
}

// Close closes every connection at once.
func (f *h1Front) Close() error {
	f.draining.Store(true)
	f.mu.Lock()
	defer f.mu.Unlock()
	for c := range f.conns {
		c.state.Store(h1Closed)
		c.nc.Close()
	}
	return nil
}

// Connection states, for Shutdown.
const (
	h1Idle   = iota // waiting for a request
	h1Busy          // reading or serving one
	h1Closed        // closed by Shutdown or Close
)

// h1Conn is one client connection served by the front.
type h1Conn struct {
	front  *h1Front
	nc     net.Conn
	sock   *clientSocket // under nc's TLS, for relay's record batch; nil without TLS
	br     *bufio.Reader
	bw     *bufio.Writer
	state  atomic.Int32
	ctx    context.Context // every request's: ends when the client is gone
	cancel context.CancelFunc
	w      h1Response
	body   watchedBody
	// bodyPending: the request's body is not all read; the client watch
	// must not read under it.
	bodyPending atomic.Bool

	// The client watch: a read of the connection while a request is
	// served, started by watchTimer. Under watchMu.
	watchMu      sync.Mutex
	watchCond    sync.Cond
	watchTimer   *time.Timer
	watching     int // watchOff, watchArmed or watchReading
	watchAborted bool
	hasByte      bool // the watch read a byte the next request starts with
	byteBuf      [1]byte
}

const (
	watchOff = iota
	watchArmed
	watchReading
)

// Read is the request reader's source: first a byte the client watch read.
func (c *h1Conn) Read(p []byte) (int, error) {
	if c.hasByte && len(p) > 0 {
		// No watch runs while the loop reads: no lock needed.
		c.hasByte = false
		p[0] = c.byteBuf[0]
		return 1, nil
	}
	return c.nc.Read(p)
}

func (c *h1Conn) serve() {
	f := c.front
	handed := false
	defer func() {
		if !handed {
			c.nc.Close()
		}
		if c.watchTimer != nil {
			c.watchTimer.Stop()
		}
		if c.cancel != nil {
			c.cancel()
		}
		f.untrack(c)
	}()
	c.sock = recordSocket(c.nc)
	c.br = bufio.NewReaderSize(c, h1HeadMax)
	c.bw = bufio.NewWriterSize(c.nc, 4<<10)
	c.watchCond.L = &c.watchMu
	c.ctx, c.cancel = context.WithCancel(f.base)
	remote := c.nc.RemoteAddr().String()
	// The first request's head must arrive within ReadHeaderTimeout;
	// between requests, IdleTimeout applies to the next one's first byte
	// and ReadHeaderTimeout to the rest of its head (readHead).
	c.nc.SetReadDeadline(time.Now().Add(f.readHeader))
	afterPOST := false
	for first := true; ; first = false {
		if !first && c.br.Buffered() == 0 && !c.hasByte {
			c.nc.SetReadDeadline(time.Now().Add(f.idle))
		}
		if _, err := c.br.Peek(1); err != nil {
			return
		}
		// As net/http's server: up to four CR or LF after a POST are
		// skipped (old clients end a POST body with a CRLF). They are
		// not the next request's: waiting for more, IdleTimeout applies.
		for skipped := 0; afterPOST && skipped < 4; skipped++ {
			if c.br.Buffered() == 0 && !c.hasByte {
				c.nc.SetReadDeadline(time.Now().Add(f.idle))
			}
			b, err := c.br.Peek(1)
			if err != nil {
				return
			}
			if b[0] != '\r' && b[0] != '\n' {
				break
			}
			c.br.Discard(1)
		}
		if !c.state.CompareAndSwap(h1Idle, h1Busy) {
			return // Shutdown closed it
		}
		end, err := c.readHead(!first)
		if err != nil {
			return
		}
		c.nc.SetReadDeadline(time.Time{})
		buffered, _ := c.br.Peek(c.br.Buffered())
		var r *http.Request
		if end > 0 {
			r, err = http.ReadRequest(c.br)
		}
		if end <= 0 || err != nil || !frontable(r) {
			// net/http answers, from the request's first byte.
			c.handoff(buffered)
			handed = true
			return
		}
		r.RemoteAddr = remote
		r = r.WithContext(c.ctx)
		afterPOST = r.Method == http.MethodPost
		if !c.serveRequest(r) {
			return
		}
		if !c.state.CompareAndSwap(h1Busy, h1Idle) {
			return
		}
	}
}

// readHead waits until the request head is buffered and returns its
// length; 0 when it cannot be read here (longer than the buffer, a bare LF
// that net/http may read otherwise), for net/http to read.
func (c *h1Conn) readHead(arm bool) (int, error) {
	for {
		buf, _ := c.br.Peek(c.br.Buffered())
		if n, done := headEnd(buf); done {
			return n, nil
		}
		if len(buf) == c.br.Size() {
			return 0, nil
		}
		if arm {
			arm = false
			c.nc.SetReadDeadline(time.Now().Add(c.front.readHeader))
		}
		if _, err := c.br.Peek(len(buf) + 1); err != nil {
			if errors.Is(err, bufio.ErrBufferFull) {
				return 0, nil
			}
			return 0, err
		}
	}
}

// headEnd finds the end of a request head in buf: its length and true, or
// 0 and true when the head is one net/http should read (a line that does
// not start a request, a bare LF), or false when more bytes are needed.
func headEnd(buf []byte) (int, bool) {
	if len(buf) > 0 && (buf[0] == '\r' || buf[0] == '\n') {
		return 0, true // empty lines before the request line
	}
	off := 0
	for {
		i := bytes.IndexByte(buf[off:], '\n')
		if i < 0 {
			return 0, false
		}
		i += off
		if i == 0 || buf[i-1] != '\r' {
			return 0, true
		}
		// An empty line ends the head.
		if i >= 3 && buf[i-3] == '\r' && buf[i-2] == '\n' {
			return i + 1, true
		}
		off = i + 1
	}
}

// frontable reports whether the front serves r: an HTTP/1.1 request in
// origin form with a valid Host and valid fields (net/http's server
// answers 400 otherwise) that takes the direct path.
func frontable(r *http.Request) bool {
	if r.ProtoMajor != 1 || r.ProtoMinor != 1 || r.Method == http.MethodConnect || r.Method == "PRI" {
		return false
	}
	if r.RequestURI == "" || r.RequestURI[0] != '/' {
		return false
	}
	// http.ReadRequest refuses a second Host and takes the field out
	// of the header.
	if r.Host == "" || !httpguts.ValidHostHeader(r.Host) {
		return false
	}
	if checkHeader(r.Header) != nil {
		return false
	}
	return fastPath(r)
}

// handoff gives the connection to net/http's server, with what was read
// of it.
func (c *h1Conn) handoff(buffered []byte) {
	c.state.Store(h1Closed) // no longer the front's to close
	c.front.handoffs.Add(1)
	rc := &replayConn{Conn: c.nc}
	if len(buffered) > 0 {
		rc.buf = append([]byte(nil), buffered...)
	}
	c.front.slow.handoff(rc)
}

// serveRequest runs the handler for r and reports whether the connection
// takes another request.
func (c *h1Conn) serveRequest(r *http.Request) (keep bool) {
	w := &c.w
	w.reset(c, r)
	if r.ContentLength > 0 {
		c.bodyPending.Store(true)
		c.body = watchedBody{ReadCloser: r.Body, c: c, left: r.ContentLength}
		r.Body = &c.body
	}
	c.watch()
	defer func() {
		c.unwatch()
		if v := recover(); v != nil {
			// The response is cut off where it stands: the connection
			// closes unflushed, as net/http's does.
			if v != http.ErrAbortHandler {
				c.front.log.Error("panic serving a request", "client", r.RemoteAddr, "err", v, "stack", string(debug.Stack()))
			}
			keep = false
		}
		w.reset(nil, nil)
	}()
	c.front.handler.ServeHTTP(w, r)
	keep = w.finish()
	if r.ContentLength > 0 && c.body.left > 0 {
		// The handler answered without reading the body (421, 413).
		// The client is sending it: closing at once could reset the
		// connection before it reads the answer (net/http's
		// closeWriteAndWait), so it gets 500 ms either way.
		if keep {
			// Nothing said the connection closes: read the small body
			// out of the way, as net/http's server does, and go on.
			return c.discardBody(500 * time.Millisecond)
		}
		time.Sleep(500 * time.Millisecond)
		return false
	}
	return keep
}

// discardBody reads what is left of the request's body, within d, and
// reports whether it all came: the connection can take the next request.
func (c *h1Conn) discardBody(d time.Duration) bool {
	// The client watch must not read the connection under a deadline of
	// the discard's, which it would take for the client gone.
	c.unwatch()
	c.nc.SetReadDeadline(time.Now().Add(d))
	_, err := io.Copy(io.Discard, &c.body)
	if err != nil || c.body.left > 0 {
		return false
	}
	c.nc.SetReadDeadline(time.Time{})
	return true
}

// watchedBody is a request body the client watch must not read under.
type watchedBody struct {
	io.ReadCloser
	c    *h1Conn
	left int64 // bytes not yet read
}

// Read ends bodyPending only with the body read whole: after an error the
// handler may still read the connection (closing the body drains it), and
// the connection closes after this request anyway.
func (b *watchedBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if b.left -= int64(n); b.left <= 0 {
		b.c.bodyPending.Store(false)
	}
	return n, err
}

// watch arms the client watch for the request being served.
func (c *h1Conn) watch() {
	c.watchMu.Lock()
	defer c.watchMu.Unlock()
	c.watching = watchArmed
	// Under watchMu: backgroundRead, on the timer's goroutine, reads
	// watchTimer under it.
	if c.watchTimer == nil {
		c.watchTimer = time.AfterFunc(clientWatchDelay, c.backgroundRead)
	} else {
		c.watchTimer.Reset(clientWatchDelay)
	}
}

// backgroundRead reads the client's connection while its request is
// served: an end or an error means the client is gone and cancels the
// request's context; a byte (the next request) is kept for the loop.
func (c *h1Conn) backgroundRead() {
	c.watchMu.Lock()
	if c.watching != watchArmed {
		c.watchMu.Unlock()
		return
	}
	if c.bodyPending.Load() {
		// The body is still being read: look again later.
		c.watchTimer.Reset(clientWatchDelay)
		c.watchMu.Unlock()
		return
	}
	if c.hasByte || c.br.Buffered() > 0 {
		c.watching = watchOff // the next request is here already
		c.watchMu.Unlock()
		return
	}
	c.watching = watchReading
	c.watchMu.Unlock()
	n, err := c.nc.Read(c.byteBuf[:])
	c.watchMu.Lock()
	if n == 1 {
		c.hasByte = true
	}
	var ne net.Error
	if err != nil && !(c.watchAborted && errors.As(err, &ne) && ne.Timeout()) {
		c.cancel()
	}
	c.watching = watchOff
	c.watchCond.Broadcast()
	c.watchMu.Unlock()
}

// unwatch ends the client watch, waiting for its read to stop.
func (c *h1Conn) unwatch() {
	c.watchMu.Lock()
	defer c.watchMu.Unlock()
	switch c.watching {
	case watchArmed:
		c.watching = watchOff
		c.watchTimer.Stop()
	case watchReading:
		c.watchAborted = true
		c.nc.SetReadDeadline(aLongTimeAgo)
		for c.watching == watchReading {
			c.watchCond.Wait()
		}
		c.watchAborted = false
		c.nc.SetReadDeadline(time.Time{})
	}
}

// h1Response is the front's http.ResponseWriter: it writes the response as
// net/http's HTTP/1 server would, straight from the handler's header.
type h1Response struct {
	c      *h1Conn
	req    *http.Request
	header http.Header

	wroteHeader bool // the final status is set
	headSent    bool // the head is in the write buffer
	status      int
	chunked     bool
	noBody      bool  // HEAD, 204, 304
	declared    int64 // Content-Length, -1 if none
	written     int64
	closeAfter  bool  // Connection: close
	deadlines   bool  // the handler set a deadline on the connection
	err         error // a failed write: the connection is done
	trailers    []string
}

func (w *h1Response) reset(c *h1Conn, r *http.Request) {
	h := w.header
	if h == nil {
		h = make(http.Header)
	} else {
		clear(h)
	}
	*w = h1Response{c: c, req: r, header: h, declared: -1, trailers: w.trailers[:0]}
}

func (w *h1Response) Header() http.Header { return w.header }

func (w *h1Response) WriteHeader(code int) {
	if w.wroteHeader {
		return // net/http logs a superfluous call and ignores it
	}
	if code < 100 || code > 999 {
		panic("invalid WriteHeader code " + strconv.Itoa(code))
	}
	if code < 200 {
		// Informational (103 Early Hints): at once, with the header as
		// it stands; the caller clears it.
		w.writeStatus(code)
		w.writeFields(false)
		w.c.bw.WriteString("\r\n")
		w.flush()
		return
	}
	w.wroteHeader, w.status = true, code
	if code == http.StatusNoContent || code == http.StatusNotModified {
		// As net/http's server (suppressedHeaders): no framing fields on
		// a response that has no body (RFC 9110 forbids Content-Length
		// on a 204), and no Content-Type on a 304.
		delete(w.header, "Content-Length")
		delete(w.header, "Transfer-Encoding")
		if code == http.StatusNotModified {
			delete(w.header, "Content-Type")
		}
	}
	if cl := w.header.Get("Content-Length"); cl != "" {
		if n, err := strconv.ParseInt(cl, 10, 64); err == nil && n >= 0 {
			w.declared = n
		} else {
			w.header.Del("Content-Length") // as net/http does
		}
	}
	w.noBody = w.req.Method == http.MethodHead || code == http.StatusNoContent || code == http.StatusNotModified
	w.chunked = w.declared < 0 && !w.noBody
	for _, v := range w.header["Connection"] {
		if httpguts.HeaderValuesContainsToken([]string{v}, "close") {
			w.closeAfter = true
		}
	}
	if w.req.Close || w.c.front.draining.Load() {
		w.closeAfter = true
	}
}

func (w *h1Response) writeStatus(code int) {
	bw := w.c.bw
	bw.WriteString("HTTP/1.1 ")
	bw.WriteString(strconv.Itoa(code))
	bw.WriteByte(' ')
	if text := http.StatusText(code); text != "" {
		bw.WriteString(text)
	} else {
		bw.WriteString("status code ")
		bw.WriteString(strconv.Itoa(code))
	}
	bw.WriteString("\r\n")
}

// writeFields writes the header's fields as net/http's writer does: names
// that are not tokens left out, line breaks in values made spaces, values
// trimmed; with final, trailer fields (http.TrailerPrefix) left for the end
// and the announced trailer names noted; without, as a 1xx, no framing
// fields (excludedHeadersNoBody).
func (w *h1Response) writeFields(final bool) {
	bw := w.c.bw
	for k, vv := range w.header {
		if final && strings.HasPrefix(k, http.TrailerPrefix) {
			continue
		}
		if !final && (k == "Content-Length" || k == "Transfer-Encoding") {
			continue
		}
		if !httpguts.ValidHeaderFieldName(k) {
			continue
		}
		if final && k == "Trailer" && w.chunked {
			for _, v := range vv {
				for _, name := range splitList(v) {
					// As net/http's declareTrailer: a field that may
					// not be a trailer (RFC 9110, section 6.5.1) is
					// not declared, so not sent after the body.
					name = http.CanonicalHeaderKey(name)
					if httpguts.ValidTrailerHeader(name) {
						w.trailers = append(w.trailers, name)
					}
				}
			}
		}
		for _, v := range vv {
			bw.WriteString(k)
			bw.WriteString(": ")
			writeFieldValue(bw, v)
			bw.WriteString("\r\n")
		}
	}
}

func writeFieldValue(bw *bufio.Writer, v string) {
	if strings.ContainsAny(v, "\r\n") {
		v = strings.NewReplacer("\r", " ", "\n", " ").Replace(v)
	}
	bw.WriteString(strings.Trim(v, " \t"))
}

// sendHead puts the status line and header in the write buffer.
func (w *h1Response) sendHead() {
	w.headSent = true
	w.writeStatus(w.status)
	w.writeFields(true)
	bw := w.c.bw
	if _, ok := w.header["Date"]; !ok {
		bw.WriteString("Date: ")
		bw.WriteString(httpDate()[0])
		bw.WriteString("\r\n")
	}
	if w.chunked {
		bw.WriteString("Transfer-Encoding: chunked\r\n")
	}
	if w.closeAfter && w.header.Get("Connection") == "" {
		bw.WriteString("Connection: close\r\n")
	}
	bw.WriteString("\r\n")
}

func (w *h1Response) Write(p []byte) (int, error) {
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	if w.err != nil {
		return 0, w.err
	}
	if w.noBody {
		if w.req.Method == http.MethodHead {
			return len(p), nil // net/http discards a HEAD response's body
		}
		return 0, http.ErrBodyNotAllowed
	}
	if w.declared >= 0 && w.written+int64(len(p)) > w.declared {
		return 0, http.ErrContentLength
	}
	if len(p) == 0 {
		return 0, nil
	}
	if !w.headSent {
		// No type is sniffed for a body without one: the header goes
		// as the handler left it (the exchange keeps net/http's
		// servers from sniffing too, see exchange.WriteHeader).
		w.sendHead()
	}
	bw := w.c.bw
	if w.chunked {
		bw.WriteString(strconv.FormatInt(int64(len(p)), 16))
		bw.WriteString("\r\n")
	}
	n, err := bw.Write(p)
	if w.chunked && err == nil {
		_, err = bw.WriteString("\r\n")
	}
	w.written += int64(n)
	if err != nil {
		w.err = err
	}
	return n, err
}

// FlushError sends what is buffered, the head first; http.Flusher and
// http.ResponseController reach it.
func (w *h1Response) FlushError() error {
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	if !w.headSent {
		w.sendHead()
	}
	return w.flush()
}

func (w *h1Response) Flush() { w.FlushError() }

func (w *h1Response) flush() error {
	if w.err != nil {
		return w.err
	}
	if err := w.c.bw.Flush(); err != nil {
		w.err = err
	}
	return w.err
}

// SetReadDeadline and SetWriteDeadline are http.ResponseController's (the
// exchange watchdog's); the connection does not outlive them.
func (w *h1Response) SetReadDeadline(t time.Time) error {
	w.deadlines = true
	return w.c.nc.SetReadDeadline(t)
}

func (w *h1Response) SetWriteDeadline(t time.Time) error {
	w.deadlines = true
	return w.c.nc.SetWriteDeadline(t)
}

// finish ends the response after the handler and reports whether the
// connection may carry another request.
func (w *h1Response) finish() bool {
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	if !w.headSent {
		if w.chunked && w.written == 0 {
			// Nothing was written: a length, as net/http gives it.
			w.chunked = false
			if w.req.Method != http.MethodHead {
				w.header["Content-Length"] = []string{"0"}
			}
		}
		w.sendHead()
	}
	bw := w.c.bw
	if w.chunked && w.err == nil {
		bw.WriteString("0\r\n")
		for _, k := range w.trailers {
			for _, v := range w.header[k] {
				bw.WriteString(k)
				bw.WriteString(": ")
				writeFieldValue(bw, v)
				bw.WriteString("\r\n")
			}
		}
		for k, vv := range w.header {
			name, ok := strings.CutPrefix(k, http.TrailerPrefix)
			if !ok || !httpguts.ValidHeaderFieldName(name) {
				continue
			}
			for _, v := range vv {
				bw.WriteString(name)
				bw.WriteString(": ")
				writeFieldValue(bw, v)
				bw.WriteString("\r\n")
			}
		}
		bw.WriteString("\r\n")
	}
	if w.flush() != nil {
		return false
	}
	if w.declared >= 0 && w.written < w.declared && !w.noBody {
		return false // a short body: only closing tells the client
	}
	return !w.closeAfter && !w.deadlines
}

// handoffListener is the listener of net/http's HTTP/1 server: it accepts
// the connections the front hands over.
type handoffListener struct {
	addr net.Addr
	ch   chan net.Conn
	done chan struct{}
	once sync.Once
}

func newHandoffListener(addr net.Addr) *handoffListener {
	return &handoffListener{addr: addr, ch: make(chan net.Conn), done: make(chan struct{})}
}

func (l *handoffListener) handoff(c net.Conn) {
	select {
	case l.ch <- c:
	case <-l.done:
		c.Close()
	}
}

func (l *handoffListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.ch:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *handoffListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *handoffListener) Addr() net.Addr { return l.addr }

// replayConn is a connection handed to net/http: reads return what the
// front had read first.
type replayConn struct {
	net.Conn
	buf []byte
}

func (c *replayConn) Read(p []byte) (int, error) {
	if len(c.buf) > 0 {
		n := copy(p, c.buf)
		c.buf = c.buf[n:]
		if len(c.buf) == 0 {
			c.buf = nil
		}
		return n, nil
	}
	return c.Conn.Read(p)
}
