package proxy

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/http"
	"testing"
	"time"
)

// A websocket's bytes go through the proxy's own code, not net/http's: each
// pump reads frame headers to know where frames start (so that it can add a
// close frame of its own at a boundary), copies payloads as they come,
// parks between frames with no goroutine, and is woken by the parker's
// epoll set. FuzzWebSocketTunnel sends arbitrary bytes both ways at once,
// cut into arbitrary writes (TLS records), with pauses that let the pumps
// park, and checks that every byte arrives, unchanged and in order.

// wsDeliverable is how much of s, the bytes one end of a websocket sent,
// the tunnel passes on once it has read them all: whole frames, and of a
// frame cut short the header with the payload bytes that came, never a
// header alone (the pump writes a header with its first payload bytes,
// copyFrame) nor part of a header. stop: a frame declares more than 2^62
// bytes, which no websocket sends; the tunnel ends there (pump.frames).
func wsDeliverable(s []byte) (n int, stop bool) {
	pos := 0
	for {
		rest := s[pos:]
		if len(rest) < 2 {
			return pos, false
		}
		h := 2
		switch rest[1] & 0x7f {
		case 126:
			h += 2
		case 127:
			h += 8
		}
		if rest[1]&0x80 != 0 {
			h += 4
		}
		if len(rest) < h {
			return pos, false
		}
		var length uint64
		switch l := rest[1] & 0x7f; l {
		case 126:
			length = uint64(binary.BigEndian.Uint16(rest[2:4]))
		case 127:
			length = binary.BigEndian.Uint64(rest[2:10])
		default:
			length = uint64(l)
		}
		if length > 1<<62 {
			return pos, true
		}
		if have := uint64(len(rest) - h); have < length {
			if have == 0 {
				return pos, false
			}
			return len(s), false
		}
		pos += h + int(length)
	}
}

// wsArrives is writePieces' arrived for a websocket's bytes: what the
// tunnel passes on of data's first bytes.
func wsArrives(data []byte) func(sent int) (int, bool) {
	return func(sent int) (int, bool) { return wsDeliverable(data[:sent]) }
}

// writeTo is writePieces' write for a piece that is a write of its own.
func writeTo(w io.Writer) func(p []byte) error {
	return func(p []byte) error {
		_, err := w.Write(p)
		return err
	}
}

// wsScript is one input's part for Cells: what Cells sends, and the
// results of its side.
type wsScript struct {
	data, cuts []byte
	clientEnd  chan *collected // the client's reads, for Cells' pauses, once it has read the 101
	quit       chan struct{}
	ready      chan *collected // Cells' reads, once it has answered 101
	written    chan error      // Cells' writer's end
}

// wsScriptedCells is a Cells whose websocket handshakes take the next
// wsScript: it answers 101, then writes the script's bytes while it reads
// what comes, until its read fails; then it closes the connection.
func wsScriptedCells(t testing.TB, withTLS bool, scripts <-chan *wsScript) *connUpstream {
	return scriptedConnCells(t, withTLS, scripts, func(c net.Conn, br *bufio.Reader, r *http.Request, s *wsScript) bool {
		if _, err := io.WriteString(c, accept101(r)); err != nil {
			s.ready <- nil
			return false
		}
		cells := collect(br)
		s.ready <- cells
		s.written <- writePieces(s.data, s.cuts, writeTo(c), wsArrives(s.data), s.clientEnd, s.quit)
		<-cells.done
		return false
	})
}

