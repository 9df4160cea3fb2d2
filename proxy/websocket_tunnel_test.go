package proxy

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// wsRawUp is a Cells that answers upgrades with serve on the hijacked
// connection (30 s deadline), and other requests with "ok".
func wsRawUp(t *testing.T, serve func(conn net.Conn, brw *bufio.ReadWriter, r *http.Request)) *testUpstream {
	return newUpstream(t, upTLS, hijacker(func(r *http.Request) bool { return r.Header.Get("Upgrade") == "" }, serve))
}

// hijacker answers the requests plain picks with "ok", and hands the
// connection of the others to serve (30 s deadline).
func hijacker(plain func(*http.Request) bool, serve func(conn net.Conn, brw *bufio.ReadWriter, r *http.Request)) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if plain(r) {
			io.WriteString(w, "ok")
			return
		}
		conn, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(30 * time.Second))
		serve(conn, brw, r)
	})
}

func accept101(r *http.Request) string {
	return "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: " +
		wsAccept(r.Header.Get("Sec-WebSocket-Key")) + "\r\n\r\n"
}

// frag is a frame with FIN as given, opcode op, masked when mask.
func frag(fin bool, op byte, payload []byte, mask bool) []byte {
	b := frameOf(op, payload, mask)
	if !fin {
		b[0] &^= 0x80
	}
	return b
}

// TestWebSocketRefusedBodyStalls: Cells refuses the upgrade (401) and its
// body stalls, with a Content-Length or chunked. A plain request whose
// response body stalls is cut after PROXY_IDLE_TIMEOUT (the control); the
// refused upgrade must be too (found by review: it held the client, a
// connection to Cells and a handler forever), and its client must see the
// body broken, not a well-ended chunked body holding half of Cells' answer
// (found by review of the first fix).
func TestWebSocketRefusedBodyStalls(t *testing.T) {
	for _, refusal := range []struct{ name, head string }{
		{"content-length", "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"code\":"},
		{"chunked", "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n{\"code\":\r\n"},
	} {
		release := make(chan struct{})
		defer close(release)
		cfg := testConfig(newUpstream(t, upTLS, stallingRefusal(release, refusal.head)))
		cfg.IdleTimeout = 300 * time.Millisecond
		tp := startProxy(t, cfg)
		for _, tc := range []struct{ name, extra string }{
			{"plain", ""},
			{"upgrade", "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"},
		} {
			t.Run(refusal.name+"/"+tc.name, func(t *testing.T) {
				conn := tp.dialTLS(t, tp.Addr().String(), "http/1.1")
				defer conn.Close()
				conn.SetDeadline(time.Now().Add(15 * time.Second))
				io.WriteString(conn, "GET /ws/event HTTP/1.1\r\nHost: "+tp.Addr().String()+"\r\n"+tc.extra+"\r\n")
				res, err := http.ReadResponse(bufio.NewReader(conn), &http.Request{Method: "GET"})
				var body []byte
				if err == nil {
					body, err = io.ReadAll(res.Body)
				}
				switch ne, ok := err.(net.Error); {
				case ok && ne.Timeout():
					t.Fatalf("connection still open 15 s after Cells' 401 body stalled (PROXY_IDLE_TIMEOUT %v); client got %q", cfg.IdleTimeout, body)
				case err == nil:
					t.Errorf("%d %q read as a complete response: Cells' body was cut after %v and the client cannot tell", res.StatusCode, body, cfg.IdleTimeout)
				}
			})
		}
	}
}

