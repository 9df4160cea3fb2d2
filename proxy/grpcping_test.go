package proxy

import (
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"net/url"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// quietUpstream is an h2c gRPC upstream that answers a call's HEADERS with
// a response header and then says nothing more on it, recording the PINGs
// it receives; it answers them when answer is set. After finishAfter
// PINGs (0: never) it ends every open call with a message and grpc-status 0.
type quietUpstream struct {
	ln          net.Listener
	answer      bool
	finishAfter int

	mu     sync.Mutex
	pings  int
	conns  []net.Conn
	wg     sync.WaitGroup
	pinged chan struct{} // receives after each PING
}

func newQuietUpstream(t *testing.T, answer bool, finishAfter int) *quietUpstream {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	u := &quietUpstream{ln: ln, answer: answer, finishAfter: finishAfter, pinged: make(chan struct{}, 100)}
	u.wg.Add(1)
	go func() {
		defer u.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			u.mu.Lock()
			u.conns = append(u.conns, c)
			u.mu.Unlock()
			u.wg.Add(1)
			go func() {
				defer u.wg.Done()
				u.serve(c)
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		u.mu.Lock()
		for _, c := range u.conns {
			c.Close()
		}
		u.mu.Unlock()
		u.wg.Wait()
	})
	return u
}

func (u *quietUpstream) pingCount() int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.pings
}

func (u *quietUpstream) serve(c net.Conn) {
	defer c.Close()
	preface := make([]byte, len(clientPreface))
	if _, err := io.ReadFull(c, preface); err != nil {
		return
	}
	fr := http2.NewFramer(c, c)
	fr.WriteSettings()
	var hbuf bytes.Buffer
	enc := hpack.NewEncoder(&hbuf)
	block := func(kv ...string) []byte {
		hbuf.Reset()
		for i := 0; i+1 < len(kv); i += 2 {
			enc.WriteField(hpack.HeaderField{Name: kv[i], Value: kv[i+1]})
		}
		return bytes.Clone(hbuf.Bytes())
	}
	var open []uint32
	for {
		f, err := fr.ReadFrame()
		if err != nil {
			return
		}
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if !f.IsAck() {
				fr.WriteSettingsAck()
			}
		case *http2.HeadersFrame:
			open = append(open, f.StreamID)
			fr.WriteHeaders(http2.HeadersFrameParam{
				StreamID:      f.StreamID,
				BlockFragment: block(":status", "200", "content-type", "application/grpc"),
				EndHeaders:    true,
			})
		case *http2.PingFrame:
			if f.IsAck() {
				continue
			}
			u.mu.Lock()
			u.pings++
			n := u.pings
			u.mu.Unlock()
			if u.answer {
				fr.WritePing(true, f.Data)
			}
			if n == u.finishAfter {
				for _, id := range open {
					fr.WriteData(id, false, []byte{0, 0, 0, 0, 2, 'o', 'k'})
					fr.WriteHeaders(http2.HeadersFrameParam{
						StreamID:      id,
						BlockFragment: block("grpc-status", "0"),
						EndHeaders:    true,
						EndStream:     true,
					})
				}
				open = nil
			}
			u.pinged <- struct{}{}
		}
	}
}

// quietCall starts a gRPC-like call through tp whose request body stays
// open, and returns its response once the header arrived.
func quietCall(t *testing.T, tp *testProxy) *http.Response {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	pr, pw := io.Pipe()
	t.Cleanup(func() { pw.Close() })
	req, _ := http.NewRequestWithContext(ctx, "POST", tp.URL+"/quiet.Svc/Watch", pr)
	req.Header.Set("Content-Type", "application/grpc")
	req.Header.Set("Te", "trailers")
	res, err := tp.H2.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { res.Body.Close() })
	if res.StatusCode != 200 {
		t.Fatalf("status %d, want 200", res.StatusCode)
	}
	return res
}

// startQuietProxy is a proxy whose gRPC upstream is u, PINGing it after
// every quiet period of every and giving up after timeout.
func startQuietProxy(t *testing.T, u *quietUpstream, every, timeout time.Duration) *testProxy {
	t.Helper()
	cfg := testConfig(newUpstream(t, upPlain, http.NotFoundHandler()))
	cfg.GRPCUpstream = &url.URL{Scheme: "h2c", Host: u.ln.Addr().String()}
	tp := startProxy(t, cfg)
	tp.fwd.grpcUp.pingEvery, tp.fwd.grpcUp.pingTimeout = every, timeout
	return tp
}

// TestGRPCUpstreamPingLost: a call whose upstream connection goes silent,
// PINGs included, ends with UNAVAILABLE instead of waiting for ever.
func TestGRPCUpstreamPingLost(t *testing.T) {
	u := newQuietUpstream(t, false, 0)
	tp := startQuietProxy(t, u, 100*time.Millisecond, 200*time.Millisecond)
	res := quietCall(t, tp)
	body, err := io.ReadAll(res.Body)
	if err != nil {
		t.Fatalf("reading the body: %v", err)
	}
	if len(body) != 0 {
		t.Errorf("body %q, want none", body)
	}
	if got := res.Trailer.Get("Grpc-Status"); got != "14" {
		t.Errorf("grpc-status %q, want 14 (UNAVAILABLE); message %q", got, res.Trailer.Get("Grpc-Message"))
	}
	if u.pingCount() == 0 {
		t.Error("the upstream received no PING")
	}
}

// TestGRPCUpstreamPingAnswered: PINGs that are answered keep a quiet call
// open; it then ends normally.
func TestGRPCUpstreamPingAnswered(t *testing.T) {
	const pings = 3
	u := newQuietUpstream(t, true, pings)
	tp := startQuietProxy(t, u, 50*time.Millisecond, 5*time.Second)
	res := quietCall(t, tp)
	body, err := io.ReadAll(res.Body)
	if err != nil {
		t.Fatalf("reading the body: %v", err)
	}
	if want := []byte{0, 0, 0, 0, 2, 'o', 'k'}; !bytes.Equal(body, want) {
		t.Errorf("body %q, want %q", body, want)
	}
	if got := res.Trailer.Get("Grpc-Status"); got != "0" {
		t.Errorf("grpc-status %q, want 0; message %q", got, res.Trailer.Get("Grpc-Message"))
	}
	if got := u.pingCount(); got < pings {
		t.Errorf("upstream received %d PINGs, want at least %d", got, pings)
	}
}

// TestGRPCUpstreamNoPingWhenIdle: a connection without calls is not
// PINGed: grpc-go servers count such PINGs against the client and close
// the connection after three within two hours.
func TestGRPCUpstreamNoPingWhenIdle(t *testing.T) {
	u := newQuietUpstream(t, true, 1)
	tp := startQuietProxy(t, u, 20*time.Millisecond, 5*time.Second)
	res := quietCall(t, tp)
	// The call's PING ends it (finishAfter 1).
	if _, err := io.ReadAll(res.Body); err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	// Not a timed assertion: a wait of 25 PING periods for PINGs that
	// must not come.
	time.Sleep(500 * time.Millisecond)
	if got := u.pingCount(); got != 1 {
		t.Errorf("upstream received %d PINGs, want 1 (none after the call ended)", got)
	}
}
