package proxy

// Hostile clients (issue 4, "Hardened like the most trusted proxies"):
// request smuggling, oversize heads, HTTP/2 rapid reset and CONTINUATION
// floods, attempts to use cells-proxy as an open proxy, and forged
// forwarding headers. Every case checks what the client got and what the
// upstream saw.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/types/known/emptypb"
)

// wire is what an upstream saw of one request, body errors included: the
// harness recorder ignores them, and they are the point here.
type wire struct {
	Method     string
	Host       string
	RequestURI string
	Header     http.Header
	Trailer    http.Header
	Body       []byte
	BodyErr    error // nil: the body ended cleanly
}

// wireRecorder is an upstream handler that records every request, reading
// its body to the end or to an error, and answers 200 "ok".
type wireRecorder struct {
	mu   sync.Mutex
	reqs []wire
	// Respond, when set, answers instead of the 200 "ok".
	Respond func(w http.ResponseWriter, r *http.Request)
}

func (rec *wireRecorder) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(r.Body)
	rec.mu.Lock()
	rec.reqs = append(rec.reqs, wire{r.Method, r.Host, r.RequestURI, r.Header.Clone(), r.Trailer.Clone(), body, err})
	rec.mu.Unlock()
	if rec.Respond != nil {
		rec.Respond(w, r)
		return
	}
	if err != nil {
		// A body that broke is never answered as a success.
		http.Error(w, "body: "+err.Error(), http.StatusBadRequest)
		return
	}
	io.WriteString(w, "ok")
}

func (rec *wireRecorder) all() []wire {
	rec.mu.Lock()
	defer rec.mu.Unlock()
	return append([]wire(nil), rec.reqs...)
}

func (rec *wireRecorder) count(pathPrefix string) int {
	n := 0
	for _, w := range rec.all() {
		if strings.HasPrefix(w.RequestURI, pathPrefix) {
			n++
		}
	}
	return n
}

