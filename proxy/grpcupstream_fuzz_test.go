package proxy

import (
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"net"
	"net/url"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// The proxy's own HTTP/2 client (grpcupstream.go) parses every byte Cells'
// gRPC port sends: frame headers, SETTINGS, windows, HPACK blocks split
// over CONTINUATIONs, padding, trailers, resets, GOAWAY. A panic on its
// read loop's goroutine would end the whole process, every client's
// transfers with it; a call that waited for ever on a connection Cells
// has closed would hold its client. FuzzGRPCUpstreamResponse stands a
// scripted Cells on 127.0.0.1 in front of a new grpcUpstream for every
// input (cleartext HTTP/2, as CELLS_GRPC_UPSTREAM=h2c://...).

// scriptedCells is a Cells on 127.0.0.1:0 that serves each connection
// with serve and the round's script (a and b, as set by round). One
// listener serves every round of a fuzz target: a listener per input, with
// the connections' TIME_WAIT, ran out of loopback ports within seconds.
type scriptedCells struct {
	ln       net.Listener
	serve    func(sc *scriptConn, a, b []byte)
	accepted sync.WaitGroup

	mu      sync.Mutex
	a, b    []byte
	conns   []*scriptConn   // the round's
	serving *sync.WaitGroup // the round's connections
}

// scriptConn is a connection of a scriptedCells. It starts waiting for the
// client's request, with a minute's deadline as a guard: endRound cuts that
// wait short (a serve function that sees its read time out goes on to send
// its script), so that Cells ends its side even to a client that sends no
// request (a call that the SETTINGS sent forbid). What follows the wait
// (sending) is not cut short: whether the client then closes is what
// endRound checks.
type scriptConn struct {
	*net.TCPConn
	mu      sync.Mutex
	waiting bool
}

// sending ends the wait; reads from here on have a minute, a guard.
func (sc *scriptConn) sending() {
	sc.mu.Lock()
	sc.waiting = false
	sc.SetReadDeadline(time.Now().Add(time.Minute))
	sc.mu.Unlock()
}

func (sc *scriptConn) cutWait() {
	sc.mu.Lock()
	if sc.waiting {
		sc.SetReadDeadline(time.Now())
	}
	sc.mu.Unlock()
}

func newScriptedCells(t testing.TB, serve func(sc *scriptConn, a, b []byte)) *scriptedCells {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	c := &scriptedCells{ln: ln, serve: serve, serving: new(sync.WaitGroup)}
	c.accepted.Go(c.accept)
	t.Cleanup(func() {
		ln.Close()
		c.accepted.Wait()
	})
	return c
}

// round sets the script of the connections from now on.
func (c *scriptedCells) round(a, b []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.a, c.b = a, b
	c.conns, c.serving = nil, new(sync.WaitGroup)
}

func (c *scriptedCells) accept() {
	for {
		nc, err := c.ln.Accept()
		if err != nil {
			return
		}
		sc := &scriptConn{TCPConn: nc.(*net.TCPConn), waiting: true}
		sc.SetDeadline(time.Now().Add(time.Minute))
		c.mu.Lock()
		a, b := c.a, c.b
		c.conns = append(c.conns, sc)
		c.serving.Go(func() { c.serve(sc, a, b) })
		c.mu.Unlock()
	}
}

// serveGRPCScript reads the client preface, sends a SETTINGS frame whose
// payload is settings as given, reads frames until the first HEADERS (the
// call's; none comes when the client refuses the SETTINGS, or when the
// SETTINGS forbid the call: then until endRound cuts the wait short), then
// sends rest as it is and ends its side of the connection. It reads on
// until the client closes.
func serveGRPCScript(nc *scriptConn, settings, rest []byte) {
	defer nc.Close()
	if _, err := io.ReadFull(nc, make([]byte, len(http2.ClientPreface))); err != nil {
		return
	}
	n := min(len(settings), 1<<24-1)
	head := []byte{byte(n >> 16), byte(n >> 8), byte(n), frameSettings, 0, 0, 0, 0, 0}
	if _, err := nc.Write(append(head, settings[:n]...)); err != nil {
		return
	}
	var h [frameHeaderLen]byte
	for {
		_, err := io.ReadFull(nc, h[:])
		if err == nil {
			_, err = io.CopyN(io.Discard, nc, int64(h[0])<<16|int64(h[1])<<8|int64(h[2]))
		}
		if ne, ok := err.(net.Error); ok && ne.Timeout() {
			break // cut short by endRound
		}
		if err != nil {
			return
		}
		if h[3] == frameHeaders {
			break
		}
	}
	nc.sending()
	nc.Write(rest)
	nc.CloseWrite()
	io.Copy(io.Discard, nc)
}

// endRound has every connection of the round that still waits for the
// client's request send its script, then waits, at most d, for the client
// to close them all; it reports whether it did, and closes them if not.
func (c *scriptedCells) endRound(d time.Duration) bool {
	c.mu.Lock()
	serving := c.serving
	for _, sc := range c.conns {
		sc.cutWait()
	}
	c.mu.Unlock()
	done := make(chan struct{})
	go func() {
		serving.Wait()
		close(done)
	}()
	select {
	case <-done:
		return true
	case <-time.After(d):
		c.mu.Lock()
		for _, nc := range c.conns {
			nc.Close()
		}
		c.mu.Unlock()
		<-done
		return false
	}
}

// scriptedCall makes one gRPC call (a message of "ping") through a new
// grpcUpstream to cells, which answers with settings and rest, reads the
// whole answer, and closes the upstream. It fails t if the call outlives
// its deadline (2 s) by more than a generous margin, or if the upstream
// keeps a connection open after its Close.
func scriptedCall(t *testing.T, cells *scriptedCells, settings, rest []byte) grpcResult {
	t.Helper()
	cells.round(settings, rest)
	u := newGRPCUpstream(cells.ln.Addr().String(), nil, &net.Dialer{})
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Second)
	defer cancel()
	type answer struct {
		r   grpcResult
		err error
	}
	done := make(chan answer, 1)
	go func() {
		req, err := grpcRequest(ctx, "http://cells/pkg.Svc/Method", grpcMsg([]byte("ping")))
		if err != nil {
			done <- answer{err: err}
			return
		}
		res, err := u.do(&grpcCall{req: req, host: "cells", path: "/pkg.Svc/Method"})
		if err != nil {
			done <- answer{r: grpcResult{Err: err}}
			return
		}
		r := grpcResult{Status: res.StatusCode, Header: res.Header}
		r.Body, r.Err = io.ReadAll(res.Body)
		res.Body.Close()
		r.Trailer = res.Trailer
		done <- answer{r: r}
	}()
	var a answer
	select {
	case a = <-done:
	case <-time.After(30 * time.Second):
		u.Close()
		cells.endRound(time.Second)
		t.Fatalf("the call still runs 30 s after it began, past its deadline of 2 s\nSETTINGS payload %x\nthen %x", settings, rest)
	}
	u.Close()
	if !cells.endRound(10 * time.Second) {
		t.Fatalf("a connection to Cells still open 10 s after the upstream's Close\nSETTINGS payload %x\nthen %x", settings, rest)
	}
	if a.err != nil {
		t.Fatal(a.err)
	}
	return a.r
}

