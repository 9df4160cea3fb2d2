package proxy

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// h2Peer is a scripted HTTP/2 server standing in for Cells' gRPC port:
// cleartext HTTP/2 with prior knowledge (CELLS_GRPC_UPSTREAM=h2c://...),
// driven frame by frame with http2.Framer and hpack, so that a test decides
// every SETTINGS, window, frame split, reset, GOAWAY and close, and sees
// every frame the proxy sends.
//
// It holds the proxy to RFC 9113 as it reads: a DATA frame beyond a window
// the peer granted, a new stream beyond SETTINGS_MAX_CONCURRENT_STREAMS
// (reset with REFUSED_STREAM, as a real server does), a stream ID that
// does not increase, an undecodable header block. Each is recorded as a
// violation, and every violation fails the test when it ends.
//
// Each request stream runs handler in its own goroutine once its HEADERS
// have arrived. Every goroutine ends when the test does: closing the
// connections wakes whatever waits on them.
type h2Peer struct {
	// Addr is the listener's host:port.
	Addr string
	// Accepted counts the connections accepted.
	Accepted atomic.Int32

	t       testing.TB
	ln      net.Listener
	handler func(s *h2Stream)
	cfg     h2PeerConfig
	done    chan struct{} // closed when the test ends
	wg      sync.WaitGroup

	mu         sync.Mutex
	conns      []*h2PeerConn
	violations []string
}

// h2PeerConfig is what the peer announces on every connection.
type h2PeerConfig struct {
	// Settings is the peer's SETTINGS frame, sent as soon as a connection
	// is accepted. Its INITIAL_WINDOW_SIZE and MAX_CONCURRENT_STREAMS are
	// enforced on the proxy.
	Settings []http2.Setting
	// ConnWindow, when above 65,535, is the connection receive window the
	// peer grants with a WINDOW_UPDATE right after its SETTINGS.
	ConnWindow int64
	// SilentPings: PINGs from the proxy are counted but not answered.
	SilentPings bool
}

// newH2Peer listens on 127.0.0.1:0 and serves every request stream with
// handler, until the test ends.
func newH2Peer(t testing.TB, cfg h2PeerConfig, handler func(s *h2Stream)) *h2Peer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &h2Peer{Addr: ln.Addr().String(), t: t, ln: ln, handler: handler, cfg: cfg, done: make(chan struct{})}
	p.wg.Go(p.acceptLoop)
	t.Cleanup(func() {
		close(p.done)
		ln.Close()
		p.mu.Lock()
		conns := slices.Clone(p.conns)
		p.mu.Unlock()
		for _, c := range conns {
			c.close()
		}
		p.wg.Wait()
		for _, v := range p.Violations() {
			t.Errorf("gRPC upstream saw an RFC 9113 violation: %s", v)
		}
	})
	return p
}

func (p *h2Peer) acceptLoop() {
	for {
		nc, err := p.ln.Accept()
		if err != nil {
			return
		}
		c := p.newConn(nc)
		p.mu.Lock()
		p.conns = append(p.conns, c)
		p.mu.Unlock()
		select {
		case <-p.done:
			// Cleanup may have listed the connections already.
			c.close()
		default:
		}
		p.wg.Go(c.readLoop)
	}
}

func (p *h2Peer) violate(format string, args ...any) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.violations = append(p.violations, fmt.Sprintf(format, args...))
}

// Violations is every protocol violation seen so far.
func (p *h2Peer) Violations() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.violations)
}

// Conns is every connection accepted so far, in order.
func (p *h2Peer) Conns() []*h2PeerConn {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.conns)
}

// setting is the value of id in the peer's SETTINGS, or def.
func (cfg h2PeerConfig) setting(id http2.SettingID, def uint32) uint32 {
	for _, s := range cfg.Settings {
		if s.ID == id {
			def = s.Val
		}
	}
	return def
}

// h2PeerConn is one connection from the proxy.
type h2PeerConn struct {
	p  *h2Peer
	N  int // 1 for the first connection accepted
	nc net.Conn
	fr *http2.Framer

	wmu  sync.Mutex // frame writes, which must not interleave, and enc
	enc  *hpack.Encoder
	ebuf bytes.Buffer
	dec  *hpack.Decoder // the read loop's

	pingAcks chan [8]byte // PING ACK payloads from the proxy

	mu      sync.Mutex
	changed chan struct{} // closed and replaced at every change below
	closed  bool
	streams map[uint32]*h2Stream
	last    uint32 // the highest stream ID the proxy opened
	active  int    // open streams
	// Sending: the proxy's windows and settings.
	sendConn     int64
	peerInitial  int64
	peerMaxFrame int
	// Receiving: what the proxy may still send on the connection, and
	// the stream window in force: the RFC's 65,535 until the proxy
	// acknowledges the peer's SETTINGS.
	recvConn   int64
	ourInitial int64
	acked      bool
	maxStreams uint32
	rec        h2ConnStats
}