// quiesce stops the proxy and then the upstream, waiting for their
// handlers, so that everything that reached the upstream is recorded.
func quiesce(t *testing.T, tp *testProxy, up *testUpstream) {
	t.Helper()
	if err := tp.Shutdown(); err != nil {
		t.Errorf("proxy Run: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := up.Srv.Shutdown(ctx); err != nil {
		t.Errorf("upstream shutdown: %v", err)
	}
}

// rawResult is what a raw HTTP/1.1 client read back.
type rawResult struct {
	Responses []*http.Response // bodies already read into Bodies
	Bodies    []string
	Closed    bool  // the proxy closed the connection (EOF or reset)
	Err       error // the read error that ended the exchange
}

func (r rawResult) statuses() []int {
	var s []int
	for _, res := range r.Responses {
		s = append(s, res.StatusCode)
	}
	return s
}

// rawExchange writes raw to a new TLS connection to the proxy, while
// reading every response until the proxy closes or 10 s pass. The write
// runs on its own so that a proxy which answers and closes before reading
// everything (a 431, say) does not block the test.
func rawExchange(t *testing.T, tp *testProxy, raw string) rawResult {
	t.Helper()
	conn := tp.dialRaw(t, tp.Addr().String(), "http/1.1")
	wrote := make(chan struct{})
	go func() {
		defer close(wrote)
		io.WriteString(conn, raw)
	}()
	defer func() { conn.Close(); <-wrote }()
	var res rawResult
	br := bufio.NewReader(conn)
	for {
		r, err := http.ReadResponse(br, nil)
		if err != nil {
			res.Err = err
			break
		}
		b, err := io.ReadAll(r.Body)
		r.Body.Close()
		res.Responses = append(res.Responses, r)
		res.Bodies = append(res.Bodies, string(b))
		if err != nil {
			res.Err = err
			break
		}
	}
	var ne net.Error
	res.Closed = !(errors.As(res.Err, &ne) && ne.Timeout())
	return res
}

// smuggled is appended to every smuggling attempt: it must never reach the
// upstream, whichever way the bytes before it are framed.
const smuggled = "GET /smuggled HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"

// TestH1Smuggling sends ambiguous or malformed HTTP/1.1 framing followed by
// a second request. In every case the client gets one answer and the
// connection is closed, and the second request never reaches Cells. The
// layer column records who decides: Go's net/http server (before the proxy
// sees the request) or cells-proxy's forwarder.
func TestH1Smuggling(t *testing.T) {
	t.Parallel()
	const head = "POST /a HTTP/1.1\r\nHost: 127.0.0.1\r\n"
	// The classic TE.CL attack: a front framing by Content-Length would
	// take the chunk as a second request.
	const inner = "GPOST /smuggled-inner HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 15\r\n\r\nx=1"
	// How the upstream must have seen the first request.
	const (
		upNone      = iota // nothing reached it
		upReframed         // one request, framed by its chunks, no Content-Length
		upBodyError        // at most the head, whose body then failed
	)
	tests := []struct {
		name   string
		raw    string
		layer  string
		status []int // accepted statuses of the one response
		up     int
		body   string // for upReframed
	}{
		// Both Transfer-Encoding and Content-Length: RFC 9112, section 6.1
		// lets a server process by Transfer-Encoding alone but then it MUST
		// close the connection. Go frames by the chunks and drops
		// Content-Length; cells-proxy closes.
		{"CL+TE", head + "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "cells-proxy", []int{200}, upReframed, ""},
		{"TE+CL", head + "Transfer-Encoding: chunked\r\nContent-Length: 35\r\n\r\n5\r\nhello\r\n0\r\n\r\n", "cells-proxy", []int{200}, upReframed, "hello"},
		{"CL+TE smuggled in body", head + "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n" + oneChunk(inner) + "0\r\n\r\n", "cells-proxy", []int{200}, upReframed, inner},
		{"CL+TE OWS value", head + "Content-Length: 5\r\nTransfer-Encoding:  chunked \r\n\r\n0\r\n\r\n", "cells-proxy", []int{200}, upReframed, ""},
		{"CL+TE tab value", head + "Content-Length: 5\r\nTransfer-Encoding:\tchunked\r\n\r\n0\r\n\r\n", "cells-proxy", []int{200}, upReframed, ""},
		{"CL+TE obs-fold", head + "Content-Length: 5\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n", "cells-proxy", []int{200}, upReframed, ""},
		// Transfer-Encoding on HTTP/1.0 is ignored by Go (it frames by
		// Content-Length); a front that honoured it would frame otherwise.
		{"HTTP/1.0 TE+CL keep-alive", "POST /a HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n", "cells-proxy", []int{200}, upReframed, "0\r\n"},
		// Without Content-Length, Go takes such a request for one without
		// a body, and nothing the handler sees tells it from one that
		// never had Transfer-Encoding (net/http deletes the field): a
		// front that honoured it would take what follows for the body.
		// RFC 9112, section 6.1: the framing is faulty, the connection
		// MUST close after the answer.
		{"HTTP/1.0 TE keep-alive", "POST /a HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n", "cells-proxy", []int{200}, upReframed, ""},
		{"HTTP/1.0 GET TE keep-alive", "GET /a HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n", "cells-proxy", []int{200}, upReframed, ""},
		// Chunk extensions are ignored (RFC 9112, section 7.1.1) and never
		// forwarded: the upstream sees the chunks re-framed.
		{"chunk extension junk", head + "Transfer-Encoding: chunked\r\n\r\n5;\x01x=\"\x7f\r\nhello\r\n0\r\n\r\n", "cells-proxy", []int{200}, upReframed, "hello"},
		// A Content-Length in the trailer section is not a framing header.
		{"trailer Content-Length", head + "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nContent-Length: 50\r\n\r\n", "cells-proxy", []int{200}, upReframed, "hello"},

		{"CL list", head + "Content-Length: 5, 6\r\n\r\nhello", "net/http", []int{400}, upNone, ""},
		{"CL twice differing", head + "Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello", "net/http", []int{400}, upNone, ""},
		{"CL negative", head + "Content-Length: -1\r\n\r\nhello", "net/http", []int{400}, upNone, ""},
		{"CL plus sign", head + "Content-Length: +5\r\n\r\nhello", "net/http", []int{400}, upNone, ""},
		{"CL huge", head + "Content-Length: 99999999999999999999\r\n\r\nhello", "net/http", []int{400}, upNone, ""},
		{"TE xchunked", head + "Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", "net/http", []int{501}, upNone, ""},
		{"TE chunked, identity", head + "Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n", "net/http", []int{501}, upNone, ""},
		{"TE identity, chunked", head + "Transfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\n", "net/http", []int{501}, upNone, ""},
		{"TE twice", head + "Transfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n\r\n0\r\n\r\n", "net/http", []int{501}, upNone, ""},
		{"TE twice chunked", head + "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "net/http", []int{501}, upNone, ""},
		{"TE space before colon", head + "Transfer-Encoding : chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n", "net/http", []int{400}, upNone, ""},
		{"TE with NUL", head + "Transfer-Encoding: chunked\x00\r\n\r\n0\r\n\r\n", "net/http", []int{400}, upNone, ""},
		{"TE vertical tab", head + "Transfer-Encoding:\vchunked\r\n\r\n0\r\n\r\n", "net/http", []int{400, 501}, upNone, ""},
		{"obs-fold first header", "POST /a HTTP/1.1\r\n Transfer-Encoding: chunked\r\nHost: 127.0.0.1\r\n\r\n0\r\n\r\n", "net/http", []int{400}, upNone, ""},
		{"CR alone in header", head + "X: a\rTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "net/http", []int{400}, upNone, ""},
		{"space in request target", "GET /a b HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", "net/http", []int{400}, upNone, ""},
		{"no Host", "GET /a HTTP/1.1\r\n\r\n", "net/http", []int{400}, upNone, ""},
		{"two Hosts", "GET /a HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\n\r\n", "net/http", []int{400}, upNone, ""},

		// Malformed chunked bodies: the head was already forwarded (bodies
		// stream, nothing is buffered), so the upstream may see the head,
		// but its body read fails: it never sees a complete request.
		{"chunk size overflow", head + "Transfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\nhello\r\n0\r\n\r\n", "net/http body", []int{400}, upBodyError, ""},
		{"chunk size not hex", head + "Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n", "net/http body", []int{400}, upBodyError, ""},
		{"chunk size bare LF", head + "Transfer-Encoding: chunked\r\n\r\n5\nhello\n0\n\n", "net/http body", []int{400}, upBodyError, ""},
		{"chunk extension bare LF", head + "Transfer-Encoding: chunked\r\n\r\n5;a\nb\r\nhello\r\n0\r\n\r\n", "net/http body", []int{400}, upBodyError, ""},
		{"chunk data longer than size", head + "Transfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n", "net/http body", []int{400}, upBodyError, ""},
		{"chunk data shorter than size", head + "Transfer-Encoding: chunked\r\n\r\n9\r\nhello\r\n0\r\n\r\n", "net/http body", []int{400}, upBodyError, ""},
		{"trailer malformed", head + "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nBad Trailer\r\n\r\n", "net/http body", []int{400}, upBodyError, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			rec := &wireRecorder{}
			up := newUpstream(t, upTLS, rec)
			tp := startProxy(t, testConfig(up))
			got := rawExchange(t, tp, tt.raw+smuggled)
			quiesce(t, tp, up)

			t.Logf("layer %s: client got %v", tt.layer, got.statuses())
			if len(got.Responses) != 1 {
				t.Fatalf("client got %d responses %v, want exactly 1", len(got.Responses), got.statuses())
			}
			if s := got.Responses[0].StatusCode; !containsInt(tt.status, s) {
				t.Errorf("status = %d, want one of %v", s, tt.status)
			}
			if !got.Closed {
				t.Errorf("connection still open after the answer (read ended with %v), want it closed", got.Err)
			}
			seen := rec.all()
			for _, w := range seen {
				if strings.Contains(w.RequestURI, "smuggled") || bytes.Contains(w.Body, []byte("GET /smuggled")) {
					t.Errorf("the smuggled request reached the upstream: %s %s", w.Method, w.RequestURI)
				}
			}
			switch tt.up {
			case upNone:
				if len(seen) != 0 {
					t.Errorf("upstream saw %d requests, want none", len(seen))
				}
			case upReframed:
				if len(seen) != 1 {
					t.Fatalf("upstream saw %d requests, want 1", len(seen))
				}
				w := seen[0]
				if w.BodyErr != nil {
					t.Errorf("upstream body error: %v", w.BodyErr)
				}
				if got, want := string(w.Body), tt.body; got != want {
					t.Errorf("upstream body = %q, want %q", got, want)
				}
				if cl := w.Header.Values("Content-Length"); strings.HasPrefix(tt.raw, "POST /a HTTP/1.1") && len(cl) > 0 {
					t.Errorf("upstream got Content-Length %q next to chunked framing", cl)
				}
				if cl := w.Trailer.Values("Content-Length"); len(cl) > 0 {
					t.Errorf("upstream got a trailer Content-Length %q", cl)
				}
			case upBodyError:
				for _, w := range seen {
					if w.BodyErr == nil {
						t.Errorf("upstream read a complete body %q for %s %s, want a body error", w.Body, w.Method, w.RequestURI)
					}
				}
			}
		})
	}
}

// oneChunk frames s as one chunk of a chunked body.
func oneChunk(s string) string { return strconv.FormatInt(int64(len(s)), 16) + "\r\n" + s + "\r\n" }

func containsInt(s []int, v int) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

// TestH1LenientSyntax covers what Go's parser accepts where a strict
// front might not: bare LF line ends (RFC 9112, section 2.2: a recipient
// MAY accept them; nginx does too) and obs-fold continuation lines
// (section 5.2: replaced by a space). Whatever was accepted reaches the
// upstream re-serialized, with CRLF and single-line values, so the upstream
// and the proxy cannot disagree on it.
func TestH1LenientSyntax(t *testing.T) {
	t.Parallel()
	rec := &wireRecorder{}
	up := newUpstream(t, upTLS, rec)
	tp := startProxy(t, testConfig(up))
	got := rawExchange(t, tp, "GET /lf HTTP/1.1\nHost: 127.0.0.1\nX-Lf: 1\n\n"+
		"GET /fold HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Fold: a\r\n  b\r\nConnection: close\r\n\r\n")
	quiesce(t, tp, up)
	if got, want := fmt.Sprint(got.statuses()), "[200 200]"; got != want {
		t.Errorf("statuses = %s, want %s", got, want)
	}
	seen := rec.all()
	if len(seen) != 2 {
		t.Fatalf("upstream saw %d requests, want 2", len(seen))
	}
	if got, want := seen[0].Header.Get("X-Lf"), "1"; got != want {
		t.Errorf("bare LF request: upstream X-Lf = %q, want %q", got, want)
	}
	if got, want := seen[1].Header.Values("X-Fold"), []string{"a b"}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("obs-fold: upstream X-Fold = %q, want %q", got, want)
	}
}

// TestOversizeHeadH1 sends a 1 MB header and 10,000 headers over
// HTTP/1.1: 431 and the connection closed, nothing upstream.
func TestOversizeHeadH1(t *testing.T) {
	t.Parallel()
	many := new(strings.Builder)
	for i := range 10000 {
		fmt.Fprintf(many, "X-H%d: v\r\n", i)
	}
	tests := []struct {
		name, headers string
	}{
		{"1MB header", "X-Big: " + strings.Repeat("a", 1<<20) + "\r\n"},
		{"10000 headers", many.String()},
		{"just over the limit", "X-Big: " + strings.Repeat("a", 64<<10+4096) + "\r\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			rec := &wireRecorder{}
			up := newUpstream(t, upTLS, rec)
			tp := startProxy(t, testConfig(up))
			got := rawExchange(t, tp, "GET /big HTTP/1.1\r\nHost: 127.0.0.1\r\n"+tt.headers+"\r\n")
			quiesce(t, tp, up)
			if got, want := fmt.Sprint(got.statuses()), "[431]"; got != want {
				t.Errorf("statuses = %s, want %s", got, want)
			}
			if !got.Closed {
				t.Errorf("connection open 10 s after the 431 (%v), want it closed", got.Err)
			}
			if n := len(rec.all()); n != 0 {
				t.Errorf("upstream saw %d requests, want none", n)
			}
		})
	}

	t.Run("configured limit", func(t *testing.T) {
		t.Parallel()
		rec := &wireRecorder{}
		up := newUpstream(t, upTLS, rec)
		cfg := testConfig(up)
		cfg.MaxHeaderBytes = 8 << 10
		tp := startProxy(t, cfg)
		// Go allows 4 KiB of slack over MaxHeaderBytes.
		got := rawExchange(t, tp, "GET /a HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: "+strings.Repeat("a", 16<<10)+"\r\n\r\n"+
			"GET /b HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nX-Ok: "+strings.Repeat("a", 6<<10)+"\r\n\r\n")
		if got, want := fmt.Sprint(got.statuses()), "[431]"; got != want {
			t.Errorf("16 KiB head with an 8 KiB limit: statuses = %s, want %s", got, want)
		}
		got = rawExchange(t, tp, "GET /b HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nX-Ok: "+strings.Repeat("a", 6<<10)+"\r\n\r\n")
		if got, want := fmt.Sprint(got.statuses()), "[200]"; got != want {
			t.Errorf("6 KiB head with an 8 KiB limit: statuses = %s, want %s", got, want)
		}
		quiesce(t, tp, up)
		if got, want := len(rec.all()), 1; got != want {
			t.Errorf("upstream saw %d requests, want %d", got, want)
		}
	})
}

// frameConn is a frame-level HTTP/2 client over TLS (ALPN h2).
type frameConn struct {
	conn *tls.Conn
	fr   *http2.Framer
	wmu  sync.Mutex // guards fr's writes and enc
	enc  *hpack.Encoder
	ebuf bytes.Buffer

	events  chan frameEvent // frames the server sent; closed when reading ends
	readErr error           // why reading ended, valid once events is closed

	stopped   atomic.Bool   // stopReading: the read loop reads no more
	noPingAck atomic.Bool   // the read loop leaves the server's PINGs unanswered
	closing   chan struct{} // closed by Close
	closeOnce sync.Once
}

// stopReading makes the read loop stop after the frame it is reading, as a
// client that no longer reads its connection.
func (c *frameConn) stopReading() { c.stopped.Store(true) }

// frameEvent is one frame from the server, reduced to what tests look at.
type frameEvent struct {
	Type     http2.FrameType
	StreamID uint32
	Status   string        // :status of a HEADERS frame
	Code     http2.ErrCode // of RST_STREAM or GOAWAY
	Data     []byte        // of a DATA frame
	End      bool          // END_STREAM on HEADERS or DATA
	LastID   uint32        // of a GOAWAY
}

// String is how tests print an answer: ":status 200", "RST_STREAM
// PROTOCOL_ERROR", "GOAWAY FLOW_CONTROL_ERROR", "DATA 17".
func (ev frameEvent) String() string {
	switch ev.Type {
	case http2.FrameHeaders:
		return ":status " + ev.Status
	case http2.FrameRSTStream, http2.FrameGoAway:
		return ev.Type.String() + " " + ev.Code.String()
	case http2.FrameData:
		return fmt.Sprintf("DATA %d", len(ev.Data))
	}
	return ev.Type.String()
}

// dialH2 opens a frameConn to the public port with a 1 MiB stream window.
func dialH2(t testing.TB, tp *testProxy) *frameConn {
	return dialH2At(t, tp, tp.Addr().String(), http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 20})
}

