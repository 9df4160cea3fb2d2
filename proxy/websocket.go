package proxy

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/soheilhy/cmux"
	"golang.org/x/net/http/httpguts"
)

// Websocket close codes (RFC 6455, section 7.4.1).
const (
	closeGoingAway = 1001
)

// tunnels tracks the open websockets so that shutdown can close each with
// 1001 (going away) at a frame boundary, instead of cutting a frame.
type tunnels struct {
	mu      sync.Mutex
	open    map[*tunnel]struct{}
	closing bool
}

func newTunnels() *tunnels { return &tunnels{open: make(map[*tunnel]struct{})} }

func (ts *tunnels) add(t *tunnel) bool {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	if ts.closing {
		return false
	}
	ts.open[t] = struct{}{}
	return true
}

func (ts *tunnels) remove(t *tunnel) {
	ts.mu.Lock()
	delete(ts.open, t)
	ts.mu.Unlock()
}

// count is the number of open websockets.
func (ts *tunnels) count() int {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	return len(ts.open)
}

// closeAll sends 1001 to both ends of every websocket and closes them. New
// websockets are refused from now on.
func (ts *tunnels) closeAll() {
	ts.mu.Lock()
	ts.closing = true
	open := make([]*tunnel, 0, len(ts.open))
	for t := range ts.open {
		open = append(open, t)
	}
	ts.mu.Unlock()
	var wg sync.WaitGroup
	for _, t := range open {
		wg.Go(func() { t.close(closeGoingAway, "server shutting down") })
	}
	wg.Wait()
}