const defaultWindow = 65535

func (p *h2Peer) newConn(nc net.Conn) *h2PeerConn {
	c := &h2PeerConn{
		p:            p,
		N:            int(p.Accepted.Add(1)),
		nc:           nc,
		fr:           http2.NewFramer(nc, nc),
		dec:          hpack.NewDecoder(4096, nil),
		pingAcks:     make(chan [8]byte, 16),
		changed:      make(chan struct{}),
		streams:      make(map[uint32]*h2Stream),
		sendConn:     defaultWindow,
		peerInitial:  defaultWindow,
		peerMaxFrame: 16384,
		recvConn:     defaultWindow,
		ourInitial:   defaultWindow,
		maxStreams:   p.cfg.setting(http2.SettingMaxConcurrentStreams, 0),
		rec:          h2ConnStats{Resets: make(map[uint32]http2.ErrCode)},
	}
	c.enc = hpack.NewEncoder(&c.ebuf)
	// Read any frame size, so that an oversized frame is recorded as a
	// violation rather than refused by the framer.
	c.fr.SetMaxReadFrameSize(1<<24 - 1)
	return c
}

// notifyLocked wakes everything waiting for a change; c.mu is held.
func (c *h2PeerConn) notifyLocked() {
	close(c.changed)
	c.changed = make(chan struct{})
}

// close drops the connection at once, as a crash would.
func (c *h2PeerConn) close() {
	c.mu.Lock()
	if !c.closed {
		c.closed = true
		c.notifyLocked()
	}
	c.mu.Unlock()
	c.nc.Close()
}

// abort drops the connection with a TCP RST instead of a FIN.
func (c *h2PeerConn) abort() {
	if tc, ok := c.nc.(*net.TCPConn); ok {
		tc.SetLinger(0)
	}
	c.close()
}

// write runs f, which writes frames, alone on the connection.
func (c *h2PeerConn) write(f func(fr *http2.Framer) error) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	return f(c.fr)
}

// goAway sends GOAWAY.
func (c *h2PeerConn) goAway(last uint32, code http2.ErrCode) error {
	return c.write(func(fr *http2.Framer) error { return fr.WriteGoAway(last, code, nil) })
}

// ping sends a PING and returns the payload of the next PING ACK, or fails
// the test after 10 s.
func (c *h2PeerConn) ping(t testing.TB, data [8]byte) [8]byte {
	t.Helper()
	if err := c.write(func(fr *http2.Framer) error { return fr.WritePing(false, data) }); err != nil {
		t.Fatalf("writing PING: %v", err)
	}
	select {
	case got := <-c.pingAcks:
		return got
	case <-time.After(10 * time.Second):
		t.Fatal("no PING ACK within 10 s")
		return [8]byte{}
	}
}

// h2ConnStats is what a connection recorded.
type h2ConnStats struct {
	MaxActive    int // the most streams open at once
	Refused      []uint32
	LateRefused  []uint32 // refused after the proxy acknowledged the SETTINGS
	Resets       map[uint32]http2.ErrCode
	GoAways      []http2.ErrCode
	DataFrames   int
	MaxDataFrame int // the largest DATA frame payload, padding included
	Pings        int // PINGs from the proxy
}

// Stats is what the connection recorded so far.
func (c *h2PeerConn) Stats() h2ConnStats {
	c.mu.Lock()
	defer c.mu.Unlock()
	st := c.rec
	st.Refused, st.LateRefused, st.GoAways = slices.Clone(st.Refused), slices.Clone(st.LateRefused), slices.Clone(st.GoAways)
	st.Resets = maps.Clone(st.Resets)
	return st
}

func (c *h2PeerConn) violate(format string, args ...any) {
	c.p.violate("connection %d: "+format, append([]any{c.N}, args...)...)
}