// dialH2At opens a frameConn to addr, the client's SETTINGS as given.
func dialH2At(t testing.TB, tp *testProxy, addr string, settings ...http2.Setting) *frameConn {
	t.Helper()
	conn := tp.dialTLSH2(t, addr)
	c := &frameConn{conn: conn, fr: http2.NewFramer(conn, conn), events: make(chan frameEvent, 1024), closing: make(chan struct{})}
	c.enc = hpack.NewEncoder(&c.ebuf)
	c.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	c.fr.MaxHeaderListSize = 1 << 20
	if _, err := io.WriteString(conn, http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	if err := c.fr.WriteSettings(settings...); err != nil {
		t.Fatal(err)
	}
	go c.readLoop()
	t.Cleanup(func() { c.Close() })
	return c
}

func (c *frameConn) Close() {
	c.closeOnce.Do(func() { close(c.closing) })
	c.conn.Close()
	for range c.events {
	}
}

func (c *frameConn) readLoop() {
	defer close(c.events)
	for {
		if c.stopped.Load() {
			<-c.closing
			c.readErr = net.ErrClosed
			return
		}
		f, err := c.fr.ReadFrame()
		if err != nil {
			c.readErr = err
			return
		}
		ev := frameEvent{Type: f.Header().Type, StreamID: f.Header().StreamID}
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if !f.IsAck() {
				c.wmu.Lock()
				c.fr.WriteSettingsAck()
				c.wmu.Unlock()
			}
			continue
		case *http2.PingFrame:
			if !f.IsAck() && !c.noPingAck.Load() {
				c.wmu.Lock()
				c.fr.WritePing(true, f.Data)
				c.wmu.Unlock()
			}
			continue
		case *http2.WindowUpdateFrame:
			continue
		case *http2.DataFrame:
			ev.Data, ev.End = bytes.Clone(f.Data()), f.StreamEnded()
		case *http2.MetaHeadersFrame:
			ev.Status, ev.End = f.PseudoValue("status"), f.StreamEnded()
		case *http2.RSTStreamFrame:
			ev.Code = f.ErrCode
		case *http2.GoAwayFrame:
			ev.Code, ev.LastID = f.ErrCode, f.LastStreamID
		}
		select {
		case c.events <- ev:
		default: // nobody listens closely; keep reading
		}
	}
}