// TestWebSocketFragmentsVerbatim: a fragmented message with a ping between its
// fragments, either way, sent frame by frame with pauses (the pumps park
// between them), split mid-header, and all at once, reaches the far end
// byte for byte.
func TestWebSocketFragmentsVerbatim(t *testing.T) {
	t.Parallel()
	big := randomMessage(websocket.MessageBinary, 70_000)
	mk := func(mask bool) [][]byte {
		return [][]byte{
			frag(false, 0x1, []byte("hello "), mask),
			frag(true, 0x9, []byte("ping!"), mask),
			frag(false, 0x0, big, mask),
			frag(true, 0xA, nil, mask),
			frag(true, 0x0, []byte(" end"), mask),
			frag(true, 0x2, big[:300], mask),
		}
	}
	fromClient, fromCells := mk(true), mk(false)
	join := func(fs [][]byte) []byte { return bytes.Join(fs, nil) }
	send := func(w io.Writer, fs [][]byte) error {
		for _, f := range fs {
			// Split inside the header, with a pause: the pump has read
			// the first byte and waits for the rest.
			if _, err := w.Write(f[:1]); err != nil {
				return err
			}
			time.Sleep(20 * time.Millisecond)
			if _, err := w.Write(f[1:]); err != nil {
				return err
			}
			time.Sleep(20 * time.Millisecond)
		}
		_, err := w.Write(join(fs)) // all at once
		return err
	}
	want := func(fs [][]byte) []byte { return append(join(fs), join(fs)...) }
	cellsGot := make(chan []byte, 1)
	up := wsRawUp(t, func(conn net.Conn, brw *bufio.ReadWriter, r *http.Request) {
		brw.WriteString(accept101(r))
		brw.Flush()
		b := make([]byte, len(want(fromClient)))
		_, err := io.ReadFull(brw, b)
		if err != nil {
			t.Errorf("Cells read: %v", err)
		}
		cellsGot <- b
		if err := send(conn, fromCells); err != nil {
			t.Errorf("Cells send: %v", err)
		}
		io.Copy(io.Discard, conn)
	})
	tp := startProxy(t, testConfig(up))
	conn := rawWS(t, tp)
	conn.SetDeadline(time.Now().Add(20 * time.Second))
	if err := send(conn, fromClient); err != nil {
		t.Fatal(err)
	}
	if b := <-cellsGot; !bytes.Equal(b, want(fromClient)) {
		t.Errorf("Cells got %d bytes differing from the client's frames", len(b))
	}
	b := make([]byte, len(want(fromCells)))
	if _, err := io.ReadFull(conn, b); err != nil {
		t.Fatalf("client read: %v", err)
	}
	if !bytes.Equal(b, want(fromCells)) {
		t.Errorf("client got bytes differing from Cells' frames")
	}
}

// TestWebSocketShutdownMidMessage: shutdown between two fragments of a message
// each way: both ends get a close frame 1001 right after the fragment.
func TestWebSocketShutdownMidMessage(t *testing.T) {
	t.Parallel()
	first := frag(false, 0x1, []byte("part one"), true)
	cellsFirst := frag(false, 0x1, []byte("cells part"), false)
	cellsGot := make(chan []byte, 1)
	up := wsRawUp(t, func(conn net.Conn, brw *bufio.ReadWriter, r *http.Request) {
		brw.WriteString(accept101(r))
		brw.WriteString(string(cellsFirst))
		brw.Flush()
		b := make([]byte, len(first))
		io.ReadFull(brw, b)
		rest, _ := io.ReadAll(brw)
		cellsGot <- append(b, rest...)
	})
	tp := startProxy(t, testConfig(up))
	conn := rawWS(t, tp)
	conn.SetDeadline(time.Now().Add(20 * time.Second))
	b := make([]byte, len(cellsFirst))
	if _, err := io.ReadFull(conn, b); err != nil || !bytes.Equal(b, cellsFirst) {
		t.Fatalf("client: %x %v", b, err)
	}
	conn.Write(first)
	time.Sleep(100 * time.Millisecond)
	stopped := shutdownAsync(tp)
	rest, _ := io.ReadAll(conn)
	if p, ok := closePayload(rest, false); !ok || binary.BigEndian.Uint16(p) != 1001 {
		t.Errorf("client got % x after the fragment, want a close 1001", rest)
	}
	got := <-cellsGot
	if !bytes.HasPrefix(got, first) {
		t.Fatalf("Cells got % x", got)
	}
	if p, ok := closePayload(got[len(first):], true); !ok || binary.BigEndian.Uint16(p) != 1001 {
		t.Errorf("Cells got % x after the fragment, want a masked close 1001", got[len(first):])
	}
	if err := <-stopped; err != nil {
		t.Error(err)
	}
}

func countFDs(t *testing.T) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skip(err)
	}
	return len(ents)
}