// readLoop reads the proxy's frames until the connection ends.
func (c *h2PeerConn) readLoop() {
	defer c.close()
	// The peer speaks first: SETTINGS does not wait for the preface.
	err := c.write(func(fr *http2.Framer) error {
		if err := fr.WriteSettings(c.p.cfg.Settings...); err != nil {
			return err
		}
		if w := c.p.cfg.ConnWindow; w > defaultWindow {
			c.mu.Lock()
			c.recvConn = w
			c.mu.Unlock()
			return fr.WriteWindowUpdate(0, uint32(w-defaultWindow))
		}
		return nil
	})
	if err != nil {
		return
	}
	preface := make([]byte, len(http2.ClientPreface))
	if _, err := io.ReadFull(c.nc, preface); err != nil {
		return
	}
	if string(preface) != http2.ClientPreface {
		c.violate("bad client preface %q", preface)
		return
	}
	var block []byte
	var blockEnd bool
	for {
		f, err := c.fr.ReadFrame()
		if err != nil {
			if !c.ordinaryEnd(err) {
				c.violate("reading a frame: %v", err)
			}
			return
		}
		switch f := f.(type) {
		case *http2.SettingsFrame:
			c.onSettings(f)
		case *http2.HeadersFrame:
			block = append(block[:0], f.HeaderBlockFragment()...)
			blockEnd = f.StreamEnded()
			if f.HeadersEnded() {
				c.onHeaders(f.StreamID, block, blockEnd)
			}
		case *http2.ContinuationFrame:
			block = append(block, f.HeaderBlockFragment()...)
			if f.HeadersEnded() {
				c.onHeaders(f.StreamID, block, blockEnd)
			}
		case *http2.DataFrame:
			c.onData(f)
		case *http2.WindowUpdateFrame:
			c.mu.Lock()
			if f.StreamID == 0 {
				c.sendConn += int64(f.Increment)
			} else if s := c.streams[f.StreamID]; s != nil {
				s.sendWin += int64(f.Increment)
			}
			c.notifyLocked()
			c.mu.Unlock()
		case *http2.RSTStreamFrame:
			c.mu.Lock()
			c.rec.Resets[f.StreamID] = f.ErrCode
			if s := c.streams[f.StreamID]; s != nil && !s.wasReset {
				s.wasReset, s.rstCode = true, f.ErrCode
				close(s.resetCh)
				c.endStreamLocked(s)
			}
			c.notifyLocked()
			c.mu.Unlock()
		case *http2.PingFrame:
			if f.IsAck() {
				select {
				case c.pingAcks <- f.Data:
				default:
				}
				continue
			}
			c.mu.Lock()
			c.rec.Pings++
			c.notifyLocked()
			c.mu.Unlock()
			if !c.p.cfg.SilentPings {
				c.write(func(fr *http2.Framer) error { return fr.WritePing(true, f.Data) })
			}
		case *http2.GoAwayFrame:
			if f.LastStreamID != 0 {
				// RFC 9113 §6.8: the last stream the sender may act
				// on, of those its peer opened; Cells opens none of
				// the proxy's (push is off).
				c.violate("GOAWAY with last stream %d, want 0: the proxy's own streams are not Cells' to open", f.LastStreamID)
			}
			c.mu.Lock()
			c.rec.GoAways = append(c.rec.GoAways, f.ErrCode)
			c.mu.Unlock()
		}
	}
}

// ordinaryEnd reports whether err is a connection ending, not a frame the
// proxy got wrong.
func (c *h2PeerConn) ordinaryEnd(err error) bool {
	c.mu.Lock()
	closed := c.closed
	c.mu.Unlock()
	return closed || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, net.ErrClosed) || errors.Is(err, syscall.ECONNRESET)
}

func (c *h2PeerConn) onSettings(f *http2.SettingsFrame) {
	c.mu.Lock()
	if f.IsAck() {
		if !c.acked {
			// The proxy now applies the peer's stream window: every
			// open stream's window moves by the difference (RFC 9113
			// §6.9.2).
			c.acked = true
			w := int64(c.p.cfg.setting(http2.SettingInitialWindowSize, defaultWindow))
			for _, s := range c.streams {
				s.recvWin += w - c.ourInitial
			}
			c.ourInitial = w
		}
		c.notifyLocked()
		c.mu.Unlock()
		return
	}
	f.ForeachSetting(func(s http2.Setting) error {
		switch s.ID {
		case http2.SettingInitialWindowSize:
			for _, st := range c.streams {
				st.sendWin += int64(s.Val) - c.peerInitial
			}
			c.peerInitial = int64(s.Val)
		case http2.SettingMaxFrameSize:
			c.peerMaxFrame = int(s.Val)
		}
		return nil
	})
	c.notifyLocked()
	c.mu.Unlock()
	c.write(func(fr *http2.Framer) error { return fr.WriteSettingsAck() })
}