// block hpack-encodes header fields given as name, value pairs.
func (c *frameConn) block(kv ...string) []byte {
	c.ebuf.Reset()
	for i := 0; i+1 < len(kv); i += 2 {
		c.enc.WriteField(hpack.HeaderField{Name: kv[i], Value: kv[i+1]})
	}
	return append([]byte(nil), c.ebuf.Bytes()...)
}

// answer waits for what ends stream id's wait for an answer: its response
// HEADERS, its RST_STREAM, or a GOAWAY.
func (c *frameConn) answer(t testing.TB, id uint32) frameEvent {
	t.Helper()
	return c.wait(t, fmt.Sprintf("an answer on stream %d", id), func(ev frameEvent) bool {
		return ev.Type == http2.FrameGoAway ||
			ev.StreamID == id && (ev.Type == http2.FrameHeaders || ev.Type == http2.FrameRSTStream)
	})
}

// request sends a HEADERS frame with END_STREAM: a request without body.
func (c *frameConn) request(id uint32, kv ...string) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	return c.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: c.block(kv...), EndStream: true, EndHeaders: true})
}

// pseudo builds the pseudo-headers of a request to the proxy.
func pseudo(tp *testProxy, method, path string, extra ...string) []string {
	return h2Fields(method, tp.Addr().String(), path, extra...)
}

// wait returns the first event for which match is true, or fails once the
// connection ends or 10 s pass.
func (c *frameConn) wait(t testing.TB, what string, match func(frameEvent) bool) frameEvent {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		select {
		case ev, ok := <-c.events:
			if !ok {
				t.Fatalf("waiting for %s: connection ended: %v", what, c.readErr)
			}
			if match(ev) {
				return ev
			}
		case <-timeout:
			t.Fatalf("waiting for %s: timed out", what)
		}
	}
}

// ended reports whether the server ended the connection (GOAWAY or close)
// within 10 s, draining events.
func (c *frameConn) ended() (goaway bool, closed bool) {
	timeout := time.After(10 * time.Second)
	for {
		select {
		case ev, ok := <-c.events:
			if !ok {
				return goaway, true
			}
			if ev.Type == http2.FrameGoAway {
				goaway = true
			}
		case <-timeout:
			return goaway, false
		}
	}
}

func h2HeapInUse() uint64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapInuse
}

// TestOversizeHeadH2 sends the same oversize heads over HTTP/2, and a
// CONTINUATION flood (CVE-2023-45288): a HEADERS frame without END_HEADERS
// followed by CONTINUATION frames that never end. The stream is refused
// (431) or the connection closed, nothing reaches the upstream, and the
// flood is cut long before it is sent whole, without the proxy's heap
// growing with it.
func TestOversizeHeadH2(t *testing.T) {
	rec := &wireRecorder{}
	up := newUpstream(t, upTLS, rec)
	tp := startProxy(t, testConfig(up))

	many := pseudo(tp, "GET", "/many")
	for i := range 10000 {
		many = append(many, "x-h"+strconv.Itoa(i), "v")
	}
	for _, tt := range []struct {
		name string
		kv   []string // pseudo-headers and fields
	}{
		{"10000 headers", many},
		{"1MB header", pseudo(tp, "GET", "/big", "x-big", strings.Repeat("a", 1<<20))},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c := dialH2(t, tp)
			blk := c.block(tt.kv...)
			c.wmu.Lock()
			err := writeHeaderBlock(c.fr, 1, blk)
			c.wmu.Unlock()
			if err != nil {
				t.Logf("writing the head: %v (the server may close first)", err)
			}
			ev := c.wait(t, "431, RST_STREAM or GOAWAY", func(ev frameEvent) bool {
				return ev.Type == http2.FrameGoAway || ev.Type == http2.FrameRSTStream || ev.Status != ""
			})
			t.Logf("answer: %v, :status %q, code %v", ev.Type, ev.Status, ev.Code)
			if ev.Status != "" && ev.Status != "431" {
				t.Errorf(":status = %s, want 431 (or the stream or connection refused)", ev.Status)
			}
		})
	}

	t.Run("CONTINUATION flood", func(t *testing.T) {
		before := h2HeapInUse()
		c := dialH2(t, tp)
		// Every fragment is a valid never-indexed literal, so the server's
		// decoder has real work to do and no table to grow.
		c.wmu.Lock()
		first := c.block(pseudo(tp, "GET", "/flood")...)
		c.ebuf.Reset()
		c.enc.WriteField(hpack.HeaderField{Name: "x-flood", Value: strings.Repeat("f", 16000), Sensitive: true})
		frag := append([]byte(nil), c.ebuf.Bytes()...)
		err := c.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: first, EndStream: true})
		c.wmu.Unlock()
		if err != nil {
			t.Fatal(err)
		}
		// At most 64 MB or 10 s: the server must cut it well before.
		const limit = 64 << 20
		sent := 0
		deadline := time.Now().Add(10 * time.Second)
		c.conn.SetWriteDeadline(deadline)
		for sent < limit && time.Now().Before(deadline) {
			c.wmu.Lock()
			err = c.fr.WriteContinuation(1, false, frag)
			c.wmu.Unlock()
			if err != nil {
				break
			}
			sent += len(frag)
		}
		t.Logf("sent %d KiB of CONTINUATION before: %v", sent>>10, err)
		if err == nil {
			t.Fatalf("the proxy read %d MB of CONTINUATION frames for one stream without closing the connection", sent>>20)
		}
		goaway, closed := c.ended()
		if !closed {
			t.Errorf("connection still open 10 s after the flood (GOAWAY sent: %v)", goaway)
		}
		if grew := int64(h2HeapInUse()) - int64(before); grew > 32<<20 {
			t.Errorf("heap in use grew by %d MiB during the flood, want it bounded (< 32 MiB)", grew>>20)
		}
	})

	quiesce(t, tp, up)
	if n := len(rec.all()); n != 0 {
		t.Errorf("upstream saw %d requests, want none", n)
	}
}

