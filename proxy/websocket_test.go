package proxy

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha1"
	"crypto/tls"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// maxTestMessage is the read limit on both ends of test websockets: the
// largest message a test sends is 10 MiB.
const maxTestMessage = 11 << 20

// wsUpstream is a websocket server standing in for Cells' /ws/event and
// /ws/chat. It records each upgrade request, refuses /ws/refused with 401
// and a body, as Cells does without a valid token, negotiates chat.v2 or
// chat.v1, and hands the socket to serve (wsEcho when nil). What ended
// each socket goes to ended; the payloads of pings it got go to pings.
type wsUpstream struct {
	serve func(ctx context.Context, c *websocket.Conn) error

	ended chan error
	pings chan []byte

	mu   sync.Mutex
	reqs []seen
}

func newWSUpstream(serve func(ctx context.Context, c *websocket.Conn) error) *wsUpstream {
	return &wsUpstream{serve: serve, ended: make(chan error, 16), pings: make(chan []byte, 16)}
}

// refusedBody is what the upstream answers to an upgrade it refuses.
const refusedBody = `{"code":"Unauthorized","message":"no token"}`

func (u *wsUpstream) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	u.mu.Lock()
	u.reqs = append(u.reqs, seen{Method: r.Method, Host: r.Host, RequestURI: r.RequestURI, Proto: r.Proto, Header: r.Header.Clone()})
	u.mu.Unlock()
	if r.URL.Path == "/ws/refused" {
		w.Header().Set("WWW-Authenticate", `Bearer realm="cells"`)
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusUnauthorized)
		io.WriteString(w, refusedBody)
		return
	}
	if r.Header.Get("Upgrade") == "" {
		io.WriteString(w, "ok") // the readiness probe
		return
	}
	c, err := websocket.Accept(w, r, &websocket.AcceptOptions{
		Subprotocols: []string{"chat.v2", "chat.v1"},
		OnPingReceived: func(_ context.Context, p []byte) bool {
			u.pings <- bytes.Clone(p)
			return true
		},
	})
	if err != nil {
		u.ended <- fmt.Errorf("accept: %w", err)
		return
	}
	defer c.CloseNow()
	c.SetReadLimit(maxTestMessage)
	serve := u.serve
	if serve == nil {
		serve = wsEcho
	}
	u.ended <- serve(r.Context(), c)
}

// last is the last upgrade request the upstream saw.
func (u *wsUpstream) last(t *testing.T) seen {
	t.Helper()
	u.mu.Lock()
	defer u.mu.Unlock()
	if len(u.reqs) == 0 {
		t.Fatal("upstream saw no upgrade request")
	}
	return u.reqs[len(u.reqs)-1]
}

// end waits for the upstream side of a socket to end and returns why.
func (u *wsUpstream) end(t *testing.T) error {
	t.Helper()
	select {
	case err := <-u.ended:
		return err
	case <-time.After(30 * time.Second):
		t.Fatal("upstream websocket did not end")
		return nil
	}
}

// wsEcho echoes every message with its type. Two text messages are
// commands: "close-me" makes it close with 4001 "server bye", and
// "ping-me" makes it ping the client and answer "pong-ok" once the pong is
// back (Cells pings its browsers every 54 s).
func wsEcho(ctx context.Context, c *websocket.Conn) error {
	var pinging sync.WaitGroup
	defer pinging.Wait()
	for {
		typ, b, err := c.Read(ctx)
		if err != nil {
			return err
		}
		switch {
		case typ == websocket.MessageText && string(b) == "close-me":
			return c.Close(4001, "server bye")
		case typ == websocket.MessageText && string(b) == "ping-me":
			// Ping waits for the pong, which only this loop's Read
			// receives: ping from another goroutine.
			pinging.Go(func() {
				msg := "pong-ok"
				if err := c.Ping(ctx); err != nil {
					msg = "ping failed: " + err.Error()
				}
				c.Write(ctx, websocket.MessageText, []byte(msg))
			})
			continue
		}
		if err := c.Write(ctx, typ, b); err != nil {
			return err
		}
	}
}

// wsURL is the wss:// (or ws://) URL of path on the proxy.
func wsURL(tp *testProxy, path string) string {
	return "ws" + strings.TrimPrefix(tp.URL, "http") + path
}

// dialWS opens a websocket through the proxy with its HTTP/1.1 client.
func dialWS(t *testing.T, tp *testProxy, path string, opts *websocket.DialOptions) (*websocket.Conn, *http.Response) {
	t.Helper()
	if opts == nil {
		opts = &websocket.DialOptions{}
	}
	opts.HTTPClient = tp.H1
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, res, err := websocket.Dial(ctx, wsURL(tp, path), opts)
	if err != nil {
		t.Fatalf("websocket dial %s: %v", path, err)
	}
	c.SetReadLimit(maxTestMessage)
	t.Cleanup(func() { c.CloseNow() })
	return c, res
}

// closeErr is the close code and reason in err, or -1 and the error text.
func closeErr(err error) (websocket.StatusCode, string) {
	var ce websocket.CloseError
	if errors.As(err, &ce) {
		return ce.Code, ce.Reason
	}
	return -1, fmt.Sprint(err)
}

// wantGoingAway checks that err, from the end of a socket (what), is a
// close with 1001: the proxy shut the socket down.
func wantGoingAway(t *testing.T, err error, what string) {
	t.Helper()
	if code, reason := closeErr(err); code != websocket.StatusGoingAway {
		t.Errorf("%s: close %d %q, want 1001", what, code, reason)
	}
}

func randomMessage(typ websocket.MessageType, n int) []byte {
	b := make([]byte, n)
	rand.NewChaCha8([32]byte{byte(n), byte(typ)}).Read(b)
	if typ == websocket.MessageText {
		const letters = "abcdefghijklmnopqrstuvwxyz0123456789 -"
		for i, c := range b {
			b[i] = letters[int(c)%len(letters)]
		}
	}
	return b
}

