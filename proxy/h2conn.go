package proxy

import (
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"strings"
	"sync/atomic"
	"time"

	"golang.org/x/net/http/httpguts"
	"golang.org/x/net/http2/hpack"
)

// h2conn filters what an HTTP/2 client sends, on its way to net/http's
// HTTP/2 server, where that server departs from RFC 9113:
//
//   - A request or trailer carrying a connection-specific header field
//     (Connection, Keep-Alive, Proxy-Connection, Transfer-Encoding, Upgrade)
//     or a TE other than "trailers" is malformed and must be reset with
//     PROTOCOL_ERROR (§8.2.2, §8.1.1). net/http answers it with a complete
//     400 response instead. h2conn appends to such a header block one
//     CONTINUATION frame with a field whose name is not lowercase, which
//     net/http's own framer resets as PROTOCOL_ERROR; the connection and
//     its other streams go on. A block over the server's header list limit
//     gets no such frame: net/http answers it 431, and would end the whole
//     connection for a CONTINUATION past its limit.
//   - A SETTINGS frame may repeat a setting; they are processed in order
//     (§6.5.3). net/http hangs up on any repeat. h2conn keeps the last value
//     of each setting, which is what processing them in order leaves. An
//     invalid value still reaches net/http, with nothing after it.
//   - A request head must arrive within PROXY_READ_HEADER_TIMEOUT, as on
//     HTTP/1.1 and as nginx applies client_header_timeout to an HTTP/2
//     header block (ngx_http_v2_state_headers_save). net/http's HTTP/2
//     server has no such limit: a HEADERS frame whose CONTINUATION never
//     comes, or trickles, held the connection until its idle limit (75 s)
//     or, with another stream open, its PING (80 s). h2conn gives a block
//     left open by its HEADERS frame a read deadline, counted from that
//     frame and not renewed by CONTINUATIONs; when it passes, net/http gets
//     a frame that is a connection error in the middle of a block, and
//     closes the connection with GOAWAY (readHeaderExpired).
//
// To know a header block's fields h2conn decodes every block with its own
// HPACK decoder, in step with net/http's: both see the same bytes, and the
// appended field is not indexed, so their dynamic tables stay equal. Other
// frames go through unread, DATA payloads straight into the server's buffer.
//
// net/http remains the judge of everything else: whenever the stream is not
// what h2conn expects (a frame over the size limit, a CONTINUATION out of
// place, an HPACK error, a cut connection), h2conn passes that frame and
// everything after it through untouched, and net/http answers the
// connection error it finds there.
type h2conn struct {
	net.Conn
	maxFrame int // the largest frame payload h2conn inspects
	maxList  int // the server's header list limit, as its framer counts it
	// readHeader bounds a header block left open by its HEADERS frame
	// (PROXY_READ_HEADER_TIMEOUT); 0: no bound. Only an open block arms
	// the read deadline: a HEADERS frame with END_HEADERS, nearly every
	// request, costs nothing more.
	readHeader time.Duration
	armed      bool // the read deadline bounds the open block

	pass int    // bytes to pass through before the next frame header
	out  []byte // inspected bytes not yet read
	off  bool   // pass everything through from here on
	hdr  [frameHeaderLen]byte
	buf  []byte // a frame being inspected

	dec     *hpack.Decoder
	inBlock bool   // inside a header block that has not ended
	stream  uint32 // the stream of that block
	skip    bool   // that block's HEADERS was reset by net/http, undecoded: so are its CONTINUATIONs
	bad     bool   // the block holds a connection-specific field
	invalid bool   // net/http resets the block's stream without help
	regular bool   // a regular field was seen (pseudo fields come first)
	sawTE   bool
	// What is left of maxList in the block, as net/http's framer counts
	// it: the block is cut (truncated) at the first field that does not
	// fit, or ignored from the first invalid one, and the fields after
	// that are not looked at, as net/http does not see them.
	remain    int
	truncated bool
}

const (
	frameHeaderLen = 9

	frameHeaders      = 0x1
	frameSettings     = 0x4
	frameContinuation = 0x9

	flagAck        = 0x1
	flagEndHeaders = 0x4
	flagPadded     = 0x8
	flagPriority   = 0x20

	// The HPACK dynamic table size of the HTTP/2 servers' decoders
	// (HTTP2Config.MaxDecoderHeaderTableSize) and h2conn's: the RFC's
	// initial 4,096.
	hpackTableSize = 4096
)

