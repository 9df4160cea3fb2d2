package proxy

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/textproto"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http/httpguts"
	"golang.org/x/net/http2/hpack"
)

// grpcUpstream is the HTTP/2 client that carries gRPC calls to Cells, in the
// way nginx's grpc module and HAProxy's HTTP/2 mux do it: frames for all the
// calls on a connection go out through one buffer, and the connection's
// writer writes everything queued at once, so concurrent calls share
// write(2)s instead of taking turns (net/http's client flushes a call's
// HEADERS and its DATA on their own, two writes per unary call, and runs a
// goroutine per call besides the handler's). One goroutine per connection
// reads frames and hands them to the calls, one writes them; a call with a request body
// has one more goroutine copying it, as it must overlap the response for
// bidirectional streams.
//
// It keeps what http.Transport did for the gRPC upstream: TLS with ALPN h2
// (or h2c with prior knowledge), the peer's SETTINGS honoured before the
// first call (stream limit, windows, frame size, header table), flow
// control both ways with 512 KiB per stream and 1 GiB per connection of
// receive window given back as the client reads (so a slow client holds
// Cells back instead of filling the proxy's memory), a PING when nothing
// was heard for 5 min while calls are open and the connection dropped if
// it is not answered in 20 s (and at once for the first call after 5 min
// of silence), GOAWAY honoured (no new calls on the connection; calls above
// its last stream ID sent again on another connection, and those refused
// with REFUSED_STREAM at once on whichever has room, up to three attempts,
// while at most 64 KiB of their body was read, with the time left before
// their deadline as grpc-timeout, as a call that first waited for a dial or
// for a stream is sent),
// the 1 MiB response header limit, header fields checked both ways,
// trailers handed to the forwarder at the end of the body, and the
// request's context resetting the stream (RST_STREAM CANCEL). Beyond what
// that Transport did, a connection that carried no call for a minute is
// closed (GOAWAY, then close; never one with a call open), as
// IdleConnTimeout closes the HTTP/1.1 ones, and a connection made before
// CELLS_UPSTREAM_CA_FILE changed takes no new call (dropStale). It speaks only what gRPC
// needs: no server push (disabled in SETTINGS), no 1xx responses passed
// on, no priorities.
type grpcUpstream struct {
	addr             string
	scheme           string      // :scheme sent: "https" or "http"
	tls              *tls.Config // nil: h2c
	dialer           *net.Dialer
	handshakeTimeout time.Duration
	pingEvery        time.Duration // PING a connection with calls open, heard nothing from for this long,
	pingTimeout      time.Duration // and drop it if nothing answers in this
	streamWindow     uint32        // receive window per stream
	connWindow       uint32        // receive window per connection
	maxHeader        uint32        // response header list limit
	// How long a call waits on the connection it dialled when Cells lets
	// no stream open on it (SETTINGS_MAX_CONCURRENT_STREAMS 0).
	noStreamsWait time.Duration
	// A connection that carried no call for this long, and at most twice
	// as long, is closed (GOAWAY, then close); 0: never (idleCheck).
	idleTimeout time.Duration
	// Tests only: called once a call has picked a connection that takes
	// no stream, to wait on, before it waits; read under mu.
	pickedNone func(*grpcConn)
	// ca is CELLS_UPSTREAM_CA_FILE: a connection dialled before its last
	// change takes no new call (dropStale); nil: none.
	ca *upstreamCA

	mu      sync.Mutex
	conns   []*grpcConn
	dialing *grpcDial
	closed  bool // Close was called: no new call, no new connection
}

type grpcDial struct {
	done    chan struct{}
	err     error
	cancel  context.CancelCauseFunc // Close ends the dial with errShutdown
	waiters int                     // calls that came to wait for it, under grpcUpstream.mu
}

func newGRPCUpstream(addr string, tlsConf *tls.Config, dialer *net.Dialer) *grpcUpstream {
	u := &grpcUpstream{
		addr:             addr,
		scheme:           "http",
		tls:              tlsConf,
		dialer:           dialer,
		handshakeTimeout: 10 * time.Second,
		// grpc-go servers (Cells) answer a client that PINGs more often
		// than every 5 minutes, three times running, with GOAWAY
		// ENHANCE_YOUR_CALM and close the connection, streams and all
		// (keepalive.EnforcementPolicy's default MinTime). Cells builds
		// its gRPC servers without a policy of its own
		// (pydio/cells common/server/grpc/grpc.go: grpc.NewServer with
		// interceptors only), so that default is what it enforces.
		pingEvery:   5 * time.Minute,
		pingTimeout: 20 * time.Second,
		// What a call whose client reads nothing holds of Cells'
		// answer (a little more: the buffer's slack). x/net's
		// Transport grants 4 MiB, for links with latency; beside
		// Cells the round trip is tens of microseconds, where 512 KiB
		// moves as fast (BenchmarkGRPCUpstreamWindow: one stream's
		// MB/s the same within the noise from 4 MiB down to 256 KiB
		// on loopback), and 250 unread calls of one client connection
		// pin about 140 MiB instead of over 1 GiB (the buffers' slack
		// included; TestGRPCUpstreamUnreadCallsHeld).
		// It still carries about 90 MB/s per stream with 2-3 ms of
		// round trip.
		streamWindow: 512 << 10,
		// http.Transport's (x/net/http2's transportDefaultConnFlow).
		// What bounds the proxy's memory is the stream window: a call
		// holds at most that much of an answer its client does not
		// read. The connection's must be far larger than a few stream
		// windows, or a few such calls use it all up and stall every
		// other call on the connection. It fits the int64 accounting
		// and a WINDOW_UPDATE's 31 bits.
		connWindow: 1 << 30,
		maxHeader:  1 << 20,
		// Long enough for a server that is briefly full to raise its
		// limit again, short enough that a client without a deadline
		// of its own (grpc-go sets none unless asked) is not held
		// indefinitely.
		noStreamsWait: 10 * time.Second,
		// As the HTTP/1.1 pool to Cells (IdleConnTimeout in forward.go),
		// and x/net's Transport with net/http's IdleConnTimeout. Without
		// it a connection nothing uses stays open for good: those a burst
		// of calls opened beyond Cells' stream limit, and one whose Cells
		// went away without a FIN (a restarted container), which the
		// next call would find dead only when its PING goes unanswered,
		// 20 s later (UNAVAILABLE), or TCP keepalive minutes later. A
		// connection with a call open is never idle: Cells Sync's
		// StreamChanges keeps its own open for hours.
		idleTimeout: 60 * time.Second,
	}
	if tlsConf != nil {
		u.scheme = "https"
	}
	return u
}

// HTTP/2 frame types, flags, settings and error codes (RFC 9113) beside
// those h2conn.go declares.
const (
	frameData         = 0x0
	framePriority     = 0x2
	frameRSTStream    = 0x3
	framePushPromise  = 0x5
	framePing         = 0x6
	frameGoAway       = 0x7
	frameWindowUpdate = 0x8

	flagEndStream = 0x1

	settingHeaderTableSize   = 0x1
	settingEnablePush        = 0x2
	settingMaxStreams        = 0x3
	settingInitialWindowSize = 0x4
	settingMaxFrameSize      = 0x5
	settingMaxHeaderListSize = 0x6

	codeProtocol        = 0x1
	codeInternal        = 0x2
	codeFlowControl     = 0x3
	codeFrameSize       = 0x6
	codeRefusedStream   = 0x7
	codeCancel          = 0x8
	codeCompression     = 0x9
	codeEnhanceYourCalm = 0xb

	h2DefaultWindow = 65535
	h2MaxWindow     = 1<<31 - 1
	h2MinFrame      = 16 << 10
	h2MaxStreamID   = 1<<31 - 1
	// h2MaxStreams caps the calls on one connection when Cells sets no
	// limit (grpc-go's default); more calls open another connection.
	h2MaxStreams = 1000
)

var h2CodeNames = map[uint32]string{
	0x0: "NO_ERROR", 0x1: "PROTOCOL_ERROR", 0x2: "INTERNAL_ERROR", 0x3: "FLOW_CONTROL_ERROR",
	0x4: "SETTINGS_TIMEOUT", 0x5: "STREAM_CLOSED", 0x6: "FRAME_SIZE_ERROR", 0x7: "REFUSED_STREAM",
	0x8: "CANCEL", 0x9: "COMPRESSION_ERROR", 0xa: "CONNECT_ERROR", 0xb: "ENHANCE_YOUR_CALM",
	0xc: "INADEQUATE_SECURITY", 0xd: "HTTP_1_1_REQUIRED",
}

func h2CodeName(c uint32) string {
	if s, ok := h2CodeNames[c]; ok {
		return s
	}
	return "error code " + strconv.FormatUint(uint64(c), 10)
}

// h2ConnError is a connection-level protocol error on Cells' side.
type h2ConnError struct {
	code uint32
	msg  string
}

func (e h2ConnError) Error() string {
	return "cells-proxy: HTTP/2 error from upstream (" + h2CodeName(e.code) + "): " + e.msg
}

// h2StreamFault is a call on which Cells broke HTTP/2's rules for a
// stream alone (a malformed response head, DATA beyond the call's window):
// the proxy resets that stream with code and the connection's other calls
// go on. grpc-go's client, connected to Cells, ends such a call with
// INTERNAL (its operateHeaders, and its handleData for a window exceeded),
// not with the UNAVAILABLE of a connection lost: a call Cells has answered,
// however badly, has been processed, and must not look safe to send again.
type h2StreamFault struct {
	code uint32
	msg  string
}

func (e h2StreamFault) Error() string {
	return "cells-proxy: HTTP/2 error from upstream on the call (" + h2CodeName(e.code) + "): " + e.msg
}

// h2StreamReset is a call Cells reset with RST_STREAM.
type h2StreamReset struct{ code uint32 }