// cellsScript builds what a scripted Cells sends after its SETTINGS: the
// frames that write writes, with one HPACK encoder for all the header
// blocks, so that later blocks refer to the dynamic table.
func cellsScript(write func(fr *http2.Framer, block func(kv ...string) []byte)) []byte {
	var out, hb bytes.Buffer
	fr := http2.NewFramer(&out, nil)
	enc := hpack.NewEncoder(&hb)
	write(fr, func(kv ...string) []byte {
		hb.Reset()
		for i := 0; i+1 < len(kv); i += 2 {
			enc.WriteField(hpack.HeaderField{Name: kv[i], Value: kv[i+1]})
		}
		return bytes.Clone(hb.Bytes())
	})
	return out.Bytes()
}

// settingsPayload is the payload of a SETTINGS frame holding s.
func settingsPayload(s ...http2.Setting) []byte {
	var b []byte
	for _, st := range s {
		b = binary.BigEndian.AppendUint16(b, uint16(st.ID))
		b = binary.BigEndian.AppendUint32(b, st.Val)
	}
	return b
}

var (
	grpcAnswerHead = []string{":status", "200", "content-type", "application/grpc"}
	grpcAnswerOK   = []string{"grpc-status", "0", "grpc-message", ""}
)

// scriptOK is a whole answer: the SETTINGS acknowledged, the header, one
// message ("pong"), the trailers.
var scriptOK = cellsScript(func(fr *http2.Framer, block func(kv ...string) []byte) {
	fr.WriteSettingsAck()
	fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, EndHeaders: true, BlockFragment: block(grpcAnswerHead...)})
	fr.WriteData(1, false, grpcMsg([]byte("pong")))
	fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, EndHeaders: true, EndStream: true, BlockFragment: block(grpcAnswerOK...)})
})

