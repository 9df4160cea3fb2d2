package proxy

import (
	"bytes"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"weak"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// TestH2ClientNotReading: an HTTP/2 client grants the whole window for a
// large download, then reads nothing. writeBehind must hold the proxy back
// as the socket did, so Cells' answer stops coming at some tens of MiB
// (the sockets' buffers on the way, and writeBehindMax); then, whatever the
// client does next:
//   - reads: every byte arrives, in order;
//   - goes away: the proxy stops the download at Cells;
//   - still reads nothing while the proxy shuts down: the writer gives up
//     after writeBehindLinger and the connection closes.
func TestH2ClientNotReading(t *testing.T) {
	size := int64(256 << 20)
	if raceEnabled || testing.Short() {
		size = 128 << 20
	}
	// Far below size: loopback's socket buffers go to a few MiB per
	// direction; the proxy's own buffers add under a MiB.
	const maxAhead = 48 << 20

	var sent, ended atomic.Int64
	up := newUpstream(t, upTLS, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer ended.Add(1)
		w.Header().Set("Content-Length", strconv.FormatInt(size, 10))
		buf := make([]byte, 32<<10)
		p := &pattern{n: size}
		for {
			n, _ := p.Read(buf)
			if n == 0 {
				return
			}
			if _, err := w.Write(buf[:n]); err != nil {
				return
			}
			sent.Add(int64(n))
		}
	}))
	settle(t, up)
	cfg := testConfig(up)
	cfg.ShutdownTimeout = time.Second
	tp := startProxy(t, cfg)

	// stall opens a connection, asks for the download with every window
	// at its largest, and returns once Cells has sent nothing more for
	// 300 ms, with what Cells had sent on this connection by then.
	stall := func(t *testing.T) (*tls.Conn, *http2.Framer, int64) {
		t.Helper()
		before, endedBefore := sent.Load(), ended.Load()
		conn := tp.dialTLSH2(t, tp.Addr().String())
		fr := http2.NewFramer(conn, conn)
		fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
		io.WriteString(conn, http2.ClientPreface)
		fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1<<31 - 1})
		fr.WriteWindowUpdate(0, 1<<31-1-65535)
		block := hpackBlock(":method", "GET", ":scheme", "https", ":path", "/big", ":authority", tp.Addr().String())
		if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block, EndStream: true, EndHeaders: true}); err != nil {
			t.Fatal(err)
		}
		last, still := int64(-1), 0
		for deadline := time.Now().Add(30 * time.Second); still < 6; time.Sleep(50 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("Cells still sending after 30 s (%d bytes)", sent.Load()-before)
			}
			if ended.Load() != endedBefore {
				t.Fatalf("Cells' handler ended after %d bytes with the client reading nothing", sent.Load()-before)
			}
			if n := sent.Load(); n != last {
				last, still = n, 0
			} else {
				still++
			}
		}
		ahead := last - before
		if ahead >= maxAhead {
			t.Fatalf("Cells sent %d MiB to a client that reads nothing, want under %d MiB", ahead>>20, maxAhead>>20)
		}
		t.Logf("Cells sent %.1f MiB before the proxy held it back", float64(ahead)/(1<<20))
		return conn, fr, ahead
	}

	t.Run("reads", func(t *testing.T) {
		conn, fr, _ := stall(t)
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(60 * time.Second))
		h := newCRC()
		var n int64
		status := ""
		for done := false; !done; {
			f, err := fr.ReadFrame()
			if err != nil {
				t.Fatalf("after %d bytes: %v", n, err)
			}
			switch f := f.(type) {
			case *http2.MetaHeadersFrame:
				if f.StreamID == 1 {
					status = f.PseudoValue("status")
				}
			case *http2.DataFrame:
				if f.StreamID == 1 {
					h.Write(f.Data())
					n += int64(len(f.Data()))
					done = f.StreamEnded()
				}
			case *http2.RSTStreamFrame:
				t.Fatalf("stream reset (%v) after %d bytes", f.ErrCode, n)
			case *http2.GoAwayFrame:
				t.Fatalf("GOAWAY (%v) after %d bytes", f.ErrCode, n)
			}
		}
		if status != "200" {
			t.Errorf("status %q, want 200", status)
		}
		if got, want := (checksum{n, h.Sum32(), nil}), hashCopy(&pattern{n: size}); got != want {
			t.Errorf("client received %v, want %v", got, want)
		}
	})

	t.Run("goes away", func(t *testing.T) {
		conn, _, _ := stall(t)
		endedBefore := ended.Load()
		conn.Close()
		waitFor(t, 30*time.Second, func() bool { return ended.Load() != endedBefore }, func() string {
			return "Cells' download still running 30 s after the client went away"
		})
	})

	t.Run("shutdown", func(t *testing.T) {
		conn, _, _ := stall(t)
		defer conn.Close()
		stopped := shutdownAsync(tp)
		select {
		case <-stopped:
		case <-time.After(30 * time.Second):
			t.Fatal("Run still running 30 s after the shutdown with a client that reads nothing")
		}
		// The writer gives up writeBehindLinger after the close; the
		// client has still read nothing.
		var n int
		waitFor(t, writeBehindLinger+20*time.Second, func() bool { n = writers(); return n == 0 }, func() string {
			return fmt.Sprintf("%d writeBehind writers left %v after the shutdown", n, writeBehindLinger+20*time.Second)
		})
		conn.SetReadDeadline(time.Now().Add(30 * time.Second))
		_, err := io.Copy(io.Discard, conn)
		var ne interface{ Timeout() bool }
		if errors.As(err, &ne) && ne.Timeout() {
			t.Errorf("connection still open after the shutdown: %v", err)
		}
	})
}