// TestWebSocketNoLeaks: many short tunnels ending every way, and refused
// handshakes, leave no fd and no goroutine behind. Not parallel.
func TestWebSocketNoLeaks(t *testing.T) {
	up := wsRawUp(t, func(conn net.Conn, brw *bufio.ReadWriter, r *http.Request) {
		switch r.URL.Query().Get("m") {
		case "401":
			brw.WriteString("HTTP/1.1 401 Unauthorized\r\nContent-Length: 2\r\n\r\nno")
			brw.Flush()
			return
		case "200":
			brw.WriteString("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
			brw.Flush()
			return
		case "noupgrade":
			brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n\r\n")
			brw.Flush()
			io.Copy(io.Discard, brw)
			return
		case "badaccept":
			brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: AAAA\r\n\r\n")
			brw.Flush()
			io.Copy(io.Discard, brw)
			return
		case "cellsclose":
			brw.WriteString(accept101(r))
			brw.Write(closeFrame(1000, "", false))
			brw.Flush()
			return
		case "cellsreset":
			brw.WriteString(accept101(r))
			brw.Flush()
			time.Sleep(50 * time.Millisecond)
			if tc, ok := conn.(interface{ NetConn() net.Conn }); ok {
				tc.NetConn().(*net.TCPConn).SetLinger(0)
			}
			return
		}
		brw.WriteString(accept101(r))
		brw.Flush()
		io.Copy(io.Discard, brw)
	})
	tp := startProxy(t, testConfig(up))
	run := func(m string) {
		conn := tp.dialTLS(t, tp.Addr().String(), "http/1.1")
		conn.SetDeadline(time.Now().Add(10 * time.Second))
		io.WriteString(conn, "GET /ws/event?m="+m+" HTTP/1.1\r\nHost: "+tp.Addr().String()+
			"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
			"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
		br := bufio.NewReader(conn)
		res, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Errorf("%s: %v", m, err)
			conn.Close()
			return
		}
		switch m {
		case "echo":
			conn.Write(wsFrame("hi", true))
			conn.Close()
		case "reset":
			conn.Write(wsFrame("hi", true))
			conn.NetConn().(*net.TCPConn).SetLinger(0)
			conn.NetConn().Close()
		default:
			if res.StatusCode != 101 {
				io.ReadAll(res.Body)
			}
			conn.Close()
		}
	}
	modes := []string{"echo", "reset", "401", "200", "noupgrade", "badaccept", "cellsclose", "cellsreset"}
	for _, m := range modes { // warm up
		run(m)
	}
	settleTunnels(t, tp)
	fd0, g0 := countFDs(t), runtime.NumGoroutine()
	for range 10 {
		for _, m := range modes {
			run(m)
		}
	}
	settleTunnels(t, tp)
	tp.H1.CloseIdleConnections()
	var fd1, g1 int
	waitFor(t, 15*time.Second, func() bool {
		fd1, g1 = countFDs(t), runtime.NumGoroutine()
		return fd1 <= fd0+2 && g1 <= g0+4
	}, func() string {
		buf := make([]byte, 1<<20)
		n := runtime.Stack(buf, true)
		var gs []string
		for _, g := range strings.Split(string(buf[:n]), "\n\n") {
			if strings.Contains(g, "cells-proxy/proxy") {
				gs = append(gs, g)
			}
		}
		return fmt.Sprintf("after 80 tunnels: fds %d -> %d, goroutines %d -> %d\n%s", fd0, fd1, g0, g1, strings.Join(gs, "\n\n"))
	})
}

func settleTunnels(t *testing.T, tp *testProxy) {
	t.Helper()
	var n int
	waitFor(t, 15*time.Second, func() bool { n = tp.fwd.ws.count(); return n == 0 }, func() string {
		return fmt.Sprintf("%d tunnels still open", n)
	})
}

var _ = fmt.Sprint
var _ = context.Background

// TestWebSocketEarlyFrames: frames sent with the upgrade request, in the same
// TLS record, behind a body, on a connection that first served a request
// through the front, and over HTTP/1.0: all reach Cells in order.
func TestWebSocketEarlyFrames(t *testing.T) {
	t.Parallel()
	type got struct {
		proto string
		body  string
		b     []byte
	}
	gotc := make(chan got, 8)
	frames := append(wsFrame("one", true), wsFrame("two", true)...)
	up := newUpstream(t, upTLS, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Upgrade") == "" {
			io.WriteString(w, "ok")
			return
		}
		body, _ := io.ReadAll(r.Body) // before the hijack
		conn, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(30 * time.Second))
		brw.WriteString(accept101(r))
		brw.Flush()
		b := make([]byte, len(frames))
		_, err = io.ReadFull(brw, b)
		if err != nil {
			t.Errorf("Cells read: %v", err)
		}
		gotc <- got{r.Proto, string(body), b}
		brw.Write(wsFrame("back", false))
		brw.Flush()
		io.Copy(io.Discard, brw)
	}))
	tp := startProxy(t, testConfig(up))
	host := tp.Addr().String()
	ws := "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
	for _, tc := range []struct{ name, pre, req, body string }{
		{"one-record", "", "GET /ws/event HTTP/1.1\r\nHost: " + host + "\r\n" + ws + "\r\n", ""},
		{"after-front", "GET / HTTP/1.1\r\nHost: " + host + "\r\n\r\n", "GET /ws/event HTTP/1.1\r\nHost: " + host + "\r\n" + ws + "\r\n", ""},
		{"with-body", "", "GET /ws/event HTTP/1.1\r\nHost: " + host + "\r\nContent-Length: 5\r\n" + ws + "\r\nhello", "hello"},
		{"chunked-body", "", "GET /ws/event HTTP/1.1\r\nHost: " + host + "\r\nTransfer-Encoding: chunked\r\n" + ws + "\r\n5\r\nhello\r\n0\r\n\r\n", "hello"},
		{"http10", "", "GET /ws/event HTTP/1.0\r\nHost: " + host + "\r\n" + ws + "\r\n", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			conn := tp.dialRaw(t, host, "http/1.1")
			br := bufio.NewReader(conn)
			if tc.pre != "" {
				io.WriteString(conn, tc.pre)
				res, err := http.ReadResponse(br, nil)
				if err != nil {
					t.Fatal(err)
				}
				io.ReadAll(res.Body)
			}
			conn.Write(append([]byte(tc.req), frames...))
			res, err := http.ReadResponse(br, nil)
			if err != nil {
				t.Fatal(err)
			}
			if res.StatusCode != 101 {
				t.Fatalf("status %d", res.StatusCode)
			}
			g := recv(t, gotc, "Cells' read")
			t.Logf("Cells saw %s body %q", g.proto, g.body)
			if !bytes.Equal(g.b, frames) || g.body != tc.body {
				t.Errorf("Cells got body %q frames % x, want %q % x", g.body, g.b, tc.body, frames)
			}
			b := make([]byte, len(wsFrame("back", false)))
			if _, err := io.ReadFull(br, b); err != nil || !bytes.Equal(b, wsFrame("back", false)) {
				t.Errorf("client got % x %v", b, err)
			}
		})
	}
}