// clientPreface is what an HTTP/2 client sends before its first frame.
const clientPreface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

// malformedField is a CONTINUATION frame payload: one header field, a
// literal not indexed (RFC 7541 §6.2.2), whose upper-case name net/http's
// framer refuses with a stream error of type PROTOCOL_ERROR.
var malformedField = func() []byte {
	const name = "Connection-Specific-Field"
	return append([]byte{0x00, byte(len(name))}, append([]byte(name), 0x00)...)
}()

// readHeaderExpired is what net/http reads in place of the rest of a
// header block that did not arrive within readHeader: a frame of an unknown
// type, empty, which in the middle of a block is a connection error of type
// PROTOCOL_ERROR (RFC 9113 §5.5, §6.10). net/http sends GOAWAY with it, the
// last stream it opened, so the client knows the unfinished request was not
// processed (§6.8), and closes the connection a second later. RFC 9113 has
// no code for a timeout; nginx ends an HTTP/2 connection whose read timed
// out with PROTOCOL_ERROR (ngx_http_v2_read_handler), and resets a stream
// whose head timed out with it (ngx_http_v2_close_stream). NO_ERROR would
// announce a graceful shutdown, and net/http cannot be made to send it.
var readHeaderExpired = []byte{0, 0, 0, 0xff, 0, 0, 0, 0, 0}

// newH2Conn filters c, whose reader is about to send the client preface.
// maxFrame is the server's SETTINGS_MAX_FRAME_SIZE, maxString the longest
// header string it accepts (net/http: MaxHeaderBytes and a little) and
// maxList its header list limit (h2MaxHeaderList). readHeader bounds a
// header block (PROXY_READ_HEADER_TIMEOUT); 0: no bound.
func newH2Conn(c net.Conn, maxFrame, maxString, maxList int, readHeader time.Duration) *h2conn {
	h := &h2conn{Conn: c, maxFrame: maxFrame, maxList: maxList, pass: len(clientPreface), readHeader: readHeader}
	h.dec = hpack.NewDecoder(hpackTableSize, h.field)
	h.dec.SetMaxStringLength(maxString)
	return h
}

func (h *h2conn) Read(p []byte) (int, error) {
	for {
		switch {
		case len(h.out) > 0:
			n := copy(p, h.out)
			h.out = h.out[n:]
			if len(h.out) == 0 && cap(h.buf) > 4<<10 {
				h.buf = nil // a large header frame is rare: do not keep its room
			}
			return n, nil
		case h.off:
			if h.armed {
				h.disarm() // net/http ends the connection: no block to bound
			}
			return h.Conn.Read(p)
		case h.pass > 0:
			if len(p) > h.pass {
				p = p[:h.pass]
			}
			n, err := h.Conn.Read(p)
			if err != nil && h.pass == len(clientPreface) {
				// The first read, which runs the gRPC port's
				// handshake: a plain HTTP request gets its 400.
				answerPlainHTTP(err)
			}
			h.pass -= n
			return n, err
		}
		if err := h.frame(); err != nil {
			return 0, err
		}
	}
}

