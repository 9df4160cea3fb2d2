package proxy

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestTLSReviewPairMistakes: the two mistakes an operator makes most with
// a certificate pair get an error that says what to do. A key written
// under a passphrase (openssl req -newkey without -noenc asks for one) was
// "failed to parse private key"; a chain file with the intermediate first
// was "private key does not match public key", which sends the operator
// looking for another key.
func TestTLSReviewPairMistakes(t *testing.T) {
	leaf, inter, leafKey := chainCerts(t, "test intermediate", time.Now().Add(48*time.Hour), nil)
	good := tls.Certificate{Certificate: [][]byte{leaf.Raw, inter.Raw}, PrivateKey: leafKey}
	chainPEM, keyPEM := pemPair(t, good)
	interFirst := append(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: inter.Raw}),
		pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: leaf.Raw})...)

	type pair struct{ name, cert, key, want string }
	pairs := []pair{
		{"intermediate first", string(interFirst), string(keyPEM), "certificate 2 of the file, not to the first"},
		// Still a plain mismatch: nothing in the file matches the key.
		{"another key", string(chainPEM), string(mustPEMKey(t, newCert(t))), "private key does not match"},
	}
	if _, err := exec.LookPath("openssl"); err == nil {
		dir := t.TempDir()
		keyFile := filepath.Join(dir, "plain.pem")
		os.WriteFile(keyFile, keyPEM, 0o600)
		for _, enc := range []struct{ name, cmd string }{
			{"passphrase (PKCS#8)", "openssl pkey -in plain.pem -aes256 -passout pass:secret -out enc.pem"},
			{"passphrase (traditional)", "openssl ec -in plain.pem -aes128 -passout pass:secret -out enc.pem"},
		} {
			cmd := exec.Command("sh", "-c", enc.cmd)
			cmd.Dir = dir
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Fatalf("%s: %v\n%s", enc.cmd, err, out)
			}
			b, _ := os.ReadFile(filepath.Join(dir, "enc.pem"))
			pairs = append(pairs, pair{enc.name, string(chainPEM), string(b), "protected by a passphrase"})
		}
	} else {
		t.Log("no openssl: the keys under a passphrase are not tried")
	}
	up := newUpstream(t, upTLS, &recorder{})
	for _, p := range pairs {
		t.Run(p.name, func(t *testing.T) {
			dir := t.TempDir()
			cfg := testConfig(up)
			cfg.CertFile, cfg.KeyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
			os.WriteFile(cfg.CertFile, []byte(p.cert), 0o600)
			os.WriteFile(cfg.KeyFile, []byte(p.key), 0o600)
			_, err := New(cfg, slog.New(slog.DiscardHandler))
			if err == nil || !strings.Contains(err.Error(), p.want) || !strings.Contains(err.Error(), "TLS_KEY_FILE") {
				t.Errorf("New: error %v, want one naming TLS_KEY_FILE and saying %q", err, p.want)
			}
		})
	}
	// The leaf first is served, chain and all.
	dir := t.TempDir()
	cfg := testConfig(up)
	cfg.CertFile, cfg.KeyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	os.WriteFile(cfg.CertFile, chainPEM, 0o600)
	os.WriteFile(cfg.KeyFile, keyPEM, 0o600)
	tp := startProxy(t, cfg)
	conn, err := tls.Dial("tcp", tp.Addr().String(), &tls.Config{InsecureSkipVerify: true})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if got, want := len(conn.ConnectionState().PeerCertificates), 2; got != want {
		t.Errorf("%d certificates served, want %d (leaf and intermediate)", got, want)
	}
}

// mustPEMKey is cert's private key in PEM.
func mustPEMKey(t *testing.T, cert tls.Certificate) []byte {
	_, k := pemPair(t, cert)
	return k
}

