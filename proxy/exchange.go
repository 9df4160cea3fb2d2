package proxy

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/textproto"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// exchange wraps one proxied request: it counts the bytes each way for the
// access log and, for plain HTTP, runs the idle watchdog that cuts an
// exchange in which no byte has moved either way for PROXY_IDLE_TIMEOUT.
// It is the http.ResponseWriter the ReverseProxy writes to; Unwrap gives
// http.ResponseController (flush, hijack, deadlines) the real one.
type exchange struct {
	http.ResponseWriter
	req   *http.Request
	start time.Time
	kind  string // h1, h2, grpc or ws, for the access log

	status      int
	wroteHeader bool
	// declared is the Content-Length of the response, -1 if none: once
	// that many bytes are written, flushing is left to the handler's end,
	// which then sends the last bytes and the end of the response together.
	declared int64
	sent     atomic.Bool // wroteHeader, for the watchdog's goroutine
	bytesOut int64
	bytesIn  atomic.Int64
	// bodyFailed is set when reading the request body failed other than
	// by its end: the client's fault, answered 400 rather than 502.
	bodyFailed atomic.Bool

	// Watchdog state. last is the UnixNano of the last byte moved.
	idle   time.Duration
	last   atomic.Int64
	timer  *time.Timer
	mu     sync.Mutex // held by check while it uses the ResponseWriter
	done   atomic.Bool
	cancel context.CancelCauseFunc
	// bodyOpen: a request body is being read and has not ended.
	bodyOpen atomic.Bool
	// refused: the proxy answered the request itself, before anything
	// went to Cells (400, 421, 405, 413, no gRPC upstream): no answer for
	// the rapid-reset guard, which must not let such answers buy resets
	// (found by review: one CONNECT bought two resets, without end).
	refused bool
	// probe: the proxy's own readiness probe come back (CELLS_UPSTREAM
	// leads to the proxy): no access line, the probe's ERROR says it.
	probe bool
	// grpc: the call's stream from Cells, once it answered (the drain's
	// gRPC cut leaves a call whose answer from Cells is complete).
	grpc atomic.Pointer[grpcStream]

	out    outbound // the request to Cells, on the direct path
	gather gather   // its response body on the way (relayGathered)

	// closeConn: the proxy decided that the client's HTTP/1 connection
	// closes after this answer (closeAfter); the final header says so
	// even if a 1xx from Cells cleared the header map in between.
	closeConn bool
}

func (e *exchange) Unwrap() http.ResponseWriter { return e.ResponseWriter }

