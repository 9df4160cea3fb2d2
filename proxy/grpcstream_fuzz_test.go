package proxy

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"testing"
	"time"

	"golang.org/x/net/http2"
)

// A gRPC stream's bytes go through the proxy's own HTTP/2 client to Cells
// (grpcupstream.go): its flow control both ways (the window it grants
// Cells as the client reads, the windows Cells grants it), its DATA frames
// and the relay back to the client. FuzzGRPCStream sends a stream's bytes
// in pieces of any size with pauses, through Cells' that grant small or
// large windows and echo each DATA frame as it comes.

// grpcStreamPeers are the windows the fuzzed Cells grant: a stream window
// of 1 KiB (it binds), the RFC's 65,535, and a 1 MiB stream window with
// the connection's 65,535 (the connection's binds).
var grpcStreamPeers = []h2PeerConfig{
	{Settings: []http2.Setting{{ID: http2.SettingInitialWindowSize, Val: 1 << 10}}},
	{},
	{Settings: []http2.Setting{{ID: http2.SettingInitialWindowSize, Val: 1 << 20}}},
}

// streamEcho answers a call with its body as it comes, DATA for DATA, then
// grpc-status 0 once the client has ended its side.
func streamEcho(s *h2Stream) {
	if s.writeHeaders(false, 1, ":status", "200", "content-type", "application/grpc") != nil {
		return
	}
	for {
		b, err := s.read()
		if err == io.EOF {
			break
		}
		if err != nil || s.writeData(b, false) != nil {
			return
		}
	}
	s.writeHeaders(true, 1, "grpc-status", "0")
}

// FuzzGRPCStream: a bidirectional stream's bytes, of any length, sent in
// pieces of any size with pauses, through Cells' with small or large
// windows that echo them: the client reads back every byte in order, at
// each pause it has read back all it sent before it (no byte waits for
// the next, no window is lost), the stream ends with grpc-status 0, and
// the proxy never sends Cells a byte beyond a window granted.
func FuzzGRPCStream(f *testing.F) {
	for _, s := range []struct {
		size uint32
		cuts []byte
	}{
		{0, nil},
		{5, []byte{0x80 | 0x40}},
		{64 << 10, []byte{0x80 | 0x0f}},
		{65535 + 1, []byte{0x3f, 0x80 | 0x40}},
		{200001, []byte{0x41, 0x80 | 0x07, 0x7f, 0x1f}},
		{256 << 10, []byte{0x3f}},
	} {
		for peer := range grpcStreamPeers {
			f.Add(uint8(peer), s.size, s.cuts)
		}
	}
	peers := make([]*h2Peer, len(grpcStreamPeers))
	proxies := make([]*testProxy, len(grpcStreamPeers))
	for i, cfg := range grpcStreamPeers {
		peers[i] = newH2Peer(f, cfg, streamEcho)
		proxies[i] = startPeerProxy(f, peers[i])
	}
	f.Fuzz(func(t *testing.T, peerN uint8, size uint32, cuts []byte) {
		i := int(peerN) % len(peers)
		tp := proxies[i]
		body := patternBody(int(size % (256 << 10)))
		what := fmt.Sprintf("peer %d, %d bytes in pieces %x", i, len(body), cuts)
		ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
		defer cancel()
		pr, pw := io.Pipe()
		defer pw.Close()
		req, err := http.NewRequestWithContext(ctx, "POST", tp.URL+"/pkg.Svc/Echo", pr)
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Content-Type", "application/grpc")
		req.Header.Set("Te", "trailers")
		quit := make(chan struct{})
		defer close(quit)
		written := make(chan error, 1)
		client := make(chan *collected, 1)
		go func() {
			err := writePieces(body, cuts, writeTo(pw), allArrive, client, quit)
			if err == nil {
				err = pw.Close()
			}
			written <- err
		}()
		res, err := tp.H2.Do(req)
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		defer res.Body.Close()
		back := collect(res.Body)
		client <- back
		select {
		case err := <-written:
			if err != nil {
				t.Fatalf("%s: %v", what, err)
			}
		case <-time.After(30 * time.Second):
			t.Fatalf("%s: the client's writes not done after 30 s; %d bytes have come back", what, back.count())
		}
		select {
		case <-back.done:
		case <-time.After(10 * time.Second):
			t.Fatalf("%s: the answer has not ended 10 s after the client's end; %d bytes have come back", what, back.count())
		}
		if got := back.bytes(); back.err != io.EOF || !bytes.Equal(got, body) {
			t.Fatalf("%s: %d bytes came back (the body's first %d: %v), then %v; want the whole body and its end",
				what, len(got), len(got), bytes.HasPrefix(body, got), back.err)
		}
		if got := res.Trailer.Get("Grpc-Status"); got != "0" {
			t.Fatalf("%s: grpc-status %q, want 0", what, got)
		}
		for _, v := range peers[i].Violations() {
			t.Fatalf("%s: Cells saw: %s", what, v)
		}
	})
}