func (c *h2PeerConn) onHeaders(id uint32, block []byte, end bool) {
	fields, err := c.dec.DecodeFull(block)
	if err != nil {
		c.violate("stream %d: undecodable header block: %v", id, err)
		return
	}
	c.mu.Lock()
	if s := c.streams[id]; s != nil {
		// Request trailers.
		s.trailer = fields
		if end {
			s.remoteEnd = true
			c.endStreamLocked(s)
		} else {
			c.violate("stream %d: trailers without END_STREAM", id)
		}
		c.notifyLocked()
		c.mu.Unlock()
		return
	}
	if id%2 == 0 || id <= c.last {
		c.violate("stream %d: HEADERS on a stream ID that is not new (last %d)", id, c.last)
		c.mu.Unlock()
		return
	}
	c.last = id
	if c.maxStreams > 0 && c.active >= int(c.maxStreams) {
		c.rec.Refused = append(c.rec.Refused, id)
		if c.acked {
			c.rec.LateRefused = append(c.rec.LateRefused, id)
		}
		c.mu.Unlock()
		c.write(func(fr *http2.Framer) error { return fr.WriteRSTStream(id, http2.ErrCodeRefusedStream) })
		return
	}
	s := &h2Stream{c: c, ID: id, Header: fields, resetCh: make(chan struct{}), recvWin: c.ourInitial, sendWin: c.peerInitial, remoteEnd: end}
	c.streams[id] = s
	c.active++
	c.rec.MaxActive = max(c.rec.MaxActive, c.active)
	c.notifyLocked()
	c.mu.Unlock()
	c.p.wg.Go(func() { c.p.handler(s) })
}

func (c *h2PeerConn) onData(f *http2.DataFrame) {
	flow := int64(f.Length) // padding counts too (RFC 9113 §6.9.1)
	c.mu.Lock()
	c.rec.DataFrames++
	c.rec.MaxDataFrame = max(c.rec.MaxDataFrame, int(f.Length))
	if c.recvConn -= flow; c.recvConn < 0 {
		c.violate("stream %d: DATA %d bytes past the connection window", f.StreamID, -c.recvConn)
	}
	s := c.streams[f.StreamID]
	if s == nil || s.wasReset || s.resetByPeer {
		// A refused or reset stream: its DATA still counts on the
		// connection; give the window back at once.
		c.recvConn += flow
		c.mu.Unlock()
		if flow > 0 {
			c.write(func(fr *http2.Framer) error { return fr.WriteWindowUpdate(0, uint32(flow)) })
		}
		return
	}
	defer c.mu.Unlock()
	if s.remoteEnd {
		c.violate("stream %d: DATA after END_STREAM", s.ID)
		return
	}
	if s.recvWin -= flow; s.recvWin < 0 {
		c.violate("stream %d: DATA %d bytes past the stream window", s.ID, -s.recvWin)
	}
	s.queue = append(s.queue, peerChunk{bytes.Clone(f.Data()), flow})
	if f.StreamEnded() {
		s.remoteEnd = true
		c.endStreamLocked(s)
	}
	c.notifyLocked()
}

// endStreamLocked counts s as closed once both sides ended it or either
// reset it; c.mu is held.
func (c *h2PeerConn) endStreamLocked(s *h2Stream) {
	if s.closed || !(s.remoteEnd && s.localEnd || s.wasReset || s.resetByPeer) {
		return
	}
	s.closed = true
	c.active--
}

// peerChunk is a DATA payload waiting for the handler, and the window it
// took.
type peerChunk struct {
	data []byte
	flow int64
}

// h2Stream is one request stream, seen from the peer.
type h2Stream struct {
	c  *h2PeerConn
	ID uint32
	// Header is the request's header block, decoded, in order.
	Header []hpack.HeaderField

	resetCh chan struct{} // closed when the proxy resets the stream

	// Guarded by c.mu.
	queue       []peerChunk
	recvWin     int64 // what the proxy may still send on the stream
	sendWin     int64
	remoteEnd   bool // the proxy ended its side
	localEnd    bool // the peer ended its side
	wasReset    bool // the proxy reset the stream
	rstCode     http2.ErrCode
	resetByPeer bool // the peer reset the stream
	closed      bool
	trailer     []hpack.HeaderField
	sent        int64 // DATA bytes sent, padding included
}

// Done is closed when the test ends: a handler that waits on the test
// waits on this too.
func (s *h2Stream) Done() <-chan struct{} { return s.c.p.done }