// TestWebSocket opens websockets through the proxy on Cells' paths and on
// any other path, to a TLS and to a plain-HTTP upstream, and checks the
// upgrade request Cells sees, echo across the frame-length boundaries of
// RFC 6455 (125, 126, 65535, 65536 bytes) and a 10 MiB message, pings
// both ways, and close handshakes started by either side.
func TestWebSocket(t *testing.T) {
	for _, kind := range []struct {
		name string
		kind upstreamKind
	}{{"tls-upstream", upTLS}, {"plain-upstream", upPlain}} {
		t.Run(kind.name, func(t *testing.T) {
			t.Parallel()
			wsUp := newWSUpstream(nil)
			up := newUpstream(t, kind.kind, wsUp)
			tp := startProxy(t, testConfig(up))
			proxyHost := tp.Addr().String()

			for _, path := range []string{"/ws/event", "/ws/chat", "/other?x=1"} {
				t.Run(strings.TrimPrefix(path, "/"), func(t *testing.T) {
					ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
					defer cancel()
					clientPings := make(chan []byte, 4)
					c, res := dialWS(t, tp, path, &websocket.DialOptions{
						Subprotocols: []string{"chat.v2"},
						HTTPHeader: http.Header{
							// A browser's Origin: Cells checks it against
							// Host, which the proxy keeps.
							"Origin": {"https://" + proxyHost},
							// Spoofed: must not reach Cells.
							"X-Forwarded-For": {"203.0.113.9"},
							"X-Real-Ip":       {"203.0.113.9"},
						},
						OnPingReceived: func(_ context.Context, p []byte) bool {
							clientPings <- bytes.Clone(p)
							return true
						},
					})
					if got, want := res.StatusCode, http.StatusSwitchingProtocols; got != want {
						t.Errorf("handshake status = %d, want %d", got, want)
					}
					if got, want := c.Subprotocol(), "chat.v2"; got != want {
						t.Errorf("negotiated subprotocol = %q, want %q", got, want)
					}

					r := wsUp.last(t)
					for _, h := range []struct{ name, got, want string }{
						{"request target", r.RequestURI, path},
						{"Host", r.Host, proxyHost},
						{"X-Forwarded-For", strings.Join(r.Header.Values("X-Forwarded-For"), ", "), "127.0.0.1"},
						{"X-Real-Ip", r.Header.Get("X-Real-Ip"), "127.0.0.1"},
						{"X-Forwarded-Proto", r.Header.Get("X-Forwarded-Proto"), "https"},
						{"X-Forwarded-Host", r.Header.Get("X-Forwarded-Host"), proxyHost},
						{"Sec-WebSocket-Protocol", r.Header.Get("Sec-WebSocket-Protocol"), "chat.v2"},
						{"Origin", r.Header.Get("Origin"), "https://" + proxyHost},
						{"Upgrade", r.Header.Get("Upgrade"), "websocket"},
					} {
						if h.got != h.want {
							t.Errorf("upstream upgrade request %s = %q, want %q", h.name, h.got, h.want)
						}
					}

					sizes := []int{0, 1, 125, 126, 127, 65535, 65536, 65537}
					if path == "/ws/event" {
						sizes = append(sizes, 10<<20)
					}
					for _, typ := range []websocket.MessageType{websocket.MessageText, websocket.MessageBinary} {
						for _, n := range sizes {
							msg := randomMessage(typ, n)
							if err := c.Write(ctx, typ, msg); err != nil {
								t.Fatalf("write %v message of %d bytes: %v", typ, n, err)
							}
							gotTyp, got, err := c.Read(ctx)
							if err != nil {
								t.Fatalf("read echo of %v message of %d bytes: %v", typ, n, err)
							}
							if gotTyp != typ || !bytes.Equal(got, msg) {
								t.Errorf("echo of %v message of %d bytes: got %v message of %d bytes (equal: %v)",
									typ, n, gotTyp, len(got), bytes.Equal(got, msg))
							}
						}
					}

					// Ping from the client: a reader must run for the pong
					// to be seen. It reads the next message, "last".
					read := make(chan string, 1)
					go func() {
						_, b, err := c.Read(ctx)
						if err != nil {
							read <- err.Error()
							return
						}
						read <- string(b)
					}()
					if err := c.Ping(ctx); err != nil {
						t.Errorf("client ping through the proxy: %v", err)
					}
					select {
					case <-wsUp.pings:
					case <-ctx.Done():
						t.Errorf("upstream saw no ping from the client")
					}
					if err := c.Write(ctx, websocket.MessageText, []byte("last")); err != nil {
						t.Fatal(err)
					}
					if got, want := <-read, "last"; got != want {
						t.Fatalf("read after ping = %q, want %q", got, want)
					}

					// Ping from the upstream, as Cells does every 54 s.
					if err := c.Write(ctx, websocket.MessageText, []byte("ping-me")); err != nil {
						t.Fatal(err)
					}
					if _, b, err := c.Read(ctx); err != nil || string(b) != "pong-ok" {
						t.Errorf("upstream ping through the proxy: got %q, %v; want \"pong-ok\"", b, err)
					}
					select {
					case <-clientPings:
					default:
						t.Errorf("client saw no ping from the upstream")
					}

					// Close started by the client, with a code and reason.
					if err := c.Close(4000, "client bye"); err != nil {
						t.Errorf("client close handshake: %v", err)
					}
					code, reason := closeErr(wsUp.end(t))
					if code != 4000 || reason != "client bye" {
						t.Errorf("upstream saw close %d %q, want 4000 \"client bye\"", code, reason)
					}

					// Close started by the upstream.
					c2, _ := dialWS(t, tp, path, nil)
					if err := c2.Write(ctx, websocket.MessageText, []byte("close-me")); err != nil {
						t.Fatal(err)
					}
					_, _, err := c2.Read(ctx)
					code, reason = closeErr(err)
					if code != 4001 || reason != "server bye" {
						t.Errorf("client saw close %d %q, want 4001 \"server bye\"", code, reason)
					}
					if err := wsUp.end(t); err != nil {
						t.Errorf("upstream close handshake: %v", err)
					}
				})
			}

			t.Run("refused", func(t *testing.T) {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				c, res, err := websocket.Dial(ctx, wsURL(tp, "/ws/refused"), &websocket.DialOptions{HTTPClient: tp.H1})
				if err == nil {
					c.CloseNow()
					t.Fatal("dial of a refused upgrade succeeded")
				}
				if res == nil {
					t.Fatalf("dial of a refused upgrade: no response: %v", err)
				}
				body, _ := io.ReadAll(res.Body)
				if got, want := res.StatusCode, http.StatusUnauthorized; got != want {
					t.Errorf("refused upgrade: status = %d, want %d", got, want)
				}
				if got, want := string(body), refusedBody; got != want {
					t.Errorf("refused upgrade: body = %q, want %q", got, want)
				}
				if got, want := res.Header.Get("WWW-Authenticate"), `Bearer realm="cells"`; got != want {
					t.Errorf("refused upgrade: WWW-Authenticate = %q, want %q", got, want)
				}
			})
		})
	}
}