// TestWebSocketBothWaysOrdered: each end sends numbered messages on its own,
// with tiny random pauses so pumps park and wake while the other direction
// moves; each end checks it gets every message in order.
func TestWebSocketBothWaysOrdered(t *testing.T) {
	t.Parallel()
	const n = 400
	check := func(ctx context.Context, c *websocket.Conn, who string, seed uint64) error {
		errc := make(chan error, 1)
		go func() {
			for i := range n {
				if i%7 == 0 {
					time.Sleep(time.Duration(seed%3) * time.Millisecond)
				}
				size := 4 + (i*131+int(seed))%3000
				if i%50 == 0 {
					size = 200_000
				}
				msg := make([]byte, size)
				binary.BigEndian.PutUint32(msg, uint32(i)) // size >= 4 below
				if size < 4 {
					msg = make([]byte, 4)
					binary.BigEndian.PutUint32(msg, uint32(i))
				}
				if err := c.Write(ctx, websocket.MessageBinary, msg); err != nil {
					errc <- fmt.Errorf("%s write %d: %w", who, i, err)
					return
				}
			}
			errc <- nil
		}()
		for i := range n {
			_, b, err := c.Read(ctx)
			if err != nil {
				return fmt.Errorf("%s read %d: %w", who, i, err)
			}
			if got := binary.BigEndian.Uint32(b); got != uint32(i) {
				return fmt.Errorf("%s: message %d is number %d", who, i, got)
			}
		}
		return <-errc
	}
	wsUp := newWSUpstream(func(ctx context.Context, c *websocket.Conn) error {
		if err := check(ctx, c, "Cells", 1); err != nil {
			return err
		}
		_, _, err := c.Read(ctx) // until the client closes
		return err
	})
	wsUp.ended = make(chan error, 8)
	tp := startProxy(t, testConfig(newUpstream(t, upTLS, wsUp)))
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	for k := range 4 {
		wg.Go(func() {
			c, _ := dialWS(t, tp, "/ws/event", nil)
			if err := check(ctx, c, fmt.Sprint("client ", k), uint64(k)); err != nil {
				t.Error(err)
			}
			c.Close(websocket.StatusNormalClosure, "")
		})
	}
	wg.Wait()
	for range 4 {
		if err := wsUp.end(t); err != nil {
			if code, _ := closeErr(err); code != websocket.StatusNormalClosure {
				t.Error(err)
			}
		}
	}
}