// serve forwards a websocket upgrade to Cells and, once Cells agrees (101),
// hands the connections to a tunnel that copies frames both ways until
// either side closes or nothing moves for PROXY_WS_IDLE_TIMEOUT. It reports
// whether the tunnel took the exchange over: the tunnel then runs on its
// own goroutines and writes the access log line when it ends, and the
// handler returns at once, so that net/http frees the connection's state
// (its bufio buffers, the response, the handler's stack) for the long
// life of an idle websocket.
func (ts *tunnels) serve(f *forwarder, ex *exchange, r *http.Request) (detached bool) {
	// The handshake itself must not hang: it gets the HTTP idle timeout.
	ctx, cancel := context.WithCancelCause(r.Context())
	defer cancel(context.Canceled)
	handshake := time.AfterFunc(f.cfg.IdleTimeout, func() { cancel(errIdle) })

	out := r.Clone(ctx)
	out.RequestURI = ""
	// ForceQuery: a target ending in a bare "?" reaches Cells with it, as
	// on every other path (the request-target goes byte for byte).
	out.URL = &url.URL{Scheme: f.httpTarget.Scheme, Host: f.httpTarget.Host, RawQuery: r.URL.RawQuery, ForceQuery: r.URL.ForceQuery}
	setTarget(out.URL, requestPath(r))
	out.Host = r.Host
	removeHopByHop(out.Header)
	out.Header.Set("Connection", "Upgrade")
	out.Header.Set("Upgrade", "websocket")
	for _, h := range []string{"Forwarded", "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto"} {
		out.Header.Del(h)
	}
	f.setForwarded(r, out)
	if r.ContentLength == 0 {
		out.Body = nil
	}
	res, upConn, err := f.httpUp.upgrade(out)
	if err != nil {
		handshake.Stop()
		// The inbound request with the handshake's context: the log line
		// names the client's path, and classify sees errIdle.
		f.errorHandler(ex, r.WithContext(ctx), err)
		return false
	}
	if res.StatusCode != http.StatusSwitchingProtocols {
		// Cells said no (401, 404, ...): pass its answer on untouched,
		// as long as it moves at least once per idle timeout.
		handshake.Reset(f.cfg.IdleTimeout)
		defer handshake.Stop()
		defer res.Body.Close()
		removeHopByHop(res.Header)
		copyHeader(ex.Header(), res.Header)
		ex.WriteHeader(res.StatusCode)
		buf := copyBuffers.Get()
		defer copyBuffers.Put(buf)
		if _, err := io.CopyBuffer(ex, idleReader{res.Body, handshake, f.cfg.IdleTimeout}, buf[:]); err != nil {
			// Cut (idle limit, Cells gone): the client must not take
			// a well-ended chunked body for Cells' whole answer. What
			// came goes out first, as on a plain response.
			http.NewResponseController(ex).Flush()
			panic(http.ErrAbortHandler)
		}
		return false
	}
	handshake.Stop()
	upstream, ok := res.Body.(io.ReadWriteCloser)
	if !ok || upConn == nil || !httpguts.HeaderValuesContainsToken(res.Header["Upgrade"], "websocket") {
		res.Body.Close()
		f.errorHandler(ex, r.WithContext(ctx), errors.New("upstream switched to something other than websocket"))
		return false
	}

	client, brw, err := http.NewResponseController(ex).Hijack()
	if err != nil {
		upstream.Close()
		f.log.Warn("websocket hijack failed", "err", err)
		return false
	}

	// Relay Cells' 101 with its headers (Sec-WebSocket-Accept, the chosen
	// protocol and extensions).
	removeHopByHop(res.Header)
	brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n")
	res.Header.Write(brw)
	brw.WriteString("\r\n")
	if err := brw.Flush(); err != nil {
		upstream.Close()
		client.Close()
		return false
	}
	ex.status, ex.wroteHeader = http.StatusSwitchingProtocols, true

	// Frames the client sent right behind its handshake are in the
	// hijacked reader's buffer: keep a copy of just those bytes, and read
	// the client's connection directly from then on. Nothing of net/http's
	// connection (brw, the response) stays referenced once serve returns.
	var clientSrc io.Reader = client
	if n := brw.Reader.Buffered(); n > 0 {
		early, _ := brw.Reader.Peek(n)
		clientSrc = io.MultiReader(bytes.NewReader(bytes.Clone(early)), client)
	}
	ex.ResponseWriter = nil // hijacked: it must not be used again
	// The access log needs only these of the request: not its headers,
	// nor its contexts, which would stay in memory as long as the tunnel.
	r = &http.Request{Method: r.Method, Host: r.Host, RequestURI: r.RequestURI, URL: r.URL,
		ProtoMajor: r.ProtoMajor, RemoteAddr: r.RemoteAddr}
	ex.req = r

	t := &tunnel{
		idle:       f.cfg.WSIdleTimeout,
		clientConn: client,
		upConn:     upConn,
		ex:         ex,
	}
	pk := getParker(f.log)
	t.up = pump{t: t, pk: pk, src: clientSrc, srcConn: client, raw: rawConn(client), dst: upstream, dstConn: upConn, mask: true}
	t.down = pump{t: t, pk: pk, fromUpstream: true, src: upstream, srcConn: upConn, raw: rawConn(upConn), dst: client, dstConn: client}
	t.run(ts, func() {
		lingerClose(upConn, client)
		f.finish(ex, r)
	})
	return true
}

// idleReader re-arms t for d at each read that returns bytes.
type idleReader struct {
	io.Reader
	t *time.Timer
	d time.Duration
}

func (r idleReader) Read(p []byte) (int, error) {
	n, err := r.Reader.Read(p)
	if n > 0 {
		r.t.Reset(r.d)
	}
	return n, err
}

// tunnel is one open websocket.
type tunnel struct {
	idle       time.Duration
	clientConn net.Conn
	upConn     net.Conn
	ex         *exchange

	up   pump // client to Cells
	down pump // Cells to client

	last      atomic.Int64 // UnixNano of the last byte read either way
	stopping  atomic.Bool  // stopPumps has set the deadlines that stop the pumps
	timerMu   sync.Mutex
	timer     *time.Timer
	ended     bool // guarded by timerMu: no re-arming once the tunnel has ended
	closeOnce sync.Once
	wg        sync.WaitGroup // the two pumps, until they stop for good
	running   atomic.Int32   // pumps that have not stopped for good
	ts        *tunnels
	onEnd     func() // once both pumps have stopped for good
}