// TestScriptedCellsAnswer: the fuzz target's scripted Cells does reach the
// proxy's client: a whole answer arrives whole, a reset and a Cells gone
// mid-answer end the call, and a refused SETTINGS ends it before it is
// sent. Were the script lost on the way, the fuzz target would test
// nothing.
func TestScriptedCellsAnswer(t *testing.T) {
	t.Parallel()
	cells := newScriptedCells(t, serveGRPCScript)
	r := scriptedCall(t, cells, nil, scriptOK)
	if r.Err != nil || r.Status != 200 || !bytes.Equal(r.Body, grpcMsg([]byte("pong"))) || r.Trailer.Get("Grpc-Status") != "0" {
		t.Errorf("whole answer: status %d, body %q, trailers %v, err %v; want 200, the message pong, grpc-status 0", r.Status, r.Body, r.Trailer, r.Err)
	}
	reset := cellsScript(func(fr *http2.Framer, block func(kv ...string) []byte) {
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, EndHeaders: true, BlockFragment: block(grpcAnswerHead...)})
		fr.WriteRSTStream(1, http2.ErrCodeInternal)
	})
	if r := scriptedCall(t, cells, nil, reset); r.Err == nil {
		t.Errorf("reset after the header: status %d, body %q, trailers %v, no error; want the read to fail", r.Status, r.Body, r.Trailer)
	}
	if r := scriptedCall(t, cells, nil, scriptOK[:len(scriptOK)-5]); r.Err == nil {
		t.Errorf("Cells gone before the trailers' end: status %d, body %q, trailers %v, no error; want the read to fail", r.Status, r.Body, r.Trailer)
	}
	// MAX_FRAME_SIZE below the RFC's floor (RFC 9113 §6.5.2).
	bad := settingsPayload(http2.Setting{ID: http2.SettingMaxFrameSize, Val: 100})
	if r := scriptedCall(t, cells, bad, scriptOK); r.Err == nil {
		t.Errorf("refused SETTINGS: status %d, body %q, no error; want the call to fail", r.Status, r.Body)
	}
}

// addGRPCSeeds adds to f, as (SETTINGS payload, what follows the call's
// HEADERS), answers of Cells' gRPC port: whole, Trailers-Only, split,
// padded, with control frames, GOAWAY, resets, frames out of place; and
// SETTINGS of several shapes before a whole answer.
func addGRPCSeeds(f *testing.F) {
	ok := func(write func(fr *http2.Framer, block func(kv ...string) []byte)) []byte { return cellsScript(write) }
	seeds := [][]byte{
		scriptOK,
		// Trailers-Only: the status in the one header block.
		ok(func(fr *http2.Framer, block func(kv ...string) []byte) {
			fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, EndHeaders: true, EndStream: true,
				BlockFragment: block(":status", "200", "content-type", "application/grpc", "grpc-status", "12", "grpc-message", "not%20here")})
		}),
		// The header split over a CONTINUATION, padded and prioritised
		// HEADERS, a padded DATA frame, the message in two frames.
		ok(func(fr *http2.Framer, block func(kv ...string) []byte) {
			b := block(append(grpcAnswerHead, "x-cells", "value")...)
			fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: b[:3], PadLength: 4,
				Priority: http2.PriorityParam{StreamDep: 0, Weight: 15}})
			fr.WriteContinuation(1, true, b[3:])
			msg := grpcMsg([]byte("a longer message, in two frames"))
			fr.WriteDataPadded(1, false, msg[:7], []byte{0, 0, 0})
			fr.WriteData(1, false, msg[7:])
			fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, EndHeaders: true, EndStream: true, BlockFragment: block(grpcAnswerOK...)})
		}),
		// A 1xx before the answer, the trailers again from the dynamic
		// table, in a CONTINUATION of their own.
		ok(func(fr *http2.Framer, block func(kv ...string) []byte) {
			fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, EndHeaders: true, BlockFragment: block(":status", "100")})
			fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, EndHeaders: true, BlockFragment: block(grpcAnswerHead...)})
			fr.WriteData(1, false, grpcMsg(nil))
			tr := block(grpcAnswerOK...)
			fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, EndStream: true, BlockFragment: tr[:1]})
			fr.WriteContinuation(1, true, tr[1:])
		}),
		// Control frames around the answer: windows, PING, a table size
		// update, then a reset.
		ok(func(fr *http2.Framer, block func(kv ...string) []byte) {
			fr.WriteWindowUpdate(0, 1<<20)
			fr.WriteWindowUpdate(1, 1<<16)
			fr.WritePing(false, [8]byte{1, 2, 3})
			fr.WriteSettings(http2.Setting{ID: http2.SettingHeaderTableSize, Val: 0}, http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1})
			fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, EndHeaders: true, BlockFragment: block(grpcAnswerHead...)})
			fr.WriteRSTStream(1, http2.ErrCodeCancel)
		}),
		// GOAWAY before the call was processed: sent again, on a new
		// connection, which gets the same script.
		ok(func(fr *http2.Framer, block func(kv ...string) []byte) {
			fr.WriteGoAway(0, http2.ErrCodeNo, []byte("restarting"))
		}),
		// GOAWAY after the call, then its answer; REFUSED_STREAM.
		ok(func(fr *http2.Framer, block func(kv ...string) []byte) {
			fr.WriteGoAway(1, http2.ErrCodeNo, nil)
			fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, EndHeaders: true, EndStream: true,
				BlockFragment: block(append(grpcAnswerHead, grpcAnswerOK...)...)})
		}),
		ok(func(fr *http2.Framer, block func(kv ...string) []byte) {
			fr.WriteRSTStream(1, http2.ErrCodeRefusedStream)
		}),
		// Frames of unknown type, on a stream never opened, a push.
		ok(func(fr *http2.Framer, block func(kv ...string) []byte) {
			fr.WriteRawFrame(0xfa, 0, 1, []byte("extension"))
			fr.WriteData(3, false, []byte("x"))
			fr.WritePushPromise(http2.PushPromiseParam{StreamID: 1, PromiseID: 2, EndHeaders: true, BlockFragment: block(":path", "/")})
		}),
	}
	settings := [][]byte{
		nil,
		settingsPayload(http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: 1}, http2.Setting{ID: http2.SettingInitialWindowSize, Val: 3}),
		settingsPayload(http2.Setting{ID: http2.SettingMaxFrameSize, Val: 1 << 15}, http2.Setting{ID: http2.SettingHeaderTableSize, Val: 64},
			http2.Setting{ID: http2.SettingMaxHeaderListSize, Val: 1000}, http2.Setting{ID: 0xff, Val: 7}),
		// Below the call's head: the call is not sent.
		settingsPayload(http2.Setting{ID: http2.SettingMaxHeaderListSize, Val: 100}),
	}
	for _, s := range seeds {
		f.Add([]byte(nil), s)
	}
	for _, st := range settings[1:] {
		f.Add(st, scriptOK)
	}
}