func (e h2StreamReset) Error() string {
	return "cells-proxy: upstream reset the stream (" + h2CodeName(e.code) + ")"
}

// grpcCode is the gRPC status code for the reset: the one grpc-go's client
// derives from the RST_STREAM error code (http2ErrConvTab in its
// internal/transport/http_util.go), so that a client sees through the
// proxy what it would have seen connected to Cells. Only REFUSED_STREAM,
// a call Cells did not process (RFC 9113 §8.7), is UNAVAILABLE, which
// clients take as safe to retry: a call Cells reset once it had started
// on it (INTERNAL_ERROR, CANCEL) may have done its work, and a Cells Sync
// write sent again could be done twice.
func (e h2StreamReset) grpcCode() int {
	switch e.code {
	case 0x0, codeProtocol, codeInternal, 0x4, 0x5, codeFrameSize, codeCompression, 0xa, 0xd:
		// NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, SETTINGS_TIMEOUT,
		// STREAM_CLOSED, FRAME_SIZE_ERROR, COMPRESSION_ERROR,
		// CONNECT_ERROR, HTTP_1_1_REQUIRED
		return 13 // INTERNAL
	case codeFlowControl, codeEnhanceYourCalm:
		return 8 // RESOURCE_EXHAUSTED
	case codeRefusedStream:
		return 14 // UNAVAILABLE
	case codeCancel:
		return 1 // CANCELLED
	case 0xc: // INADEQUATE_SECURITY
		return 7 // PERMISSION_DENIED
	}
	return 2 // UNKNOWN, as grpc-go gives a code not in its table
}

var (
	errH2GoAway    = errors.New("cells-proxy: upstream closed the connection (GOAWAY) before handling the call")
	errH2BodyClose = errors.New("cells-proxy: response body closed")
	errH2PingLost  = errors.New("cells-proxy: upstream connection lost (PING not answered)")
	errH2Drained   = errors.New("cells-proxy: connection drained after GOAWAY")
	errH2Idle      = errors.New("cells-proxy: connection closed after carrying no call for its idle timeout")
	errH2Stale     = errors.New("cells-proxy: connection closed after CELLS_UPSTREAM_CA_FILE changed")
)

// grpcCall is a client's call as it goes to Cells: the client's request
// (method, header fields, context), the :authority and :path the
// forwarder chose, and the forwarding fields that replace the client's.
type grpcCall struct {
	req        *http.Request
	host, path string
	fw         forwarded
	// timeout, when set, is the grpc-timeout sent in place of the
	// client's: the time left, on an attempt that did not leave at once
	// (retime).
	timeout string
}

// retime sets the grpc-timeout of the call's next attempt to the time left
// before its deadline, which serveGRPC set from the client's grpc-timeout:
// for an attempt after the first, and for a first one that waited (for a
// connection to be dialled, or for Cells to allow a stream on one; see
// grpcUpstream.open). The client's value counts from when it sent the
// call: sent as it came after such a wait, it would tell Cells it has more
// time than its client waits, and Cells would go on with work nobody
// takes. It reports false when no time is left: the deadline has passed,
// though the proxy's timer may not have fired yet. A call without a
// grpc-timeout the proxy took keeps the client's fields as they came, and
// so does a first attempt that went at once (no time worth telling Cells
// of has passed, and the common path allocates no new field).
func (call *grpcCall) retime(ctx context.Context) bool {
	if _, ok := parseGRPCTimeout(call.req.Header.Get("Grpc-Timeout")); !ok {
		return true
	}
	deadline, ok := ctx.Deadline()
	if !ok {
		return true
	}
	left := time.Until(deadline)
	if left <= 0 {
		return false
	}
	call.timeout = encodeGRPCTimeout(left)
	return true
}

// do sends the call as a new stream and returns when the response header
// arrives; the body is then read from the stream. The request body is the
// client's: the stream closes it when the call ends, so that a copy
// blocked reading it returns (see grpcStream.Close).
func (u *grpcUpstream) do(call *grpcCall) (*http.Response, error) {
	req := call.req
	ctx := req.Context()
	body := req.Body
	if body == http.NoBody || req.ContentLength == 0 {
		body = nil
	}
	for attempt := 1; ; attempt++ {
		if attempt > 1 && !call.retime(ctx) {
			// Not sent again with no time left: grpcDeadline sees the
			// deadline passed, and the client gets DEADLINE_EXCEEDED.
			if body != nil {
				body.Close()
			}
			return nil, errGRPCDeadline
		}
		s, err := u.start(ctx, call, body)
		if err != nil {
			if body != nil {
				body.Close()
			}
			return nil, err
		}
		<-s.ready
		if s.res != nil {
			return s.res, nil
		}
		s.stop()
		// Cells did not process the call (RFC 9113 §8.7): send it again,
		// with what was read of the body and the rest as it comes. At
		// once, and on whichever connection has room, which may be the
		// one that refused it: grpc-go's client retries such a call once,
		// at once, on the connection its picker gives (stream.go's
		// shouldRetry), x/net's Transport at once then after 1 s, 2 s...,
		// on its pool's connection. A server says why it refuses: a
		// grpc-go server (Cells) refuses only streams beyond the limit its
		// SETTINGS announced (its operateHeaders), which the proxy keeps
		// to, and a connection that is going away sends GOAWAY, which
		// makes the proxy use another. A server that lowers its limit
		// sends the SETTINGS before the reset, so a connection the new
		// limit fills takes no attempt either
		// (TestGRPCUpstreamRefusedLimitLowered).
		next, ok := s.handOver(attempt < 3)
		if !ok {
			return nil, s.err
		}
		body = next
	}
}

// start opens a stream for call and starts copying body to it.
func (u *grpcUpstream) start(ctx context.Context, call *grpcCall, body io.ReadCloser) (*grpcStream, error) {
	s, err := u.open(ctx, call, body)
	if err != nil {
		return nil, err
	}
	s.stop = context.AfterFunc(ctx, func() { s.abort(context.Cause(ctx), codeCancel) })
	if body != nil {
		go s.writeBody(body)
		// A unary call's message is usually in the body already: yield
		// so that the copy can queue it behind the HEADERS, for the
		// writer to take both in one write(2). If the body is still
		// empty (a stream whose client waits for Cells first), the
		// flush below hands the writer the HEADERS alone; either way
		// they leave now.
		runtime.Gosched()
		s.c.flush()
	}
	return s, nil
}

// Close closes every connection, ending the calls still on them with
// errShutdown, and fails later calls with it; it returns how many calls it
// ended. The proxy's drain calls it a few seconds in, for the gRPC streams
// that never end by themselves, and again at its end.
func (u *grpcUpstream) Close() (ended int) {
	u.mu.Lock()
	u.closed = true
	if u.dialing != nil {
		u.dialing.cancel(errShutdown)
	}
	conns := append([]*grpcConn(nil), u.conns...)
	u.mu.Unlock()
	for _, c := range conns {
		c.mu.Lock()
		ended += len(c.streams)
		c.failLocked(errShutdown)
		c.mu.Unlock()
	}
	return ended
}

var (
	errH2Full      = errors.New("connection full")
	errH2NoStreams = errors.New("cells-proxy: upstream allows no new call on its connection (SETTINGS_MAX_CONCURRENT_STREAMS 0)")
)

