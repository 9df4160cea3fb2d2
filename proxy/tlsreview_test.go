package proxy

import (
	"crypto/tls"
	"encoding/pem"
	"log/slog"
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