func (e *exchange) WriteHeader(code int) {
	if code < 200 && code != http.StatusSwitchingProtocols {
		// Cells is working on it (102 Processing) or has hints (103):
		// the exchange is not idle, even when the client is HTTP/1.0
		// and gets none of it.
		e.touch()
	}
	if code == http.StatusContinue {
		// Cells' 100 Continue answers the proxy's Expect, not the
		// client's: the client's comes from the proxy's own server (net/
		// http's, HTTP/1.1 and HTTP/2) when the proxy first reads the
		// body, which http.Transport does once Cells' 100 has come or
		// ExpectContinueTimeout has passed. Passed on as well, it made a
		// second 100 whenever the proxy's went first, which older S3
		// SDKs and proxies in front mishandle.
		return
	}
	if code < 200 && code != http.StatusSwitchingProtocols && e.req != nil && !e.req.ProtoAtLeast(1, 1) {
		// RFC 9110, section 15.2: no 1xx to an HTTP/1.0 client, which
		// would take it for the answer. Cells got HTTP/1.1 from us.
		return
	}
	if code < 200 && e.req != nil && e.req.ProtoMajor == 2 && e.bodyOpen.Load() && e.bytesIn.Load() == 0 {
		// net/http's HTTP/2 server sends the client's 100 Continue at
		// the first read of the body, and none once a header frame has
		// gone out on the stream, a 1xx included (golang.org/issue/
		// 14030); it also takes Expect out of the request, so the
		// proxy cannot tell who asked. A 1xx from Cells that beat the
		// proxy's first read would leave a client that waits for its
		// 100 (curl, S3 SDKs) waiting for its own timeout. Until a read
		// has returned body bytes, and so the 100 went first, a 1xx is
		// dropped: the final response still comes, and Cells sends no
		// 103 Early Hints, whose use is for pages, not uploads.
		return
	}
	if code < 200 && code != http.StatusSwitchingProtocols {
		// A 1xx from Cells, passed on by either path with Cells' header
		// (ReverseProxy's rule, which leaves out the hop-by-hop step it
		// takes for the final response): its Connection fields are Cells'
		// hop, and make the response malformed to an HTTP/2 client.
		removeHopByHop(e.Header())
	}
	if code >= 200 && !e.wroteHeader {
		if e.closeConn {
			e.Header().Set("Connection", "close")
		}
		e.status, e.wroteHeader = code, true
		e.declared = -1
		if _, typed := e.Header()["Content-Type"]; !typed {
			// Cells gave no type: none goes to the client. net/http's
			// servers (HTTP/1.1 after a hand-over, HTTP/2) sniff one
			// for a body written without the key, and leave it out
			// when the key is there with no value. RFC 9110, section
			// 8.3 leaves the guess to the recipient, nosniff asks that
			// none be made, and a guessed text/html renders what Cells
			// served as data. Every path, ReverseProxy's included (its
			// copy of the header drops a key without values, so
			// ModifyResponse cannot do this), writes the header here;
			// the proxy's own answers set their type. Cells' usual
			// answer has one: a map look-up, nothing stored.
			e.Header()["Content-Type"] = nil
		}
		if cl := e.Header().Get("Content-Length"); cl != "" {
			if n, err := strconv.ParseInt(cl, 10, 64); err == nil {
				e.declared = n
			}
		}
		e.sent.Store(true)
	}
	e.ResponseWriter.WriteHeader(code)
}

func (e *exchange) Write(p []byte) (int, error) {
	if !e.wroteHeader {
		e.WriteHeader(http.StatusOK)
	}
	n, err := e.ResponseWriter.Write(p)
	if n > 0 {
		e.bytesOut += int64(n)
		e.touch()
	}
	return n, err
}

// FlushError is what http.ResponseController and ReverseProxy's immediate
// flushing (FlushInterval -1) call. Some flushes only cost a write system
// call (and, on HTTP/2, a frame) of their own and are left to what follows:
//
//   - the headers of a response with a declared length, which relay (and
//     ReverseProxy, from a timer) flushes before the body: they leave with
//     the first body bytes, which are flushed as soon as they are written;
//   - a response whose declared length has been written in full: the
//     handler's end flushes it, on HTTP/2 with END_STREAM in the same frame;
//   - the headers of a gRPC Trailers-Only response (grpc-status in the
//     headers: Cells' answer to a call that fails at once), which must be
//     one HEADERS frame that ends the stream: grpc-go ignores a grpc-status
//     in headers that do not end it, and fails the call with Internal
//     "server closed the stream without sending trailers".
//
// Every partial body is flushed at once, so streaming is unchanged.
func (e *exchange) FlushError() error {
	if e.declared >= 0 && (e.bytesOut == 0 || e.bytesOut >= e.declared) {
		return nil
	}
	if e.kind == "grpc" && e.bytesOut == 0 && e.Header().Get("Grpc-Status") != "" {
		return nil
	}
	return http.NewResponseController(e.ResponseWriter).Flush()
}

func (e *exchange) touch() {
	if e.timer != nil {
		e.last.Store(time.Now().UnixNano())
	}
}

// watch starts the idle watchdog and returns the context to forward with,
// which ends with errIdle when it fires.
func (e *exchange) watch(parent context.Context, idle time.Duration) context.Context {
	ctx, cancel := context.WithCancelCause(parent)
	e.idle, e.cancel = idle, cancel
	e.last.Store(time.Now().UnixNano())
	e.timer = time.AfterFunc(idle, e.check)
	return ctx
}