// wsIdle is PROXY_WS_IDLE_TIMEOUT in the idle tests. Traffic every wsIdle/3
// leaves a delayed write 2/3 of it in slack on a busy machine.
const wsIdle = 1500 * time.Millisecond

// TestWebSocketIdle proves the idle logic with a short
// PROXY_WS_IDLE_TIMEOUT: traffic in either direction alone keeps a socket
// open for several idle periods, and a silent one is closed with 1001 at
// both ends once the timeout passes.
func TestWebSocketIdle(t *testing.T) {
	// A message every sixth of the timeout: the socket stays open unless
	// the test itself stalls for over 1.2 s, which a loaded machine running
	// the suite with -race has been seen to do at a third. A try that
	// fails after the test process stood still that long is made again
	// (retryStalled).
	const periods, perPeriod = 4, 6
	ticks := periods * perPeriod
	// idleSocket opens a socket to wsUp through a proxy whose
	// PROXY_WS_IDLE_TIMEOUT is wsIdle.
	idleSocket := func(t *testing.T, wsUp *wsUpstream) *websocket.Conn {
		t.Helper()
		up := newUpstream(t, upTLS, wsUp)
		cfg := testConfig(up)
		cfg.WSIdleTimeout = wsIdle
		c, _ := dialWS(t, startProxy(t, cfg), "/ws/event", nil)
		return c
	}

	t.Run("client-to-server-traffic", func(t *testing.T) {
		t.Parallel()
		retryStalled(t, wsIdle-wsIdle/perPeriod, func() error {
			return clientToServer(t, idleSocket, ticks, wsIdle/perPeriod)
		})
	})

	t.Run("server-to-client-traffic", func(t *testing.T) {
		t.Parallel()
		retryStalled(t, wsIdle-wsIdle/perPeriod, func() error {
			return serverToClient(t, idleSocket, ticks, wsIdle/perPeriod)
		})
	})

	t.Run("silent", func(t *testing.T) {
		t.Parallel()
		// The same silent socket through two proxies: one with the short
		// timeout, one with the default 24h. The first is closed with
		// 1001 at both ends; the second is still open after twice as long
		// and still echoes. (With the default, a socket silent for Cells'
		// 60 s ping period survives; this shows it without waiting 60 s.)
		wsUp := newWSUpstream(nil)
		up := newUpstream(t, upTLS, wsUp)
		short := testConfig(up)
		short.WSIdleTimeout = wsIdle
		long := testConfig(up)
		def := variableDefault(t, "PROXY_WS_IDLE_TIMEOUT")
		d, err := time.ParseDuration(def)
		if err != nil || d != 24*time.Hour {
			t.Fatalf("default PROXY_WS_IDLE_TIMEOUT = %q, want 24h", def)
		}
		long.WSIdleTimeout = d
		tpShort, tpLong := startProxy(t, short), startProxy(t, long)

		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		start := time.Now()
		cShort, _ := dialWS(t, tpShort, "/ws/event", nil)
		cLong, _ := dialWS(t, tpLong, "/ws/event", nil)

		_, _, err = cShort.Read(ctx)
		quiet := time.Since(start)
		wantGoingAway(t, err, "client of a silent socket")
		if quiet < wsIdle {
			t.Errorf("silent socket closed after %v, before PROXY_WS_IDLE_TIMEOUT=%v", quiet, wsIdle)
		}
		wantGoingAway(t, wsUp.end(t), "upstream of a silent socket")

		time.Sleep(2*wsIdle - time.Since(start))
		if err := cLong.Write(ctx, websocket.MessageText, []byte("still here")); err != nil {
			t.Fatalf("write on a socket silent for %v with the default timeout: %v", time.Since(start), err)
		}
		if _, b, err := cLong.Read(ctx); err != nil || string(b) != "still here" {
			t.Errorf("echo on a socket silent for %v with the default timeout: %q, %v", time.Since(start), b, err)
		}
		if err := cLong.Close(websocket.StatusNormalClosure, ""); err != nil {
			t.Errorf("close: %v", err)
		}
		wsUp.end(t)
	})
}

// clientToServer is one try of TestWebSocketIdle/client-to-server-traffic:
// the client sends a message every period, ticks times, on a socket that
// open gives it to an upstream that only reads; then it closes the socket.
func clientToServer(t *testing.T, open func(*testing.T, *wsUpstream) *websocket.Conn, ticks int, every time.Duration) error {
	got := make(chan int, 1)
	wsUp := newWSUpstream(func(ctx context.Context, c *websocket.Conn) error {
		n := 0
		for {
			_, _, err := c.Read(ctx)
			if err != nil {
				got <- n
				return err
			}
			n++
		}
	})
	c := open(t, wsUp)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	tick := time.NewTicker(every)
	defer tick.Stop()
	for i := range ticks {
		<-tick.C
		if err := c.Write(ctx, websocket.MessageText, []byte("tick")); err != nil {
			return fmt.Errorf("write %d: %w", i, err)
		}
	}
	if err := c.Close(websocket.StatusNormalClosure, ""); err != nil {
		return fmt.Errorf("close after %d messages from the client: %w", ticks, err)
	}
	if code, reason := closeErr(wsUp.end(t)); code != websocket.StatusNormalClosure {
		return fmt.Errorf("upstream saw close %d %q, want 1000", code, reason)
	}
	if n := <-got; n != ticks {
		return fmt.Errorf("upstream got %d messages, want %d", n, ticks)
	}
	return nil
}