// FuzzWebSocketTunnel: whatever bytes a client and Cells send each other
// over a websocket, in whatever pieces, through a cleartext or a TLS Cells,
// each end receives what the tunnel passes on (wsDeliverable) of what the
// other sent, byte for byte, in order, and nothing more; after a pause, the
// bytes written before it arrive without the next write to wake the pump;
// and once the client closes (or the tunnel stops at a frame no websocket
// sends) both connections end.
func FuzzWebSocketTunnel(f *testing.F) {
	text := func(s string, mask bool) []byte { return shortFrame(0x1, []byte(s), mask) }
	mid := make([]byte, 300)
	for i := range mid {
		mid[i] = byte(i)
	}
	medium := func(mask bool) []byte { // a 126-length frame
		b := []byte{0x82, 126, 0, 0}
		binary.BigEndian.PutUint16(b[2:], uint16(len(mid)))
		if mask {
			b[1] |= 0x80
			b = append(b, 1, 2, 3, 4)
		}
		return append(b, mid...)
	}
	cat := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
	for _, s := range []struct {
		up, down, upCuts, downCuts []byte
	}{
		{text(`{"jwt":"x"}`, true), text(`{"event":"y"}`, false), nil, nil},
		{cat(text("a", true), text("bb", true), medium(true), frameOf(0x2, bytes.Repeat([]byte("u"), 40000), true), closeFrame(1000, "", true)),
			cat(text("c", false), medium(false), shortFrame(0x9, nil, false), frameOf(0x2, bytes.Repeat([]byte("d"), 40000), false)),
			[]byte{0xc0, 0x41, 0x02, 0x83}, []byte{0xff, 0x01}},
		// A message in fragments, a ping and a pong between them, every
		// byte a write of its own, with pauses.
		{cat(frag(false, 0x1, []byte("he"), true), shortFrame(0xa, nil, true), frag(true, 0x0, []byte("llo"), true)),
			cat(shortFrame(0x9, []byte("p"), false), text("z", false)),
			[]byte{0xc0}, []byte{0xc0, 0x40}},
		// A frame cut short at the end: its header and the bytes that came
		// reach the other end; a header cut short does not.
		{cat(text("x", true), medium(true)[:100]), cat(text("y", false), []byte{0x82, 126, 0}), []byte{0xc0 | 7}, nil},
		// Zero-length frames, pauses after each.
		{cat(shortFrame(0x1, nil, true), shortFrame(0x2, nil, true)), cat(shortFrame(0x1, nil, false), shortFrame(0x9, nil, false)), []byte{0x80}, []byte{0x80}},
		// A frame that declares more than 2^62 bytes: the tunnel stops.
		{cat(text("x", true), []byte{0x82, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4}, text("lost", true)), text("y", false), []byte{0xc5}, nil},
		{nil, cat(text("only Cells speaks", false), closeFrame(1001, "going away", false)), nil, []byte{0x81}},
	} {
		for _, withTLS := range []bool{false, true} {
			f.Add(withTLS, s.up, s.down, s.upCuts, s.downCuts)
		}
	}
	sides := startScriptedSides(f, wsScriptedCells)
	f.Fuzz(func(t *testing.T, withTLS bool, up, down, upCuts, downCuts []byte) {
		sd := sides.pick(withTLS)
		quit := make(chan struct{})
		defer close(quit)
		conn := sd.tp.dialTLS(t, sd.tp.Addr().String(), "http/1.1")
		conn.SetDeadline(time.Now().Add(time.Minute)) // a guard: the test fails on its own bound first
		br := bufio.NewReader(conn)
		s := &wsScript{data: down, cuts: downCuts, quit: quit, clientEnd: make(chan *collected, 1), ready: make(chan *collected, 1), written: make(chan error, 1)}
		sd.scripts <- s
		fmt.Fprintf(conn, "GET /ws/event HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
			"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n", sd.tp.Addr())
		res, err := http.ReadResponse(br, nil)
		if err != nil || res.StatusCode != http.StatusSwitchingProtocols {
			t.Fatalf("handshake: %v, %v; want 101", res, err)
		}
		clientEnd := collect(br)
		s.clientEnd <- clientEnd
		var cellsEnd *collected
		select {
		case cellsEnd = <-s.ready:
		case <-time.After(10 * time.Second):
			t.Fatal("Cells did not get the handshake")
		}
		if cellsEnd == nil {
			t.Fatal("Cells could not answer the handshake")
		}
		upWritten := make(chan error, 1)
		cellsReads := make(chan *collected, 1)
		cellsReads <- cellsEnd
		go func() { upWritten <- writePieces(up, upCuts, writeTo(conn), wsArrives(up), cellsReads, quit) }()

		upWant, upStop := wsDeliverable(up)
		downWant, downStop := wsDeliverable(down)
		stop := upStop || downStop
		for _, w := range []struct {
			who string
			c   chan error
		}{{"the client's", upWritten}, {"Cells'", s.written}} {
			select {
			case err := <-w.c:
				if err != nil && !stop {
					t.Errorf("%s writes: %v", w.who, err)
				}
			case <-time.After(30 * time.Second):
				t.Fatalf("%s writes: not done after 30 s", w.who)
			}
		}
		if !stop {
			// Everything arrives while the websocket stays open.
			if !cellsEnd.wait(upWant, quit) || !clientEnd.wait(downWant, quit) {
				t.Fatalf("Cells has read %d of the %d bytes the tunnel passes on, the client %d of %d",
					cellsEnd.count(), upWant, clientEnd.count(), downWant)
			}
			conn.Close()
		}
		for _, e := range []struct {
			who string
			e   *collected
		}{{"Cells'", cellsEnd}, {"the client's", clientEnd}} {
			select {
			case <-e.e.done:
			case <-time.After(10 * time.Second):
				t.Fatalf("%s connection still open 10 s after the tunnel's end", e.who)
			}
		}
		check := func(who string, got, sent []byte, want int) {
			if !bytes.Equal(got, sent[:want]) && !(stop && bytes.HasPrefix(sent[:want], got)) {
				i := 0
				for i < len(got) && i < want && got[i] == sent[i] {
					i++
				}
				t.Errorf("%s got %d bytes, want the %d the tunnel passes on of the %d sent (stop %v); first difference at %d",
					who, len(got), want, len(sent), stop, i)
			}
		}
		check("Cells", cellsEnd.bytes(), up, upWant)
		check("the client", clientEnd.bytes(), down, downWant)
	})
}