// writeHeaderBlock writes blk as HEADERS and CONTINUATION frames of at most
// 16 KiB, the default SETTINGS_MAX_FRAME_SIZE.
func writeHeaderBlock(fr *http2.Framer, id uint32, blk []byte) error {
	const max = 16 << 10
	n := min(len(blk), max)
	if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: blk[:n], EndStream: true, EndHeaders: n == len(blk)}); err != nil {
		return err
	}
	for blk = blk[n:]; len(blk) > 0; blk = blk[n:] {
		n = min(len(blk), max)
		if err := fr.WriteContinuation(id, n == len(blk), blk[:n]); err != nil {
			return err
		}
	}
	return nil
}

// TestH2RapidReset opens streams and resets them at once (CVE-2023-44487),
// up to 5,000 times on one connection, while a well-behaved client uses
// another: the upstream sees at most a small share of the reset requests
// (the proxy closes the attacking connection), and the well-behaved client
// gets every answer.
func TestH2RapidReset(t *testing.T) {
	rec := &wireRecorder{}
	up := newUpstream(t, upTLS, rec)
	tp := startProxy(t, testConfig(up))

	attack := func() (pairs int, err error) {
		c := dialH2(t, tp)
		defer c.Close()
		deadline := time.Now().Add(10 * time.Second)
		c.conn.SetWriteDeadline(deadline)
		for i := 0; i < 5000 && time.Now().Before(deadline); i++ {
			id := uint32(2*i + 1)
			if err := c.request(id, pseudo(tp, "GET", "/reset/"+strconv.Itoa(i))...); err != nil {
				return pairs, err
			}
			c.wmu.Lock()
			err := c.fr.WriteRSTStream(id, http2.ErrCodeCancel)
			c.wmu.Unlock()
			if err != nil {
				return pairs, err
			}
			pairs++
		}
		return pairs, nil
	}

	var wg sync.WaitGroup
	var pairs int
	var attackErr error
	attackDone := make(chan struct{})
	wg.Go(func() {
		defer close(attackDone)
		pairs, attackErr = attack()
	})
	// The well-behaved client, on its own connection, until the attack ends
	// and at least 50 requests were made (bounded at 2,000).
	var served, failed atomic.Int32
	wg.Go(func() {
		for i := 0; i < 2000; i++ {
			select {
			case <-attackDone:
				if i >= 50 {
					return
				}
			default:
			}
			res, err := tp.H2.Get(tp.URL + "/normal")
			if err != nil {
				t.Errorf("normal client, request %d: %v", i, err)
				failed.Add(1)
				continue
			}
			io.Copy(io.Discard, res.Body)
			res.Body.Close()
			if res.StatusCode != http.StatusOK {
				t.Errorf("normal client, request %d: status %d", i, res.StatusCode)
				failed.Add(1)
				continue
			}
			served.Add(1)
		}
	})
	wg.Wait()
	tp.H2.CloseIdleConnections()
	quiesce(t, tp, up)

	reached := rec.count("/reset/")
	t.Logf("attack: %d HEADERS+RST_STREAM pairs (ended by %v); %d reached the upstream; normal client: %d served, %d failed",
		pairs, attackErr, reached, served.Load(), failed.Load())
	if reached > 250 {
		t.Errorf("%d reset requests reached the upstream, want at most 250 (MaxConcurrentStreams)", reached)
	}
	if served.Load() < 50 {
		t.Errorf("normal client got %d answers, want at least 50", served.Load())
	}
}

// TestH2RapidResetNonReader: the attacker of TestH2RapidReset first asks
// for a large download and reads none of it, so that a write to it is
// always pending. Closing the connection then left the socket open for the
// pending write's grace period while net/http's server went on reading and
// dispatching the attacker's frames (130,000 more pairs in 5 s); the guard
// closes the socket itself, and the attack ends as soon.
func TestH2RapidResetNonReader(t *testing.T) {
	rec := &wireRecorder{Respond: func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/big" {
			io.WriteString(w, "ok")
			return
		}
		w.Header().Set("Content-Length", strconv.Itoa(64<<20))
		buf := make([]byte, 32<<10)
		for n := 0; n < 64<<20; n += len(buf) {
			if _, err := w.Write(buf); err != nil {
				return
			}
		}
	}}
	up := newUpstream(t, upTLS, rec)
	tp := startProxy(t, testConfig(up))

	c := dialH2At(t, tp, tp.Addr().String(), http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1<<31 - 1})
	c.conn.SetDeadline(time.Now().Add(30 * time.Second))
	c.wmu.Lock()
	c.fr.WriteWindowUpdate(0, 1<<31-1-65535)
	c.wmu.Unlock()
	// The download fills the socket's buffers and the write-behind's:
	// the client's reader is stopped once it has seen the answer.
	if err := c.request(1, pseudo(tp, "GET", "/big")...); err != nil {
		t.Fatal(err)
	}
	c.answer(t, 1)
	c.stopReading()
	time.Sleep(500 * time.Millisecond)

	pairs := 0
	var err error
	for i := 1; i < 200_000 && err == nil; i++ {
		id := uint32(2*i + 1)
		if err = c.request(id, pseudo(tp, "GET", "/reset/"+strconv.Itoa(i))...); err == nil {
			c.wmu.Lock()
			err = c.fr.WriteRSTStream(id, http2.ErrCodeCancel)
			c.wmu.Unlock()
		}
		pairs++
	}
	c.conn.Close()
	quiesce(t, tp, up)
	t.Logf("%d pairs, ended by %v; %d reached Cells", pairs, err, rec.count("/reset/"))
	if !strings.Contains(tp.Log.String(), "rapid reset") {
		t.Fatal("the guard never fired")
	}
	// TestH2RapidReset's reading attacker gets about 1,300 pairs in; this
	// one got 130,000 more in the write's grace period.
	if pairs > 20_000 {
		t.Errorf("the connection took %d pairs before it ended", pairs)
	}
	if n := rec.count("/reset/"); n > 250 {
		t.Errorf("%d reset requests reached Cells, want at most 250", n)
	}
}