func (e *exchange) check() {
	// The ResponseWriter must not be touched once the handler has
	// returned (HTTP/2 recycles it): stop takes mu before it returns.
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.done.Load() {
		return
	}
	quiet := time.Duration(time.Now().UnixNano() - e.last.Load())
	if quiet < e.idle {
		e.timer.Reset(e.idle - quiet)
		return
	}
	// Read before cancelling: the cancellation wakes the handler, whose
	// 504 must not count as a response already under way.
	sent := e.sent.Load()
	e.cancel(errIdle)
	// Unblock a read from, or a write to, a client that stopped moving:
	// cancelling the upstream side alone would leave them waiting. Before
	// the response has started, the client must still get its 504: a
	// passed write deadline would break that (HTTP/2 resets the stream,
	// TLS is left unusable), so only reads are cut then.
	// Only a request body still being read needs its read cut: on
	// HTTP/1.1 a read deadline also cancels the connection's context,
	// which would fail the next request on it (the 504 then closes it).
	rc := http.NewResponseController(e.ResponseWriter)
	now := time.Now()
	if e.bodyOpen.Load() {
		_ = rc.SetReadDeadline(now)
	}
	if sent {
		_ = rc.SetWriteDeadline(now)
	}
}

// stop ends the watchdog. Safe to call when none runs.
func (e *exchange) stop() {
	e.mu.Lock()
	e.done.Store(true)
	e.mu.Unlock()
	if e.timer != nil {
		e.timer.Stop()
	}
	if e.cancel != nil {
		e.cancel(context.Canceled)
	}
}

// countingBody counts request body bytes and feeds the watchdog.
type countingBody struct {
	io.ReadCloser
	ex     *exchange
	closed atomic.Bool // by the proxy (a gRPC call's stream, the transport)
}

// Close closes the body for the proxy's own reasons: Cells' side of the call
// failed, or the call is over. A read that this ends, the copy's to Cells
// waiting for the client's next bytes, is no failure of the client's.
func (b *countingBody) Close() error {
	b.closed.Store(true)
	return b.ReadCloser.Close()
}

func (b *countingBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if n > 0 {
		b.ex.bytesIn.Add(int64(n))
		b.ex.touch()
	}
	if err != nil {
		b.ex.bodyOpen.Store(false)
		if err != io.EOF && !b.closed.Load() {
			b.ex.bodyFailed.Store(true)
		}
	}
	return n, err
}

// logAccess writes the access log line. Secrets in the query are redacted;
// headers are not logged at all.
func (e *exchange) logAccess(log *slog.Logger) {
	status := e.status
	if status == 0 {
		status = statusClientClosed
	}
	r := e.req
	out := e.bytesOut
	if r.Method == http.MethodHead {
		out = 0 // net/http's servers discard a HEAD response's body
	}
	// On the stack (the slice does not escape): the optional grpc_status
	// costs other requests nothing.
	attrs := make([]slog.Attr, 0, 11)
	attrs = append(attrs,
		slog.String("proto", e.kind),
		slog.String("method", r.Method),
		slog.String("host", r.Host),
		slog.String("path", redactPath(r)),
		slog.Int("status", status),
	)
	if e.kind == "grpc" {
		// gRPC answers HTTP 200 even for a failed call: the status the
		// client was sent is what tells a failed Cells Sync call.
		if code, ok := e.grpcStatus(); ok {
			attrs = append(attrs, slog.Int("grpc_status", code))
		}
	}
	attrs = append(attrs,
		slog.Int64("bytes_in", e.bytesIn.Load()),
		slog.Int64("bytes_out", out),
		slog.Duration("duration", time.Since(e.start)),
		slog.String("client", r.RemoteAddr),
	)
	log.LogAttrs(r.Context(), slog.LevelInfo, "request", attrs...)
}