// serverToClient is one try of TestWebSocketIdle/server-to-client-traffic:
// the upstream sends a message every period, ticks times, to a client that
// only reads; then the client closes the socket.
func serverToClient(t *testing.T, open func(*testing.T, *wsUpstream) *websocket.Conn, ticks int, every time.Duration) error {
	wsUp := newWSUpstream(func(ctx context.Context, c *websocket.Conn) error {
		tick := time.NewTicker(every)
		defer tick.Stop()
		for range ticks {
			<-tick.C
			if err := c.Write(ctx, websocket.MessageText, []byte("event")); err != nil {
				return err
			}
		}
		_, _, err := c.Read(ctx) // the client's close
		return err
	})
	c := open(t, wsUp)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for i := range ticks {
		if _, _, err := c.Read(ctx); err != nil {
			return fmt.Errorf("read %d: %w", i, err)
		}
	}
	if err := c.Close(websocket.StatusNormalClosure, ""); err != nil {
		return fmt.Errorf("close after %d messages from the server: %w", ticks, err)
	}
	if code, reason := closeErr(wsUp.end(t)); code != websocket.StatusNormalClosure {
		return fmt.Errorf("upstream saw close %d %q, want 1000", code, reason)
	}
	return nil
}

// retryStalled runs try, and again, up to three times in all, while it
// fails after the test process stood still for gap or more in all
// (stallWatch) during the try: a socket quiet that long may rightly be
// closed for idleness, whatever the test sent. A try that fails without
// such a stall fails the test, as does the third.
func retryStalled(t *testing.T, gap time.Duration, try func() error) {
	t.Helper()
	stalls := newStallWatch(t)
	for n := 1; ; n++ {
		start := time.Now()
		err := try()
		if err == nil {
			return
		}
		if stood := stalls.stood(start); stood >= gap && n < 3 {
			t.Logf("try %d: %v, after the test process stood still %v: trying again", n, err, stood.Round(time.Millisecond))
			continue
		}
		t.Fatal(err)
	}
}

// variableDefault is the documented default of an environment variable.
func variableDefault(t *testing.T, name string) string {
	t.Helper()
	for _, v := range Variables() {
		if v.Name == name {
			return v.Default
		}
	}
	t.Fatalf("no variable %s", name)
	return ""
}

// wsFrameLen is the size on the wire of a websocket frame with an n-byte
// payload (RFC 6455, section 5.2); client frames carry a 4-byte mask key.
func wsFrameLen(n int, masked bool) int64 {
	l := int64(2 + n)
	switch {
	case n > 65535:
		l += 8
	case n > 125:
		l += 2
	}
	if masked {
		l += 4
	}
	return l
}

// TestWebSocketAccessLog checks the access log line of a websocket: status
// 101 and the bytes of every frame that crossed each way, close frames
// included.
func TestWebSocketAccessLog(t *testing.T) {
	t.Parallel()
	wsUp := newWSUpstream(nil)
	up := newUpstream(t, upTLS, wsUp)
	cfg := testConfig(up)
	cfg.AccessLog = true
	tp := startProxy(t, cfg)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	c, _ := dialWS(t, tp, "/ws/chat", nil)
	var in, out int64
	for _, n := range []int{100, 200, 70000} {
		if err := c.Write(ctx, websocket.MessageBinary, make([]byte, n)); err != nil {
			t.Fatal(err)
		}
		if _, _, err := c.Read(ctx); err != nil {
			t.Fatal(err)
		}
		in += wsFrameLen(n, true)
		out += wsFrameLen(n, false)
	}
	if err := c.Close(websocket.StatusNormalClosure, "bye"); err != nil {
		t.Fatal(err)
	}
	// The close frame each way: code and reason.
	in += wsFrameLen(2+len("bye"), true)
	out += wsFrameLen(2+len("bye"), false)
	wsUp.end(t)

	var line string
	waitFor(t, 10*time.Second, func() bool {
		for l := range strings.SplitSeq(tp.Log.String(), "\n") {
			if strings.Contains(l, "msg=request") && strings.Contains(l, "proto=ws") {
				line = l
			}
		}
		return line != ""
	}, func() string { return "no access log line for the websocket" })
	for _, want := range []string{"status=101", "path=/ws/chat", fmt.Sprintf("bytes_in=%d", in), fmt.Sprintf("bytes_out=%d", out)} {
		if !strings.Contains(line, " "+want+" ") {
			t.Errorf("access log line %q: want %s", line, want)
		}
	}
}