// TestH2LateCancelsBuyNoRapidResets: a cancel that comes late does not
// count as a reset (TestH2CancelsDoNotCloseTheConnection), nor as an
// answer: a client that holds streams open a while and then cancels them
// must not earn rapid resets with them. With no request ever answered,
// its rapid resets close the connection as in TestH2RapidReset.
func TestH2LateCancelsBuyNoRapidResets(t *testing.T) {
	rec := &wireRecorder{}
	up := newUpstream(t, upTLS, rec)
	tp := startProxy(t, testConfig(up))
	c := dialH2(t, tp)
	c.conn.SetWriteDeadline(time.Now().Add(30 * time.Second))
	id := uint32(1)
	var err error
	for round := 0; round < 20 && err == nil; round++ {
		// A hundred POSTs whose bodies never come, cancelled later...
		var held []uint32
		for i := 0; i < 100 && err == nil; i++ {
			c.wmu.Lock()
			err = c.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, EndHeaders: true,
				BlockFragment: c.block(pseudo(tp, "POST", "/held/"+strconv.Itoa(int(id)))...)})
			c.wmu.Unlock()
			held = append(held, id)
			id += 2
		}
		// ...and, once some were cancelled, 150 rapid resets a round.
		for i := 0; round > 0 && i < 150 && err == nil; i++ {
			if err = c.request(id, pseudo(tp, "GET", "/rapid/"+strconv.Itoa(int(id)))...); err == nil {
				c.wmu.Lock()
				err = c.fr.WriteRSTStream(id, http2.ErrCodeCancel)
				c.wmu.Unlock()
			}
			id += 2
		}
		time.Sleep(150 * time.Millisecond)
		for _, s := range held {
			if err == nil {
				c.wmu.Lock()
				err = c.fr.WriteRSTStream(s, http2.ErrCodeCancel)
				c.wmu.Unlock()
			}
		}
	}
	c.Close()
	quiesce(t, tp, up)
	if !strings.Contains(tp.Log.String(), "rapid reset") {
		t.Errorf("the guard never closed a connection none of whose requests was answered (ended by %v)", err)
	}
}

// TestH2CancelsDoNotCloseTheConnection: a browser shares one connection
// between tabs, uploads and the requests of pages; a user who leaves two
// folders of slow thumbnails cancels 150 requests, a while after they were
// made. They are not a rapid reset: the connection, and the upload on it,
// go on.
func TestH2CancelsDoNotCloseTheConnection(t *testing.T) {
	uploaded := make(chan int64, 1)
	up := newUpstream(t, upTLS, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.URL.Path == "/upload":
			n, _ := io.Copy(io.Discard, r.Body)
			uploaded <- n
			io.WriteString(w, "stored")
		case strings.HasPrefix(r.URL.Path, "/thumb/"):
			<-r.Context().Done() // a slow Cells
		default:
			io.WriteString(w, "ok")
		}
	}))
	settle(t, up)
	tp := startProxy(t, testConfig(up))
	c := tp.H2
	for range 20 { // the page itself
		res, err := c.Get(tp.URL + "/page")
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, res.Body)
		res.Body.Close()
	}
	// An upload on the same connection, held open while the user browses.
	pr, pw := io.Pipe()
	upRes := make(chan error, 1)
	go func() {
		req, _ := http.NewRequest(http.MethodPut, tp.URL+"/upload", pr)
		req.ContentLength = 1 << 20
		res, err := c.Do(req)
		if err == nil {
			io.Copy(io.Discard, res.Body)
			res.Body.Close()
			if res.StatusCode != http.StatusOK {
				err = fmt.Errorf("status %s", res.Status)
			}
		}
		upRes <- err
	}()
	pw.Write(make([]byte, 512<<10))
	for folder := range 2 {
		ctx, cancel := context.WithCancel(t.Context())
		var wg sync.WaitGroup
		for i := range 75 {
			wg.Go(func() {
				req, _ := http.NewRequestWithContext(ctx, http.MethodGet, fmt.Sprintf("%s/thumb/%d/%d", tp.URL, folder, i), nil)
				if res, err := c.Do(req); err == nil {
					res.Body.Close()
				}
			})
		}
		time.Sleep(time.Second) // the user looks, then leaves
		cancel()
		wg.Wait()
	}
	pw.Write(make([]byte, 512<<10))
	pw.Close()
	if err := <-upRes; err != nil {
		t.Errorf("the upload on the browser's connection: %v", err)
	} else if n := <-uploaded; n != 1<<20 {
		t.Errorf("Cells got %d bytes of the upload, want %d", n, 1<<20)
	}
	if strings.Contains(tp.Log.String(), "rapid reset") {
		t.Errorf("the rapid-reset guard closed the browser's connection")
	}
}

// startEvil listens like a server the attacker wants reached and counts
// the connections it gets: every test expects none.
func startEvil(t *testing.T) (addr string, conns *atomic.Int32) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	conns = new(atomic.Int32)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			conns.Add(1)
			c.Close()
		}
	}()
	t.Cleanup(func() { ln.Close(); <-done })
	return ln.Addr().String(), conns
}

