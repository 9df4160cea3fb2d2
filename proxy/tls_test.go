package proxy

import (
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// selfSignedRSA is SelfSigned with an RSA 2048 key: most certificates in
// the field are RSA, and only with one can a client even ask for the
// ECDHE_RSA and static-RSA suites.
func selfSignedRSA(t testing.TB, names ...string) tls.Certificate {
	t.Helper()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "cells-proxy test RSA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	return signSelf(t, tmpl, key, &key.PublicKey, names...)
}

// signSelf is tmpl for names, signed with its own key.
func signSelf(t testing.TB, tmpl *x509.Certificate, key crypto.Signer, pub any, names ...string) tls.Certificate {
	t.Helper()
	for _, n := range names {
		if ip := net.ParseIP(n); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, n)
		}
	}
	leaf := signCert(t, tmpl, tmpl, pub, key)
	return tls.Certificate{Certificate: [][]byte{leaf.Raw}, PrivateKey: key, Leaf: leaf}
}

// signCert is tmpl signed by parent's key.
func signCert(t testing.TB, tmpl, parent *x509.Certificate, pub any, signer crypto.Signer) *x509.Certificate {
	t.Helper()
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, signer)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// pemPair is the PEM encoding of a certificate and its key, as files hold them.
func pemPair(t testing.TB, cert tls.Certificate) (certPEM, keyPEM []byte) {
	t.Helper()
	for _, der := range cert.Certificate {
		certPEM = append(certPEM, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})...)
	}
	der, err := x509.MarshalPKCS8PrivateKey(cert.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	return certPEM, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
}

// writePair writes cert to certFile and keyFile, replacing them in place.
func writePair(t testing.TB, cert tls.Certificate, certFile, keyFile string) {
	t.Helper()
	c, k := pemPair(t, cert)
	if err := os.WriteFile(certFile, c, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, k, 0o600); err != nil {
		t.Fatal(err)
	}
}

// certKinds are the two key types a real certificate comes with.
var certKinds = []struct {
	name string
	make func(t testing.TB) tls.Certificate
}{
	{"ECDSA", func(t testing.TB) tls.Certificate {
		c, err := SelfSigned("localhost", "127.0.0.1")
		if err != nil {
			t.Fatal(err)
		}
		return c
	}},
	{"RSA", func(t testing.TB) tls.Certificate { return selfSignedRSA(t, "localhost", "127.0.0.1") }},
}

// startTLSProxy runs a proxy that serves cert from TLS_CERT_FILE, with the
// dedicated gRPC port open too.
func startTLSProxy(t *testing.T, cert tls.Certificate) *testProxy {
	t.Helper()
	up := newUpstream(t, upTLS, &recorder{})
	cfg := testConfig(up)
	dir := t.TempDir()
	cfg.CertFile, cfg.KeyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	writePair(t, cert, cfg.CertFile, cfg.KeyFile)
	cfg.GRPCAddr = "127.0.0.1:0"
	return startProxy(t, cfg)
}

// tlsPorts are the proxy's two TLS listeners, named for subtests.
func tlsPorts(tp *testProxy) map[string]string {
	return map[string]string{"public": tp.Addr().String(), "grpc": tp.GRPCAddr().String()}
}

// eachCertPort runs f as the subtest kind/port for each certificate kind,
// on both TLS ports of a proxy serving a certificate of that kind.
func eachCertPort(t *testing.T, f func(t *testing.T, kind string, tp *testProxy, addr string)) {
	for _, kind := range certKinds {
		t.Run(kind.name, func(t *testing.T) {
			tp := startTLSProxy(t, kind.make(t))
			for port, addr := range tlsPorts(tp) {
				t.Run(port, func(t *testing.T) { f(t, kind.name, tp, addr) })
			}
		})
	}
}

// handshake dials addr with c and returns the connection state, or the
// handshake error.
func handshake(addr string, c *tls.Config) (tls.ConnectionState, error) {
	d := &tls.Dialer{NetDialer: &net.Dialer{Timeout: 10 * time.Second}, Config: c}
	conn, err := d.Dial("tcp", addr)
	if err != nil {
		return tls.ConnectionState{}, err
	}
	defer conn.Close()
	return conn.(*tls.Conn).ConnectionState(), nil
}