// TestWebSocketBuffered sends frames that reach the proxy together with
// other bytes, so that they wait in a buffer above the socket (the upgrade
// response's bufio, crypto/tls) while the socket itself has nothing more to
// read. A pump that waited on the socket without taking them first would
// never forward them: the test would fail on its deadline.
func TestWebSocketBuffered(t *testing.T) {
	t.Run("upstream-frames-behind-101", func(t *testing.T) {
		t.Parallel()
		msgs := []string{"one", "two", "three"}
		done := make(chan struct{})
		up := newUpstream(t, upTLS, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Header.Get("Upgrade") == "" {
				io.WriteString(w, "ok") // the readiness probe
				return
			}
			defer close(done)
			conn, brw, err := http.NewResponseController(w).Hijack()
			if err != nil {
				t.Errorf("upstream hijack: %v", err)
				return
			}
			defer conn.Close()
			// The 101 and three frames in one write, so in one TLS record.
			brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
				"Sec-WebSocket-Accept: " + wsAccept(r.Header.Get("Sec-WebSocket-Key")) + "\r\n\r\n")
			for _, m := range msgs {
				brw.Write(wsFrame(m, false))
			}
			brw.Flush()
			io.Copy(io.Discard, brw) // until the proxy closes
		}))
		tp := startProxy(t, testConfig(up))
		c, _ := dialWS(t, tp, "/ws/event", nil)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		for _, want := range msgs {
			_, got, err := c.Read(ctx)
			if err != nil {
				t.Fatalf("read %q: %v", want, err)
			}
			if string(got) != want {
				t.Errorf("message = %q, want %q", got, want)
			}
		}
		c.CloseNow()
		<-done
	})

	t.Run("client-records-in-one-segment", func(t *testing.T) {
		t.Parallel()
		wsUp := newWSUpstream(nil)
		tp := startProxy(t, testConfig(newUpstream(t, upTLS, wsUp)))
		var held *heldConn
		conn := tp.tlsOver(t, func(tcp net.Conn) net.Conn { held = &heldConn{Conn: tcp}; return held })
		conn.SetDeadline(time.Now().Add(10 * time.Second))
		if err := conn.Handshake(); err != nil {
			t.Fatal(err)
		}
		// Each Write is a TLS record of its own; heldConn sends them in one
		// TCP write. The proxy reads them all at once: net/http takes the
		// request, the frames stay in crypto/tls.
		send := func(parts ...string) {
			t.Helper()
			held.hold = true
			for _, p := range parts {
				if _, err := io.WriteString(conn, p); err != nil {
					t.Fatal(err)
				}
			}
			if err := held.release(); err != nil {
				t.Fatal(err)
			}
		}
		send("GET /ws/event HTTP/1.1\r\nHost: "+tp.Addr().String()+"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
			"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
			string(wsFrame("one", true)), string(wsFrame("two", true)))
		br := bufio.NewReader(conn)
		res, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatal(err)
		}
		if got, want := res.StatusCode, http.StatusSwitchingProtocols; got != want {
			t.Fatalf("handshake status = %d, want %d", got, want)
		}
		readEcho := func(want string) {
			t.Helper()
			var hdr [2]byte
			if _, err := io.ReadFull(br, hdr[:]); err != nil {
				t.Fatalf("echo of %q: %v", want, err)
			}
			got := make([]byte, hdr[1]&0x7f)
			if _, err := io.ReadFull(br, got); err != nil {
				t.Fatalf("echo of %q: %v", want, err)
			}
			if string(got) != want {
				t.Errorf("echo = %q, want %q", got, want)
			}
		}
		readEcho("one")
		readEcho("two")
		// Again once the tunnel has gone quiet between frames.
		send(string(wsFrame("three", true)), string(wsFrame("four", true)))
		readEcho("three")
		readEcho("four")
		conn.Close()
		wsUp.end(t)
	})
}

// heldConn keeps what is written to it while hold is set, until release
// sends it in one write.
type heldConn struct {
	net.Conn
	hold bool
	buf  []byte
}

func (c *heldConn) Write(p []byte) (int, error) {
	if c.hold {
		c.buf = append(c.buf, p...)
		return len(p), nil
	}
	return c.Conn.Write(p)
}

func (c *heldConn) release() error {
	c.hold = false
	_, err := c.Conn.Write(c.buf)
	c.buf = nil
	return err
}

// wsFrame is a final text frame carrying s (shorter than 126 bytes),
// masked when masked is set, as a client's must be.
func wsFrame(s string, masked bool) []byte { return shortFrame(0x1, []byte(s), masked) }