// open opens call's stream on a connection that takes it, dialling one
// when none does; concurrent callers wait for the same dial, and the one
// that dialled opens its stream first on the new connection.
//
// No call dials while a connection that takes no stream at all is open.
// Cells may set SETTINGS_MAX_CONCURRENT_STREAMS to 0 (RFC 9113 §6.5.2:
// "prevents the creation of new streams"), and a new connection would be
// no better: dialling one after another, or one per call, would flood
// Cells with connections. Calls wait on that connection instead, as
// grpc-go's client waits for stream quota, until SETTINGS let them in or
// noStreamsWait has passed; a call then fails (UNAVAILABLE for a gRPC
// client) and the connection, of no use, is closed. A connection that
// takes streams but has none free does not count: another is dialled, as
// when calls outnumber the limit.
//
// A call that waited for a dial or for streams goes with the time left
// before its deadline (retime), or, with none left, not at all
// (errGRPCDeadline): a dial may take up to handshakeTimeout, a wait for
// streams noStreamsWait.
func (u *grpcUpstream) open(ctx context.Context, call *grpcCall, body io.ReadCloser) (*grpcStream, error) {
	var fresh *grpcConn       // a connection that takes no stream, to wait on
	var wait <-chan time.Time // the end of noStreamsWait, once started
	waited := false
	for {
		if ctx.Err() != nil {
			return nil, context.Cause(ctx)
		}
		if fresh != nil {
			if wait == nil {
				t := time.NewTimer(u.noStreamsWait)
				defer t.Stop()
				wait = t.C
			}
			err := fresh.awaitStreams(ctx, wait)
			if err != nil && err != errH2GoAway && err != errH2Drained && err != errH2Idle && err != errH2Stale {
				return nil, err
			}
			waited = true
			// Cells raised its limit, or the connection is going away
			// (the call was never sent: another connection takes it).
			// errH2Idle: idleCheck closed it after this call picked it
			// and before the call counted as waiting on it. errH2Stale:
			// CELLS_UPSTREAM_CA_FILE changed (dropStale).
			fresh = nil
		}
		u.mu.Lock()
		if u.closed {
			u.mu.Unlock()
			return nil, errShutdown
		}
		var c, none *grpcConn
		// A connection made before CELLS_UPSTREAM_CA_FILE last changed
		// may still be here between the change and dropStale: passed
		// over, as dropStale will retire it.
		gen := u.ca.generation()
		for _, x := range u.conns {
			if x.gen != gen {
				continue
			}
			if x.canTake() {
				c = x
				break
			}
			if none == nil && x.takesNone() {
				none = x
			}
		}
		if c != nil {
			u.mu.Unlock()
			if waited && !call.retime(ctx) {
				return nil, errGRPCDeadline
			}
			s, err := c.open(call, body)
			if err != errH2Full {
				return s, err
			}
			continue // taken meanwhile
		}
		if none != nil {
			picked := u.pickedNone
			u.mu.Unlock()
			if picked != nil {
				picked(none)
			}
			fresh = none
			continue
		}
		if d := u.dialing; d != nil {
			d.waiters++
			u.mu.Unlock()
			select {
			case <-d.done:
				if d.err != nil {
					return nil, d.err
				}
				waited = true
				continue
			case <-ctx.Done():
				return nil, context.Cause(ctx)
			}
		}
		// Not the caller's context: the connection outlives this call.
		dctx, dcancel := context.WithCancelCause(context.WithoutCancel(ctx))
		d := &grpcDial{done: make(chan struct{}), cancel: dcancel}
		u.dialing = d
		u.mu.Unlock()
		c, err := u.dial(dctx)
		if err != nil && errors.Is(context.Cause(dctx), errShutdown) {
			err = errShutdown
		}
		dcancel(nil)
		var s *grpcStream
		openErr := errH2Full
		// The dial does not end with the call (the connection is for
		// the calls to come), so the call may have ended meanwhile: its
		// client reset it or its deadline passed, and was told so. It
		// is not sent then (the loop returns its cause): Cells would do
		// a call whose client may send it again, or did already.
		waited = true
		// Dialled across a change of CELLS_UPSTREAM_CA_FILE: verified,
		// if at all, with the file being replaced. Retired below; the
		// call dials again.
		if err == nil && ctx.Err() == nil && c.gen == u.ca.generation() {
			// Before the others see the connection: had another call
			// taken its only stream, this one would dial again.
			if call.retime(ctx) {
				s, openErr = c.open(call, body)
			} else {
				openErr = errGRPCDeadline
			}
		}
		u.mu.Lock()
		u.dialing = nil
		if err == nil && u.closed {
			// Close came during the dial: it did not see this
			// connection, which takes no call now.
			err = errShutdown
			c.close(err)
		}
		if err == nil && c.gen != u.ca.generation() {
			// Dialled before CELLS_UPSTREAM_CA_FILE changed, and not
			// seen by dropStale: it takes no call (should the change
			// have come after the look above, the call goes on, as
			// one open at a change does). Under u.mu, which dropStale
			// takes after the change.
			c.mu.Lock()
			c.retireLocked()
			c.mu.Unlock()
		}
		if err == nil && c.alive() {
			// Under u.mu: should the connection fail after alive, its
			// removal (failLocked) waits for u.mu, so comes after this.
			u.conns = append(u.conns, c)
		}
		u.mu.Unlock()
		d.err = err
		close(d.done)
		if err != nil {
			return nil, err
		}
		go c.readLoop()
		go c.writeLoop() // writes the SETTINGS ACK dial queued, with the stream's HEADERS
		if openErr != errH2Full {
			return s, openErr
		}
		if c.takesNone() {
			fresh = c
		}
	}
}

func (u *grpcUpstream) remove(c *grpcConn) {
	u.mu.Lock()
	defer u.mu.Unlock()
	for i, x := range u.conns {
		if x == c {
			u.conns = append(u.conns[:i], u.conns[i+1:]...)
			return
		}
	}
}

// connect dials Cells and, with conf, makes the TLS handshake, all before
// deadline, which stays set on raw for the HTTP/2 handshake; nc is raw or
// the TLS connection over it.
func (u *grpcUpstream) connect(ctx context.Context, deadline time.Time, conf *tls.Config) (raw, nc net.Conn, err error) {
	if raw, err = u.dialer.DialContext(ctx, "tcp", u.addr); err != nil {
		return nil, nil, err
	}
	raw.SetDeadline(deadline)
	if conf == nil {
		return raw, raw, nil
	}
	tc := tls.Client(raw, conf)
	if err := tc.HandshakeContext(ctx); err != nil {
		raw.Close()
		return nil, nil, err
	}
	if p := tc.ConnectionState().NegotiatedProtocol; p != "h2" {
		raw.Close()
		return nil, nil, fmt.Errorf("cells-proxy: upstream %s did not negotiate HTTP/2 (ALPN %q): gRPC needs h2", u.addr, p)
	}
	return raw, tc, nil
}

// dial connects, sends the preface and SETTINGS and reads Cells' SETTINGS,
// which must come first, before any call goes out: a call sent before
// them could exceed a lower stream limit and be refused.
func (u *grpcUpstream) dial(ctx context.Context) (*grpcConn, error) {
	gen := u.ca.generation() // before the handshake: see upstreamCA.gen
	deadline := time.Now().Add(u.handshakeTimeout)
	raw, nc, err := u.connect(ctx, deadline, u.tls)
	if conf := fullHandshakeAfter(err); conf != nil {
		// A resumed session refused: once more, with a full
		// handshake (resumeRefused), within the same deadline.
		raw, nc, err = u.connect(ctx, deadline, conf)
	}
	if err != nil {
		return nil, err
	}
	// Close during the handshake (the drain's grace) ends it; connect
	// has honoured ctx so far.
	defer context.AfterFunc(ctx, func() { raw.SetDeadline(time.Now()) })()
	c := &grpcConn{
		u:          u,
		gen:        gen,
		nc:         nc,
		raw:        raw,
		streams:    make(map[uint32]*grpcStream),
		nextID:     1,
		maxStreams: h2MaxStreams,
		peerWindow: h2DefaultWindow,
		sendConn:   h2DefaultWindow,
		maxFrame:   h2MinFrame,
		recvConn:   int64(u.connWindow),
	}
	c.sendWait.L = &c.mu
	c.wake.L = &c.mu
	c.stamp.Store(time.Now().UnixNano())
	c.br = bufio.NewReaderSize(stampReader{c}, 32<<10)
	c.henc = hpack.NewEncoder(&c.hbuf)
	c.hdec = hpack.NewDecoder(4096, func(f hpack.HeaderField) {
		// Counted as decoded: a small block can name large table
		// entries many times over.
		if c.fieldsSize += int(f.Size()); c.fieldsSize <= int(u.maxHeader) {
			c.fields = append(c.fields, f)
		}
	})
	c.hdec.SetMaxStringLength(int(u.maxHeader))

	b := append([]byte(nil), clientPreface...)
	b = appendFrameHeader(b, 4*6, frameSettings, 0, 0)
	b = appendSetting(b, settingEnablePush, 0)
	b = appendSetting(b, settingInitialWindowSize, u.streamWindow)
	b = appendSetting(b, settingMaxFrameSize, h2MinFrame)
	b = appendSetting(b, settingMaxHeaderListSize, u.maxHeader)
	if u.connWindow > h2DefaultWindow {
		b = appendWindowUpdate(b, 0, u.connWindow-h2DefaultWindow)
	}
	if _, err := nc.Write(b); err != nil {
		nc.Close()
		return nil, err
	}
	typ, flags, id, p, err := c.readFrame()
	if err == nil && (typ != frameSettings || flags&flagAck != 0 || id != 0) {
		err = errors.New("cells-proxy: upstream did not start with SETTINGS: not an HTTP/2 server")
	}
	if err == nil {
		err = c.applySettings(p)
	}
	if err != nil {
		nc.Close()
		return nil, err
	}
	nc.SetDeadline(time.Time{})
	c.wbuf = appendFrameHeader(c.wbuf, 0, frameSettings, flagAck, 0)
	// Under c.mu, which the timers' functions take: a timer that fires
	// before its field is set finds it set.
	c.mu.Lock()
	c.ping = time.AfterFunc(u.pingEvery, c.health)
	if u.idleTimeout > 0 {
		c.idleTimer = time.AfterFunc(u.idleTimeout, c.idleCheck)
	}
	c.mu.Unlock()
	return c, nil
}

// grpcConn is one HTTP/2 connection to Cells.
type grpcConn struct {
	u     *grpcUpstream
	gen   uint64 // u.ca's generation when dialled
	nc    net.Conn
	raw   net.Conn // nc's TCP connection: closed without TLS's close_notify, which could block
	br    *bufio.Reader
	stamp atomic.Int64 // UnixNano of the last read from Cells
	ping  *time.Timer
	// idleCheck's timer; nil when idleTimeout is 0.
	idleTimer *time.Timer

	// Read loop only.
	head       [9]byte // a frame header; here, not on readFrame's stack, where io.ReadFull would move it to the heap
	rbuf       []byte
	hdec       *hpack.Decoder
	fields     []hpack.HeaderField
	fieldsSize int    // of the block being decoded, RFC 9113's measure
	inBlock    bool   // a header block awaits its CONTINUATIONs
	block      []byte // that block so far
	blockID    uint32
	blockEnd   bool

	mu      sync.Mutex
	wbuf    []byte // frames waiting to be written
	spare   []byte
	writing bool      // a write(2) runs (the writer's or flushOwnLocked's); what is queued meanwhile waits
	wake    sync.Cond // the writer waits for frames on it
	idle    bool      // the writer waits on wake
	answers int       // acknowledgements queued since the writer last took wbuf (answerLocked)
	henc    *hpack.Encoder
	hbuf    bytes.Buffer
	hsize   uint64 // RFC 9113's size of the fields written since it was zeroed
	sizing  bool   // writeField only counts
	// Cells' SETTINGS_MAX_HEADER_LIST_SIZE; 0 when it set none (grpc-go
	// sets none unless told: it accepts 16 MiB).
	peerMaxHeader uint32

	streams    map[uint32]*grpcStream
	nextID     uint32
	lastID     uint32 // highest stream ID opened
	maxStreams uint32
	peerWindow int64 // initial send window of a stream (peer's SETTINGS)
	sendConn   int64 // connection send window
	sendWait   sync.Cond
	maxFrame   int
	recvConn   int64 // connection receive window left
	recvAcked  int64 // bytes read by clients not yet given back on the connection
	goaway     bool
	// Streams opened and ended, counted (a wrapping counter): idleCheck
	// compares it with its value at the previous check, idleMark.
	activity uint32
	idleMark uint32
	// Closed when SETTINGS arrive or the connection fails, for a call
	// waiting for Cells to allow streams (awaitStreams); nil when none
	// waits.
	changed  chan struct{}
	waiting  int       // calls in awaitStreams
	pingSent time.Time // zero: no PING outstanding
	err      error     // the connection is broken
}