// frame reads the next frame header and either lets the payload pass or
// reads and inspects the whole frame, leaving what to deliver in h.out.
func (h *h2conn) frame() error {
	hdr := h.hdr[:frameHeaderLen]
	if n, err := io.ReadFull(h.Conn, hdr); err != nil {
		return h.giveUp(hdr[:n], err)
	}
	length := int(hdr[0])<<16 | int(hdr[1])<<8 | int(hdr[2])
	typ, flags := hdr[3], hdr[4]
	stream := binary.BigEndian.Uint32(hdr[5:]) & (1<<31 - 1)

	inspect := typ == frameHeaders || typ == frameContinuation || typ == frameSettings && flags&flagAck == 0
	if h.inBlock && typ != frameContinuation || length > h.maxFrame {
		// A connection error for net/http (RFC 9113 §6.10, §4.2).
		h.off, inspect = true, false
	}
	if !inspect {
		h.out, h.pass = hdr, length
		return nil
	}
	if cap(h.buf) < frameHeaderLen+length {
		h.buf = make([]byte, frameHeaderLen+length, max(frameHeaderLen+length, 512))
	}
	f := h.buf[:frameHeaderLen+length]
	copy(f, hdr)
	if n, err := io.ReadFull(h.Conn, f[frameHeaderLen:]); err != nil {
		return h.giveUp(f[:frameHeaderLen+n], err)
	}
	h.out = f
	switch typ {
	case frameSettings:
		if stream == 0 && length%6 == 0 {
			h.out = f[:frameHeaderLen+lastSettings(f[frameHeaderLen:])]
			putLength(h.out, len(h.out)-frameHeaderLen)
		}
	case frameHeaders:
		frag, err := headersFragment(f[frameHeaderLen:], flags)
		switch {
		case stream == 0 || err == errShortHeaders:
			h.off = true // a connection error for net/http
			return nil
		case err != nil:
			// net/http resets the stream without decoding the block.
			// Its framer still takes a block without END_HEADERS as
			// open (checkFrameOrder runs on the frame header, before
			// the payload is parsed) and ignores its CONTINUATION
			// frames one by one, which reset no timer of net/http's:
			// trickled, they held the connection past the bound.
			if flags&flagEndHeaders == 0 {
				h.inBlock, h.stream, h.skip = true, stream, true
				h.arm()
			}
			return nil
		}
		h.inBlock, h.stream = true, stream
		h.bad, h.invalid, h.regular, h.sawTE = false, false, false, false
		h.remain, h.truncated = h.maxList, false
		h.decode(frag, flags)
		if h.inBlock && !h.off {
			// The block goes on in CONTINUATION frames: all of it
			// within readHeader from here, however they trickle.
			h.arm()
		}
	case frameContinuation:
		if !h.inBlock || stream != h.stream {
			h.off = true // a connection error for net/http
			return nil
		}
		if h.skip {
			if flags&flagEndHeaders != 0 {
				h.inBlock, h.skip = false, false
				if h.armed {
					h.disarm()
				}
			}
			return nil
		}
		h.decode(f[frameHeaderLen:], flags)
	}
	return nil
}

// decode feeds a header block fragment to the decoder. At the end of a
// block that holds a connection-specific field, the frame in h.out loses
// its END_HEADERS flag and a CONTINUATION frame with malformedField follows.
func (h *h2conn) decode(frag []byte, flags byte) {
	if _, err := h.dec.Write(frag); err != nil {
		h.off = true // net/http meets the same error: COMPRESSION_ERROR
		return
	}
	if flags&flagEndHeaders == 0 {
		return
	}
	h.inBlock = false
	if h.armed {
		h.disarm()
	}
	if err := h.dec.Close(); err != nil {
		h.off = true
		return
	}
	if !h.bad || h.invalid || h.truncated || 2*h.remain < len(malformedField) {
		// net/http makes a connection error of any CONTINUATION after
		// an invalid field (instead of its stream error), after the
		// limit was exceeded (instead of its 431), or of more than
		// twice what is left of the limit: the block goes as it is.
		return
	}
	h.out[4] &^= flagEndHeaders
	var c [frameHeaderLen]byte
	putLength(c[:], len(malformedField))
	c[3], c[4] = frameContinuation, flagEndHeaders
	binary.BigEndian.PutUint32(c[5:], h.stream)
	h.out = append(append(h.out, c[:]...), malformedField...)
	h.buf = h.out[:0]
}

// field is the decoder's emit function. Besides connection-specific
// fields it notes what net/http's framer already refuses with a stream
// error: values with bytes outside RFC 9110's field-value, names that are
// not lowercase tokens, pseudo fields after regular ones.
func (h *h2conn) field(f hpack.HeaderField) {
	if h.invalid || h.truncated {
		return // net/http no longer looks
	}
	if !httpguts.ValidHeaderFieldValue(f.Value) {
		h.invalid = true
	}
	pseudo := strings.HasPrefix(f.Name, ":")
	if pseudo {
		h.invalid = h.invalid || h.regular
	} else {
		h.regular = true
		if !validWireName(f.Name) {
			h.invalid = true
		}
	}
	if h.invalid {
		return
	}
	size := int(f.Size())
	if size > h.remain {
		h.truncated = true
		return
	}
	h.remain -= size
	if pseudo {
		return
	}
	switch {
	case connSpecific(f.Name):
		h.bad = true
	case f.Name == "te":
		// net/http lets an empty TE through too; one TE only.
		if h.sawTE || f.Value != "trailers" && f.Value != "" {
			h.bad = true
		}
		h.sawTE = true
	}
}