// TestOpenProxy tries to make cells-proxy reach another server: absolute
// request targets, CONNECT over HTTP/1.1 and HTTP/2, a Host or :authority
// naming another server. Only the configured upstream is ever contacted;
// CONNECT gets 405, since Cells has no use for it; everything else reaches
// Cells with the client's Host, as Cells needs.
func TestOpenProxy(t *testing.T) {
	t.Parallel()
	evil, evilConns := startEvil(t)
	rec := &wireRecorder{}
	up := newUpstream(t, upTLS, rec)
	tp := startProxy(t, testConfig(up))

	h1 := []struct {
		name      string
		raw       string
		status    int
		uri, host string // what the upstream must see; uri "": nothing
	}{
		{"absolute-form http", "GET http://" + evil + "/steal?x=1 HTTP/1.1\r\nHost: " + evil + "\r\nConnection: close\r\n\r\n", 200, "/steal?x=1", evil},
		{"absolute-form https, other Host", "GET https://" + evil + "/steal HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n", 200, "/steal", evil},
		{"absolute-form no path", "GET http://" + evil + " HTTP/1.1\r\nHost: " + evil + "\r\nConnection: close\r\n\r\n", 200, "/", evil},
		{"absolute-form userinfo", "GET http://user:pw@" + evil + "/steal HTTP/1.1\r\nHost: " + evil + "\r\nConnection: close\r\n\r\n", 200, "/steal", evil},
		{"Host names another server", "GET /steal HTTP/1.1\r\nHost: " + evil + "\r\nConnection: close\r\n\r\n", 200, "/steal", evil},
		{"scheme-relative path", "GET //" + evil + "/steal HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n", 200, "//" + evil + "/steal", "127.0.0.1"},
		{"CONNECT authority-form", "CONNECT " + evil + " HTTP/1.1\r\nHost: " + evil + "\r\n\r\n", 405, "", ""},
		{"CONNECT absolute-form", "CONNECT http://" + evil + "/ HTTP/1.1\r\nHost: " + evil + "\r\n\r\n", 405, "", ""},
	}
	for _, tt := range h1 {
		t.Run("h1/"+tt.name, func(t *testing.T) {
			before := len(rec.all())
			got := rawExchange(t, tp, tt.raw)
			if len(got.Responses) == 0 {
				t.Fatalf("no response: %v", got.Err)
			}
			if got, want := got.Responses[0].StatusCode, tt.status; got != want {
				t.Errorf("status = %d, want %d", got, want)
			}
			seen := rec.all()[before:]
			if tt.uri == "" {
				if len(seen) != 0 {
					t.Errorf("upstream saw %s %s, want nothing", seen[0].Method, seen[0].RequestURI)
				}
				return
			}
			if len(seen) != 1 {
				t.Fatalf("upstream saw %d requests, want 1", len(seen))
			}
			if got, want := seen[0].RequestURI, tt.uri; got != want {
				t.Errorf("upstream request-target = %q, want %q", got, want)
			}
			if got, want := seen[0].Host, tt.host; got != want {
				t.Errorf("upstream Host = %q, want %q", got, want)
			}
		})
	}

	t.Run("h2/CONNECT", func(t *testing.T) {
		before := len(rec.all())
		c := dialH2(t, tp)
		if err := c.request(1, ":method", "CONNECT", ":authority", evil); err != nil {
			t.Fatal(err)
		}
		ev := c.wait(t, "the answer to CONNECT", func(ev frameEvent) bool { return ev.StreamID == 1 })
		if got, want := ev.Status, "405"; got != want {
			t.Errorf("CONNECT :status = %q (frame %v, code %v), want %q", got, ev.Type, ev.Code, want)
		}
		if seen := rec.all()[before:]; len(seen) != 0 {
			t.Errorf("upstream saw %s %s, want nothing", seen[0].Method, seen[0].RequestURI)
		}
	})

	t.Run("h2/authority names another server", func(t *testing.T) {
		before := len(rec.all())
		c := dialH2(t, tp)
		if err := c.request(1, ":method", "GET", ":scheme", "https", ":authority", evil, ":path", "/steal"); err != nil {
			t.Fatal(err)
		}
		ev := c.wait(t, "the answer", func(ev frameEvent) bool { return ev.StreamID == 1 })
		if got, want := ev.Status, "200"; got != want {
			t.Errorf(":status = %q, want %q", got, want)
		}
		seen := rec.all()[before:]
		if len(seen) != 1 {
			t.Fatalf("upstream saw %d requests, want 1", len(seen))
		}
		if got, want := seen[0].Host, evil; got != want {
			t.Errorf("upstream Host = %q, want %q", got, want)
		}
	})

	t.Run("h2/authority outside ASCII", func(t *testing.T) {
		// net/http's HTTP/2 server lets it through (its HTTP/1 server
		// refuses such a Host): ReverseProxy's writer sends it in
		// punycode, the direct path leaves it to ReverseProxy.
		before := len(rec.all())
		c := dialH2(t, tp)
		if err := c.request(1, ":method", "GET", ":scheme", "https", ":authority", "café.example", ":path", "/"); err != nil {
			t.Fatal(err)
		}
		ev := c.wait(t, "the answer", func(ev frameEvent) bool { return ev.StreamID == 1 })
		if got, want := ev.Status, "200"; got != want {
			t.Fatalf(":status = %q (%v), want %q", got, ev, want)
		}
		seen := rec.all()[before:]
		if len(seen) != 1 {
			t.Fatalf("upstream saw %d requests, want 1", len(seen))
		}
		if got, want := seen[0].Host, "xn--caf-dma.example"; got != want {
			t.Errorf("upstream Host = %q, want %q", got, want)
		}
	})

	t.Run("h2/absolute path in :path", func(t *testing.T) {
		before := len(rec.all())
		c := dialH2(t, tp)
		if err := c.request(1, ":method", "GET", ":scheme", "https", ":authority", "127.0.0.1", ":path", "http://"+evil+"/steal"); err != nil {
			t.Fatal(err)
		}
		ev := c.wait(t, "the answer", func(ev frameEvent) bool { return ev.StreamID == 1 })
		t.Logf("answer: type %v, :status %q, code %v", ev.Type, ev.Status, ev.Code)
		for _, w := range rec.all()[before:] {
			if strings.Contains(w.RequestURI, "://") {
				t.Errorf("upstream got an absolute target %q", w.RequestURI)
			}
		}
	})

	if n := evilConns.Load(); n != 0 {
		t.Errorf("the other server got %d connections, want none", n)
	}
}

// spoofHeaders are what a client sends to pass itself off as someone else.
var spoofHeaders = []string{
	"X-Forwarded-For", "6.6.6.6",
	"X-Real-Ip", "6.6.6.6",
	"Forwarded", "for=6.6.6.6;proto=http;host=evil.example",
	"X-Forwarded-Host", "evil.example",
	"X-Forwarded-Proto", "http",
}

// checkNotSpoofed checks that the upstream saw the proxy's forwarding
// headers for an untrusted client on 127.0.0.1, and none of the client's.
func checkNotSpoofed(t *testing.T, w wire) {
	t.Helper()
	h, host := w.Header, w.Host
	for _, tt := range []struct{ name, want string }{
		{"X-Forwarded-For", "127.0.0.1"},
		{"X-Real-Ip", "127.0.0.1"},
		{"X-Forwarded-Proto", "https"},
		{"X-Forwarded-Host", host},
		{"Forwarded", ""},
	} {
		got := strings.Join(h.Values(tt.name), " | ")
		if got != tt.want {
			t.Errorf("upstream %s = %q, want %q", tt.name, got, tt.want)
		}
	}
}