// alive reports whether c has not failed.
func (c *grpcConn) alive() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err == nil
}

// takesNone reports whether Cells allows no stream at all on c, which is
// otherwise usable.
func (c *grpcConn) takesNone() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err == nil && !c.goaway && c.maxStreams == 0
}

// awaitStreams waits until Cells allows streams on c, which took none: a
// SETTINGS frame raising the limit. It fails when ctx ends, when wait
// fires, or when c fails or is going away; c is then closed unless it
// carries streams or another call still waits on it, as nothing would open
// a stream on it. (Closed while others waited, one client giving up failed
// them all at once, with UNAVAILABLE, even had Cells raised its limit a
// moment later.)
func (c *grpcConn) awaitStreams(ctx context.Context, wait <-chan time.Time) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.waiting++
	defer func() { c.waiting-- }()
	for c.err == nil && !c.goaway && c.maxStreams == 0 {
		if c.changed == nil {
			c.changed = make(chan struct{})
		}
		changed := c.changed
		c.mu.Unlock()
		var err error
		select {
		case <-changed:
		case <-ctx.Done():
			err = context.Cause(ctx)
		case <-wait:
			err = errH2NoStreams
		}
		c.mu.Lock()
		if err != nil {
			if c.maxStreams == 0 && len(c.streams) == 0 && c.waiting == 1 {
				c.failLocked(errH2NoStreams)
			}
			return err
		}
	}
	switch {
	case c.err != nil:
		return c.err
	case c.goaway:
		return errH2GoAway
	}
	return nil
}

func (c *grpcConn) canTake() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err == nil && !c.goaway && uint32(len(c.streams)) < c.maxStreams && c.nextID <= h2MaxStreamID
}

// notifyLocked wakes the calls waiting in awaitStreams.
func (c *grpcConn) notifyLocked() {
	if c.changed != nil {
		close(c.changed)
		c.changed = nil
	}
}

// stampReader notes when Cells was last heard from, for the PING check.
type stampReader struct{ c *grpcConn }

func (r stampReader) Read(p []byte) (int, error) {
	n, err := r.c.nc.Read(p)
	if n > 0 {
		r.c.stamp.Store(time.Now().UnixNano())
	}
	return n, err
}

// flushLocked hands what is queued to the connection's writer.
//
// The writer, not the call, makes the write(2): calls queue their frames
// and go on (a unary call to reading its request's end or its answer),
// and the writer takes everything queued since its last write in one. With
// 32 unary calls in flight the proxy makes 0.77 write(2) per call, both
// sides counted, instead of 2.0 when each call wrote its own HEADERS, DATA
// and END_STREAM unless another was writing at that moment. The exception
// is a connection with one stream: its call writes its own DATA
// (flushOwnLocked), as no other call's frames could join them. What waits for
// the writer is bounded: a call's DATA by Cells' windows and by
// grpcMaxQueued, HEADERS by Cells' stream limit, acknowledgements by
// maxQueuedAnswers.
func (c *grpcConn) flushLocked() {
	if len(c.wbuf) > 0 && !c.writing {
		c.wake.Signal()
	}
}

// flushOwnLocked is flushLocked for a call's own goroutine, which may
// wait: when the call's stream is the connection's only one and the writer
// is idle, the call makes the write(2) itself. No other call's frames can
// join it, so handing them to the writer would only add a goroutine
// switch per message (a bidirectional stream's, or a lone unary call's).
// mu is released during the write.
func (c *grpcConn) flushOwnLocked() {
	if len(c.wbuf) == 0 || c.writing || !c.idle || len(c.streams) != 1 || c.err != nil {
		c.flushLocked()
		return
	}
	b := c.takeLocked()
	c.mu.Unlock()
	_, err := c.nc.Write(b)
	c.mu.Lock()
	c.wroteLocked(b, err)
	c.flushLocked() // what was queued meanwhile
}

// takeLocked takes what is queued, for one write(2) by the caller, which
// then calls wroteLocked. Only one write runs at a time (c.writing).
func (c *grpcConn) takeLocked() []byte {
	c.writing = true
	b := c.wbuf
	c.wbuf = c.spare[:0]
	c.answers = 0
	if len(b) >= grpcMaxQueued {
		c.sendWait.Broadcast() // copies waiting for room (writeData)
	}
	return b
}

// wroteLocked ends the write(2) of b, which failed the connection if err.
func (c *grpcConn) wroteLocked(b []byte, err error) {
	c.writing = false
	if cap(b) <= 64<<10 {
		c.spare = b[:0]
	} else {
		c.spare = nil
	}
	if err != nil {
		c.failLocked(err)
	}
}

// writeLoop is the connection's writer (flushLocked): it runs until the
// connection fails, and fails it when a write does.
func (c *grpcConn) writeLoop() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for {
		for (len(c.wbuf) == 0 || c.writing) && c.err == nil {
			c.idle = true
			c.wake.Wait()
			c.idle = false
		}
		if c.err != nil {
			return
		}
		// Let the calls that are ready to run queue their frames
		// first: under load the write takes theirs too. c.writing
		// stays false meanwhile, so that goAwayLocked, which writes
		// only when the writer is not writing, can still send its
		// GOAWAY (and what is queued) if the read loop fails the
		// connection now.
		c.mu.Unlock()
		runtime.Gosched()
		c.mu.Lock()
		if c.err != nil {
			return
		}
		if c.writing || len(c.wbuf) == 0 {
			continue // a call wrote them (flushOwnLocked)
		}
		b := c.takeLocked()
		c.mu.Unlock()
		_, err := c.nc.Write(b)
		c.mu.Lock()
		c.wroteLocked(b, err)
	}
}

// grpcMaxQueued is how much a call's request body may queue while the
// writer has not taken the buffer: past it, writeData waits for the writer,
// as the copy used to wait in its own write(2). Without it, a Cells that
// stops reading (or a slow path to it) would have the proxy read its
// clients' uploads into memory up to Cells' windows (up to 2 GiB a
// connection), and every call's frames would queue behind them.
const grpcMaxQueued = 1 << 20

// maxQueuedAnswers bounds the acknowledgements (of Cells' PINGs and
// SETTINGS) queued while the writer has not taken the buffer: x/net's
// HTTP/2 server's maxQueuedControlFrames.
const maxQueuedAnswers = 10000

// answerLocked counts one more acknowledgement to queue, and refuses it when
// maxQueuedAnswers are already waiting. The read loop never waits for the
// writer, so a Cells that stopped reading but kept sending PINGs would
// otherwise grow the buffer without end; the connection is closed instead
// (ENHANCE_YOUR_CALM), as x/net's server closes such a client's.
func (c *grpcConn) answerLocked() error {
	if c.answers >= maxQueuedAnswers {
		return h2ConnError{codeEnhanceYourCalm, "too many PING and SETTINGS frames while not reading"}
	}
	c.answers++
	return nil
}

// close ends the connection and every call on it with err.
func (c *grpcConn) close(err error) {
	c.mu.Lock()
	c.failLocked(err)
	c.mu.Unlock()
}

func (c *grpcConn) failLocked(err error) {
	if c.err != nil {
		return
	}
	c.err = err
	c.raw.Close()
	if c.ping != nil {
		c.ping.Stop()
	}
	if c.idleTimer != nil {
		c.idleTimer.Stop()
	}
	for _, s := range c.streams {
		s.failLocked(err)
	}
	c.streams = nil
	c.sendWait.Broadcast()
	c.wake.Signal()
	c.notifyLocked()
	go c.u.remove(c)
}

// dropStale has the connections dialled before CELLS_UPSTREAM_CA_FILE
// last changed take no new call (upstreamCA.onChange): the calls go on a
// new connection, verified with the file as it is now.
func (u *grpcUpstream) dropStale() {
	gen := u.ca.generation()
	// A connection added after this look checks gen itself (open).
	// Outside u.mu: a GOAWAY may take up to a second to write.
	u.mu.Lock()
	conns := append([]*grpcConn(nil), u.conns...)
	u.mu.Unlock()
	for _, c := range conns {
		if c.gen != gen {
			c.mu.Lock()
			c.retireLocked()
			c.mu.Unlock()
		}
	}
}

// retireLocked has c take no new call, as a GOAWAY from Cells does: the
// calls open on it go on to their end, the last one closes it
// (dropLocked), and calls waiting for Cells to allow streams on it go
// elsewhere. Without calls it is closed at once, as idleCheck closes an
// idle one (GOAWAY NO_ERROR).
func (c *grpcConn) retireLocked() {
	if c.err != nil {
		return
	}
	c.goaway = true
	c.notifyLocked()
	if len(c.streams) == 0 {
		c.goAwayLocked(0, errH2Stale)
	}
}

// goAwayLocked answers a protocol error of Cells' with GOAWAY and closes;
// idleCheck closes an idle connection with it too (NO_ERROR).
func (c *grpcConn) goAwayLocked(code uint32, err error) {
	if c.err == nil {
		b := appendFrameHeader(nil, 8, frameGoAway, 0, 0)
		// Last-Stream-ID counts the streams Cells opened (RFC 9113
		// §6.8): none, push being off. The proxy's own are its to end.
		b = binary.BigEndian.AppendUint32(b, 0)
		b = binary.BigEndian.AppendUint32(b, code)
		c.nc.SetWriteDeadline(time.Now().Add(time.Second))
		if !c.writing {
			c.nc.Write(append(c.wbuf, b...))
		}
	}
	c.failLocked(err)
}