// wsAccept is the Sec-WebSocket-Accept for key (RFC 6455, section 4.2.2).
func wsAccept(key string) string {
	h := sha1.Sum([]byte(key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"))
	return base64.StdEncoding.EncodeToString(h[:])
}

// TestWebSocketParkedTunnels: once its frames are copied, an idle websocket
// holds no goroutine of the proxy's (its sockets wait in the parker's epoll
// set), and a frame either way wakes it, round after round. Not parallel:
// it counts every pump goroutine in the process.
func TestWebSocketParkedTunnels(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("the parker is Linux's epoll; elsewhere each pump waits on its goroutine")
	}
	wsUp := newWSUpstream(nil)
	tp := startProxy(t, testConfig(newUpstream(t, upTLS, wsUp)))
	const n = 16 // wsUpstream's ended holds 16
	conns := make([]*websocket.Conn, n)
	for i := range conns {
		conns[i], _ = dialWS(t, tp, "/ws/event", nil)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for round := range 3 {
		if got := pumpGoroutines(t, 0); got != 0 {
			t.Fatalf("round %d: %d goroutines still in a pump with every websocket idle, want 0", round, got)
		}
		// Each message wakes the client-to-Cells pump, its echo the
		// other one.
		for i, c := range conns {
			want := fmt.Sprintf("round %d socket %d", round, i)
			if err := c.Write(ctx, websocket.MessageText, []byte(want)); err != nil {
				t.Fatalf("round %d socket %d: write: %v", round, i, err)
			}
			_, got, err := c.Read(ctx)
			if err != nil {
				t.Fatalf("round %d socket %d: read: %v", round, i, err)
			}
			if string(got) != want {
				t.Fatalf("round %d socket %d: echo %q, want %q", round, i, got, want)
			}
		}
	}
	for _, c := range conns {
		c.Close(websocket.StatusNormalClosure, "")
	}
}

// pumpGoroutines waits up to 10 s for the number of goroutines running a
// websocket pump to fall to want, and returns the last count.
func pumpGoroutines(t *testing.T, want int) int {
	t.Helper()
	buf := make([]byte, 1<<20)
	deadline := time.Now().Add(10 * time.Second)
	for {
		for {
			n := runtime.Stack(buf, true)
			if n < len(buf) {
				buf = buf[:n]
				break
			}
			buf = make([]byte, 2*len(buf))
		}
		got := 0
		for _, g := range strings.Split(string(buf), "\n\n") {
			if strings.Contains(g, "proxy.(*pump).") {
				got++
			}
		}
		if got <= want || time.Now().After(deadline) {
			return got
		}
		buf = buf[:cap(buf)]
		time.Sleep(20 * time.Millisecond)
	}
}

// TestWebSocketTunnelAfterShutdownBegan: a tunnel that starts once
// shutdown has closed the others (its handshake ended in between, a narrow
// window the shutdown tests do not reach) is closed at once with 1001 to
// both ends, its client-to-Cells pump stopped, and ends.
func TestWebSocketTunnelAfterShutdownBegan(t *testing.T) {
	t.Parallel()
	clientFar, client := loopbackPair(t)
	upFar, up := loopbackPair(t)
	ts := newTunnels()
	ts.closeAll()

	tn := &tunnel{idle: time.Minute, clientConn: client, upConn: up, ex: &exchange{}}
	pk := getParker(slog.New(slog.DiscardHandler))
	tn.up = pump{t: tn, pk: pk, src: client, srcConn: client, raw: rawConn(client), dst: up, dstConn: up, mask: true}
	tn.down = pump{t: tn, pk: pk, fromUpstream: true, src: up, srcConn: up, raw: rawConn(up), dst: client, dstConn: client}
	ended := make(chan struct{}, 2)
	tn.run(ts, func() {
		client.Close()
		up.Close()
		ended <- struct{}{}
	})

	for _, end := range []struct {
		name   string
		conn   net.Conn
		masked bool
	}{{"client", clientFar, false}, {"upstream", upFar, true}} {
		end.conn.SetReadDeadline(time.Now().Add(10 * time.Second))
		b, err := io.ReadAll(end.conn)
		if err != nil {
			t.Errorf("%s: %v after %d bytes", end.name, err, len(b))
			continue
		}
		payload, ok := closePayload(b, end.masked)
		if !ok || len(payload) < 2 {
			t.Errorf("%s got % x, want one close frame", end.name, b)
			continue
		}
		if code := binary.BigEndian.Uint16(payload); code != 1001 {
			t.Errorf("%s: close code %d (%q), want 1001", end.name, code, payload[2:])
		}
	}
	recv(t, ended, "the tunnel's end")
}

// closePayload is the payload of b if b is exactly one short close frame,
// masked or not as said.
func closePayload(b []byte, masked bool) ([]byte, bool) {
	if len(b) < 2 || b[0] != 0x88 || (b[1]&0x80 != 0) != masked {
		return nil, false
	}
	n, rest := int(b[1]&0x7f), b[2:]
	if !masked {
		return rest, n < 126 && len(rest) == n
	}
	if n >= 126 || len(rest) != 4+n {
		return nil, false
	}
	key, payload := rest[:4], bytes.Clone(rest[4:])
	for i := range payload {
		payload[i] ^= key[i%4]
	}
	return payload, true
}

// TestWebSocketChurn: many websockets at once, each sending messages of
// sizes that straddle frames and TLS records with short pauses between them
// (so pumps park and wake over and over), and ending in one of three ways:
// the client closes, the upstream closes (4001), or the socket falls quiet
// past PROXY_WS_IDLE_TIMEOUT and the proxy closes it with 1001 while both
// its pumps are parked. Every echo arrives intact, every socket ends as its
// story says, and no tunnel outlives the test (goleak checks the rest).
//
// A busy socket that the proxy closes fails the test, unless the test
// process itself stood still (a loaded machine has stopped it for 1.5 s
// under -race): then its tunnel may have been quiet for the idle timeout,
// and the close was the proxy's duty. That is, from before its last message
// that went through to the close, more than wsIdle passed, half of it or
// more with the process stopped (stallWatch); the socket ends with the
// proxy's 1001, or, if the proxy was writing to the client as it closed,
// with the connection cut. On a quiet machine no socket is excused.
func TestWebSocketChurn(t *testing.T) {
	t.Parallel()
	const sockets, ops = 30, 12
	wsUp := newWSUpstream(nil)
	wsUp.ended = make(chan error, sockets)
	cfg := testConfig(newUpstream(t, upTLS, wsUp))
	cfg.WSIdleTimeout = wsIdle
	tp := startProxy(t, cfg)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	stalls := newStallWatch(t)

	var wg sync.WaitGroup
	for i := range sockets {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(i), 7))
			// Before the last message the tunnel passed on: its idle
			// clock started no earlier.
			moved := time.Now()
			c, _ := dialWS(t, tp, "/ws/event", nil)
			defer c.CloseNow()
			// idleClosed: err ended the socket, and the proxy may have
			// closed it for idleness, rightly: the test stood still.
			idleClosed := func(what string, err error) bool {
				quiet, stood := time.Since(moved), stalls.stood(moved)
				if quiet < wsIdle || stood < wsIdle/2 || ctx.Err() != nil {
					return false
				}
				// The proxy's 1001, or the connection cut: no close frame
				// can follow a frame the proxy was writing.
				if code, reason := closeErr(err); code != -1 && (code != websocket.StatusGoingAway || reason != "idle timeout") {
					return false
				}
				t.Logf("socket %d: %s: %v, %v after its last message went through, %v of it with the test process stopped: past PROXY_WS_IDLE_TIMEOUT=%v",
					i, what, err, quiet.Round(time.Millisecond), stood.Round(time.Millisecond), wsIdle)
				return true
			}
			for op := range ops {
				time.Sleep(time.Duration(rng.IntN(50)) * time.Millisecond)
				msg := make([]byte, 1+rng.IntN(70_000))
				for j := range msg {
					msg[j] = byte(i + op + j)
				}
				start := time.Now()
				if err := c.Write(ctx, websocket.MessageBinary, msg); err != nil {
					if !idleClosed("write", err) {
						t.Errorf("socket %d op %d: write: %v", i, op, err)
					}
					return
				}
				_, got, err := c.Read(ctx)
				if err != nil {
					if !idleClosed("read", err) {
						t.Errorf("socket %d op %d: read: %v", i, op, err)
					}
					return
				}
				if !bytes.Equal(got, msg) {
					t.Errorf("socket %d op %d: echo of %d bytes differs from the %d sent", i, op, len(got), len(msg))
					return
				}
				moved = start
			}
			switch i % 3 {
			case 0:
				c.Close(websocket.StatusNormalClosure, "client bye")
			case 1:
				if err := c.Write(ctx, websocket.MessageText, []byte("close-me")); err != nil {
					if !idleClosed("write", err) {
						t.Errorf("socket %d: write close-me: %v", i, err)
					}
					return
				}
				_, _, err := c.Read(ctx)
				if code, reason := closeErr(err); code != 4001 && !idleClosed("read", err) {
					t.Errorf("socket %d: close %d %q, want 4001 from the upstream", i, code, reason)
				}
			default:
				// Quiet until the proxy closes it.
				_, _, err := c.Read(ctx)
				wantGoingAway(t, err, fmt.Sprintf("socket %d", i))
			}
		})
	}
	wg.Wait()
	var n int
	waitFor(t, 10*time.Second, func() bool { n = tp.fwd.ws.count(); return n == 0 }, func() string {
		return fmt.Sprintf("%d tunnels still open after every client ended", n)
	})
}

