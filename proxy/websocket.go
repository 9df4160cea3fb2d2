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
	out.URL = &url.URL{Scheme: f.httpTarget.Scheme, Host: f.httpTarget.Host, RawQuery: r.URL.RawQuery}
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
	handshake.Stop()
	if err != nil {
		// The inbound request with the handshake's context: the log line
		// names the client's path, and classify sees errIdle.
		f.errorHandler(ex, r.WithContext(ctx), err)
		return false
	}
	if res.StatusCode != http.StatusSwitchingProtocols {
		// Cells said no (401, 404, ...): pass its answer on untouched.
		defer res.Body.Close()
		removeHopByHop(res.Header)
		copyHeader(ex.Header(), res.Header)
		ex.WriteHeader(res.StatusCode)
		buf := copyBuffers.Get()
		defer copyBuffers.Put(buf)
		io.CopyBuffer(ex, res.Body, buf)
		return false
	}
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
	t.up = pump{src: clientSrc, srcConn: client, raw: rawConn(client), dst: upstream, dstConn: upConn, mask: true}
	t.down = pump{src: upstream, srcConn: upConn, raw: rawConn(upConn), dst: client, dstConn: client}
	go func() {
		defer f.finish(ex, r)
		defer client.Close()
		defer upstream.Close()
		t.run(ts)
	}()
	return true
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
	ended     bool // guarded by timerMu: no re-arming after run returns
	closeOnce sync.Once
	wg        sync.WaitGroup // the two pumps, until their loops return
}

// pump copies frames from src to dst. Knowing where frames start lets the
// proxy add a close frame of its own without corrupting the stream.
type pump struct {
	src     io.Reader
	srcConn net.Conn        // the connection under src, for its read deadline
	raw     syscall.RawConn // the socket under srcConn; nil: no parking
	dst     io.Writer
	dstConn net.Conn
	mask    bool // frames to dst must be masked (client to server)

	midFrame bool // a frame has been started on dst and not finished
	broken   bool // dst failed: nothing more may be written to it
}

// run pumps until the tunnel ends: the client-to-Cells pump on a goroutine
// of its own, the other on the caller's. The tunnel joins ts only once its
// state is set: from then on closeAll may close it.
func (t *tunnel) run(ts *tunnels) {
	t.last.Store(time.Now().UnixNano())
	t.timerMu.Lock()
	t.timer = time.AfterFunc(t.idle, t.checkIdle)
	t.timerMu.Unlock()
	defer func() {
		t.timerMu.Lock()
		t.ended = true
		t.timer.Stop()
		t.timerMu.Unlock()
	}()

	// A pump that ends (a close handshake, or a dropped connection) ends
	// the tunnel: it unblocks the other pump, unless close (idle timeout,
	// shutdown) already does. close waits for both pump loops (wg), so a
	// pump leaves wg before it may wait on closeOnce; and a second
	// stopPumps would cut the close frames close is writing, mid TLS
	// record.
	upExited := make(chan struct{})
	t.wg.Add(2)
	go func() {
		defer close(upExited)
		t.up.run(t, false)
		t.wg.Done()
		t.closeOnce.Do(t.stopPumps)
	}()
	if !ts.add(t) {
		t.wg.Done() // the down pump does not run
		t.close(closeGoingAway, "server shutting down")
		<-upExited
		return
	}
	defer ts.remove(t)
	t.down.run(t, true)
	t.wg.Done()
	t.closeOnce.Do(t.stopPumps)
	<-upExited
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
}

// close ends the tunnel with a close frame to each side that is at a frame
// boundary, then closes both connections.
func (t *tunnel) close(code uint16, reason string) {
	t.closeOnce.Do(func() {
		t.stopPumps()
		t.wg.Wait()
		t.sendClose(code, reason)
		t.clientConn.Close()
		t.upConn.Close()
	})
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

// run copies frames until src ends or fails. fromUpstream marks the
// direction for the access log's byte counts.
//
// Between frames, which for an idle websocket is almost always, the pump
// waits on its socket (syscall.RawConn.Read with parkRead) on a goroutine
// that never reads through crypto/tls, and copies frames on a goroutine
// of their own that ends when nothing is left to copy. A goroutine that
// once read through crypto/tls has a 4 KiB stack, and the runtime never
// shrinks it back; one that only parks keeps 2 KiB. That is 4 KiB less
// of stack per idle websocket, and as much again of heap the garbage
// collector's goal no longer grows by.
func (p *pump) run(t *tunnel, fromUpstream bool) {
	if p.raw == nil {
		p.frames(t, fromUpstream, true)
		return
	}
	woken := false
	for {
		idle := make(chan bool, 1)
		go func(block bool) { idle <- p.frames(t, fromUpstream, block) }(woken)
		if !<-idle {
			return
		}
		if err := p.raw.Read(parkRead); err != nil {
			return
		}
		woken = true
	}
}

// frames copies frames from src to dst. With block false, it returns true
// at the first frame boundary where nothing is buffered above the socket,
// for run to park; it returns false when the pump must end. With block true
// it waits for the next frame inside the read, as a pump without a socket
// does throughout, and a woken pump does for the frame that woke it.
func (p *pump) frames(t *tunnel, fromUpstream, block bool) (park bool) {
	var hdr [14]byte
	for {
		// Read the fixed part of a frame header, then its extensions.
		if block || p.raw == nil {
			block = false
			if _, err := io.ReadFull(p.src, hdr[:1]); err != nil {
				return false
			}
		} else if ok, err := p.buffered(t, hdr[:1]); err != nil {
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
		p.midFrame = true
		if _, err := p.dst.Write(hdr[:n]); err != nil {
			p.broken = true
			return false
		}
		if length > 0 {
			if err := p.copyPayload(t, int64(length)); err != nil {
				return false
			}
		}
		p.midFrame = false
		if fromUpstream {
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
func (p *pump) buffered(t *tunnel, b []byte) (bool, error) {
	p.srcConn.SetReadDeadline(aLongTimeAgo)
	n, err := p.src.Read(b)
	p.srcConn.SetReadDeadline(time.Time{})
	if t.stopping.Load() {
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

func (p *pump) copyPayload(t *tunnel, length int64) error {
	buf := copyBuffers.Get()
	defer copyBuffers.Put(buf)
	for length > 0 {
		chunk := buf
		if int64(len(chunk)) > length {
			chunk = chunk[:length]
		}
		nr, err := p.src.Read(chunk)
		if nr > 0 {
			t.touch()
			if _, werr := p.dst.Write(chunk[:nr]); werr != nil {
				p.broken = true
				return werr
			}
			length -= int64(nr)
		}
		if err != nil {
			if length == 0 {
				return nil
			}
			return err
		}
	}
	return nil
}

// rawConn finds the socket under c, through TLS and cmux, for a pump to
// park on; nil when there is none (another wrapper, another platform): the
// pump then waits inside its reads.
func rawConn(c net.Conn) syscall.RawConn {
	for {
		switch x := c.(type) {
		case *tls.Conn:
			c = x.NetConn()
		case *cmux.MuxConn:
			c = x.Conn
		case syscall.Conn:
			return rawConnOf(x)
		default:
			return nil
		}
	}
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

func copyHeader(dst, src http.Header) {
	for k, vv := range src {
		dst[k] = append(dst[k], vv...)
	}
}