// wantRefused checks that the server, not the client, ended the handshake:
// the client got a TLS alert back ("remote error"), so it did send its hello.
func wantRefused(t *testing.T, err error, what string) {
	t.Helper()
	var op *net.OpError
	switch {
	case err == nil:
		t.Errorf("%s: handshake succeeded, want it refused", what)
	case !errors.As(err, &op) || op.Op != "remote error":
		t.Errorf("%s: handshake error %v, want a TLS alert from the server", what, err)
	}
}

func TestTLSVersions(t *testing.T) {
	eachCertPort(t, func(t *testing.T, kind string, tp *testProxy, addr string) {
		for _, tc := range []struct {
			name     string
			min, max uint16
			want     uint16 // 0: refused
		}{
			{"TLS1.0", tls.VersionTLS10, tls.VersionTLS10, 0},
			{"TLS1.1", tls.VersionTLS10, tls.VersionTLS11, 0},
			{"TLS1.2", tls.VersionTLS12, tls.VersionTLS12, tls.VersionTLS12},
			{"TLS1.3", tls.VersionTLS13, tls.VersionTLS13, tls.VersionTLS13},
			{"any", tls.VersionTLS10, tls.VersionTLS13, tls.VersionTLS13},
		} {
			c := tp.TLSConfig("h2")
			c.MinVersion, c.MaxVersion = tc.min, tc.max
			st, err := handshake(addr, c)
			if tc.want == 0 {
				wantRefused(t, err, tc.name)
				continue
			}
			if err != nil {
				t.Errorf("%s: %v", tc.name, err)
				continue
			}
			if got := st.Version; got != tc.want {
				t.Errorf("%s: version = %s, want %s", tc.name, tls.VersionName(got), tls.VersionName(tc.want))
			}
		}
	})
}

func TestTLS12CipherSuites(t *testing.T) {
	// Suites a TLS 1.2 client may offer. Each is offered alone: the
	// handshake succeeds only if the server accepts that very suite.
	refused := []uint16{
		// CBC (Lucky13, BEAST-class padding oracles).
		tls.TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA,
		tls.TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA,
		tls.TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256,
		tls.TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA,
		tls.TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA,
		tls.TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256,
		// Static RSA key exchange: no forward secrecy, ROBOT.
		tls.TLS_RSA_WITH_AES_128_GCM_SHA256,
		tls.TLS_RSA_WITH_AES_256_GCM_SHA384,
		tls.TLS_RSA_WITH_AES_128_CBC_SHA,
		tls.TLS_RSA_WITH_AES_256_CBC_SHA,
		tls.TLS_RSA_WITH_AES_128_CBC_SHA256,
		// 3DES (Sweet32) and RC4.
		tls.TLS_ECDHE_RSA_WITH_3DES_EDE_CBC_SHA,
		tls.TLS_RSA_WITH_3DES_EDE_CBC_SHA,
		tls.TLS_ECDHE_RSA_WITH_RC4_128_SHA,
		tls.TLS_ECDHE_ECDSA_WITH_RC4_128_SHA,
		tls.TLS_RSA_WITH_RC4_128_SHA,
	}
	accepted := map[string][]uint16{
		"ECDSA": {
			tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
			tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
			tls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
		},
		"RSA": {
			tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
			tls.TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
			tls.TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
		},
	}
	eachCertPort(t, func(t *testing.T, kind string, tp *testProxy, addr string) {
		offer := func(suite uint16) (tls.ConnectionState, error) {
			c := tp.TLSConfig("h2")
			c.MaxVersion = tls.VersionTLS12
			c.CipherSuites = []uint16{suite}
			return handshake(addr, c)
		}
		for _, suite := range refused {
			_, err := offer(suite)
			wantRefused(t, err, tls.CipherSuiteName(suite))
		}
		for _, suite := range accepted[kind] {
			st, err := offer(suite)
			if err != nil {
				t.Errorf("%s: %v", tls.CipherSuiteName(suite), err)
				continue
			}
			if got, want := tls.CipherSuiteName(st.CipherSuite), tls.CipherSuiteName(suite); got != want {
				t.Errorf("negotiated suite = %s, want %s", got, want)
			}
		}
		// A client offering everything Go knows gets a
		// forward-secret AEAD suite.
		c := tp.TLSConfig("h2")
		c.MaxVersion = tls.VersionTLS12
		for _, s := range append(tls.CipherSuites(), tls.InsecureCipherSuites()...) {
			c.CipherSuites = append(c.CipherSuites, s.ID)
		}
		st, err := handshake(addr, c)
		if err != nil {
			t.Fatalf("all suites offered: %v", err)
		}
		if name := tls.CipherSuiteName(st.CipherSuite); !strings.HasPrefix(name, "TLS_ECDHE_") ||
			!(strings.Contains(name, "_GCM_") || strings.Contains(name, "CHACHA20")) {
			t.Errorf("all suites offered: negotiated %s, want ECDHE with GCM or ChaCha20", name)
		}
	})
}

