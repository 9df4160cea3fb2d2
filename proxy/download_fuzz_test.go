package proxy

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"testing"
	"time"
)

// A response body from Cells goes through the proxy's own code on the
// direct path: relay gathers what Cells has sent into writes of up to
// 63 KiB, and sends what it holds as soon as its next read from Cells would
// wait (download.go); to an HTTP/2 client, the write-behind holds the
// frames (h2write.go). FuzzDownload sends bodies of any size in pieces of
// any size with pauses, and checks both promises: every byte arrives, and
// none waits for the next (a zip Cells builds on the fly, server-sent
// events).

// downloadModes are the ways Cells frames a body.
var downloadModes = []string{"sized", "chunked", "close"}

// downloadScript is one response for downloadCells to send.
type downloadScript struct {
	mode    string
	body    []byte
	cuts    []byte
	client  chan *collected // what the client has read, once it has the header
	quit    chan struct{}
	written chan error
	cancel  func() // the client's request, when Cells' writes fail
}

// downloadCells is a Cells that answers each request with the next script:
// the header, then the body in the script's pieces, each a write of its
// own (a chunk of its own when chunked). After a piece that asks for a
// pause, it waits until the client has read every body byte sent so far:
// over 10 s is an error, a byte the proxy held back.
func downloadCells(t testing.TB, withTLS bool, scripts <-chan *downloadScript) *connUpstream {
	return scriptedConnCells(t, withTLS, scripts, func(c net.Conn, _ *bufio.Reader, _ *http.Request, s *downloadScript) bool {
		err := s.write(c)
		s.written <- err
		if err != nil {
			s.cancel() // the client may be waiting for the header
		}
		return s.mode != "close"
	})
}

func (s *downloadScript) write(w io.Writer) error {
	head := "HTTP/1.1 200 OK\r\nContent-Type: application/zip\r\n"
	switch s.mode {
	case "sized":
		head += fmt.Sprintf("Content-Length: %d\r\n", len(s.body))
	case "chunked":
		head += "Transfer-Encoding: chunked\r\n"
	case "close":
		head += "Connection: close\r\n"
	}
	if _, err := io.WriteString(w, head+"\r\n"); err != nil {
		return err
	}
	write := writeTo(w)
	if s.mode == "chunked" {
		write = func(p []byte) error {
			_, err := fmt.Fprintf(w, "%x\r\n%s\r\n", len(p), p)
			return err
		}
	}
	if err := writePieces(s.body, s.cuts, write, allArrive, s.client, s.quit); err != nil {
		return err
	}
	if s.mode == "chunked" {
		if _, err := io.WriteString(w, "0\r\n\r\n"); err != nil {
			return err
		}
	}
	return nil
}

// FuzzDownload: a body of any size, that Cells sends in pieces of any size
// with pauses, with a length, chunked or until it closes, through a
// cleartext or a TLS Cells, to an HTTP/1.1 or HTTP/2 client: the client
// reads every byte, in order, and at each pause it has read every byte
// Cells sent before it.
func FuzzDownload(f *testing.F) {
	for _, s := range []struct {
		size uint32
		cuts []byte
	}{
		{0, nil},
		{1, []byte{0x80}},
		{3, []byte{0xc0}},                       // a byte a write, a pause after each
		{64 << 10, []byte{0x0f, 0x0f, 0x8f}},    // 16 KiB pieces
		{63<<10 + 1, []byte{0x3e, 0x80 | 0x40}}, // 63 KiB and a byte
		{200001, []byte{0x41, 0x80 | 0x07, 0x7f, 0x1f}},
		{300 << 10, []byte{0x80 | 0x3f}},
	} {
		for mode := range downloadModes {
			for _, h2 := range []bool{false, true} {
				for _, withTLS := range []bool{false, true} {
					f.Add(withTLS, h2, uint8(mode), s.size, s.cuts)
				}
			}
		}
	}
	sides := startScriptedSides(f, downloadCells)
	f.Fuzz(func(t *testing.T, withTLS, h2 bool, modeN uint8, size uint32, cuts []byte) {
		sd := sides.pick(withTLS)
		s := &downloadScript{
			mode: downloadModes[int(modeN)%len(downloadModes)],
			body: patternBody(int(size % (512 << 10))),
			cuts: cuts, client: make(chan *collected, 1), quit: make(chan struct{}), written: make(chan error, 1),
		}
		defer close(s.quit)
		ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
		defer cancel()
		s.cancel = cancel
		sd.scripts <- s
		req, err := http.NewRequestWithContext(ctx, "GET", sd.tp.URL+"/zip", nil)
		if err != nil {
			t.Fatal(err)
		}
		c := sd.tp.H1
		if h2 {
			c = sd.tp.H2
		}
		what := fmt.Sprintf("HTTP/2 %v, %s, %d bytes in pieces %x", h2, s.mode, len(s.body), cuts)
		res, err := c.Do(req)
		if err != nil {
			select {
			case werr := <-s.written:
				if werr != nil {
					t.Fatalf("%s: Cells: %v", what, werr)
				}
			default:
			}
			t.Fatalf("%s: %v", what, err)
		}
		defer res.Body.Close()
		client := collect(res.Body)
		s.client <- client
		select {
		case err := <-s.written:
			if err != nil {
				t.Fatalf("%s: Cells: %v", what, err)
			}
		case <-time.After(30 * time.Second):
			t.Fatalf("%s: Cells' writes not done after 30 s", what)
		}
		select {
		case <-client.done:
		case <-time.After(10 * time.Second):
			t.Fatalf("%s: the body has not ended 10 s after Cells sent it all; the client has read %d bytes", what, client.count())
		}
		if got := client.bytes(); client.err != io.EOF || !bytes.Equal(got, s.body) {
			t.Fatalf("%s: the client read %d bytes (the body's first %d: %v), then %v; want the whole body and its end",
				what, len(got), len(got), bytes.HasPrefix(s.body, got), client.err)
		}
	})
}