// writers counts writeBehind's writer goroutines.
func writers() int {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	return strings.Count(string(buf), "proxy.(*writeBehind).writer(")
}

// TestWriteBehindClose closes a writeBehind, on a real loopback
// connection, while its peer reads nothing and the socket's buffers are
// full: Close returns at once, Write fails from then on, and every byte
// Write took still reaches the peer, followed by the end of the
// connection, once the peer reads within writeBehindLinger.
func TestWriteBehindClose(t *testing.T) {
	peer, sc := loopbackPair(t)
	w := newWriteBehind(sc, 0)

	// Write until Write blocks: the socket's buffers and writeBehindMax
	// are full.
	var took atomic.Int64
	writes := make(chan error, 1)
	go func() {
		p := &pattern{n: 1 << 30}
		buf := make([]byte, 16<<10)
		for {
			n, _ := p.Read(buf)
			if _, err := w.Write(buf[:n]); err != nil {
				writes <- err
				return
			}
			took.Add(int64(n))
		}
	}()
	for last, still := int64(-1), 0; still < 6; time.Sleep(50 * time.Millisecond) {
		if n := took.Load(); n != last {
			last, still = n, 0
		} else {
			still++
		}
	}
	if took.Load() >= 1<<30 {
		t.Fatal("Write took 1 GiB from a peer that reads nothing")
	}

	closed := make(chan error, 1)
	go func() { closed <- w.Close() }()
	select {
	case err := <-closed:
		if err != nil {
			t.Errorf("Close = %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Close waited for the peer to read")
	}
	if err := <-writes; !errors.Is(err, net.ErrClosed) {
		t.Errorf("Write after Close = %v, want net.ErrClosed", err)
	}

	peer.SetReadDeadline(time.Now().Add(writeBehindLinger - time.Second))
	got := hashCopy(peer)
	if want, ok := matchesPattern(got, took.Load()); !ok {
		t.Errorf("peer received %v, want %v and the end of the connection", got, want)
	}
}

// TestWriteBehindStall: with a stall bound, a peer that reads steadily,
// however long the transfer, keeps its connection (each write gets its own
// deadline); once it stops reading, the write fails within the bound, later
// writes fail, and the connection is closed.
func TestWriteBehindStall(t *testing.T) {
	const stall = 500 * time.Millisecond
	peer, sc := loopbackPair(t)
	w := newWriteBehind(sc, stall)

	writes := make(chan error, 1)
	go func() {
		buf := make([]byte, 16<<10)
		for {
			if _, err := w.Write(buf); err != nil {
				writes <- err
				return
			}
		}
	}()
	// Six stall bounds of steady reading, 64 KiB every 10 ms.
	buf := make([]byte, 64<<10)
	for start := time.Now(); time.Since(start) < 6*stall; time.Sleep(10 * time.Millisecond) {
		peer.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.ReadFull(peer, buf); err != nil {
			t.Fatalf("a peer reading steadily lost its connection after %v: %v", time.Since(start).Round(time.Millisecond), err)
		}
	}
	select {
	case err := <-writes:
		t.Fatalf("Write failed while the peer read: %v", err)
	default:
	}

	// The peer stops reading.
	stopped := time.Now()
	select {
	case err := <-writes:
		if err == nil {
			t.Fatal("Write returned nil")
		}
		t.Logf("Write failed %v after the peer stopped reading: %v", time.Since(stopped).Round(time.Millisecond), err)
	case <-time.After(30 * time.Second):
		t.Fatal("Write still blocked 30 s after the peer stopped reading")
	}
	if _, err := w.Write([]byte("x")); err == nil {
		t.Error("a Write after the stall succeeded")
	}
	// The connection is closed: the peer reads what the socket holds,
	// then its end.
	peer.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.Copy(io.Discard, peer); err != nil && !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("peer's read after the stall: %v, want the connection's end", err)
	}
}