// stallWatch measures how long the test process stood still: a goroutine
// that sleeps 10 ms at a time notes each waking that came more than 50 ms
// late, which on a quiet machine none does.
type stallWatch struct {
	mu     sync.Mutex
	stalls []stall
	last   time.Time // the watch's last waking
}

type stall struct{ from, to time.Time }

// newStallWatch starts a stallWatch that stops when the test ends.
func newStallWatch(t *testing.T) *stallWatch {
	w := &stallWatch{last: time.Now()}
	done := make(chan struct{})
	ended := make(chan struct{})
	t.Cleanup(func() { close(done); <-ended })
	go func() {
		defer close(ended)
		for {
			select {
			case <-done:
				return
			case <-time.After(10 * time.Millisecond):
			}
			now := time.Now()
			w.mu.Lock()
			if now.Sub(w.last) > 60*time.Millisecond {
				w.stalls = append(w.stalls, stall{w.last, now})
			}
			w.last = now
			w.mu.Unlock()
		}
	}()
	return w
}

// stood is how long the process stood still since from, as far as the
// watch has seen.
func (w *stallWatch) stood(from time.Time) time.Duration {
	w.mu.Lock()
	defer w.mu.Unlock()
	var d time.Duration
	// The stall the process may just have come out of, before the watch
	// has woken to note it.
	stalls := w.stalls
	if now := time.Now(); now.Sub(w.last) > 60*time.Millisecond {
		stalls = append(slices.Clip(stalls), stall{w.last, now})
	}
	for _, s := range stalls {
		if s.to.After(from) {
			start := s.from
			if start.Before(from) {
				start = from
			}
			d += s.to.Sub(start) - 10*time.Millisecond
		}
	}
	return d
}

// rawWS opens a websocket through the proxy by hand, over TLS, and returns
// the connection once the 101 is read, with nothing read beyond it.
func rawWS(t *testing.T, tp *testProxy) *tls.Conn {
	t.Helper()
	conn := tp.dialTLS(t, tp.Addr().String(), "http/1.1")
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	readWS101(t, tp, conn)
	return conn
}

// readWS101 asks for a websocket on conn and reads the 101, byte by byte,
// so that nothing after its blank line is taken.
func readWS101(t *testing.T, tp *testProxy, conn *tls.Conn) {
	t.Helper()
	if _, err := io.WriteString(conn, "GET /ws/event HTTP/1.1\r\nHost: "+tp.Addr().String()+
		"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	var head []byte
	for !bytes.HasSuffix(head, []byte("\r\n\r\n")) {
		var b [1]byte
		if _, err := conn.Read(b[:]); err != nil {
			t.Fatalf("reading the 101: %v (read %q)", err, head)
		}
		head = append(head, b[0])
	}
	if !bytes.HasPrefix(head, []byte("HTTP/1.1 101 ")) {
		t.Fatalf("handshake answer %q, want a 101", head)
	}
}

// TestWebSocketFrameInOneRecord: a small frame leaves the proxy in one
// write, header and payload together, so one TLS record (one write(2))
// each way rather than two. crypto/tls returns at most one record per Read,
// so the first Read at each end must return the whole frame.
func TestWebSocketFrameInOneRecord(t *testing.T) {
	t.Parallel()
	fromClient := wsFrame("hello", true)
	fromCells := wsFrame("world", false)
	got := make(chan []byte, 1)
	up := newUpstream(t, upTLS, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Upgrade") == "" {
			io.WriteString(w, "ok") // the readiness probe
			return
		}
		conn, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			t.Errorf("upstream hijack: %v", err)
			return
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(10 * time.Second))
		brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
			"Sec-WebSocket-Accept: " + wsAccept(r.Header.Get("Sec-WebSocket-Key")) + "\r\n\r\n")
		brw.Flush()
		if n := brw.Reader.Buffered(); n > 0 {
			t.Errorf("upstream: %d bytes arrived with the upgrade request", n)
		}
		buf := make([]byte, 1024)
		n, err := conn.Read(buf)
		if err != nil {
			t.Errorf("upstream read: %v", err)
		}
		got <- buf[:n]
		conn.Write(fromCells)
		io.Copy(io.Discard, conn) // until the proxy closes
	}))
	tp := startProxy(t, testConfig(up))
	conn := rawWS(t, tp)
	defer conn.Close()
	if _, err := conn.Write(fromClient); err != nil {
		t.Fatal(err)
	}
	if b := <-got; !bytes.Equal(b, fromClient) {
		t.Errorf("Cells' first read: %x, want the whole frame %x", b, fromClient)
	}
	buf := make([]byte, 1024)
	n, err := conn.Read(buf)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf[:n], fromCells) {
		t.Errorf("client's first read: %x, want the whole frame %x", buf[:n], fromCells)
	}
}

// TestWebSocketCloseBeforePayload: the proxy shuts down while a client's
// frame is half sent (its header, not its payload). Nothing of that frame
// has gone to Cells, so Cells still gets a clean close frame, 1001, and so
// does the client.
func TestWebSocketCloseBeforePayload(t *testing.T) {
	t.Parallel()
	wsUp := newWSUpstream(nil)
	tp := startProxy(t, testConfig(newUpstream(t, upTLS, wsUp)))
	conn := rawWS(t, tp)
	defer conn.Close()

	// The tunnel's last activity, once it runs: reading a frame's first
	// byte touches it.
	var tun *tunnel
	waitFor(t, 10*time.Second, func() bool {
		tp.fwd.ws.mu.Lock()
		defer tp.fwd.ws.mu.Unlock()
		for x := range tp.fwd.ws.open {
			tun = x
		}
		return tun != nil
	}, func() string { return "no tunnel" })
	before := tun.last.Load()
	frame := wsFrame("hello", true)
	if _, err := conn.Write(frame[:6]); err != nil { // header and mask key only
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, func() bool { return tun.last.Load() != before }, func() string {
		return "the proxy did not read the frame header"
	})

	stopped := shutdownAsync(tp)
	wantGoingAway(t, wsUp.end(t), "Cells")
	var hdr [4]byte
	if _, err := io.ReadFull(conn, hdr[:]); err != nil {
		t.Fatalf("client: no close frame: %v", err)
	}
	if hdr[0] != 0x88 || binary.BigEndian.Uint16(hdr[2:]) != 1001 {
		t.Errorf("client got %x, want a close frame with 1001", hdr)
	}
	if err := <-stopped; err != nil {
		t.Errorf("Run = %v, want nil", err)
	}
}

