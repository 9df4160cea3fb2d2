package proxy

import (
	"bytes"
	"crypto/tls"
	"io"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/http2"
)

// These are the h2spec cases (ci/h2spec.sh runs them all) that depend on
// cells-proxy's own code rather than on net/http's HTTP/2 server, checked
// at the frame level on both TLS ports.

// h2Conn opens a TLS connection that agreed h2 and returns it with a
// framer on it.
func h2Conn(t *testing.T, tp *testProxy, addr string) (*tls.Conn, *http2.Framer) {
	t.Helper()
	conn := tp.dialTLSH2(t, addr)
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	return conn, http2.NewFramer(conn, conn)
}

// TestH2InvalidPreface is h2spec http2/3.5/2: on a connection that agreed
// h2 in ALPN, bytes that are not the HTTP/2 preface end the connection
// (RFC 9113 §3.4). cells-proxy used to sniff the bytes only, so such a
// connection reached the HTTP/1 server and got a "400 Bad Request".
func TestH2InvalidPreface(t *testing.T) {
	tp := startTLSProxy(t, newCert(t))
	for port, addr := range tlsPorts(tp) {
		t.Run(port, func(t *testing.T) {
			conn, _ := h2Conn(t, tp, addr)
			io.WriteString(conn, "INVALID CONNECTION PREFACE\r\n\r\n")
			b, _ := io.ReadAll(conn)
			// The server may have sent its SETTINGS before it read
			// the preface; no HTTP/1 response in any case.
			if bytes.Contains(b, []byte("HTTP/1.")) {
				t.Errorf("answered %q, want the connection closed", b)
			}
		})
	}

	// Without ALPN the first bytes still decide, as before: HTTP/1.1
	// and h2 prior knowledge both work on the public port.
	conn := tp.dialRaw(t, tp.Addr().String())
	io.WriteString(conn, http2.ClientPreface)
	fr := http2.NewFramer(conn, conn)
	if err := fr.WriteSettings(); err != nil {
		t.Fatal(err)
	}
	f, err := fr.ReadFrame()
	if err != nil {
		t.Fatalf("h2 prior knowledge without ALPN: %v", err)
	}
	if _, ok := f.(*http2.SettingsFrame); !ok {
		t.Errorf("h2 prior knowledge without ALPN: first frame %v, want SETTINGS", f)
	}
}

// TestH2MaxFrameSize is h2spec http2/4.2/3: cells-proxy keeps the RFC 9113
// default frame size of 16 KiB (net/http offers 1 MiB unless told), so a
// HEADERS frame above it is a connection error FRAME_SIZE_ERROR.
func TestH2MaxFrameSize(t *testing.T) {
	tp := startTLSProxy(t, newCert(t))
	for port, addr := range tlsPorts(tp) {
		t.Run(port, func(t *testing.T) {
			fr, settings := serverSettings(t, tp, addr)
			max := uint32(16384) // RFC 9113 §6.5.2: the value when not sent
			if v, ok := settings.Value(http2.SettingMaxFrameSize); ok {
				max = v
			}
			if got, want := max, uint32(16<<10); got != want {
				t.Errorf("SETTINGS_MAX_FRAME_SIZE = %d, want %d", got, want)
			}
			fr.WriteSettingsAck()

			// A GET whose header block is 20 KB in one frame.
			block := hpackBlock(":method", "GET", ":scheme", "https", ":path", "/", ":authority", "127.0.0.1",
				"x-dummy", strings.Repeat("x", 20000))
			fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block, EndStream: true, EndHeaders: true})
			for {
				f, err := fr.ReadFrame()
				if err != nil {
					t.Fatalf("connection ended with %v before a GOAWAY", err)
				}
				switch f := f.(type) {
				case *http2.GoAwayFrame:
					if got, want := f.ErrCode, http2.ErrCodeFrameSize; got != want {
						t.Errorf("GOAWAY %v, want %v", got, want)
					}
					return
				case *http2.HeadersFrame, *http2.DataFrame:
					t.Fatalf("got %v: the oversized HEADERS frame was served", f)
				}
			}
		})
	}
}

// TestH2NoExtendedConnect: neither HTTP/2 port advertises
// SETTINGS_ENABLE_CONNECT_PROTOCOL (RFC 8441). Browsers that see it open
// websockets over HTTP/2 as an extended CONNECT, which the proxy answers
// 405 (it tunnels websockets from HTTP/1.1 only): Cells' /ws/event and
// /ws/chat would break. net/http's server advertises it only under
// GODEBUG=http2xconnect=1 in Go 1.26 (golang/go#71128); this fails first
// if a Go release turns it on by default.
func TestH2NoExtendedConnect(t *testing.T) {
	tp := startTLSProxy(t, newCert(t))
	for port, addr := range tlsPorts(tp) {
		t.Run(port, func(t *testing.T) {
			_, settings := serverSettings(t, tp, addr)
			if v, ok := settings.Value(http2.SettingEnableConnectProtocol); ok && v != 0 {
				t.Errorf("SETTINGS_ENABLE_CONNECT_PROTOCOL = %d: browsers would send websockets as extended CONNECT", v)
			}
		})
	}
}

// serverSettings opens an HTTP/2 connection to addr, sends the preface and
// an empty SETTINGS, and returns the framer and the server's first frame,
// which must be its SETTINGS.
func serverSettings(t *testing.T, tp *testProxy, addr string) (*http2.Framer, *http2.SettingsFrame) {
	t.Helper()
	conn, fr := h2Conn(t, tp, addr)
	io.WriteString(conn, http2.ClientPreface)
	if err := fr.WriteSettings(); err != nil {
		t.Fatal(err)
	}
	f, err := fr.ReadFrame()
	if err != nil {
		t.Fatal(err)
	}
	settings, ok := f.(*http2.SettingsFrame)
	if !ok {
		t.Fatalf("first frame %v, want SETTINGS", f)
	}
	return fr, settings
}