// pump copies frames from src to dst. Knowing where frames start lets the
// proxy add a close frame of its own without corrupting the stream.
type pump struct {
	t            *tunnel
	fromUpstream bool // for the access log's byte counts
	pk           *parker
	parkID       uint64 // guarded by pk.mu
	inSet        bool   // guarded by pk.mu: the socket is in pk's epoll set

	src     io.Reader
	srcConn net.Conn        // the connection under src, for its read deadline
	raw     syscall.RawConn // the socket under srcConn; nil: no parking
	dst     io.Writer
	dstConn net.Conn
	mask    bool // frames to dst must be masked (client to server)

	midFrame bool // a frame has been started on dst and not finished
	broken   bool // dst failed: nothing more may be written to it
}

// run starts the two pumps and returns. From then on the tunnel lives on
// a goroutine per pump while frames move, and on none while it is idle
// (see parker); onEnd runs once both pumps have stopped for good. The
// tunnel joins ts only once its state is set: from then on closeAll may
// close it.
func (t *tunnel) run(ts *tunnels, onEnd func()) {
	t.ts, t.onEnd = ts, onEnd
	t.last.Store(time.Now().UnixNano())
	t.timerMu.Lock()
	t.timer = time.AfterFunc(t.idle, t.checkIdle)
	t.timerMu.Unlock()

	t.running.Store(2)
	t.wg.Add(2)
	go t.up.cycle(false)
	if !ts.add(t) {
		// Shutting down: the down pump does not run.
		t.wg.Done()
		go func() {
			t.close(closeGoingAway, "server shutting down")
			t.pumpGone(false)
		}()
		return
	}
	go t.down.cycle(false)
}

// pumpEnded is called once by each pump when it stops for good. A pump
// that ends on its own (a close handshake, a dropped connection) ends the
// tunnel: it stops the other pump, unless close (idle timeout, shutdown)
// already does; byStop marks a pump that stopPumps took back from the
// parker, on stopPumps' goroutine. close waits for both pumps (wg), so a
// pump leaves wg before it may wait on closeOnce; and a second stopPumps
// would cut the close frames close is writing, mid TLS record.
func (t *tunnel) pumpEnded(byStop bool) {
	t.wg.Done()
	if !byStop {
		t.closeOnce.Do(t.stopPumps)
	}
	t.pumpGone(byStop)
}

// pumpGone counts a pump out; the last one ends the tunnel, on a goroutine
// of its own when async (the caller is inside closeOnce, which end waits
// on).
func (t *tunnel) pumpGone(async bool) {
	if t.running.Add(-1) > 0 {
		return
	}
	if async {
		go t.end()
		return
	}
	t.end()
}

// end runs once both pumps have stopped for good, after close, if one is
// under way, has written its close frames.
func (t *tunnel) end() {
	t.closeOnce.Do(t.stopPumps)
	t.timerMu.Lock()
	t.ended = true
	t.timer.Stop()
	t.timerMu.Unlock()
	t.ts.remove(t)
	t.onEnd()
}

func (t *tunnel) checkIdle() {
	quiet := time.Duration(time.Now().UnixNano() - t.last.Load())
	if quiet < t.idle {
		// Reset of a fired AfterFunc timer re-arms it.
		t.timerMu.Lock()
		if !t.ended {
			t.timer.Reset(t.idle - quiet)
		}
		t.timerMu.Unlock()
		return
	}
	t.close(closeGoingAway, "idle timeout")
}