// TestTLSReviewSNIForms: the forms a name takes in a ClientHello (OpenSSL
// sends the case as given; curl strips a trailing dot from the URL's host)
// are each served the certificate without the log saying clients ask
// for a name it lacks; no SNI at all neither. A name it lacks is logged.
func TestTLSReviewSNIForms(t *testing.T) {
	if _, err := exec.LookPath("openssl"); err != nil {
		t.Skip("needs openssl (s_client sends the name as given)")
	}
	cert, err := SelfSigned("cells.example.com")
	if err != nil {
		t.Fatal(err)
	}
	tp := startTLSProxy(t, cert)
	const warning = "clients ask for a name that TLS_CERT_FILE's certificate does not cover"
	sClient := func(t *testing.T, args ...string) {
		t.Helper()
		args = append([]string{"s_client", "-connect", tp.Addr().String(), "-brief", "-alpn", "h2,http/1.1"}, args...)
		cmd := exec.Command("openssl", args...)
		cmd.Stdin = strings.NewReader("")
		out, err := cmd.CombinedOutput()
		if err != nil || !strings.Contains(string(out), "CONNECTION ESTABLISHED") {
			t.Fatalf("openssl %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	for _, name := range []string{"CELLS.Example.COM", "cells.example.com"} {
		sClient(t, "-servername", name)
	}
	sClient(t, "-noservername")
	// crypto/tls refuses an SNI with a trailing dot (decode_error, RFC
	// 6066 §3 forbids it), which s_client sends as given; curl strips it.
	if _, err := exec.LookPath("curl"); err == nil {
		_, port, _ := net.SplitHostPort(tp.Addr().String())
		url := "https://cells.example.com.:" + port + "/"
		out, err := exec.Command("curl", "-sS", "-k", "-m", "10", "-o", "/dev/null", "-w", "%{http_code}",
			"--resolve", "cells.example.com.:"+port+":127.0.0.1", url).CombinedOutput()
		if err != nil || string(out) != "200" {
			t.Errorf("curl %s: %v, %s; want 200", url, err, out)
		}
	}
	if strings.Contains(tp.Log.String(), warning) {
		t.Errorf("a name the certificate covers was logged as not covered:\n%s", tp.Log)
	}
	sClient(t, "-servername", "files.example.org")
	if !strings.Contains(tp.Log.String(), "server_name=files.example.org") {
		t.Errorf("a name the certificate lacks was not logged:\n%s", tp.Log)
	}
}

// TestTLSReviewTLSToCleartextPorts: an operator's curl https:// sent to
// the redirect port, or to the public port with PROXY_TLS=off, fails at
// once with OpenSSL's "wrong version number" (the port answered 400 in
// clear, or closed), not at a timeout.
func TestTLSReviewTLSToCleartextPorts(t *testing.T) {
	if _, err := exec.LookPath("curl"); err != nil {
		t.Skip("needs curl")
	}
	cfg := testConfig(newUpstream(t, upTLS, &recorder{}))
	cfg.TLS = false
	plain := startProxy(t, cfg)
	for name, addr := range map[string]string{"public, PROXY_TLS=off": plain.Addr().String(), "redirect": plain.RedirectAddr().String()} {
		start := time.Now()
		out, err := exec.Command("curl", "-sS", "-k", "-m", "20", "https://"+addr+"/").CombinedOutput()
		if err == nil || strings.Contains(string(out), "timed out") {
			t.Errorf("%s: curl https:// %v after %v: %s; want a TLS error at once", name, err, time.Since(start).Round(time.Millisecond), out)
		}
		t.Logf("%s: %s", name, strings.TrimSpace(string(out)))
	}
}

// TestTLSReviewLargeClientHello: a ClientHello over one record (16 KiB:
// post-quantum key shares, a long ALPN list), sent one byte at a time,
// agrees h2 and serves a request on the public port.
func TestTLSReviewLargeClientHello(t *testing.T) {
	tp, _ := startWithGRPCPort(t)
	alpn := []string{}
	for i := range 120 {
		alpn = append(alpn, fmt.Sprintf("x-%03d-%s", i, strings.Repeat("p", 200)))
	}
	alpn = append(alpn, "h2")
	for _, addr := range []string{tp.Addr().String(), tp.GRPCAddr().String()} {
		nc, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer nc.Close()
		nc.SetDeadline(time.Now().Add(20 * time.Second))
		rec := &trickleConn{Conn: nc}
		c := tls.Client(rec, tp.TLSConfig(alpn...))
		if err := c.Handshake(); err != nil {
			t.Fatalf("%s: handshake: %v", addr, err)
		}
		if got := c.ConnectionState().NegotiatedProtocol; got != "h2" {
			t.Errorf("%s: ALPN %q, want h2", addr, got)
		}
		if rec.first < 16<<10 {
			t.Errorf("ClientHello of %d bytes, want one over a record", rec.first)
		}
	}
}

// trickleConn writes one byte at a time and counts the first write.
type trickleConn struct {
	net.Conn
	first int
}

func (c *trickleConn) Write(p []byte) (int, error) {
	if c.first == 0 {
		c.first = len(p)
	}
	for i := range p {
		if _, err := c.Conn.Write(p[i : i+1]); err != nil {
			return i, err
		}
	}
	return len(p), nil
}

// TestTLSReviewUpstreamCerts: towards Cells, a CELLS_UPSTREAM_CA_FILE
// bundle whose root for Cells is not its first certificate verifies
// Cells; Cells restarting on the same port with a new certificate from
// that root (its sessions and tickets forgotten, the proxy's pooled
// connections dead) is served at the first request; restarting with one
// from a root outside the bundle is a 502 whose log line names
// CELLS_UPSTREAM_CA_FILE; and a CELLS_UPSTREAM_SERVER_NAME that the
// certificate lacks is a 502 whose log names that variable.
func TestTLSReviewUpstreamCerts(t *testing.T) {
	newRoot := func(cn string) (*x509.Certificate, *ecdsa.PrivateKey) {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: cn},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true,
			BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
		return signCert(t, tmpl, tmpl, &k.PublicKey, k), k
	}
	leafOf := func(root *x509.Certificate, rootKey *ecdsa.PrivateKey) tls.Certificate {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		leaf := signCert(t, &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: "cells"},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), DNSNames: []string{"localhost", "cells"},
			IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}},
			root, &k.PublicKey, rootKey)
		return tls.Certificate{Certificate: [][]byte{leaf.Raw}, PrivateKey: k, Leaf: leaf}
	}
	cellsRoot, cellsKey := newRoot("cells root")
	otherRoot, otherKey := newRoot("another root")
	var bundle []byte
	for _, c := range []*x509.Certificate{otherRoot, cellsRoot} {
		bundle = append(bundle, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	caFile := filepath.Join(t.TempDir(), "bundle.pem")
	if err := os.WriteFile(caFile, bundle, 0o600); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	// cells serves cert on addr until the next call or the test's end.
	var srv *http.Server
	cells := func(cert tls.Certificate) {
		if srv != nil {
			srv.Close()
		}
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		srv = &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}),
			ErrorLog: slog.NewLogLogger(slog.DiscardHandler, slog.LevelError)}
		go srv.Serve(tls.NewListener(ln, &tls.Config{Certificates: []tls.Certificate{cert}}))
	}
	cells(leafOf(cellsRoot, cellsKey))
	t.Cleanup(func() { srv.Close() })

	start := func(serverName string) *testProxy {
		cfg := testConfig(nil)
		cfg.Upstream = &url.URL{Scheme: "https", Host: addr}
		cfg.UpstreamCAFile, cfg.UpstreamServerName = caFile, serverName
		return startProxy(t, cfg)
	}
	get := func(tp *testProxy, want int, when string) {
		t.Helper()
		for _, c := range []*http.Client{tp.H1, tp.H2} {
			res, err := c.Get(tp.URL + "/a/frontend/bootconf")
			if err != nil {
				t.Fatalf("%s: %v", when, err)
			}
			res.Body.Close()
			if res.StatusCode != want {
				t.Errorf("%s: %s, want %d", when, res.Status, want)
			}
		}
	}
	tp := start("")
	get(tp, http.StatusOK, "Cells' root second in the bundle")
	cells(leafOf(cellsRoot, cellsKey))
	get(tp, http.StatusOK, "Cells restarted with a new certificate from its root")
	cells(leafOf(otherRoot, otherKey))
	get(tp, http.StatusOK, "Cells restarted with a certificate from the bundle's other root")
	untrusted, untrustedKey := newRoot("untrusted root")
	cells(leafOf(untrusted, untrustedKey))
	get(tp, http.StatusBadGateway, "Cells restarted with a certificate from outside the bundle")
	if !strings.Contains(tp.Log.String(), "set CELLS_UPSTREAM_CA_FILE") {
		t.Errorf("no log line names CELLS_UPSTREAM_CA_FILE:\n%s", tp.Log)
	}

	cells(leafOf(cellsRoot, cellsKey))
	named := start("files.example.com")
	get(named, http.StatusBadGateway, "CELLS_UPSTREAM_SERVER_NAME the certificate lacks")
	if log := named.Log.String(); !strings.Contains(log, "CELLS_UPSTREAM_SERVER_NAME") || !strings.Contains(log, "files.example.com") {
		t.Errorf("no log line names CELLS_UPSTREAM_SERVER_NAME and the name:\n%s", log)
	}
	get(start("CELLS"), http.StatusOK, "CELLS_UPSTREAM_SERVER_NAME in capitals")
}