// Sent is how many DATA bytes the peer sent on the stream so far.
func (s *h2Stream) Sent() int64 {
	s.c.mu.Lock()
	defer s.c.mu.Unlock()
	return s.sent
}

// Get is the value of the first request field named name.
func (s *h2Stream) Get(name string) string {
	for _, f := range s.Header {
		if f.Name == name {
			return f.Value
		}
	}
	return ""
}

var (
	errPeerClosed = errors.New("h2peer: connection closed")
	errPeerReset  = errors.New("h2peer: stream reset")
)

// wait blocks until cond (called with c.mu held) is true, the stream is
// reset either way, or the connection closes. If stall is not nil and cond
// stays false for stallAfter, stall is called once (without c.mu).
func (s *h2Stream) wait(cond func() bool, stallAfter time.Duration, stall func()) error {
	c := s.c
	var timer <-chan time.Time
	if stall != nil {
		t := time.NewTimer(stallAfter)
		defer t.Stop()
		timer = t.C
	}
	for {
		c.mu.Lock()
		switch {
		case c.closed:
			c.mu.Unlock()
			return errPeerClosed
		case cond():
			c.mu.Unlock()
			return nil
		case s.wasReset || s.resetByPeer:
			c.mu.Unlock()
			return errPeerReset
		}
		ch := c.changed
		c.mu.Unlock()
		select {
		case <-ch:
		case <-timer:
			timer = nil
			stall()
		}
	}
}

// read returns the next DATA payload from the proxy, and grants its window
// back, stream and connection, as a server that consumed it does. It
// returns io.EOF after END_STREAM.
func (s *h2Stream) read() ([]byte, error) {
	c := s.c
	var ch peerChunk
	err := s.wait(func() bool { return len(s.queue) > 0 || s.remoteEnd }, 0, nil)
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	if len(s.queue) == 0 {
		c.mu.Unlock()
		return nil, io.EOF
	}
	ch, s.queue = s.queue[0], s.queue[1:]
	// Account for the window before the proxy can see it.
	grantStream := ch.flow > 0 && !s.remoteEnd
	if grantStream {
		s.recvWin += ch.flow
	}
	c.recvConn += ch.flow
	c.mu.Unlock()
	if ch.flow > 0 {
		c.write(func(fr *http2.Framer) error {
			if grantStream {
				if err := fr.WriteWindowUpdate(s.ID, uint32(ch.flow)); err != nil {
					return err
				}
			}
			return fr.WriteWindowUpdate(0, uint32(ch.flow))
		})
	}
	return ch.data, nil
}

// readBody reads the request body to END_STREAM.
func (s *h2Stream) readBody() ([]byte, error) {
	var body []byte
	for {
		b, err := s.read()
		if err == io.EOF {
			return body, nil
		}
		if err != nil {
			return body, err
		}
		body = append(body, b...)
	}
}

// writeHeaders sends a header block of kv (name, value, ...), encoded as
// given (names are not lowercased), split into parts frames: HEADERS then
// CONTINUATION.
func (s *h2Stream) writeHeaders(end bool, parts int, kv ...string) error {
	c := s.c
	return c.write(func(fr *http2.Framer) error {
		c.ebuf.Reset()
		for i := 0; i+1 < len(kv); i += 2 {
			c.enc.WriteField(hpack.HeaderField{Name: kv[i], Value: kv[i+1]})
		}
		blk := c.ebuf.Bytes()
		if end {
			// Before the frame leaves: the proxy may open its next
			// stream as soon as it reads it.
			s.endLocal()
		}
		parts = max(1, min(parts, len(blk)))
		size := (len(blk) + parts - 1) / parts
		first := min(size, len(blk))
		if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: s.ID, BlockFragment: blk[:first], EndStream: end, EndHeaders: first == len(blk)}); err != nil {
			return err
		}
		for rest := blk[first:]; len(rest) > 0; {
			n := min(size, len(rest))
			if err := fr.WriteContinuation(s.ID, n == len(rest), rest[:n]); err != nil {
				return err
			}
			rest = rest[n:]
		}
		return nil
	})
}

func (s *h2Stream) endLocal() {
	c := s.c
	c.mu.Lock()
	s.localEnd = true
	c.endStreamLocked(s)
	c.notifyLocked()
	c.mu.Unlock()
}