// stopPumps interrupts both pumps.
func (t *tunnel) stopPumps() {
	// Before the deadlines: a pump that clears its own read deadline
	// (buffered) checks stopping after that, so it either sees stopping or
	// clears its deadline before this sets it.
	t.stopping.Store(true)
	now := time.Now()
	t.clientConn.SetDeadline(now)
	t.upConn.SetDeadline(now)
	// A parked pump is in no read that a deadline could stop: take it
	// back. One that parks after this sees stopping and takes itself back.
	for _, p := range [...]*pump{&t.up, &t.down} {
		if p.pk.unpark(p) {
			t.pumpEnded(true)
		}
	}
}

// close ends the tunnel with a close frame to each side that is at a frame
// boundary, then closes both connections.
func (t *tunnel) close(code uint16, reason string) {
	t.closeOnce.Do(func() {
		t.stopPumps()
		t.wg.Wait()
		t.sendClose(code, reason)
		lingerClose(t.clientConn, t.upConn)
	})
}

// lingerTimeout bounds lingerClose.
var lingerTimeout = 2 * time.Second

// lingerClose closes the connections of a tunnel without losing what was
// written to them. A socket closed with bytes still unread makes the
// kernel reset the connection, which throws away what it has not yet
// sent: the end of the last message one side sent before it closed, or the
// close frames. So each socket first ends its sending side (TLS's
// close_notify, unless a write was cut, then a FIN behind the bytes
// queued), then what the peer still sends is read and dropped until it
// closes too, for at most lingerTimeout: nginx's lingering close,
// net/http's closeWriteAndWait.
func lingerClose(conns ...net.Conn) {
	deadline := time.Now().Add(lingerTimeout)
	var wg sync.WaitGroup
	for _, c := range conns {
		tcp := tcpConn(c)
		if tcp == nil {
			c.Close()
			continue
		}
		wg.Go(func() {
			defer c.Close()
			for l := c; l != nil; l = wrapped(l) {
				if tc, ok := l.(*tls.Conn); ok {
					// A write that failed (a deadline, a stop) may have
					// sent part of a TLS record: a close_notify behind it
					// would read, to the peer, as the rest of that record
					// and fail as a bad MAC instead of a truncation.
					// tls.Conn keeps a failed write's error, which
					// Write(nil) returns without writing.
					if _, err := tc.Write(nil); err == nil {
						tc.CloseWrite() // bounded by a deadline of its own
					}
					break
				}
			}
			if tcp.CloseWrite() != nil {
				return
			}
			tcp.SetReadDeadline(deadline)
			var buf [512]byte
			for {
				if _, err := tcp.Read(buf[:]); err != nil {
					return
				}
			}
		})
	}
	wg.Wait()
}

// tcpConn is the TCP connection under c, through TLS and the public
// port's layers; nil if there is none.
func tcpConn(c net.Conn) *net.TCPConn {
	for ; c != nil; c = wrapped(c) {
		if tcp, ok := c.(*net.TCPConn); ok {
			return tcp
		}
	}
	return nil
}

// sendClose writes a close frame to each side that can take one. The pumps
// must be stopped.
func (t *tunnel) sendClose(code uint16, reason string) {
	deadline := time.Now().Add(2 * time.Second)
	for _, p := range []*pump{&t.up, &t.down} {
		if p.midFrame || p.broken {
			continue
		}
		p.dstConn.SetWriteDeadline(deadline)
		p.dst.Write(closeFrame(code, reason, p.mask))
	}
}

func closeFrame(code uint16, reason string, mask bool) []byte {
	payload := make([]byte, 2+len(reason))
	binary.BigEndian.PutUint16(payload, code)
	copy(payload[2:], reason)
	return shortFrame(0x8, payload, mask)
}

// shortFrame is a final frame of opcode op with a payload under 126 bytes,
// masked with a random key when mask is set (RFC 6455 §5.2, §5.3).
func shortFrame(op byte, payload []byte, mask bool) []byte {
	f := []byte{0x80 | op, byte(len(payload))}
	if !mask {
		return append(f, payload...)
	}
	var key [4]byte
	rand.Read(key[:])
	f[1] |= 0x80
	f = append(f, key[:]...)
	for i, b := range payload {
		f = append(f, b^key[i%4])
	}
	return f
}