// idleCheck runs every idleTimeout: it closes c, with GOAWAY NO_ERROR
// (RFC 9113 §6.8: a graceful close), when c carried no call since the
// previous check (no stream open now, none opened or ended since) and no
// call waits on it for streams. A connection is so closed between one and
// two idleTimeouts after its last call ended; counting streams rather than
// taking the time when the last one ends keeps the clock, and the timer,
// off the calls' path. Under c.mu, a call cannot open a stream meanwhile:
// one that finds c closed goes on another connection (errH2Full, or
// errH2Idle from awaitStreams for one that picked c to wait on).
func (c *grpcConn) idleCheck() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return
	}
	if len(c.streams) == 0 && c.waiting == 0 && c.activity == c.idleMark {
		c.goAwayLocked(0, errH2Idle)
		return
	}
	c.idleMark = c.activity
	c.idleTimer.Reset(c.u.idleTimeout)
}

// health runs pingEvery after Cells was last heard from: while calls are
// open it sends a PING, and drops the connection when one sent
// pingTimeout ago is unanswered and nothing else came either.
func (c *grpcConn) health() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.healthLocked()
}

func (c *grpcConn) healthLocked() {
	if c.err != nil {
		return
	}
	now := time.Now()
	quiet := now.Sub(time.Unix(0, c.stamp.Load()))
	switch {
	case !c.pingSent.IsZero() && now.Sub(c.pingSent) >= c.u.pingTimeout && quiet >= c.u.pingTimeout:
		c.failLocked(errH2PingLost)
		return
	case !c.pingSent.IsZero():
		c.ping.Reset(max(c.u.pingTimeout-now.Sub(c.pingSent), c.u.pingTimeout-quiet))
	case quiet >= c.u.pingEvery && len(c.streams) == 0:
		// No call to protect: a PING now would count against the
		// connection under grpc-go's policy (none without calls within
		// two hours); a dead idle connection is found by TCP keepalive.
		c.ping.Reset(c.u.pingEvery)
	case quiet >= c.u.pingEvery:
		c.pingSent = now
		c.wbuf = appendFrameHeader(c.wbuf, 8, framePing, 0, 0)
		c.wbuf = binary.BigEndian.AppendUint64(c.wbuf, uint64(now.UnixNano()))
		c.ping.Reset(c.u.pingTimeout)
		c.flushLocked()
	default:
		c.ping.Reset(c.u.pingEvery - quiet)
	}
}

// open starts a stream for req: HEADERS, with END_STREAM when there is no
// body. With a body, the HEADERS are queued, not written: the caller
// flushes them.
func (c *grpcConn) open(call *grpcCall, body io.ReadCloser) (*grpcStream, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil || c.goaway || uint32(len(c.streams)) >= c.maxStreams || c.nextID > h2MaxStreamID {
		return nil, errH2Full
	}
	s := &grpcStream{
		c:       c,
		req:     call.req,
		body:    body,
		id:      c.nextID,
		ready:   make(chan struct{}),
		send:    c.peerWindow,
		recv:    int64(c.u.streamWindow),
		sentEnd: body == nil,
	}
	s.cond.L = &c.mu
	c.hbuf.Reset()
	if err := c.encodeRequest(call, body != nil); err != nil {
		return nil, err // nothing encoded
	}
	c.nextID += 2
	c.lastID = s.id
	c.streams[s.id] = s
	c.activity++
	c.appendHeaderBlock(s.id, body == nil)
	if len(c.streams) == 1 && c.pingSent.IsZero() && time.Since(time.Unix(0, c.stamp.Load())) >= c.u.pingEvery {
		// The first call on a connection Cells has been quiet on for
		// pingEvery: the PING check waits on a timer set for a
		// connection without calls, which may fire up to pingEvery
		// from now, and a call on a connection that died without a
		// FIN or RST would wait that long. The PING goes now, after
		// the HEADERS (grpc-go counts a PING that finds no stream open
		// against the client).
		c.healthLocked()
	}
	if body == nil {
		c.flushLocked()
	}
	return s, nil
}

// flush writes what is queued.
func (c *grpcConn) flush() {
	c.mu.Lock()
	c.flushLocked()
	c.mu.Unlock()
}

// appendHeaderBlock queues c.hbuf as HEADERS and CONTINUATION frames.
func (c *grpcConn) appendHeaderBlock(id uint32, end bool) {
	block := c.hbuf.Bytes()
	typ, flags := byte(frameHeaders), byte(0)
	if end {
		flags = flagEndStream
	}
	for first := true; first || len(block) > 0; first = false {
		n := min(len(block), c.maxFrame)
		f := flags
		if n == len(block) {
			f |= flagEndHeaders
		}
		c.wbuf = appendFrameHeader(c.wbuf, n, typ, f, id)
		c.wbuf = append(c.wbuf, block[:n]...)
		block = block[n:]
		typ, flags = frameContinuation, 0
	}
}

func (c *grpcConn) encodeRequest(call *grpcCall, hasBody bool) error {
	req := call.req
	if !httpguts.ValidHostHeader(call.host) || !validPseudo(call.path) || !validPseudo(req.Method) {
		// Not the target itself: its query may hold a token, and the
		// error is logged (errorHandler logs the path redacted).
		return errors.New("cells-proxy: invalid request target for HTTP/2")
	}
	// Checked before anything is encoded: HPACK's table changes with
	// every field written, so a block must not be abandoned half-way.
	if err := checkHeader(req.Header); err != nil {
		return err
	}
	if c.peerMaxHeader > 0 {
		// A head Cells announced it would refuse is not sent: the
		// client gets 431 (RESOURCE_EXHAUSTED for gRPC) instead of a
		// reset from Cells. A dry run of the same writes measures it.
		c.sizing, c.hsize = true, 0
		c.writeRequest(call, hasBody)
		c.sizing = false
		if c.hsize > uint64(c.peerMaxHeader) {
			return errHeaderListSize
		}
	}
	c.writeRequest(call, hasBody)
	return nil
}

// errHeaderListSize: the request's head is larger than Cells' advertised
// SETTINGS_MAX_HEADER_LIST_SIZE.
var errHeaderListSize = errors.New("cells-proxy: request head larger than Cells' SETTINGS_MAX_HEADER_LIST_SIZE")

// writeRequest encodes the call's head: the pseudo-header fields, the
// client's fields (encodeFields' rules), the proxy's forwarding fields and
// the body's length when the client gave it.
func (c *grpcConn) writeRequest(call *grpcCall, hasBody bool) {
	req := call.req
	c.writeField(":method", req.Method)
	c.writeField(":scheme", c.u.scheme)
	c.writeField(":authority", call.host)
	c.writeField(":path", call.path)
	c.encodeFields(req.Header, call.timeout != "")
	if call.timeout != "" {
		c.writeField("grpc-timeout", call.timeout)
	}
	if fw := &call.fw; fw.ok {
		c.writeField("x-forwarded-for", fw.xff)
		c.writeField("x-real-ip", fw.realIP)
		c.writeField("x-forwarded-proto", fw.proto)
		c.writeField("x-forwarded-host", fw.host)
	}
	if hasBody && req.ContentLength > 0 {
		c.writeField("content-length", strconv.FormatInt(req.ContentLength, 10))
	}
}

func validPseudo(v string) bool {
	if v == "" {
		return false
	}
	for i := 0; i < len(v); i++ {
		if b := v[i]; b <= ' ' || b == 0x7f {
			return false
		}
	}
	return true
}

// encodeFields adds the client's header fields h to the request's header
// block, lower-cased, with the direct path's rules (notForwarded: no
// hop-by-hop fields, none of the forwarding fields the proxy replaces, no
// Host or Content-Length; writeRequest writes its own), except that te is
// kept as "trailers" when the client said it, and every User-Agent value
// is kept, as ReverseProxy passed them to an HTTP/2 transport. With
// retimed, the client's grpc-timeout is left out: writeRequest writes the
// time left instead.
func (c *grpcConn) encodeFields(h http.Header, retimed bool) {
	for k, vv := range h {
		name := lowerName(k)
		switch {
		case retimed && name == "grpc-timeout":
			continue
		case name == "te":
			if httpguts.HeaderValuesContainsToken(vv, "trailers") {
				c.writeField("te", "trailers")
			}
			continue
		case name == "user-agent":
			if len(vv) > 0 && vv[0] == "" {
				continue
			}
		case connSpecific(name) || notForwarded(k):
			continue
		}
		for _, v := range vv {
			c.writeField(name, v)
		}
	}
}

func (c *grpcConn) writeField(name, value string) {
	f := hpack.HeaderField{Name: name, Value: value}
	c.hsize += uint64(f.Size())
	if !c.sizing {
		c.henc.WriteField(f)
	}
}

// lowerName lower-cases a canonical header key, without allocating for
// the common ones.
func lowerName(k string) string {
	if v, ok := commonLower[k]; ok {
		return v
	}
	for i := 0; i < len(k); i++ {
		if b := k[i]; 'A' <= b && b <= 'Z' {
			return strings.ToLower(k)
		}
	}
	return k
}

var commonLower = func() map[string]string {
	m := make(map[string]string)
	for _, k := range []string{
		"Accept", "Accept-Encoding", "Authorization", "Content-Type", "Content-Length",
		"Cookie", "Grpc-Accept-Encoding", "Grpc-Encoding", "Grpc-Timeout", "Grpc-Status",
		"Grpc-Message", "Te", "User-Agent", "X-Forwarded-For", "X-Forwarded-Host",
		"X-Forwarded-Proto", "X-Real-Ip", "X-Pydio-Bearer", "Connection", "Upgrade",
		"Transfer-Encoding", "Keep-Alive", "Proxy-Connection", "Host",
	} {
		m[k] = strings.ToLower(k)
	}
	return m
}()