// writeOne writes a byte through w, reads it at peer, and returns once
// the writer has stopped.
func writeOne(t *testing.T, w *writeBehind, peer net.Conn) {
	t.Helper()
	if _, err := w.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	peer.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(peer, make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, func() bool {
		w.mu.Lock()
		defer w.mu.Unlock()
		return !w.writing
	}, func() string { return "the writer still runs 10 s after its write" })
}

// TestWriteBehindIdleNoDeadline: once the writer has stopped, no write
// deadline is left on the connection to pass while it idles. crypto/tls
// writes to the socket on its own (the answer to a client's KeyUpdate), and
// a write that fails on a deadline leaves it unusable.
func TestWriteBehindIdleNoDeadline(t *testing.T) {
	const stall = 100 * time.Millisecond
	peer, sc := loopbackPair(t)
	w := newWriteBehind(sc, stall)
	writeOne(t, w, peer)
	time.Sleep(2 * stall)
	// As crypto/tls writes, under writeBehind.
	if _, err := sc.Write([]byte("y")); err != nil {
		t.Fatalf("a write to the connection %v after writeBehind's last: %v", 2*stall, err)
	}
	w.Close()
}

// TestWriteBehindCloseLetsGo: once closed, a writeBehind is garbage at the
// next collection, with the connection, its buffers and TLS state it holds.
// The watch its last write armed (stall/4 ahead: 15 s with the default
// PROXY_IDLE_TIMEOUT, here an hour) held it until it fired: for every
// HTTP/2 connection, up to 15 s of its memory after it had gone.
func TestWriteBehindCloseLetsGo(t *testing.T) {
	const stall = 4 * time.Hour
	peer, sc := loopbackPair(t)
	// Built, written to and closed in a function of its own, so that no
	// variable of the test's keeps it.
	closed := func() weak.Pointer[writeBehind] {
		w := newWriteBehind(sc, stall)
		if w.acked == nil {
			t.Skip("the socket cannot be looked at here: no watch is armed")
		}
		writeOne(t, w, peer)
		w.mu.Lock()
		watching := w.watching
		w.mu.Unlock()
		if !watching {
			t.Fatal("no watch armed by the write: the test would prove nothing")
		}
		w.Close()
		return weak.Make(w)
	}()
	waitFor(t, 10*time.Second, func() bool {
		runtime.GC()
		return closed.Value() == nil
	}, func() string { return "the closed writeBehind is still reachable 10 s after Close" })
}