// grpcStatus is the gRPC status code of the call's answer, ok false when
// the client gets none: it went away or reset the stream, or the answer
// carries none. Every answer goes through the exchange's header map (Cells'
// relayed by relayHeader and relayTrailer, the proxy's own by
// writeGRPCStatus and endBroken), and the handler has not returned yet, so
// the map is still the one net/http sends the trailers from: grpc-status
// in the headers (Trailers-Only, or a trailer Cells declared) or under
// http.TrailerPrefix (one it did not).
//
// The client reads the status from the call's last HEADERS, as grpc-go's
// does: a grpc-status Cells put in its response head as well is not the
// call's, so the trailer's comes first, and of several values the last.
// A value that is not a number is UNKNOWN, as grpc-go's client takes it.
func (e *exchange) grpcStatus() (int, bool) {
	if e.status == 0 || e.status == statusClientClosed || e.req.Context().Err() != nil {
		return 0, false
	}
	h := e.Header()
	vv := h[http.TrailerPrefix+"Grpc-Status"]
	if len(vv) == 0 {
		vv = h["Grpc-Status"]
	}
	if len(vv) == 0 {
		return 0, false
	}
	code, err := strconv.ParseInt(vv[len(vv)-1], 10, 32)
	if err != nil {
		return 2, true // UNKNOWN
	}
	return int(code), true
}

// secretParams are query parameters that carry credentials: Cells' JWT and
// the parts of an S3 presigned URL that would let a log reader replay it,
// SigV4's and SigV2's (s3cmd signurl, rclone with v2_auth).
var secretParams = []string{"pydio_jwt", "x-amz-signature", "x-amz-credential", "x-amz-security-token",
	"signature", "awsaccesskeyid", "access_token", "id_token", "code"}

// redactPath is the request path and query with secret values replaced.
func redactPath(r *http.Request) string {
	p := requestPath(r)
	q := r.URL.RawQuery
	if q == "" {
		return p
	}
	var b strings.Builder
	b.Grow(len(p) + 1 + len(q))
	b.WriteString(p)
	b.WriteByte('?')
	// Parameters end at '&' or ';': Go's url.ParseQuery rejects ';', but
	// other servers split on it and the value is a credential either way.
	for len(q) > 0 {
		kv := q
		sep := strings.IndexAny(q, "&;")
		if sep >= 0 {
			kv, q = q[:sep], q[sep:]
		} else {
			q = ""
		}
		k, _, hasValue := strings.Cut(kv, "=")
		if hasValue && isSecretParam(k) {
			b.WriteString(k)
			b.WriteString("=REDACTED")
		} else {
			b.WriteString(kv)
		}
		if sep >= 0 {
			b.WriteByte(q[0])
			q = q[1:]
		}
	}
	return b.String()
}

// isSecretParam reports whether query key k names a credential. The key is
// compared unescaped, as servers read it: X%2DAmz%2DSignature is
// X-Amz-Signature to S3.
func isSecretParam(k string) bool {
	if u, err := url.QueryUnescape(k); err == nil {
		k = u
	}
	for _, s := range secretParams {
		if strings.EqualFold(k, s) {
			return true
		}
	}
	return false
}

// logErr is err as a log line gives it: without the header line of Cells'
// answer that textproto's errors quote whole (a malformed Set-Cookie with a
// session, a token in a malformed trailer), only what is wrong with it.
// Only errors take this path.
func logErr(err error) string {
	var pe textproto.ProtocolError
	if !errors.As(err, &pe) {
		return err.Error()
	}
	what, _, _ := strings.Cut(string(pe), ":")
	return strings.Replace(err.Error(), string(pe), what+" (the line is not logged)", 1)
}

// pool is a typed sync.Pool.
type pool[T any] struct{ p sync.Pool }

func newPool[T any](mk func() T) *pool[T] {
	return &pool[T]{p: sync.Pool{New: func() any { return mk() }}}
}

func (p *pool[T]) Get() T  { return p.p.Get().(T) }
func (p *pool[T]) Put(x T) { p.p.Put(x) }

// httpDate is the Date field of a response sent now, made once a second:
// net/http's HTTP/2 server formats one for every response that has none
// (gRPC responses have none), and that formatting is about 1% of the CPU
// of a gRPC call. The slice is shared by every response of that second
// and never written to.
func httpDate() []string {
	now := time.Now()
	sec := now.Unix()
	if d := dates.Load(); d != nil && d.sec == sec {
		return d.value
	}
	d := &date{sec: sec, value: []string{now.UTC().Format(http.TimeFormat)}}
	dates.Store(d)
	return d.value
}

type date struct {
	sec   int64
	value []string
}

var dates atomic.Pointer[date]