// stallingRefusal is a Cells that answers "/" (readiness) with "ok" and
// every other request, upgrade or not, with head and then nothing, until
// release is closed or 25 s have passed.
func stallingRefusal(release <-chan struct{}, head string) http.Handler {
	return hijacker(func(r *http.Request) bool { return r.URL.Path == "/" }, func(_ net.Conn, brw *bufio.ReadWriter, _ *http.Request) {
		brw.WriteString(head)
		brw.Flush()
		select {
		case <-release:
		case <-time.After(25 * time.Second):
		}
	})
}

// TestWebSocketCutWriteNoCloseNotify: the idle timeout cuts the proxy's
// write to a client that stopped reading, mid TLS record. The connection
// then ends with a FIN alone: a close_notify behind the cut record's first
// bytes would read, to the client, as the rest of that record and fail as
// a bad MAC, instead of the truncation it is (found by review: it did).
// The client's bytes are taken off the wire, below its TLS, to see where
// the stream ends.
func TestWebSocketCutWriteNoCloseNotify(t *testing.T) {
	t.Parallel()
	const size = 64 << 20 // more than the sockets between Cells and the client hold
	up := wsRawUp(t, func(conn net.Conn, brw *bufio.ReadWriter, r *http.Request) {
		brw.WriteString(accept101(r))
		brw.Write(binary.BigEndian.AppendUint64([]byte{0x82, 127}, size))
		chunk := make([]byte, 1<<20)
		for range size / len(chunk) {
			if _, err := brw.Write(chunk); err != nil {
				return
			}
		}
		brw.Flush()
		io.Copy(io.Discard, conn)
	})
	cfg := testConfig(up)
	cfg.WSIdleTimeout = 300 * time.Millisecond
	tp := startProxy(t, cfg)

	// A write cut exactly between two records (rare) shows nothing: try
	// again.
	for try := 1; ; try++ {
		wire, err := cutWebSocketWrite(t, tp)
		end, cut := lastRecord(wire)
		t.Logf("try %d: %d bytes; the client's read ended with %v; last record at %d", try, len(wire), err, end)
		if !cut {
			if try < 3 {
				continue
			}
			t.Fatalf("the stream ended between records %d times: the proxy's write was never cut mid-record", try)
		}
		// TLS 1.3 sends close_notify as a 19-byte application_data record.
		if tail := wire[max(0, len(wire)-24):]; len(wire)-24 > end && bytes.HasPrefix(tail, []byte{0x17, 0x03, 0x03, 0x00, 0x13}) {
			t.Errorf("a close_notify record follows the first %d bytes of a cut record", len(wire)-24-end-5)
		}
		if errors.Is(err, io.EOF) || err == nil || strings.Contains(err.Error(), "MAC") {
			t.Errorf("the client's read ended with %v, want an unexpected EOF", err)
		}
		return
	}
}

// cutWebSocketWrite opens a websocket through tp whose client reads
// nothing past the 101 until the proxy stops the tunnel (its idle
// timeout), then reads to the end. It returns what came off the wire and
// the error that ended the client's reading.
func cutWebSocketWrite(t *testing.T, tp *testProxy) ([]byte, error) {
	t.Helper()
	var tap *tapConn
	conn := tp.tlsOver(t, func(tcp net.Conn) net.Conn { tap = &tapConn{Conn: tcp}; return tap })
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(30 * time.Second))
	readWS101(t, tp, conn)
	waitFor(t, 20*time.Second, tp.fwd.ws.stopping, func() string { return "the idle timeout never stopped the tunnel" })
	_, err := io.Copy(io.Discard, conn)
	return tap.got.Bytes(), err
}

// tapConn keeps a copy of what is read through it.
type tapConn struct {
	net.Conn
	got bytes.Buffer
}

func (c *tapConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.got.Write(p[:n])
	return n, err
}

// lastRecord walks the TLS records of wire: the offset of the last one, and
// whether the wire ends inside it.
func lastRecord(wire []byte) (at int, cut bool) {
	for at = 0; at+5 <= len(wire); {
		next := at + 5 + int(binary.BigEndian.Uint16(wire[at+3:]))
		if next > len(wire) {
			return at, true
		}
		if next == len(wire) {
			return at, false
		}
		at = next
	}
	return at, at < len(wire)
}

// stopping: some open tunnel has begun to stop (stopPumps).
func (ts *tunnels) stopping() bool {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	for t := range ts.open {
		if t.stopping.Load() {
			return true
		}
	}
	return false
}