// cycle copies frames until none is left to copy, then parks the pump
// until its socket is readable, when wake starts the next cycle on a new
// goroutine; or it ends the pump. woken: the socket was readable, so the
// first read may wait.
//
// Between frames, which for an idle websocket is almost always, a parked
// pump has no goroutine: the goroutine that copied frames ends, and with it
// the stack that reading through crypto/tls grew (4 KiB or more, which the
// runtime never shrinks back on a goroutine that lives on).
func (p *pump) cycle(woken bool) {
	t := p.t
	for {
		if !p.frames(woken) {
			t.pumpEnded(false)
			return
		}
		if p.pk.park(p) {
			if t.stopping.Load() && p.pk.unpark(p) {
				// stopPumps ran before the pump was parked and had
				// nothing to take back.
				t.pumpEnded(false)
			}
			return
		}
		// No parking (no socket under src, no epoll set, another
		// platform): wait for the next frame inside the read.
		woken = true
	}
}

// wake is the parker's call when p's socket is readable.
func (p *pump) wake() { p.cycle(true) }

// frames copies frames from src to dst. With block false, it returns true
// at the first frame boundary where nothing is buffered above the socket,
// for cycle to park; it returns false when the pump must end. With block true
// it waits for the next frame inside the read, as a pump without a socket
// does throughout, and a woken pump does for the frame that woke it.
func (p *pump) frames(block bool) (park bool) {
	t := p.t
	var hdr [14]byte
	for {
		// Read the fixed part of a frame header, then its extensions.
		if block || p.raw == nil {
			block = false
			if _, err := io.ReadFull(p.src, hdr[:1]); err != nil {
				return false
			}
		} else if ok, err := p.buffered(hdr[:1]); err != nil {
			return false
		} else if !ok {
			return true
		}
		t.touch()
		if _, err := io.ReadFull(p.src, hdr[1:2]); err != nil {
			return false
		}
		n := 2
		switch l := hdr[1] & 0x7f; l {
		case 126:
			n += 2
		case 127:
			n += 8
		}
		if hdr[1]&0x80 != 0 {
			n += 4
		}
		if _, err := io.ReadFull(p.src, hdr[2:n]); err != nil {
			return false
		}
		var length uint64
		switch l := hdr[1] & 0x7f; l {
		case 126:
			length = uint64(binary.BigEndian.Uint16(hdr[2:4]))
		case 127:
			length = binary.BigEndian.Uint64(hdr[2:10])
		default:
			length = uint64(l)
		}
		if length > 1<<62 {
			return false // not a websocket: stop rather than guess
		}
		if err := p.copyFrame(hdr[:n], int64(length)); err != nil {
			return false
		}
		p.midFrame = false
		if p.fromUpstream {
			t.ex.bytesOut += int64(n) + int64(length)
		} else {
			t.ex.bytesIn.Add(int64(n) + int64(length))
		}
	}
}

// aLongTimeAgo is a read deadline that makes a read return at once with
// what is already buffered, without asking the socket.
var aLongTimeAgo = time.Unix(1, 0)

// buffered reads one byte into b if one is buffered above the socket (in
// crypto/tls, cmux, or the upgrade response's bufio), without waiting:
// only when none is may the pump park on the socket.
func (p *pump) buffered(b []byte) (bool, error) {
	p.srcConn.SetReadDeadline(aLongTimeAgo)
	n, err := p.src.Read(b)
	p.srcConn.SetReadDeadline(time.Time{})
	if p.t.stopping.Load() {
		// stopPumps set a deadline that the line above may have cleared.
		return false, net.ErrClosed
	}
	if n > 0 {
		return true, nil
	}
	if err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		return false, nil
	}
	return false, err
}