// frameOf is a final frame of opcode op and any length, masked with a fixed
// key when mask is set.
func frameOf(op byte, payload []byte, mask bool) []byte {
	b := []byte{0x80 | op, 127}
	b = binary.BigEndian.AppendUint64(b, uint64(len(payload)))
	if !mask {
		return append(b, payload...)
	}
	b[1] |= 0x80
	key := [4]byte{7, 1, 3, 9}
	b = append(b, key[:]...)
	for i, c := range payload {
		b = append(b, c^key[i%4])
	}
	return b
}

// TestWebSocketLastWordsArrive: the client sends a large message and its
// close frame, then ends its side of the connection (close_notify, and a
// FIN or not) while it goes on reading, and Cells keeps sending events all
// along. The tunnel ends at the client's end of stream; every byte the
// client sent must still reach Cells, the message whole and then the close
// frame. Closing a socket with Cells' events unread would make the kernel
// reset the connection and throw away the end of the message still queued
// to Cells.
func TestWebSocketLastWordsArrive(t *testing.T) {
	for _, fin := range []bool{false, true} {
		t.Run(fmt.Sprintf("fin=%v", fin), func(t *testing.T) {
			const size = 2 << 20
			msg := randomMessage(websocket.MessageBinary, size)
			ended := make(chan struct{}) // the client has ended its side
			type result struct {
				n       int
				closeOK bool
				err     error
			}
			got := make(chan result, 1)
			wsUp := newWSUpstream(func(ctx context.Context, c *websocket.Conn) error {
				ctx, stop := context.WithCancel(ctx)
				defer stop()
				go func() {
					event := make([]byte, 16<<10)
					for c.Write(ctx, websocket.MessageBinary, event) == nil {
					}
				}()
				<-ended // the proxy's writes to Cells wait meanwhile
				var res result
				_, p, err := c.Read(ctx)
				res.n, res.err = len(p), err
				if err == nil && bytes.Equal(p, msg) {
					_, _, err = c.Read(ctx)
					code, _ := closeErr(err)
					res.closeOK, res.err = code == websocket.StatusNormalClosure, err
				}
				got <- res
				return nil
			})
			tp := startProxy(t, testConfig(newUpstream(t, upTLS, wsUp)))
			conn := rawWS(t, tp)
			conn.SetDeadline(time.Now().Add(30 * time.Second))
			go io.Copy(io.Discard, conn) // the client reads all Cells sends
			go func() {
				conn.Write(frameOf(0x2, msg, true))
				conn.Write(closeFrame(1000, "bye", true))
				conn.CloseWrite()
				if fin {
					conn.NetConn().(*net.TCPConn).CloseWrite()
				}
				close(ended)
			}()
			var res result
			select {
			case res = <-got:
			case <-time.After(30 * time.Second):
				t.Fatal("Cells read nothing in 30 s")
			}
			if res.n != size || !res.closeOK {
				t.Errorf("Cells got a message of %d bytes (want %d), then the client's close frame: %v (%v)", res.n, size, res.closeOK, res.err)
			}
			wsUp.end(t)
		})
	}
}

// TestWebSocketLastWordsReachClient is TestWebSocketLastWordsArrive the
// other way: Cells sends a large message and its close frame and ends,
// while the client, slow to read, is still sending. Every byte Cells sent
// must reach the client: the client's socket, found under TLS, cmux and
// the public port's own layer, lingers too.
func TestWebSocketLastWordsReachClient(t *testing.T) {
	const size = 16 << 20
	msg := randomMessage(websocket.MessageBinary, size)
	up := wsRawUp(t, func(conn net.Conn, brw *bufio.ReadWriter, r *http.Request) {
		brw.WriteString(accept101(r))
		brw.Write(frameOf(0x2, msg, false))
		brw.Write(closeFrame(1000, "bye", false))
		brw.Flush()
		// Cells lingers itself: nothing is lost on its side.
		tc := conn.(*tls.Conn)
		tc.CloseWrite()
		tc.NetConn().(*net.TCPConn).CloseWrite()
		conn.SetReadDeadline(time.Now().Add(20 * time.Second))
		io.Copy(io.Discard, conn)
	})
	settle(t, up)
	tp := startProxy(t, testConfig(up))
	conn := rawWS(t, tp)
	conn.SetDeadline(time.Now().Add(30 * time.Second))
	stop := make(chan struct{})
	sent := make(chan struct{})
	go func() {
		defer close(sent)
		f := frameOf(0x2, make([]byte, 1024), true)
		for {
			select {
			case <-stop:
				return
			case <-time.After(time.Millisecond):
			}
			if _, err := conn.Write(f); err != nil {
				return
			}
		}
	}()
	defer func() { close(stop); <-sent }()
	// Cells has sent all by the time the client reads: what the proxy
	// could not pass on yet waits in its socket's queue to the client.
	time.Sleep(500 * time.Millisecond)
	want := append(frameOf(0x2, msg, false), closeFrame(1000, "bye", false)...)
	got := make([]byte, 0, len(want))
	buf := make([]byte, 16<<10)
	var err error
	for len(got) < len(want) && err == nil {
		var n int
		n, err = conn.Read(buf)
		got = append(got, buf[:n]...)
		time.Sleep(200 * time.Microsecond)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("the client got %d of the %d bytes Cells sent (message and close frame), then %v", len(got), len(want), err)
	}
}