func TestALPN(t *testing.T) {
	cert, err := SelfSigned("localhost", "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	tp := startTLSProxy(t, cert)
	for _, tc := range []struct {
		port  string
		offer []string
		want  string
	}{
		{"public", []string{"h2", "http/1.1"}, "h2"},
		{"public", []string{"http/1.1", "h2"}, "h2"}, // the server's preference wins
		{"public", []string{"http/1.1"}, "http/1.1"},
		{"public", []string{"h2"}, "h2"},
		{"public", nil, ""},
		// curl --http1.0 offers http/1.0 alone; nginx agrees it. Go's
		// TLS server refuses a client that offers nothing it knows.
		{"public", []string{"http/1.0"}, "http/1.0"},
		{"grpc", []string{"h2", "http/1.1"}, "h2"},
		{"grpc", []string{"h2"}, "h2"},
		// HTTP/1.1 cannot carry gRPC. Go's TLS server lets an http/1.1
		// client of an h2-only server connect without ALPN rather than
		// refuse it (crypto/tls negotiateALPN, golang/go#46310); what
		// matters is that http/1.1 is never agreed.
		{"grpc", []string{"http/1.1"}, ""},
	} {
		name := tc.port + "/" + strings.Join(tc.offer, ",")
		t.Run(name, func(t *testing.T) {
			addr := tp.Addr().String()
			if tc.port == "grpc" {
				addr = tp.GRPCAddr().String()
			}
			for _, v := range []uint16{tls.VersionTLS12, tls.VersionTLS13} {
				c := tp.TLSConfig(tc.offer...)
				c.MinVersion, c.MaxVersion = v, v
				st, err := handshake(addr, c)
				if err != nil {
					t.Fatalf("%s: %v", tls.VersionName(v), err)
				}
				if got := st.NegotiatedProtocol; got != tc.want {
					t.Errorf("%s: ALPN = %q, want %q", tls.VersionName(v), got, tc.want)
				}
			}
		})
	}

	// A client without ALPN is served HTTP/1.1 on the public port.
	conn := tp.dialRaw(t, tp.Addr().String())
	io.WriteString(conn, "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
	b, _ := io.ReadAll(conn)
	if got, want := strings.SplitN(string(b), "\r\n", 2)[0], "HTTP/1.1 200 OK"; got != want {
		t.Errorf("public port, no ALPN: status line = %q, want %q", got, want)
	}

	// Nor is one that agreed http/1.0 refused its HTTP/1.0 request.
	conn = tp.dialRaw(t, tp.Addr().String(), "http/1.0")
	io.WriteString(conn, "GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
	b, _ = io.ReadAll(conn)
	if got, want := strings.SplitN(string(b), "\r\n", 2)[0], "HTTP/1.0 200 OK"; got != want {
		t.Errorf("public port, ALPN http/1.0: status line = %q, want %q", got, want)
	}

	// The gRPC port speaks only HTTP/2: an HTTP/1.1 request there is not
	// answered, the connection is closed.
	conn = tp.dialRaw(t, tp.GRPCAddr().String(), "http/1.1")
	io.WriteString(conn, "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
	b, err = io.ReadAll(conn)
	if len(b) != 0 || err != nil {
		t.Errorf("gRPC port, HTTP/1.1 request: read %q, %v; want the connection closed", b, err)
	}
}

func TestParseHSTS(t *testing.T) {
	for _, tc := range []struct {
		value    string
		realCert bool
		want     string
		wantErr  bool
	}{
		{"auto", true, "max-age=31536000", false},
		{"auto", false, "", false},
		{"AUTO", true, "max-age=31536000", false},
		{"off", true, "", false},
		{"off", false, "", false},
		{"max-age=63072000; includeSubDomains", true, "max-age=63072000; includeSubDomains", false},
		{"max-age=63072000; includeSubDomains; preload", false, "max-age=63072000; includeSubDomains; preload", false},
		{`includeSubDomains; max-age="600"`, true, `includeSubDomains; max-age="600"`, false},
		{"max-age=0", true, "max-age=0", false}, // RFC 6797 §6.1.1: how a site withdraws HSTS
		{"includeSubDomains", true, "", true},
		{"max-age=a year", true, "", true},
		{"max-age=-1", true, "", true},
		{"on", true, "", true},
		{"max-age=600\n", true, "max-age=600", false},
		{"max-age=600;\x7fx", true, "", true},
	} {
		got, err := parseHSTS(tc.value, tc.realCert)
		if (err != nil) != tc.wantErr {
			t.Errorf("parseHSTS(%q, %v) error = %v, want error: %v", tc.value, tc.realCert, err, tc.wantErr)
			continue
		}
		if got != tc.want {
			t.Errorf("parseHSTS(%q, %v) = %q, want %q", tc.value, tc.realCert, got, tc.want)
		}
	}
}

func TestLoadHSTS(t *testing.T) {
	for _, tc := range []struct {
		name string
		vars map[string]string
		want string
	}{
		{"unset, self-signed", map[string]string{}, ""},
		{"unset, TLS_CERT_FILE", map[string]string{"TLS_CERT_FILE": "/c.pem", "TLS_KEY_FILE": "/k.pem"}, "max-age=31536000"},
		{"off", map[string]string{"PROXY_HSTS": "off", "TLS_CERT_FILE": "/c.pem", "TLS_KEY_FILE": "/k.pem"}, ""},
		{"explicit, self-signed", map[string]string{"PROXY_HSTS": "max-age=600"}, "max-age=600"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			vars := map[string]string{"CELLS_UPSTREAM": "https://cells:8080"}
			for k, v := range tc.vars {
				vars[k] = v
			}
			setEnv(t, vars)
			c, err := Load()
			if err != nil {
				t.Fatalf("Load: %v", err)
			}
			if got := c.HSTS; got != tc.want {
				t.Errorf("HSTS = %q, want %q", got, tc.want)
			}
		})
	}
	setEnv(t, map[string]string{"CELLS_UPSTREAM": "https://cells:8080", "PROXY_HSTS": "includeSubDomains"})
	_, err := Load()
	if err == nil || !strings.Contains(err.Error(), "PROXY_HSTS") {
		t.Errorf("PROXY_HSTS=includeSubDomains: Load error = %v, want one naming PROXY_HSTS", err)
	}
}

func TestHSTS(t *testing.T) {
	const value = "max-age=63072000; includeSubDomains"
	const cells = "max-age=600"
	rec := &recorder{Respond: func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/own" {
			w.Header().Set("Strict-Transport-Security", cells)
		}
		if r.URL.Path == "/missing" {
			http.NotFound(w, r)
			return
		}
		io.WriteString(w, "ok")
	}}
	up := newUpstream(t, upTLS, rec)

	t.Run("TLS", func(t *testing.T) {
		cfg := testConfig(up)
		cfg.HSTS = value
		cfg.ServerNames = []string{"127.0.0.1"}
		cfg.GRPCAddr = "127.0.0.1:0"
		tp := startProxy(t, cfg)
		for _, tc := range []struct {
			path string
			host string
			want string
		}{
			{"/a/frontend/bootconf", "", value},
			{"/missing", "", value},       // Cells' errors too
			{"/own", "", cells},           // Cells' own value wins
			{"/", "other.example", value}, // the proxy's own 421
		} {
			for _, c := range []*http.Client{tp.H1, tp.H2} {
				req, _ := http.NewRequest("GET", tp.URL+tc.path, nil)
				if tc.host != "" {
					req.Host = tc.host
				}
				res := doDrain(t, c, req)
				if got := res.Header.Values("Strict-Transport-Security"); len(got) != 1 || got[0] != tc.want {
					t.Errorf("%s %s (status %d): Strict-Transport-Security = %q, want [%q]", res.Proto, tc.path, res.StatusCode, got, tc.want)
				}
			}
		}

		// Never on the cleartext redirect port (RFC 6797 §7.2).
		res, err := tp.H1.Get("http://" + tp.RedirectAddr().String() + "/x")
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		if got := res.Header.Get("Strict-Transport-Security"); got != "" {
			t.Errorf("redirect port: Strict-Transport-Security = %q, want none", got)
		}
	})

	t.Run("cleartext", func(t *testing.T) {
		cfg := testConfig(up)
		cfg.HSTS = value
		cfg.TLS = false
		tp := startProxy(t, cfg)
		res, err := tp.H1.Get(tp.URL + "/a/frontend/bootconf")
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		if got := res.Header.Get("Strict-Transport-Security"); got != "" {
			t.Errorf("PROXY_TLS=off: Strict-Transport-Security = %q, want none", got)
		}
	})
}

// TestSilentClientClosed: a TCP connection that never sends its
// ClientHello, or completes its handshake and then sends nothing, is closed
// after the 10 s of the README's limits table ("TLS handshake and protocol
// sniffing"), on the public port and on the dedicated gRPC port
// (PYDIO_GRPC_EXTERNAL) alike, whatever ALPN agreed, and so is a silent
// connection to the public port with PROXY_TLS=off. Found by review: the
// gRPC port has no cmux, and its handshake waited PROXY_READ_HEADER_TIMEOUT
// (30 s by default, whatever the operator sets); on the public port a
// connection that agreed h2 went to the HTTP/2 server at once, which waited
// PROXY_READ_HEADER_TIMEOUT for its preface, and one that agreed http/1.1 or
// nothing went to the HTTP/1.1 front once sniffing gave up, which waited
// that long again for a request (40 s).
func TestSilentClientClosed(t *testing.T) {
	t.Parallel()
	tp, up := startWithGRPCPort(t)
	cleartext := testConfig(up)
	cleartext.TLS = false
	plain := startProxy(t, cleartext)

	dialTCP := func(addr string) net.Conn {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	public, grpcPort := tp.Addr().String(), tp.GRPCAddr().String()
	conns := []struct {
		name string
		c    net.Conn
	}{
		// Nothing at all: not even a ClientHello.
		{"public", dialTCP(public)},
		{"grpc", dialTCP(grpcPort)},
		// A handshake, then nothing.
		{"public/after-handshake-h2", tp.dialTLS(t, public, "h2")},
		{"public/after-handshake-http1.1", tp.dialTLS(t, public, "http/1.1")},
		{"public/after-handshake-no-alpn", tp.dialTLS(t, public)},
		{"grpc/after-handshake-h2", tp.dialTLS(t, grpcPort, "h2")},
		{"public-cleartext", dialTCP(plain.Addr().String())},
	}
	// All at once: each waits out the limit, and subtests would run only
	// as many at a time as there are CPUs.
	var wg sync.WaitGroup
	for _, tc := range conns {
		tc.c.SetReadDeadline(time.Now().Add(15 * time.Second))
		wg.Go(func() {
			start := time.Now()
			var buf [512]byte
			var err error
			for {
				_, err = tc.c.Read(buf[:])
				if err != nil {
					break
				}
			}
			if errors.Is(err, os.ErrDeadlineExceeded) {
				t.Errorf("%s: a client that sent nothing still connected after %v", tc.name, time.Since(start).Round(time.Second))
				return
			}
			t.Logf("%s: the silent connection was closed after %v (%v)", tc.name, time.Since(start).Round(100*time.Millisecond), err)
		})
	}
	wg.Wait()
	// A connection that matches nothing is cmux's ErrNotMatched, which
	// must not close the listener: the ports still serve.
	for _, c := range []struct {
		name   string
		client *http.Client
		url    string
	}{
		{"public, HTTP/1.1", tp.H1, tp.URL}, {"public, HTTP/2", tp.H2, tp.URL},
		{"public-cleartext, HTTP/1.1", plain.H1, plain.URL}, {"public-cleartext, h2c", plain.H2, plain.URL},
	} {
		res, err := c.client.Get(c.url + "/a/frontend/bootconf")
		if err != nil {
			t.Errorf("%s after the silent connections: %v", c.name, err)
			continue
		}
		res.Body.Close()
		if res.StatusCode != http.StatusOK {
			t.Errorf("%s after the silent connections: %s", c.name, res.Status)
		}
	}
}

// startWithGRPCPort starts a proxy with a dedicated gRPC port in front of
// an upstream that answers 200 to everything.
func startWithGRPCPort(t *testing.T) (*testProxy, *testUpstream) {
	t.Helper()
	up := newUpstream(t, upTLS, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	cfg := testConfig(up)
	cfg.GRPCAddr = "127.0.0.1:0"
	return startProxy(t, cfg), up
}

// TestPlainHTTPToTLSPort: a plain HTTP request sent to a TLS port
// (http://host:443, or a load balancer set up without TLS to the proxy) gets
// a 400 that says what is wrong, then the connection closes, as net/http's
// TLS servers answer (Cells' among them) and nginx (its 497). Both ports run
// the handshake where net/http does not see it (a cmux matcher, h2conn's
// first read), and only closed the connection: the client saw an empty
// reply.
func TestPlainHTTPToTLSPort(t *testing.T) {
	t.Parallel()
	tp, _ := startWithGRPCPort(t)
	for _, port := range []struct{ name, addr string }{
		{"public", tp.Addr().String()}, {"grpc", tp.GRPCAddr().String()},
	} {
		for _, req := range []string{
			"GET /login HTTP/1.1\r\nHost: cells.example.com\r\n\r\n",
			"PROPFIND /dav/ HTTP/1.1\r\nHost: cells.example.com\r\nDepth: 1\r\n\r\n",
		} {
			t.Run(port.name+"/"+strings.Fields(req)[0], func(t *testing.T) {
				c, err := net.Dial("tcp", port.addr)
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				c.SetDeadline(time.Now().Add(20 * time.Second))
				if _, err := io.WriteString(c, req); err != nil {
					t.Fatal(err)
				}
				got, err := io.ReadAll(c)
				if err != nil {
					t.Fatalf("%v after %q", err, got)
				}
				if !strings.HasPrefix(string(got), "HTTP/1.0 400 Bad Request\r\n") || !strings.Contains(string(got), "Client sent an HTTP request to an HTTPS server") {
					t.Errorf("got %q, want a 400 saying the request was plain HTTP", got)
				}
			})
		}
	}
}

// TestSelfSignedNotCA: the self-signed certificate says it is not a CA.
// Firefox refuses a server certificate that says it is one
// (MOZILLA_PKIX_ERROR_CA_CERT_USED_AS_END_ENTITY), even once trusted; it
// said so. Clients that trust the certificate itself still verify it: Go's,
// and OpenSSL's (curl --cacert), checked with openssl verify.
func TestSelfSignedNotCA(t *testing.T) {
	cert, err := SelfSigned("localhost", "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	leaf := cert.Leaf
	if leaf.IsCA || !leaf.BasicConstraintsValid || leaf.KeyUsage&x509.KeyUsageCertSign != 0 {
		t.Errorf("IsCA %v, basic constraints %v, key usage %b: want a leaf that says it is not a CA",
			leaf.IsCA, leaf.BasicConstraintsValid, leaf.KeyUsage)
	}
	roots := x509.NewCertPool()
	roots.AddCert(leaf)
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, DNSName: "localhost"}); err != nil {
		t.Errorf("Go, trusting the certificate itself: %v", err)
	}
	ossl, err := exec.LookPath("openssl")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("CI must run this test: .ci/run installs openssl")
		}
		t.Skip("needs openssl")
	}
	f := filepath.Join(t.TempDir(), "cert.pem")
	if err := os.WriteFile(f, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Certificate[0]}), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(ossl, "verify", "-x509_strict", "-purpose", "sslserver", "-CAfile", f, f).CombinedOutput()
	if err != nil || !strings.Contains(string(out), ": OK") {
		t.Errorf("openssl verify, trusting the certificate itself: %v\n%s", err, out)
	}
}