// FuzzGRPCUpstreamResponse: whatever Cells' gRPC port sends, in its
// SETTINGS and after the call's HEADERS, the proxy's client must not
// panic, the call must end (with an answer or an error) once Cells has
// ended its side, and the upstream's Close must close the connection.
func FuzzGRPCUpstreamResponse(f *testing.F) {
	addGRPCSeeds(f)
	cells := newScriptedCells(f, serveGRPCScript)
	f.Fuzz(func(t *testing.T, settings, rest []byte) {
		r := scriptedCall(t, cells, settings, rest)
		if r.Err == nil && r.Status == 0 {
			t.Fatalf("a call with neither an answer nor an error\nSETTINGS payload %x\nthen %x", settings, rest)
		}
	})
}

// FuzzGRPCRelay: the same answers from Cells' gRPC port (CELLS_GRPC_UPSTREAM
// =h2c://), through a whole proxy to an HTTP/2 client (net/http's, as
// gRPC clients call): the relay of the answer's header, messages and
// trailers, and net/http's HTTP/2 server after it. The proxy must not
// panic, the client must get an answer or an error within 20 s once Cells
// has ended its side, and the proxy must close its connections to Cells
// within 10 s after that. A proxy that stopped serving fails the next input.
func FuzzGRPCRelay(f *testing.F) {
	addGRPCSeeds(f)
	cells := newScriptedCells(f, serveGRPCScript)
	cfg := testConfig(nil)
	cfg.Upstream = &url.URL{Scheme: "http", Host: cells.ln.Addr().String()}
	cfg.GRPCUpstream = &url.URL{Scheme: "h2c", Host: cells.ln.Addr().String()}
	tp := startProxy(f, cfg)
	f.Fuzz(func(t *testing.T, settings, rest []byte) {
		cells.round(settings, rest)
		ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
		defer cancel()
		// grpc-timeout: the proxy ends the call itself within 2 s, where
		// Cells keeps it waiting by right (SETTINGS_MAX_CONCURRENT_STREAMS
		// 0: up to 10 s for a stream); 20 s without an answer is a hang.
		r := callGRPC(ctx, tp.H2, tp.URL+"/pkg.Svc/Method", grpcMsg([]byte("ping")), "grpc-timeout", "2S")
		if ctx.Err() != nil {
			t.Fatalf("no answer within 20 s (%v)\nSETTINGS payload %x\nthen %x", r.Err, settings, rest)
		}
		if !cells.endRound(10 * time.Second) {
			t.Fatalf("a connection to Cells still open 10 s after Cells ended its side\nSETTINGS payload %x\nthen %x", settings, rest)
		}
	})
}