// connSpecific reports whether name is a connection-specific field, which
// HTTP/2 forbids (RFC 9113 §8.2.2).
func connSpecific(name string) bool {
	switch name {
	case "connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade":
		return true
	}
	return false
}

// validWireName reports whether name is a lowercase token (RFC 9113 §8.2.1).
func validWireName(name string) bool {
	if name == "" {
		return false
	}
	for _, r := range name {
		if !httpguts.IsTokenRune(r) || 'A' <= r && r <= 'Z' {
			return false
		}
	}
	return true
}

// arm gives the open block readHeader to end. Nothing else reads the
// connection meanwhile (net/http's reader is in h2conn's Read), and
// net/http's HTTP/2 server sets no read deadline of its own (ReadTimeout
// is 0).
func (h *h2conn) arm() {
	if h.readHeader > 0 {
		h.Conn.SetReadDeadline(time.Now().Add(h.readHeader))
		h.armed = true
	}
}

// disarm lifts the read deadline of an open block.
func (h *h2conn) disarm() {
	h.armed = false
	h.Conn.SetReadDeadline(time.Time{})
}

// giveUp hands on the bytes read before err and passes everything after.
// If err is the open block's deadline, net/http gets readHeaderExpired
// instead: a frame read in part is dropped with the connection.
func (h *h2conn) giveUp(read []byte, err error) error {
	h.off = true
	if h.armed && errors.Is(err, os.ErrDeadlineExceeded) {
		h.out = readHeaderExpired
		return nil
	}
	if len(read) == 0 {
		return err
	}
	h.out = read
	return nil
}

var (
	errShortHeaders = errors.New("HEADERS frame too short for its padding or priority")
	errPadding      = errors.New("HEADERS frame padding longer than its payload")
)

// headersFragment returns the header block fragment of a HEADERS payload
// (RFC 9113 §6.2). Like net/http's framer, it calls a frame too short to
// hold its pad length and priority fields a connection error, and padding
// longer than the rest a stream error.
func headersFragment(p []byte, flags byte) ([]byte, error) {
	pad := 0
	if flags&flagPadded != 0 {
		if len(p) < 1 {
			return nil, errShortHeaders
		}
		pad, p = int(p[0]), p[1:]
	}
	if flags&flagPriority != 0 {
		if len(p) < 5 {
			return nil, errShortHeaders
		}
		p = p[5:]
	}
	if pad > len(p) {
		return nil, errPadding
	}
	return p[:len(p)-pad], nil
}

// lastSettings rewrites a SETTINGS payload in place so each setting appears
// once, with its last value, and returns the new length. It stops after the
// first invalid value (net/http refuses it before looking further), and
// leaves a frame with more than 100 settings alone (net/http hangs up on
// those, as a defence). Keeping the last value is what processing them in
// order leaves, with one theoretical difference: an intermediate
// SETTINGS_INITIAL_WINDOW_SIZE that would overflow a stream's window is not
// seen. SETTINGS_HEADER_TABLE_SIZE is the exception: it keeps its smallest
// value, which the server's encoder must signal (RFC 7541, section 4.2;
// 0 then 4096 is how a client empties the table), at the price of a
// smaller table for the rest of that connection.
func lastSettings(p []byte) int {
	n := len(p) / 6
	if n < 2 || n > 100 {
		return len(p)
	}
	id := func(i int) uint16 { return binary.BigEndian.Uint16(p[6*i:]) }
	dup := false
	for i := range n {
		for j := range i {
			dup = dup || id(j) == id(i)
		}
	}
	if !dup {
		return len(p)
	}
	end := n
	for i := range n {
		if !validSetting(id(i), binary.BigEndian.Uint32(p[6*i+2:])) {
			end = i + 1
			break
		}
	}
	// HEADER_TABLE_SIZE keeps the smallest of its values instead: the
	// server's encoder must signal the smallest size the interval had
	// (RFC 7541 §4.2), and may then use less than the last one allows.
	minTable, seenTable := uint32(0), false
	for i := range end {
		if v := binary.BigEndian.Uint32(p[6*i+2:]); id(i) == 0x1 && (!seenTable || v < minTable) {
			minTable, seenTable = v, true
		}
	}
	w := 0
	for i := range end {
		later := false
		for j := i + 1; j < end && !later; j++ {
			later = id(j) == id(i)
		}
		if !later {
			copy(p[6*w:6*w+6], p[6*i:6*i+6])
			if id(w) == 0x1 {
				binary.BigEndian.PutUint32(p[6*w+2:], minTable)
			}
			w++
		}
	}
	return 6 * w
}