// TestH2KeyUpdateAfterIdle: an HTTP/2 client over TLS 1.3 (OpenSSL's
// s_client) sends a KeyUpdate that asks for the proxy's, after the proxy has
// written nothing for longer than the stall bound (PROXY_IDLE_TIMEOUT, here
// 200 ms, times 1.5). crypto/tls answers it from its Read, with a write of
// its own to the socket: the request that follows must still be answered.
// When writeBehind left its last write deadline on the connection, that
// answer failed, crypto/tls failed every write after it, and the proxy
// closed the connection instead of answering.
func TestH2KeyUpdateAfterIdle(t *testing.T) {
	ossl, err := exec.LookPath("openssl")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("CI must run this test: .ci/run installs openssl (s_client sends the KeyUpdate)")
		}
		t.Skip("needs openssl (s_client) to send a KeyUpdate")
	}
	up := newUpstream(t, upTLS, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "ok")
	}))
	const idle = 200 * time.Millisecond
	cfg := testConfig(up)
	cfg.IdleTimeout = idle
	tp := startProxy(t, cfg)

	// Without -quiet, whose -ign_eof turns its commands off: "K" on a line
	// of its own sends a KeyUpdate with update_requested. -brief keeps
	// stdout for the connection's bytes.
	cmd := exec.Command(ossl, "s_client", "-connect", tp.Addr().String(), "-alpn", "h2", "-tls1_3", "-brief")
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	stderr := &syncBuffer{}
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		stdin.Close()
		cmd.Process.Kill()
		cmd.Wait()
		if t.Failed() {
			t.Logf("s_client's stderr:\n%s", stderr.String())
		}
	}()
	var out bytes.Buffer
	fw := http2.NewFramer(&out, nil)
	send := func() {
		t.Helper()
		if _, err := stdin.Write(out.Bytes()); err != nil {
			t.Fatal(err)
		}
		out.Reset()
	}
	get := func(id uint32, path string) {
		t.Helper()
		fw.WriteHeaders(http2.HeadersFrameParam{StreamID: id, EndStream: true, EndHeaders: true,
			BlockFragment: hpackBlock(":method", "GET", ":scheme", "https", ":path", path, ":authority", tp.Addr().String())})
		send()
	}
	fr := http2.NewFramer(nil, stdout)
	fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	answer := func(id uint32) {
		t.Helper()
		stop := time.AfterFunc(10*time.Second, func() { cmd.Process.Kill() })
		defer stop.Stop()
		status := ""
		for {
			f, err := fr.ReadFrame()
			if err != nil {
				t.Fatalf("stream %d: %v", id, err)
			}
			switch f := f.(type) {
			case *http2.SettingsFrame:
				if !f.IsAck() {
					fw.WriteSettingsAck()
					send()
				}
			case *http2.MetaHeadersFrame:
				if f.StreamID == id {
					status = f.PseudoValue("status")
				}
			case *http2.DataFrame:
				if f.StreamID == id && f.StreamEnded() {
					if status != "200" || string(f.Data()) != "ok" {
						t.Fatalf("stream %d: %s %q, want 200 \"ok\"", id, status, f.Data())
					}
					return
				}
			case *http2.RSTStreamFrame:
				t.Fatalf("stream %d reset (%v)", f.StreamID, f.ErrCode)
			case *http2.GoAwayFrame:
				t.Fatalf("GOAWAY (%v)", f.ErrCode)
			}
		}
	}

	out.WriteString(http2.ClientPreface)
	fw.WriteSettings()
	get(1, "/before")
	answer(1)
	time.Sleep(4 * idle) // the proxy writes nothing: its next PING is 60 s away
	// s_client takes "K" for a command only at the start of what it reads
	// from stdin, and drops the rest of that read: the next request must
	// not be written until it has read the command, and said so.
	io.WriteString(stdin, "K\n")
	waitFor(t, 10*time.Second, func() bool { return strings.Contains(stderr.String(), "KEYUPDATE") }, func() string {
		return "s_client did not take the KeyUpdate command within 10 s"
	})
	get(3, "/after")
	answer(3)
}