// copyFrame writes a frame to dst: its header hdr with the first bytes of
// its payload (length bytes) in the same write, so that a small frame is
// one TLS record and one write(2) rather than two, then the rest of the
// payload as it arrives. The frame starts on dst (midFrame) with that first
// write: a pump stopped while it waits for the payload leaves dst at a
// frame boundary, where the close frame can still go.
func (p *pump) copyFrame(hdr []byte, length int64) error {
	buf := copyBuffers.Get()
	defer copyBuffers.Put(buf)
	head := copy(buf[:], hdr)
	for {
		chunk := buf[head:]
		if int64(len(chunk)) > length {
			chunk = chunk[:length]
		}
		var nr int
		var err error
		if len(chunk) > 0 {
			nr, err = p.src.Read(chunk)
		}
		if nr > 0 {
			p.t.touch()
		}
		// The header alone only for a frame without payload: otherwise
		// it waits for the first payload bytes (a read that failed
		// before any leaves nothing of the frame on dst).
		if nr > 0 || length == 0 {
			p.midFrame = true
			if _, werr := p.dst.Write(buf[:head+nr]); werr != nil {
				p.broken = true
				return werr
			}
			head = 0
			length -= int64(nr)
		}
		if length == 0 {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// rawConn finds the socket under c, through TLS and cmux, for a pump to
// park on; nil when there is none (another wrapper, another platform): the
// pump then waits inside its reads.
func rawConn(c net.Conn) syscall.RawConn {
	for ; c != nil; c = wrapped(c) {
		switch x := c.(type) {
		case *replayConn:
			if len(x.buf) > 0 {
				return nil // bytes to read above the socket
			}
		case syscall.Conn:
			return rawConnOf(x)
		}
	}
	return nil
}

// wrapped is the connection under c when c is one of the layers a
// connection goes through (TLS, cmux's, the HTTP/1.1 front's hand-over, the
// public port's accepted socket, HTTP/2's filter and write-behind, the socket
// to Cells, under its TLS if any), else nil.
func wrapped(c net.Conn) net.Conn {
	switch x := c.(type) {
	case *tls.Conn:
		return x.NetConn()
	case *cmux.MuxConn:
		return x.Conn
	case *replayConn:
		return x.Conn
	case *cellsSocket:
		return x.Conn
	case *clientSocket:
		return x.Conn
	case *h2conn:
		return x.Conn
	case *writeBehind:
		return x.Conn
	case *servedConn:
		if w := x.c.Load(); w != nil {
			return w
		}
	}
	return nil
}

func (t *tunnel) touch() { t.last.Store(time.Now().UnixNano()) }

// hopHeaders are the hop-by-hop headers of RFC 9110, section 7.6.1, plus
// the non-standard ones that proxies have used.
var hopHeaders = []string{
	"Connection", "Proxy-Connection", "Keep-Alive", "Proxy-Authenticate",
	"Proxy-Authorization", "Te", "Trailer", "Transfer-Encoding", "Upgrade",
}

// removeHopByHop deletes hop-by-hop headers and those named in Connection.
func removeHopByHop(h http.Header) {
	for _, v := range h["Connection"] {
		for _, name := range splitList(v) {
			h.Del(name)
		}
	}
	for _, name := range hopHeaders {
		h.Del(name)
	}
}

// copyHeader adds src's fields to dst. A name with no value is left out:
// it stands for nothing on the wire, and net/http's HTTP/2 server, finding
// a declared trailer's name in a handler's header with no value, sends
// neither trailers nor END_STREAM, and the stream never ends (a trailer
// that Cells declared and did not send: TestTrailerDeclaredNotSent).
func copyHeader(dst, src http.Header) {
	for k, vv := range src {
		if len(vv) > 0 {
			dst[k] = append(dst[k], vv...)
		}
	}
}