// validSetting mirrors RFC 9113 §6.5.2 as net/http checks it.
func validSetting(id uint16, v uint32) bool {
	switch id {
	case 0x2, 0x8: // ENABLE_PUSH, ENABLE_CONNECT_PROTOCOL
		return v <= 1
	case 0x4: // INITIAL_WINDOW_SIZE
		return v <= 1<<31-1
	case 0x5: // MAX_FRAME_SIZE
		return v >= 1<<14 && v <= 1<<24-1
	}
	return true
}

func putLength(hdr []byte, n int) {
	hdr[0], hdr[1], hdr[2] = byte(n>>16), byte(n>>8), byte(n)
}

// h2Listener hands out h2conns, behind a writeBehind and a servedConn.
type h2Listener struct {
	net.Listener
	maxFrame, maxString, maxList int
	readHeader                   time.Duration // h2conn's
	stall                        time.Duration // writeBehind's
}

func (l h2Listener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	sc := &servedConn{local: c.LocalAddr(), remote: c.RemoteAddr()}
	sc.c.Store(newWriteBehind(newH2Conn(c, l.maxFrame, l.maxString, l.maxList, l.readHeader), l.stall))
	return sc, nil
}

// servedConn is the connection net/http's HTTP/2 server is given: the
// connection until Close, and after it nothing but its addresses, so
// that what the server keeps of a connection after its end keeps none of
// the connection's own state.
//
// The server keeps a closed connection for its IdleTimeout (75 s) when
// the client left with streams open: serve's deferred idleTimer.Stop runs
// before its deferred closeAllStreamsOnConnClose, whose closeStream
// re-arms the timer once the last stream is gone (src/net/http/
// h2_bundle.go, Go 1.26), and the timer's function holds the whole
// serverConn. Through the connection, that was its TLS state and
// buffers, h2conn's HPACK table, cmux's sniffed bytes and the socket:
// of the 60 KiB a connection cut in the middle of an upload held for
// 75 s, 35 KiB (of 16 KiB for one cut while its request waited for
// Cells, 8 KiB). What the server keeps itself (its framer's read buffer,
// HPACK tables, channels) the proxy cannot reach.
type servedConn struct {
	c             atomic.Pointer[writeBehind] // nil once closed
	local, remote net.Addr
}

func (s *servedConn) Read(p []byte) (int, error) {
	if c := s.c.Load(); c != nil {
		return c.Read(p)
	}
	return 0, net.ErrClosed
}

func (s *servedConn) Write(p []byte) (int, error) {
	if c := s.c.Load(); c != nil {
		return c.Write(p)
	}
	return 0, net.ErrClosed
}

// Close closes the connection and lets it go: a Read or Write already
// in its call holds it until that returns, as the Close makes it do.
func (s *servedConn) Close() error {
	if c := s.c.Swap(nil); c != nil {
		return c.Close()
	}
	return net.ErrClosed
}

func (s *servedConn) LocalAddr() net.Addr  { return s.local }
func (s *servedConn) RemoteAddr() net.Addr { return s.remote }

func (s *servedConn) SetDeadline(t time.Time) error {
	if c := s.c.Load(); c != nil {
		return c.SetDeadline(t)
	}
	return net.ErrClosed
}

func (s *servedConn) SetReadDeadline(t time.Time) error {
	if c := s.c.Load(); c != nil {
		return c.SetReadDeadline(t)
	}
	return net.ErrClosed
}

func (s *servedConn) SetWriteDeadline(t time.Time) error {
	if c := s.c.Load(); c != nil {
		return c.SetWriteDeadline(t)
	}
	return net.ErrClosed
}