func appendFrameHeader(b []byte, n int, typ, flags byte, id uint32) []byte {
	return append(b, byte(n>>16), byte(n>>8), byte(n), typ, flags,
		byte(id>>24)&0x7f, byte(id>>16), byte(id>>8), byte(id))
}

func appendSetting(b []byte, id uint16, v uint32) []byte {
	b = binary.BigEndian.AppendUint16(b, id)
	return binary.BigEndian.AppendUint32(b, v)
}

func appendWindowUpdate(b []byte, id, n uint32) []byte {
	b = appendFrameHeader(b, 4, frameWindowUpdate, 0, id)
	return binary.BigEndian.AppendUint32(b, n)
}

func appendRST(b []byte, id, code uint32) []byte {
	b = appendFrameHeader(b, 4, frameRSTStream, 0, id)
	return binary.BigEndian.AppendUint32(b, code)
}

// readFrame reads one frame; its payload is valid until the next call.
func (c *grpcConn) readFrame() (typ, flags byte, id uint32, p []byte, err error) {
	h := &c.head
	if _, err = io.ReadFull(c.br, h[:]); err != nil {
		return
	}
	n := int(h[0])<<16 | int(h[1])<<8 | int(h[2])
	typ, flags = h[3], h[4]
	id = binary.BigEndian.Uint32(h[5:]) & h2MaxStreamID
	if n > h2MinFrame {
		err = h2ConnError{codeFrameSize, fmt.Sprintf("frame of %d bytes, more than the %d advertised", n, h2MinFrame)}
		return
	}
	if cap(c.rbuf) < n {
		c.rbuf = make([]byte, h2MinFrame)
	}
	p = c.rbuf[:n]
	_, err = io.ReadFull(c.br, p)
	if err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return
}