// TestSpoofedForwardingHeaders sends forged X-Forwarded-For, X-Real-IP,
// Forwarded, X-Forwarded-Host and X-Forwarded-Proto from an untrusted peer
// over every protocol: none of them reaches Cells (it believes the first
// X-Forwarded-For entry).
func TestSpoofedForwardingHeaders(t *testing.T) {
	t.Parallel()
	rec := &wireRecorder{}
	rec.Respond = func(w http.ResponseWriter, r *http.Request) {
		switch {
		case strings.HasPrefix(r.Header.Get("Content-Type"), "application/grpc"):
			// A gRPC OK with one empty message.
			w.Header().Set("Content-Type", "application/grpc")
			w.Header().Set("Trailer", "Grpc-Status")
			w.Write([]byte{0, 0, 0, 0, 0})
			w.Header().Set("Grpc-Status", "0")
		case r.Header.Get("Upgrade") != "":
			c, err := websocket.Accept(w, r, nil)
			if err != nil {
				return
			}
			c.Close(websocket.StatusNormalClosure, "")
		default:
			io.WriteString(w, "ok")
		}
	}
	up := newUpstream(t, upTLS, rec)
	tp := startProxy(t, testConfig(up))
	host := tp.Addr().String()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	for _, pc := range h1h2Clients(tp) {
		t.Run(pc.name, func(t *testing.T) {
			req, _ := http.NewRequestWithContext(ctx, "GET", tp.URL+"/a/frontend/bootconf", nil)
			for i := 0; i < len(spoofHeaders); i += 2 {
				req.Header.Add(spoofHeaders[i], spoofHeaders[i+1])
			}
			req.Header.Add("X-Forwarded-For", "7.7.7.7, 8.8.8.8")
			res := doDrain(t, pc.c, req)
			if res.StatusCode != 200 {
				t.Fatalf("status = %d, want 200", res.StatusCode)
			}
			checkNotSpoofed(t, rec.all()[len(rec.all())-1])
		})
	}

	t.Run("h1 raw, odd case", func(t *testing.T) {
		got := rawExchange(t, tp, "GET /raw HTTP/1.1\r\nHost: "+host+"\r\nx-forwarded-for: 6.6.6.6\r\nX-REAL-IP: 6.6.6.6\r\n"+
			"forwarded: for=6.6.6.6\r\nx-FORWARDED-host: evil.example\r\nx-forwarded-proto: http\r\nConnection: close\r\n\r\n")
		if fmt.Sprint(got.statuses()) != "[200]" {
			t.Fatalf("statuses = %v, want [200]", got.statuses())
		}
		checkNotSpoofed(t, rec.all()[len(rec.all())-1])
	})

	t.Run("grpc metadata", func(t *testing.T) {
		cc, err := grpc.NewClient("passthrough:///"+host, grpc.WithTransportCredentials(credentials.NewTLS(tp.TLSConfig("h2"))))
		if err != nil {
			t.Fatal(err)
		}
		defer cc.Close()
		md := metadata.Pairs()
		for i := 0; i < len(spoofHeaders); i += 2 {
			md.Append(strings.ToLower(spoofHeaders[i]), spoofHeaders[i+1])
		}
		octx := metadata.NewOutgoingContext(ctx, md)
		if err := cc.Invoke(octx, "/tree.NodeProvider/ListNodes", &emptypb.Empty{}, &emptypb.Empty{}); err != nil {
			t.Fatalf("gRPC call: %v", err)
		}
		w := rec.all()[len(rec.all())-1]
		if got, want := w.RequestURI, "/tree.NodeProvider/ListNodes"; got != want {
			t.Fatalf("upstream saw %q, want %q", got, want)
		}
		checkNotSpoofed(t, w)
	})

	t.Run("websocket upgrade", func(t *testing.T) {
		h := http.Header{}
		for i := 0; i < len(spoofHeaders); i += 2 {
			h.Add(spoofHeaders[i], spoofHeaders[i+1])
		}
		c, res, err := websocket.Dial(ctx, "wss://"+host+"/ws/event", &websocket.DialOptions{HTTPClient: tp.H1, HTTPHeader: h})
		if err != nil {
			t.Fatalf("websocket dial: %v", err)
		}
		defer c.CloseNow()
		if res.StatusCode != http.StatusSwitchingProtocols {
			t.Fatalf("status = %d, want 101", res.StatusCode)
		}
		w := rec.all()[len(rec.all())-1]
		if got, want := w.RequestURI, "/ws/event"; got != want {
			t.Fatalf("upstream saw %q, want %q", got, want)
		}
		checkNotSpoofed(t, w)
	})
}

// TestH2RapidResetBoughtWithRefusals: the rapid-reset guard lets a client
// cancel twice as many requests as were answered, so that a client whose
// requests Cells answers is not cut for a few cancels. But an answer the
// proxy makes itself, before anything reaches Cells (405 to a CONNECT, 400
// to a malformed request, 421 to an unknown host), buys rapid resets as
// well: one CONNECT per two resets, and every reset request reaches Cells
// and is cancelled there, as long as the attacker likes. Here 300 such
// resets, each of a request Cells was working on (at most 250 must reach
// it, TestH2RapidReset), 150 CONNECTs between them: the guard must close
// the connection, as it does without the CONNECTs.
func TestH2RapidResetBoughtWithRefusals(t *testing.T) {
	arrived := make(chan string, 1024)
	up := newUpstream(t, upTLS, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		arrived <- r.URL.Path
		<-r.Context().Done() // Cells at work, until the proxy cancels
	}))
	tp := startProxy(t, testConfig(up))
	c := dialH2(t, tp)
	c.conn.SetWriteDeadline(time.Now().Add(30 * time.Second))
	id, reached := uint32(1), 0
	for i := 0; i < 300; i++ {
		if i%2 == 0 {
			// The price: a request the proxy refuses itself.
			c.wmu.Lock()
			err := c.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, EndStream: true, EndHeaders: true,
				BlockFragment: c.block(":method", "CONNECT", ":authority", "127.0.0.1:1")})
			c.wmu.Unlock()
			if err != nil {
				break
			}
			ev, ok := c.waitAnswer(id)
			if !ok {
				break
			}
			if ev.String() != ":status 405" {
				t.Fatalf("CONNECT: got %s, want :status 405", ev)
			}
			id += 2
		}
		if err := c.request(id, pseudo(tp, "GET", "/reset/"+strconv.Itoa(i))...); err != nil {
			break
		}
		closed := false
		for wait := time.After(10 * time.Second); ; {
			select {
			case <-arrived:
				reached++
			case _, ok := <-c.events:
				if ok {
					continue
				}
				closed = true // the guard closed the connection
			case <-wait:
				t.Fatalf("request %d never reached Cells", i)
			}
			break
		}
		if closed {
			break
		}
		c.wmu.Lock()
		err := c.fr.WriteRSTStream(id, http2.ErrCodeCancel)
		c.wmu.Unlock()
		if err != nil {
			break
		}
		id += 2
	}
	c.Close()
	quiesce(t, tp, up)
	t.Logf("%d reset requests reached Cells", reached)
	if !strings.Contains(tp.Log.String(), "rapid reset") {
		t.Errorf("the guard never fired: %d requests reached Cells and were reset there, each soon after it was made", reached)
	}
	if reached > 250 {
		t.Errorf("%d reset requests reached Cells, want at most 250", reached)
	}
}

// waitAnswer is answer without failing: ok is false once the connection
// ended.
func (c *frameConn) waitAnswer(id uint32) (frameEvent, bool) {
	timeout := time.After(10 * time.Second)
	for {
		select {
		case ev, ok := <-c.events:
			if !ok || ev.Type == http2.FrameGoAway {
				return ev, false
			}
			if ev.StreamID == id && (ev.Type == http2.FrameHeaders || ev.Type == http2.FrameRSTStream) {
				return ev, true
			}
		case <-timeout:
			return frameEvent{}, false
		}
	}
}