// reserve waits until the windows allow at least min(want, 1) bytes, or
// exactly want bytes if exact, and takes at most want of them, within the
// proxy's SETTINGS_MAX_FRAME_SIZE. While it waits on a window for longer
// than stallAfter, stall is called once.
func (s *h2Stream) reserve(want int64, exact bool, stallAfter time.Duration, stall func()) (int64, error) {
	c := s.c
	var n int64
	err := s.wait(func() bool {
		if want == 0 {
			n = 0
			return true
		}
		n = min(want, c.sendConn, s.sendWin, int64(c.peerMaxFrame))
		if n < want && exact || n <= 0 {
			return false
		}
		c.sendConn -= n
		s.sendWin -= n
		s.sent += n
		return true
	}, stallAfter, stall)
	return n, err
}

// writeData sends b as DATA frames as large as the proxy's windows and
// frame size allow, waiting for windows; END_STREAM on the last if end.
func (s *h2Stream) writeData(b []byte, end bool) error {
	return s.writeDataStall(b, end, 0, nil)
}

// writeDataStall is writeData that calls stall once whenever it has
// waited stallAfter for a window.
func (s *h2Stream) writeDataStall(b []byte, end bool, stallAfter time.Duration, stall func()) error {
	if len(b) == 0 && !end {
		return nil
	}
	for first := true; first || len(b) > 0; first = false {
		n, err := s.reserve(int64(len(b)), false, stallAfter, stall)
		if err != nil {
			return err
		}
		last := end && int(n) == len(b)
		if err := s.dataFrame(b[:n], -1, last); err != nil {
			return err
		}
		b = b[n:]
	}
	return nil
}

// writePadded sends b as one DATA frame with pad bytes of padding (which
// take window too), waiting for the window.
func (s *h2Stream) writePadded(b []byte, pad int, end bool) error {
	if _, err := s.reserve(int64(len(b)+1+pad), true, 0, nil); err != nil {
		return err
	}
	return s.dataFrame(b, pad, end)
}

// dataFrame writes one DATA frame whose window is already reserved; pad < 0:
// not padded.
func (s *h2Stream) dataFrame(b []byte, pad int, end bool) error {
	return s.c.write(func(fr *http2.Framer) error {
		if end {
			s.endLocal()
		}
		if pad < 0 {
			return fr.WriteData(s.ID, end, b)
		}
		return fr.WriteDataPadded(s.ID, end, b, make([]byte, pad))
	})
}

// reset sends RST_STREAM.
func (s *h2Stream) reset(code http2.ErrCode) error {
	c := s.c
	c.mu.Lock()
	s.resetByPeer = true
	c.endStreamLocked(s)
	c.notifyLocked()
	c.mu.Unlock()
	return c.write(func(fr *http2.Framer) error { return fr.WriteRSTStream(s.ID, code) })
}

// resetCode waits up to 10 s for the proxy to reset the stream, and returns
// the code; ok is false if it did not.
func (s *h2Stream) resetCode() (code http2.ErrCode, ok bool) {
	select {
	case <-s.resetCh:
		s.c.mu.Lock()
		defer s.c.mu.Unlock()
		return s.rstCode, true
	case <-time.After(10 * time.Second):
		return 0, false
	}
}

// respond answers with :status 200, content-type application/grpc, body in
// DATA frames, and trailers grpc-status 0 plus the trailer pairs given.
func (s *h2Stream) respond(body []byte, trailer ...string) error {
	if err := s.writeHeaders(false, 1, ":status", "200", "content-type", "application/grpc"); err != nil {
		return err
	}
	if err := s.writeData(body, false); err != nil {
		return err
	}
	return s.writeHeaders(true, 1, append([]string{"grpc-status", "0"}, trailer...)...)
}

// newHoldingPeer is a Cells that echoes each call's body, but hands a call
// to path over to held first and answers it only once release is closed
// (or drops it if the stream ends meanwhile).
func newHoldingPeer(t testing.TB, path string, held chan<- *h2Stream, release <-chan struct{}) *h2Peer {
	return newH2Peer(t, h2PeerConfig{}, func(s *h2Stream) {
		body, err := s.readBody()
		if err != nil {
			return
		}
		if s.Get(":path") == path {
			s.holdEcho(held, release, body)
			return
		}
		s.respond(body)
	})
}

// holdEcho hands s over to held, then answers it with body once release
// is closed; it drops the call if the stream ends first.
func (s *h2Stream) holdEcho(held chan<- *h2Stream, release <-chan struct{}, body []byte) {
	held <- s
	select {
	case <-release:
	case <-s.Done():
		return
	}
	s.respond(body)
}