func (c *grpcConn) applySettings(p []byte) error {
	if len(p)%6 != 0 {
		return h2ConnError{codeFrameSize, "SETTINGS length not a multiple of 6"}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for ; len(p) > 0; p = p[6:] {
		v := binary.BigEndian.Uint32(p[2:])
		switch binary.BigEndian.Uint16(p) {
		case settingHeaderTableSize:
			c.henc.SetMaxDynamicTableSizeLimit(v)
		case settingMaxStreams:
			c.maxStreams = min(v, h2MaxStreams)
			c.notifyLocked()
		case settingInitialWindowSize:
			if v > h2MaxWindow {
				return h2ConnError{codeFlowControl, "initial window size too large"}
			}
			delta := int64(v) - c.peerWindow
			c.peerWindow = int64(v)
			for _, s := range c.streams {
				s.send += delta
				if s.send > h2MaxWindow {
					return h2ConnError{codeFlowControl, "stream window overflow"}
				}
			}
			c.sendWait.Broadcast()
		case settingMaxFrameSize:
			if v < h2MinFrame || v > 1<<24-1 {
				return h2ConnError{codeProtocol, "invalid SETTINGS_MAX_FRAME_SIZE"}
			}
			c.maxFrame = int(v)
		case settingMaxHeaderListSize:
			c.peerMaxHeader = v
		case settingEnablePush:
			if v > 1 {
				return h2ConnError{codeProtocol, "invalid SETTINGS_ENABLE_PUSH"}
			}
		}
	}
	return nil
}

// readLoop reads Cells' frames until the connection ends.
func (c *grpcConn) readLoop() {
	for {
		typ, flags, id, p, err := c.readFrame()
		if err == nil {
			err = c.handle(typ, flags, id, p)
		}
		if err != nil {
			c.mu.Lock()
			var ce h2ConnError
			if errors.As(err, &ce) {
				c.goAwayLocked(ce.code, err)
			} else {
				if err == io.EOF {
					err = io.ErrUnexpectedEOF
				}
				c.failLocked(err)
			}
			c.mu.Unlock()
			return
		}
	}
}

func (c *grpcConn) handle(typ, flags byte, id uint32, p []byte) error {
	if c.inBlock && typ != frameContinuation {
		return h2ConnError{codeProtocol, "header block interrupted"}
	}
	switch typ {
	case frameData:
		return c.handleData(flags, id, p)
	case frameHeaders:
		if id == 0 {
			return h2ConnError{codeProtocol, "HEADERS on stream 0"}
		}
		var err error
		if p, err = unpad(flags, p); err != nil {
			return err
		}
		if flags&flagPriority != 0 {
			if len(p) < 5 {
				return h2ConnError{codeFrameSize, "short HEADERS"}
			}
			p = p[5:]
		}
		c.blockID, c.blockEnd = id, flags&flagEndStream != 0
		c.inBlock, c.block = true, append(c.block[:0], p...)
		if flags&flagEndHeaders != 0 {
			return c.endBlock()
		}
	case frameContinuation:
		if !c.inBlock || id != c.blockID {
			return h2ConnError{codeProtocol, "unexpected CONTINUATION"}
		}
		if len(c.block)+len(p) > int(c.u.maxHeader)+h2MinFrame {
			return h2ConnError{codeEnhanceYourCalm, "response header block too large"}
		}
		c.block = append(c.block, p...)
		if flags&flagEndHeaders != 0 {
			return c.endBlock()
		}
	case frameRSTStream:
		if len(p) != 4 {
			return h2ConnError{codeFrameSize, "RST_STREAM length"}
		}
		if id == 0 {
			return h2ConnError{codeProtocol, "RST_STREAM on stream 0"}
		}
		c.mu.Lock()
		if s := c.streams[id]; s != nil {
			// After a complete response (grpc-go resets a stream the
			// client has not ended), only the request side stops.
			code := binary.BigEndian.Uint32(p)
			s.refused = code == codeRefusedStream && s.res == nil
			s.failLocked(h2StreamReset{code})
			c.dropLocked(s)
		}
		c.mu.Unlock()
	case frameSettings:
		if id != 0 {
			return h2ConnError{codeProtocol, "SETTINGS on a stream"}
		}
		if flags&flagAck != 0 {
			return nil
		}
		if err := c.applySettings(p); err != nil {
			return err
		}
		c.mu.Lock()
		if err := c.answerLocked(); err != nil {
			c.mu.Unlock()
			return err
		}
		c.wbuf = appendFrameHeader(c.wbuf, 0, frameSettings, flagAck, 0)
		c.flushLocked()
		c.mu.Unlock()
	case framePushPromise:
		return h2ConnError{codeProtocol, "PUSH_PROMISE though push is disabled"}
	case framePing:
		if len(p) != 8 || id != 0 {
			return h2ConnError{codeFrameSize, "bad PING"}
		}
		c.mu.Lock()
		if flags&flagAck != 0 {
			if !c.pingSent.IsZero() {
				c.pingSent = time.Time{}
				c.ping.Reset(c.u.pingEvery)
			}
		} else {
			if err := c.answerLocked(); err != nil {
				c.mu.Unlock()
				return err
			}
			c.wbuf = appendFrameHeader(c.wbuf, 8, framePing, flagAck, 0)
			c.wbuf = append(c.wbuf, p...)
			c.flushLocked()
		}
		c.mu.Unlock()
	case frameGoAway:
		if len(p) < 8 || id != 0 {
			return h2ConnError{codeFrameSize, "bad GOAWAY"}
		}
		last := binary.BigEndian.Uint32(p) & h2MaxStreamID
		c.mu.Lock()
		c.goaway = true
		c.notifyLocked() // calls waiting for streams go elsewhere
		for sid, s := range c.streams {
			if sid > last {
				s.refused = s.res == nil
				s.failLocked(errH2GoAway)
				c.dropLocked(s)
			}
		}
		// Whatever the error code, the calls up to last may still end
		// well; Cells closes the connection when they cannot.
		if len(c.streams) == 0 {
			c.failLocked(errH2Drained)
		}
		c.mu.Unlock()
	case frameWindowUpdate:
		if len(p) != 4 {
			return h2ConnError{codeFrameSize, "WINDOW_UPDATE length"}
		}
		n := int64(binary.BigEndian.Uint32(p) & h2MaxWindow)
		c.mu.Lock()
		defer c.mu.Unlock()
		if id == 0 {
			if n == 0 {
				return h2ConnError{codeProtocol, "WINDOW_UPDATE of 0"}
			}
			if c.sendConn += n; c.sendConn > h2MaxWindow {
				return h2ConnError{codeFlowControl, "connection window overflow"}
			}
		} else if s := c.streams[id]; s != nil {
			if s.send += n; n == 0 || s.send > h2MaxWindow {
				s.failLocked(h2StreamFault{codeFlowControl, "bad stream WINDOW_UPDATE"})
				c.resetLocked(s, codeFlowControl)
			}
		}
		c.sendWait.Broadcast()
	}
	return nil
}

func unpad(flags byte, p []byte) ([]byte, error) {
	if flags&flagPadded == 0 {
		return p, nil
	}
	if len(p) < 1 || int(p[0]) > len(p)-1 {
		return nil, h2ConnError{codeProtocol, "bad padding"}
	}
	return p[1 : len(p)-int(p[0])], nil
}

func (c *grpcConn) handleData(flags byte, id uint32, p []byte) error {
	if id == 0 {
		return h2ConnError{codeProtocol, "DATA on stream 0"}
	}
	size := int64(len(p)) // padding counts against the windows too
	data, err := unpad(flags, p)
	if err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.recvConn -= size; c.recvConn < 0 {
		return h2ConnError{codeFlowControl, "connection receive window exceeded"}
	}
	s := c.streams[id]
	if s == nil || s.remoteEnd || s.failed != nil {
		// A call already over: give the window back.
		if id > c.lastID {
			return h2ConnError{codeProtocol, "DATA on an unopened stream"}
		}
		c.consumedLocked(nil, size)
		return nil
	}
	if s.res == nil {
		s.failLocked(h2StreamFault{codeProtocol, "DATA before the response header"})
		c.resetLocked(s, codeProtocol)
		c.consumedLocked(nil, size)
		return nil
	}
	if s.recv -= size; s.recv < 0 {
		s.failLocked(h2StreamFault{codeFlowControl, "stream receive window exceeded"})
		c.resetLocked(s, codeFlowControl)
		c.consumedLocked(nil, size)
		return nil
	}
	s.buf.Write(data)
	if flags&flagEndStream != 0 {
		s.remoteEnd = true
		c.endLocked(s)
	}
	s.cond.Signal()
	if pad := size - int64(len(data)); pad > 0 {
		// Padding is never read: its window comes back now, on the
		// connection and on a stream still open, as x/net's transport
		// does. Were it given back with the next read, DATA frames of
		// padding alone could use up the stream's window with nothing
		// for the client to read, and the call would stall.
		c.consumedLocked(s, pad)
	}
	return nil
}

// consumedLocked gives n bytes of receive window back: on the connection,
// and on s when not nil and still open, once half a window is owed.
func (c *grpcConn) consumedLocked(s *grpcStream, n int64) {
	c.recvAcked += n
	if c.recvAcked >= int64(c.u.connWindow)/2 {
		c.wbuf = appendWindowUpdate(c.wbuf, 0, uint32(c.recvAcked))
		c.recvConn += c.recvAcked
		c.recvAcked = 0
	}
	if s != nil && !s.remoteEnd && s.failed == nil {
		s.acked += n
		if s.acked >= int64(c.u.streamWindow)/2 {
			c.wbuf = appendWindowUpdate(c.wbuf, s.id, uint32(s.acked))
			s.recv += s.acked
			s.acked = 0
		}
	}
	c.flushLocked()
}

// endBlock decodes a complete header block: the response header, or the
// trailers.
func (c *grpcConn) endBlock() error {
	block, id, end := c.block, c.blockID, c.blockEnd
	c.inBlock = false
	if cap(c.block) > 64<<10 {
		c.block = nil
	}
	c.fields, c.fieldsSize = c.fields[:0], 0
	if _, err := c.hdec.Write(block); err != nil {
		return h2ConnError{codeCompression, err.Error()}
	}
	if err := c.hdec.Close(); err != nil {
		return h2ConnError{codeCompression, err.Error()}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	s := c.streams[id]
	if s == nil || s.failed != nil || s.remoteEnd {
		if id > c.lastID {
			return h2ConnError{codeProtocol, "HEADERS on an unopened stream"}
		}
		return nil // a call already over; the block kept HPACK in step
	}
	if s.res == nil {
		res, informational, err := c.response(s, end)
		if err != nil {
			s.failLocked(err)
			c.resetLocked(s, codeProtocol)
			return nil
		}
		if informational {
			return nil // 1xx: not passed on
		}
		s.res = res
		close(s.ready)
		// Answered: no longer refusable, so the copy kept for sending
		// it again goes (a stream may live for hours).
		s.kept, s.tooLong = nil, true
	} else {
		if !end {
			s.failLocked(h2StreamFault{codeProtocol, "trailers without END_STREAM"})
			c.resetLocked(s, codeProtocol)
			return nil
		}
		t, err := c.trailers()
		if err != nil {
			s.failLocked(err)
			c.resetLocked(s, codeProtocol)
			return nil
		}
		s.trailer = t
	}
	if end {
		s.remoteEnd = true
		s.cond.Signal()
		c.endLocked(s)
	}
	return nil
}

var errBadResponseHeader = h2StreamFault{codeProtocol, "malformed response header"}

// response builds s's response from the decoded fields.
func (c *grpcConn) response(s *grpcStream, end bool) (*http.Response, bool, error) {
	status := ""
	h := make(http.Header, len(c.fields))
	values := make([]string, len(c.fields)) // one array for all the fields' values
	for i, f := range c.fields {
		if strings.HasPrefix(f.Name, ":") {
			if f.Name != ":status" || status != "" || i != 0 {
				return nil, false, errBadResponseHeader
			}
			status = f.Value
			continue
		}
		if !validField(f) {
			return nil, false, errBadResponseHeader
		}
		addField(h, values[i:i+1:i+1], f)
	}
	if c.fieldsSize > int(c.u.maxHeader) {
		return nil, false, h2StreamFault{codeProtocol, fmt.Sprintf("response header larger than %d bytes", c.u.maxHeader)}
	}
	code, err := strconv.Atoi(status)
	if err != nil || len(status) != 3 || code < 100 {
		return nil, false, errBadResponseHeader
	}
	if code < 200 {
		if code == 101 || end {
			return nil, false, errBadResponseHeader
		}
		return nil, true, nil
	}
	if code == http.StatusOK {
		status = "200 OK" // without a concatenation: nearly every answer
	} else {
		status += " " + http.StatusText(code)
	}
	res := &http.Response{
		Status:        status,
		StatusCode:    code,
		Proto:         "HTTP/2.0",
		ProtoMajor:    2,
		Header:        h,
		Trailer:       make(http.Header),
		ContentLength: -1,
		Body:          s,
		Request:       s.req,
	}
	if end {
		res.ContentLength = 0
	} else if cl := h["Content-Length"]; len(cl) == 1 {
		if n, err := strconv.ParseInt(cl[0], 10, 64); err == nil && n >= 0 {
			res.ContentLength = n
		}
	}
	for _, v := range h["Trailer"] {
		for k := range strings.SplitSeq(v, ",") {
			if k = textproto.TrimString(k); k != "" {
				res.Trailer[canonicalKey(k)] = nil
			}
		}
	}
	return res, false, nil
}

func (c *grpcConn) trailers() (http.Header, error) {
	t := make(http.Header, len(c.fields))
	values := make([]string, len(c.fields))
	for i, f := range c.fields {
		if strings.HasPrefix(f.Name, ":") || !validField(f) {
			return nil, errBadResponseHeader
		}
		addField(t, values[i:i+1:i+1], f)
	}
	if c.fieldsSize > int(c.u.maxHeader) {
		return nil, h2StreamFault{codeProtocol, fmt.Sprintf("trailers larger than %d bytes", c.u.maxHeader)}
	}
	return t, nil
}

// validField: a lower-case token name, a value without CR, LF or NUL, and
// no connection-specific field (RFC 9113 8.2).
// addField adds f to h. slot is a free place of capacity one for its value:
// the first value of a name takes it, so that the values of a header
// section are one allocation, not one per field; the rest are appended.
func addField(h http.Header, slot []string, f hpack.HeaderField) {
	k := canonicalKey(f.Name)
	if vv, ok := h[k]; ok {
		h[k] = append(vv, f.Value)
		return
	}
	slot[0] = f.Value
	h[k] = slot
}

// canonicalKey is http.CanonicalHeaderKey for a name as HTTP/2 carries it
// (lower case), without allocating for the names of a gRPC answer.
// TestCanonicalKey checks it against http.CanonicalHeaderKey.
func canonicalKey(name string) string {
	switch name {
	case "content-type":
		return "Content-Type"
	case "content-length":
		return "Content-Length"
	case "date":
		return "Date"
	case "trailer":
		return "Trailer"
	case "grpc-status":
		return "Grpc-Status"
	case "grpc-message":
		return "Grpc-Message"
	case "grpc-encoding":
		return "Grpc-Encoding"
	case "grpc-accept-encoding":
		return "Grpc-Accept-Encoding"
	case "grpc-status-details-bin":
		return "Grpc-Status-Details-Bin"
	}
	return http.CanonicalHeaderKey(name)
}

func validField(f hpack.HeaderField) bool {
	return validWireName(f.Name) && httpguts.ValidHeaderFieldValue(f.Value) && !connSpecific(f.Name)
}

// resetLocked sends RST_STREAM for s and forgets it.
func (c *grpcConn) resetLocked(s *grpcStream, code uint32) {
	if c.streams[s.id] != s {
		return
	}
	c.wbuf = appendRST(c.wbuf, s.id, code)
	c.dropLocked(s)
	c.flushLocked()
}

// dropLocked forgets s, which is over on both sides. What it buffered is
// still read (then its error); the connection window of what is never read
// comes back when the body is closed.
func (c *grpcConn) dropLocked(s *grpcStream) {
	s.sentEnd, s.remoteEnd = true, true
	if c.streams[s.id] == s {
		delete(c.streams, s.id)
		c.activity++
	}
	s.cond.Broadcast()
	c.sendWait.Broadcast()
	if (c.goaway || c.nextID > h2MaxStreamID) && len(c.streams) == 0 {
		// Nothing opens a stream on it any more.
		c.failLocked(errH2Drained)
	}
}

// endLocked forgets s once both sides have ended it.
func (c *grpcConn) endLocked(s *grpcStream) {
	if s.sentEnd && s.remoteEnd && c.streams[s.id] == s {
		c.dropLocked(s)
	}
}

// grpcStream is one call. It is the response body.
type grpcStream struct {
	c         *grpcConn
	id        uint32
	req       *http.Request
	body      io.ReadCloser // request body; nil: none
	bodyClose sync.Once
	stop      func() bool // stops the context's AfterFunc

	// Under c.mu.
	cond      sync.Cond
	ready     chan struct{} // closed when res or err is set
	res       *http.Response
	err       error      // what do returns when res is nil
	failed    error      // the call broke: reads return it after buf
	buf       recvBuffer // response body received, not yet read
	trailer   http.Header
	send      int64 // send window
	recv      int64 // receive window left
	acked     int64 // bytes read not yet given back
	sentEnd   bool  // END_STREAM or RST_STREAM sent
	remoteEnd bool  // END_STREAM or RST_STREAM received
	closed    bool  // Close called
	// The request body read so far, kept while it is at most
	// grpcReplayMax, so that a call Cells refused can be sent again;
	// keptAll once its end was read too.
	kept    []byte
	keptAll bool
	tooLong bool
	refused bool // Cells did not process the call (REFUSED_STREAM, or above a GOAWAY's last stream)
	// After a refusal: decided once do has called handOver; handoff, the
	// next attempt's pipe, to which the body copy then sends the rest of
	// the body; copyDone once the body copy has ended.
	decided  bool
	handoff  *io.PipeWriter
	copyDone bool
}

// grpcReplayMax is the most request body kept for sending a refused call
// again: a unary call's message (Cells Sync's are small).
const grpcReplayMax = 64 << 10

// handOver decides, once an attempt has failed, whether the call is sent
// again (again, and Cells refused it with no more of the body read than
// grpcReplayMax), and returns the next attempt's body: what was read of the
// body, then, unless its end was read too, the rest, which the body copy
// reads on and passes through a pipe. The copy waits for this decision when
// it finds the stream refused, so that no byte is lost or read twice (a
// stream's client may wait for Cells before it sends more: the next attempt
// does not wait for the body's end).
func (s *grpcStream) handOver(again bool) (io.ReadCloser, bool) {
	c := s.c
	c.mu.Lock()
	defer c.mu.Unlock()
	s.decided = true
	s.cond.Broadcast()
	switch {
	case !again || !s.refused:
	case s.body == nil:
		return nil, true
	case s.tooLong:
	case s.keptAll:
		go s.closeBody()
		return io.NopCloser(bytes.NewReader(s.kept)), true
	case !s.copyDone:
		pr, pw := io.Pipe()
		s.handoff = pw
		return handedBody{io.MultiReader(bytes.NewReader(s.kept), pr), pr}, true
	}
	if s.body != nil {
		go s.closeBody()
	}
	return nil, false
}

// handedBody is the body of a call's next attempt: what the refused one
// read, then the pipe its body copy feeds.
type handedBody struct {
	io.Reader
	pr *io.PipeReader
}

// Close makes the feeding copy stop and close the client's body.
func (b handedBody) Close() error { return b.pr.Close() }

// closeBody closes the request body: a copy blocked reading it returns.
func (s *grpcStream) closeBody() {
	if s.body != nil {
		s.bodyClose.Do(func() { s.body.Close() })
	}
}

// failLocked ends s with err, unless its response is complete already:
// then only the request side stops. Reads return err after what is
// buffered.
func (s *grpcStream) failLocked(err error) {
	if s.failed != nil {
		return
	}
	if !s.remoteEnd {
		s.failed = err
		if s.res == nil {
			s.err = err
			close(s.ready)
		}
	}
	s.cond.Broadcast()
	s.c.sendWait.Broadcast()
	if s.body != nil && !s.refused {
		// A refused call's body may go to its next attempt: handOver
		// decides.
		go s.closeBody()
	}
}

// answered reports whether Cells' answer on s came complete.
func (s *grpcStream) answered() bool {
	s.c.mu.Lock()
	defer s.c.mu.Unlock()
	return s.remoteEnd && s.failed == nil
}

// abort ends s from our side (the client went, its body broke).
func (s *grpcStream) abort(err error, code uint32) {
	c := s.c
	c.mu.Lock()
	defer c.mu.Unlock()
	s.failLocked(err)
	if c.err == nil {
		c.resetLocked(s, code)
	}
}

// Read reads the response body.
func (s *grpcStream) Read(p []byte) (int, error) {
	c := s.c
	c.mu.Lock()
	defer c.mu.Unlock()
	for s.buf.Len() == 0 && !s.remoteEnd && s.failed == nil {
		s.cond.Wait()
	}
	if s.buf.Len() > 0 {
		n := s.buf.Read(p)
		c.consumedLocked(s, int64(n))
		return n, nil
	}
	if s.failed != nil {
		return 0, s.failed
	}
	for k, vv := range s.trailer {
		s.res.Trailer[k] = vv
	}
	s.trailer = nil
	return 0, io.EOF
}

// Close ends the call: a stream still open is reset.
func (s *grpcStream) Close() error {
	s.stop()
	c := s.c
	c.mu.Lock()
	if s.closed {
		c.mu.Unlock()
		return nil
	}
	s.closed = true
	if !s.remoteEnd || !s.sentEnd {
		s.failLocked(errH2BodyClose)
		if c.err == nil {
			c.resetLocked(s, codeCancel)
		}
	}
	n := int64(s.buf.Len())
	s.buf.Reset() // its chunks back to their pools
	if n > 0 && c.err == nil {
		// Unread: its connection window comes back now.
		c.consumedLocked(nil, n)
	}
	c.mu.Unlock()
	s.closeBody()
	return nil
}

var h2BodyBuffers = newPool(func() *[h2MinFrame]byte { return new([h2MinFrame]byte) })

// writeBody copies the request body to DATA frames, as fast as the
// windows allow, and ends the stream when the body ends. What it reads is
// kept for sending again (keep). Should Cells refuse the stream, it
// waits for do's decision (handOver) and, if the call goes again, passes the
// rest of the body on to the next attempt.
func (s *grpcStream) writeBody(body io.ReadCloser) {
	buf := h2BodyBuffers.Get()
	defer h2BodyBuffers.Put(buf)
	defer s.closeBody()
	for {
		n, err := body.Read(buf[:])
		if w := s.keep(buf[:n], err); w != nil {
			pumpBody(w, body, buf[:n], err, buf[:])
			return
		}
		if n > 0 && !s.writeData(buf[:n], false) {
			s.handOff(body, buf[:])
			return
		}
		if err == io.EOF {
			if !s.writeData(nil, true) {
				s.handOff(body, buf[:])
			} else if w := s.finish(); w != nil {
				w.Close()
			}
			return
		}
		if err != nil {
			if w := s.finish(); w != nil {
				w.CloseWithError(err)
			}
			s.abort(err, codeCancel)
			return
		}
	}
}

// finish notes that the body copy ends, unless the call was handed over:
// it then returns the next attempt's pipe, to be closed.
func (s *grpcStream) finish() *io.PipeWriter {
	c := s.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if s.handoff == nil {
		s.copyDone = true
	}
	return s.handoff
}

// keep notes p, read from the body with err, for a next attempt; or
// returns the next attempt's pipe, to which p goes instead, if the call
// was handed over already.
func (s *grpcStream) keep(p []byte, err error) *io.PipeWriter {
	c := s.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if s.handoff != nil {
		return s.handoff
	}
	if !s.tooLong {
		if s.tooLong = len(s.kept)+len(p) > grpcReplayMax; s.tooLong {
			s.kept = nil
		} else {
			s.kept = append(s.kept, p...)
			s.keptAll = err == io.EOF
		}
	}
	return nil
}

// handOff ends the copy of a stream that no longer takes the body: if
// Cells refused it, once do has decided, the rest of the body goes to the
// next attempt, if any.
func (s *grpcStream) handOff(body io.ReadCloser, buf []byte) {
	c := s.c
	c.mu.Lock()
	for s.refused && !s.decided {
		s.cond.Wait()
	}
	w := s.handoff
	s.copyDone = w == nil
	c.mu.Unlock()
	if w != nil {
		pumpBody(w, body, nil, nil, buf)
	}
}

// pumpBody copies p, read with err, then the rest of body to w, until the
// body ends or w's reader is closed.
func pumpBody(w *io.PipeWriter, body io.Reader, p []byte, err error, buf []byte) {
	for {
		if len(p) > 0 {
			if _, werr := w.Write(p); werr != nil {
				return
			}
		}
		switch {
		case err == io.EOF:
			w.Close()
			return
		case err != nil:
			w.CloseWithError(err)
			return
		}
		var n int
		n, err = body.Read(buf)
		p = buf[:n]
	}
}

// writeData queues p as DATA frames as the windows allow, ending the
// stream with the last one when end. It reports whether the stream still
// takes request body.
//
// A client's request trailers are not passed on (RFC 9110, section 6.5.1,
// lets a proxy drop them): they arrive after the proxy has checked and
// rewritten the header section, so a client could name a forwarding field
// there that Cells would take for the proxy's; gRPC clients send none.
// Through ReverseProxy they reached Cells without their values, as an
// empty header block.
func (s *grpcStream) writeData(p []byte, end bool) bool {
	c := s.c
	c.mu.Lock()
	defer c.mu.Unlock()
	for {
		for len(p) > 0 && (s.send <= 0 || c.sendConn <= 0 || len(c.wbuf) >= grpcMaxQueued) && s.failed == nil && !s.sentEnd && c.err == nil {
			// What the windows took so far leaves before waiting for
			// more, or for the writer to take what is queued.
			c.flushLocked()
			if s.send <= 0 || c.sendConn <= 0 || len(c.wbuf) >= grpcMaxQueued {
				c.sendWait.Wait()
			}
		}
		if s.failed != nil || s.sentEnd || c.err != nil {
			return false
		}
		// Not below 0: a SETTINGS frame that lowers the initial window
		// can leave s.send negative (RFC 9113 §6.9.2), and the empty
		// DATA frame that ends the stream takes no window.
		n := int(max(0, min(int64(len(p)), s.send, c.sendConn, int64(c.maxFrame))))
		last := n == len(p)
		if n > 0 || (last && end) {
			var flags byte
			if last && end {
				flags = flagEndStream
			}
			c.wbuf = appendFrameHeader(c.wbuf, n, frameData, flags, s.id)
			c.wbuf = append(c.wbuf, p[:n]...)
			s.send -= int64(n)
			c.sendConn -= int64(n)
			p = p[n:]
		}
		if !last {
			continue
		}
		if end {
			s.sentEnd = true
			c.endLocked(s)
		}
		c.flushOwnLocked()
		return !end
	}
}
