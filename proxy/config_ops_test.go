package proxy

import (
	"io"
	"net/http"
	"net/netip"
	"strings"
	"testing"

	"github.com/cells-proxy/cells-proxy/internal/testport"
)

// loadFor sets the environment for an upstream under test, every listener
// on loopback, and loads it.
func loadFor(t *testing.T, up *testUpstream, extra map[string]string) (*Config, error) {
	t.Helper()
	vars := map[string]string{
		"CELLS_UPSTREAM":    up.URL.String(),
		"PROXY_HTTPS_ADDR":  "127.0.0.1:0",
		"PROXY_HTTP_ADDR":   "off",
		"PROXY_HEALTH_ADDR": testport.Reserve(t),
		"PROXY_ACCESS_LOG":  "false",
	}
	if up.CAFile != "" {
		vars["CELLS_UPSTREAM_CA_FILE"] = up.CAFile
	}
	for k, v := range extra {
		vars[k] = v
	}
	setEnv(t, vars)
	return Load()
}

// TestServerNamesUnicode: an operator whose Cells lives at an IDN
// writes it as typed. Browsers send the A-label (xn--...) in Host, so every
// request must not end in 421: either the name is converted, or refused at
// start with a line naming the variable.
func TestServerNamesUnicode(t *testing.T) {
	up := newUpstream(t, upPlain, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	cfg, err := loadFor(t, up, map[string]string{"PROXY_SERVER_NAMES": "café.example"})
	if err != nil {
		if !strings.Contains(err.Error(), "PROXY_SERVER_NAMES") {
			t.Fatalf("error does not name PROXY_SERVER_NAMES: %v", err)
		}
		return // refused at start: fine
	}
	tp := startProxy(t, cfg)
	req, _ := http.NewRequest("GET", tp.URL+"/", nil)
	req.Host = "xn--caf-dma.example" // what a browser sends for café.example
	res, err := tp.H1.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode == http.StatusMisdirectedRequest {
		t.Errorf("PROXY_SERVER_NAMES=café.example accepted at start (ServerNames %q), yet a browser's Host %q gets %d",
			cfg.ServerNames, req.Host, res.StatusCode)
	}
}

// TestUpstreamServerNameWithPort: CELLS_UPSTREAM_SERVER_NAME is a
// name verified in Cells' certificate; a value with a port or a scheme can
// never verify, so every request fails with 502. It must be refused at start.
func TestUpstreamServerNameWithPort(t *testing.T) {
	up := newUpstream(t, upTLS, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	for _, v := range []string{"localhost:" + up.URL.Port(), "https://localhost"} {
		cfg, err := loadFor(t, up, map[string]string{"CELLS_UPSTREAM_SERVER_NAME": v})
		if err != nil {
			if !strings.Contains(err.Error(), "CELLS_UPSTREAM_SERVER_NAME") {
				t.Errorf("%q: error does not name the variable: %v", v, err)
			}
			continue
		}
		tp := startProxy(t, cfg)
		res, err := tp.H1.Get(tp.URL + "/")
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		t.Errorf("CELLS_UPSTREAM_SERVER_NAME=%q accepted at start; every request then gets %d", v, res.StatusCode)
	}
}

// TestTrustedProxyMapped: a trusted proxy written in its IPv4-mapped
// form (as dual-stack tools print it: ::ffff:172.18.0.2) is trusted (peers
// are compared unmapped, so it used to be accepted and never trusted).
func TestTrustedProxyMapped(t *testing.T) {
	up := newUpstream(t, upPlain, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	for _, v := range []string{"::ffff:127.0.0.1", "::ffff:127.0.0.0/104"} {
		cfg, err := loadFor(t, up, map[string]string{"PROXY_TRUSTED_PROXIES": v})
		if err != nil {
			continue // refused with a message: fine
		}
		f := &forwarder{cfg: cfg}
		if peer := netip.MustParseAddr("127.0.0.1"); !f.trusted(peer) {
			t.Errorf("PROXY_TRUSTED_PROXIES=%s accepted (%v), but peer %v is not trusted", v, cfg.TrustedProxies, peer)
		}
	}
}

// TestUpstreamServerNameBracketedIPv6: CELLS_UPSTREAM_SERVER_NAME=[::1]
// verifies (crypto/x509's VerifyHostname takes an IP in brackets) and is
// accepted (found by review: 76f3b2d had refused it at start).
func TestUpstreamServerNameBracketedIPv6(t *testing.T) {
	up := namedUpstream(t, "::1")
	cfg, err := loadFor(t, up, map[string]string{"CELLS_UPSTREAM_SERVER_NAME": "[::1]"})
	if err != nil {
		t.Fatalf("CELLS_UPSTREAM_SERVER_NAME=[::1] refused at start: %v", err)
	}
	tp := startProxy(t, cfg)
	for _, pc := range h1h2Clients(tp) {
		res, err := pc.c.Get(tp.URL + "/")
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(res.Body)
		res.Body.Close()
		if res.StatusCode != http.StatusOK {
			t.Errorf("%s: %d %s", pc.name, res.StatusCode, b)
		}
	}
}

// TestServerNamesIPv6: an operator who reaches Cells by an IPv6 address
// lists it in PROXY_SERVER_NAMES, with or without brackets (it used to be
// refused at start as a name "with port"). Exactly that address then
// passes, with or without a port and however it is written, over HTTP/1.1,
// HTTP/2 (:authority) and on the redirect port; another address does not.
// The self-signed certificate carries it as an IP address, and the
// readiness probe sends Cells a Host with brackets.
func TestServerNamesIPv6(t *testing.T) {
	rec := &recorder{}
	up := newUpstream(t, upTLS, rec)
	cfg, err := loadFor(t, up, map[string]string{
		"PROXY_SERVER_NAMES": "[2001:DB8::1], ::1, cells.example.com",
		"PROXY_HTTP_ADDR":    "127.0.0.1:0",
	})
	if err != nil {
		t.Fatalf("PROXY_SERVER_NAMES with IPv6 literals refused at start: %v", err)
	}
	tp := startProxy(t, cfg)
	for _, tc := range []struct {
		host string
		ok   bool
	}{
		{"[::1]", true},
		{"[::1]:8443", true},
		{"[2001:db8::1]", true},
		{"[2001:db8::1]:8443", true},
		{"[2001:DB8:0::1]:443", true},
		{"cells.example.com", true},
		{"[2001:db8::2]", false},
		{"[2001:db8::2]:8443", false},
		{"[::2]", false},
	} {
		t.Run(tc.host, func(t *testing.T) {
			wantHTTPS, wantPlain, wantLoc := http.StatusOK, http.StatusMovedPermanently, "https://"+bracketIPv6(hostOnly(tc.host))+"/x"
			if !tc.ok {
				wantHTTPS, wantPlain, wantLoc = http.StatusMisdirectedRequest, http.StatusNotFound, ""
			}
			res, _ := rawH1(t, tp, "GET /x HTTP/1.1\r\nHost: "+tc.host+"\r\nConnection: close\r\n\r\n")
			if got := res.StatusCode; got != wantHTTPS {
				t.Errorf("h1 status = %d, want %d", got, wantHTTPS)
			}
			if got := rawH2(t, tp, h2Fields("GET", tc.host, "/x"), nil).Status; got != wantHTTPS {
				t.Errorf("h2 status = %d, want %d", got, wantHTTPS)
			}
			res = rawPlain(t, tp, "GET /x HTTP/1.1\r\nHost: "+tc.host+"\r\n\r\n")
			if got := res.StatusCode; got != wantPlain {
				t.Errorf("redirect port status = %d, want %d", got, wantPlain)
			}
			if got := res.Header.Get("Location"); got != wantLoc {
				t.Errorf("redirect port Location = %q, want %q", got, wantLoc)
			}
		})
	}

	leaf := tp.dialTLS(t, tp.Addr().String()).ConnectionState().PeerCertificates[0]
	for _, n := range []string{"2001:db8::1", "::1"} {
		if err := leaf.VerifyHostname(n); err != nil {
			t.Errorf("self-signed certificate (IPs %v, DNS names %q) does not cover %s: %v", leaf.IPAddresses, leaf.DNSNames, n, err)
		}
	}
	for _, n := range leaf.DNSNames {
		if strings.ContainsAny(n, ":[]") {
			t.Errorf("self-signed certificate has DNS name %q: an IP address belongs in an IP SAN", n)
		}
	}

	if got, want := readyz(t, tp), http.StatusOK; got != want {
		t.Fatalf("/readyz = %d, want %d", got, want)
	}
	probed := false
	for _, r := range rec.all() {
		if r.Header.Get("User-Agent") == "cells-proxy-healthcheck" {
			probed = true
			if got, want := r.Host, "[2001:db8::1]"; got != want {
				t.Errorf("readiness probe Host at Cells = %q, want %q", got, want)
			}
		}
	}
	if !probed {
		t.Error("no readiness probe reached Cells")
	}
}

// TestTrustedProxiesHostBits: a CIDR with host bits set (10.0.0.1/8) is
// taken as its network, as netip masks it; nginx warns of it ("low address
// bits of 10.0.0.1/8 are meaningless"), and so must cells-proxy, once per
// such entry, naming the variable, the value and what it is taken as: the
// operator may have meant the address alone. ::ffff:10.0.0.0/8, 10.0.0.0/8
// written mapped with IPv4's bits, trusts ::/8 (::1 among them) and no IPv4
// peer at all. A CIDR without host bits, or an address, is not warned of.
func TestTrustedProxiesHostBits(t *testing.T) {
	up := newUpstream(t, upPlain, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	cfg, err := loadFor(t, up, map[string]string{
		"PROXY_TRUSTED_PROXIES": "10.0.0.1/8, 192.168.1.0/24, 2001:db8::1/32, 172.16.5.4, ::ffff:10.0.0.0/104, ::ffff:10.0.0.1/104, ::ffff:10.0.0.0/8",
	})
	if err != nil {
		t.Fatal(err)
	}
	sink := newLogSink()
	startLoggedProxy(t, cfg, sink, "json")
	want := map[string]string{
		"10.0.0.1/8":          "10.0.0.0/8",
		"2001:db8::1/32":      "2001:db8::/32",
		"::ffff:10.0.0.1/104": "10.0.0.0/8",
		"::ffff:10.0.0.0/8":   "::/8",
	}
	got := map[string]int{}
	for _, f := range linesNaming(t, sink, "PROXY_TRUSTED_PROXIES") {
		l := f["line"]
		v := f["value"]
		got[v]++
		if f["level"] != "WARN" {
			t.Errorf("%s: %q is not a warning", v, l)
		}
		if taken, ok := want[v]; !ok {
			t.Errorf("PROXY_TRUSTED_PROXIES entry %s warned of: %q", v, l)
		} else if f["taken_as"] != taken {
			t.Errorf("PROXY_TRUSTED_PROXIES entry %s: taken_as %q, want %q: %q", v, f["taken_as"], taken, l)
		}
	}
	for v := range want {
		if got[v] != 1 {
			t.Errorf("PROXY_TRUSTED_PROXIES entry %s: %d warnings, want 1; log:\n%s", v, got[v], sink.String())
		}
	}
}

// TestServerNamesExactHost: PROXY_SERVER_NAMES lets through a listed name
// or address as a client writes it in Host, and nothing else: brackets
// around a name, unmatched brackets, or an IPv6 address without brackets
// (no valid Host, RFC 3986 section 3.2.2) used to pass as the name inside
// and reach Cells, which builds its links from Host.
func TestServerNamesExactHost(t *testing.T) {
	rec := &recorder{}
	up := newUpstream(t, upTLS, rec)
	cfg, err := loadFor(t, up, map[string]string{
		"PROXY_SERVER_NAMES": "cells.example.com, ::1, 192.0.2.7",
		"PROXY_HTTP_ADDR":    "127.0.0.1:0",
	})
	if err != nil {
		t.Fatal(err)
	}
	tp := startProxy(t, cfg)
	for _, host := range []string{
		"[cells.example.com]", "[cells.example.com]:443", "[cells.example.com", "cells.example.com]",
		"[192.0.2.7]", "[192.0.2.7]:443", "[::1", "::1]", "::1", "[::1]]", "[::1]x", "[::1]:443]",
	} {
		t.Run(host, func(t *testing.T) {
			res, _ := rawH1(t, tp, "GET /x HTTP/1.1\r\nHost: "+host+"\r\nConnection: close\r\n\r\n")
			if got := res.StatusCode; got != http.StatusMisdirectedRequest && got != http.StatusBadRequest {
				t.Errorf("h1 status = %d, want %d (or 400)", got, http.StatusMisdirectedRequest)
			}
			if got := rawH2(t, tp, h2Fields("GET", host, "/x"), nil).Status; got != http.StatusMisdirectedRequest && got != http.StatusBadRequest {
				t.Errorf("h2 status = %d, want %d (or 400)", got, http.StatusMisdirectedRequest)
			}
			res = rawPlain(t, tp, "GET /x HTTP/1.1\r\nHost: "+host+"\r\n\r\n")
			if got := res.StatusCode; got != http.StatusNotFound && got != http.StatusBadRequest {
				t.Errorf("redirect port status = %d, want %d (or 400); Location %q", got, http.StatusNotFound, res.Header.Get("Location"))
			}
		})
	}
	for _, r := range rec.all() {
		t.Errorf("Cells saw a request with Host %q", r.Host)
	}
}

// TestNoEffectWarnings: a variable set to a value that the rest of the
// configuration leaves without effect is warned of at start, naming it and
// what turns it off, with no taken_as: PROXY_HSTS with PROXY_TLS=off (HSTS
// goes over HTTPS only), PROXY_REDIRECT_HTTPS_PORT with PROXY_HTTP_ADDR=off
// (no redirects), CELLS_UPSTREAM_CA_FILE and CELLS_UPSTREAM_SERVER_NAME with
// no TLS to Cells. Where they apply, or are empty or off, nothing is said.
func TestNoEffectWarnings(t *testing.T) {
	up := newUpstream(t, upPlain, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	for _, tc := range []struct {
		env  map[string]string
		want []string // variables warned of
	}{
		{map[string]string{"PROXY_TLS": "off", "PROXY_HSTS": "max-age=63072000", "PROXY_REDIRECT_HTTPS_PORT": "8443"},
			[]string{"PROXY_HSTS", "PROXY_REDIRECT_HTTPS_PORT"}},
		{map[string]string{"PROXY_TLS": "off", "PROXY_HSTS": "off"}, nil},
		{map[string]string{"PROXY_TLS": "off", "PROXY_HSTS": "auto"}, nil}, // auto: none without a certificate file
		{map[string]string{"PROXY_HSTS": "max-age=63072000", "PROXY_HTTP_ADDR": "127.0.0.1:0", "PROXY_REDIRECT_HTTPS_PORT": "8443"}, nil},
		{map[string]string{"PROXY_REDIRECT_HTTPS_PORT": "443"}, []string{"PROXY_REDIRECT_HTTPS_PORT"}}, // the default, written: still nothing
		// Cells in clear (topology B, as upPlain), gRPC with it: no TLS to
		// Cells to verify. compose.example.yml says to drop the CA file
		// when switching; one left in place was used by nothing, unsaid.
		{map[string]string{"CELLS_UPSTREAM_CA_FILE": "/cells/certs/rootCA.pem", "CELLS_UPSTREAM_SERVER_NAME": "localhost"},
			[]string{"CELLS_UPSTREAM_CA_FILE", "CELLS_UPSTREAM_SERVER_NAME"}},
		{map[string]string{"CELLS_UPSTREAM_CA_FILE": "/cells/certs/rootCA.pem", "PYDIO_GRPC_EXTERNAL": "33060"},
			[]string{"CELLS_UPSTREAM_CA_FILE"}},
		{map[string]string{"CELLS_UPSTREAM_CA_FILE": "/cells/certs/rootCA.pem", "CELLS_GRPC_UPSTREAM": "https://cells:8443"}, nil},
	} {
		cfg, err := loadFor(t, up, tc.env)
		if err != nil {
			t.Fatalf("%v: %v", tc.env, err)
		}
		var got []string
		for _, w := range cfg.Warnings {
			got = append(got, w.Variable)
			if !strings.Contains(w.Msg, "does nothing") || w.TakenAs != "" {
				t.Errorf("%v: warning %+v, want one saying it does nothing, without taken_as", tc.env, w)
			}
		}
		if strings.Join(got, " ") != strings.Join(tc.want, " ") {
			t.Errorf("%v: warnings for %q, want %q", tc.env, got, tc.want)
		}
	}

	// In the log: one line each, naming the variable and its value.
	cfg, err := loadFor(t, up, map[string]string{"PROXY_REDIRECT_HTTPS_PORT": "8443"})
	if err != nil {
		t.Fatal(err)
	}
	sink := newLogSink()
	startLoggedProxy(t, cfg, sink, "json")
	lines := linesNaming(t, sink, "PROXY_REDIRECT_HTTPS_PORT")
	for _, f := range lines {
		if _, ok := f["taken_as"]; ok || f["level"] != "WARN" || f["value"] != "8443" || !strings.Contains(f["msg"], "PROXY_HTTP_ADDR=off") {
			t.Errorf("log line %q: want a warning naming PROXY_HTTP_ADDR=off, value 8443, no taken_as", f["line"])
		}
	}
	if n := len(lines); n != 1 {
		t.Errorf("%d log lines about PROXY_REDIRECT_HTTPS_PORT, want 1; log:\n%s", n, sink.String())
	}
}

// TestGRPCExternalWarning: with Cells in clear (topology B) its discovery
// sends Cells Sync to the public host on Cells' gRPC port, with TLS. An h2c
// CELLS_GRPC_UPSTREAM without that port served here left Sync unable to
// connect and nothing saying why: the start now warns, naming the variable
// to set and the port. Not when the port is set (under either name), when
// gRPC goes over TLS to Cells' main port, when the public port is that port,
// or with PROXY_TLS=off, where the front before cells-proxy serves it. With
// the port set to another number than Cells' the same trap awaits (unless the
// host publishes Cells' port to this one): a warning names the port to set.
func TestGRPCExternalWarning(t *testing.T) {
	up := newUpstream(t, upPlain, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	for _, tc := range []struct {
		name string
		env  map[string]string
		fix  string // "": no warning
	}{
		{"h2c", map[string]string{"CELLS_GRPC_UPSTREAM": "h2c://cells:33060"}, "PYDIO_GRPC_EXTERNAL=33060"},
		{"h2c other port", map[string]string{"CELLS_GRPC_UPSTREAM": "h2c://127.0.0.1:9443"}, "PYDIO_GRPC_EXTERNAL=9443"},
		{"PYDIO_GRPC_EXTERNAL", map[string]string{"CELLS_GRPC_UPSTREAM": "h2c://cells:33060", "PYDIO_GRPC_EXTERNAL": "33060"}, ""},
		{"CELLS_GRPC_EXTERNAL", map[string]string{"CELLS_GRPC_UPSTREAM": "h2c://cells:33060", "CELLS_GRPC_EXTERNAL": "33060"}, ""},
		{"default from PYDIO_GRPC_EXTERNAL", map[string]string{"PYDIO_GRPC_EXTERNAL": "33060"}, ""},
		{"https", map[string]string{"CELLS_GRPC_UPSTREAM": "https://cells:8080"}, ""},
		{"public port is Cells' gRPC port", map[string]string{"CELLS_GRPC_UPSTREAM": "h2c://cells:8443", "PROXY_HTTPS_ADDR": "127.0.0.1:8443"}, ""},
		{"PROXY_TLS=off", map[string]string{"CELLS_GRPC_UPSTREAM": "h2c://cells:33060", "PROXY_TLS": "off"}, ""},
		{"PROXY_TLS=off, other ports", map[string]string{"CELLS_GRPC_UPSTREAM": "h2c://cells:33061", "PYDIO_GRPC_EXTERNAL": "33060", "PROXY_TLS": "off"}, ""},
		{"https, other port", map[string]string{"CELLS_GRPC_UPSTREAM": "https://cells:8080", "PYDIO_GRPC_EXTERNAL": "33060"}, ""},
		{"same port written otherwise", map[string]string{"CELLS_GRPC_UPSTREAM": "h2c://cells:33060", "PYDIO_GRPC_EXTERNAL": "033060"}, ""},
		// The port set, but not Cells' (which its discovery advertises).
		{"PYDIO_GRPC_EXTERNAL not Cells' port", map[string]string{"CELLS_GRPC_UPSTREAM": "h2c://cells:33061", "PYDIO_GRPC_EXTERNAL": "33060"}, "PYDIO_GRPC_EXTERNAL=33061"},
		{"CELLS_GRPC_EXTERNAL not Cells' port", map[string]string{"CELLS_GRPC_UPSTREAM": "h2c://cells:33061", "CELLS_GRPC_EXTERNAL": "33060"}, "CELLS_GRPC_EXTERNAL=33061"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, err := loadFor(t, up, tc.env)
			if err != nil {
				t.Fatal(err)
			}
			var got []Warning
			for _, w := range cfg.Warnings {
				if w.Variable == "CELLS_GRPC_UPSTREAM" || strings.HasSuffix(w.Variable, "_GRPC_EXTERNAL") {
					got = append(got, w)
				}
			}
			switch {
			case tc.fix == "" && len(got) > 0:
				t.Errorf("warnings %+v, want none", got)
			case tc.fix == "":
			case len(got) != 1:
				t.Errorf("warnings %+v, want one about CELLS_GRPC_UPSTREAM", got)
			default:
				w := got[0]
				variable, _, _ := strings.Cut(tc.fix, "=")
				if variable == "PYDIO_GRPC_EXTERNAL" && tc.env[variable] == "" {
					variable = "CELLS_GRPC_UPSTREAM" // the port not set: the upstream is what warns
				}
				if w.Fix != tc.fix || w.Variable != variable || w.Value != tc.env[variable] || w.TakenAs != "" {
					t.Errorf("warning %+v, want variable %s, fix %s, value %s, no taken_as", w, variable, tc.fix, tc.env[variable])
				}
				if !strings.Contains(w.Msg, "CELLS_GRPC_UPSTREAM") || !strings.Contains(w.Msg, "Cells Sync") {
					t.Errorf("warning message %q does not name CELLS_GRPC_UPSTREAM and Cells Sync", w.Msg)
				}
			}
		})
	}

	// In the log at start: one warning line, with the value and the fix.
	cfg, err := loadFor(t, up, map[string]string{"CELLS_GRPC_UPSTREAM": "h2c://127.0.0.1:33060"})
	if err != nil {
		t.Fatal(err)
	}
	sink := newLogSink()
	startLoggedProxy(t, cfg, sink, "json")
	lines := linesNaming(t, sink, "CELLS_GRPC_UPSTREAM")
	for _, f := range lines {
		if f["level"] != "WARN" || f["value"] != "h2c://127.0.0.1:33060" || f["fix"] != "PYDIO_GRPC_EXTERNAL=33060" {
			t.Errorf("log line %q: want a warning with value h2c://127.0.0.1:33060 and fix PYDIO_GRPC_EXTERNAL=33060", f["line"])
		}
	}
	if n := len(lines); n != 1 {
		t.Errorf("%d log lines about CELLS_GRPC_UPSTREAM, want 1; log:\n%s", n, sink.String())
	}
}

// linesNaming returns the JSON log lines in sink whose "variable" is name,
// parsed, each with its text under "line" for messages.
func linesNaming(t *testing.T, sink *logSink, name string) []map[string]string {
	t.Helper()
	var out []map[string]string
	for _, l := range strings.Split(sink.String(), "\n") {
		if f := parseLogLine(t, l); f["variable"] == name {
			f["line"] = l
			out = append(out, f)
		}
	}
	return out
}

// TestUnbracketedIPv6: an IPv6 address written without brackets, or a port
// written twice (h2c://cells:33060:33060, Docker's ports syntax), leaves
// more than one ':' beside the host. An h2c CELLS_GRPC_UPSTREAM took it,
// the host being all before the last ':', and every gRPC call then failed
// with UNAVAILABLE and "lookup cells:33060: no such host"; the https URLs
// and the listeners were refused with a line that did not say what to
// write instead. Each is now refused with a line saying it.
func TestUnbracketedIPv6(t *testing.T) {
	for _, tc := range []struct{ name, value string }{
		{"CELLS_UPSTREAM", "https://::1:8080"},
		{"CELLS_UPSTREAM", "http://2001:db8::1:8080"},
		{"CELLS_UPSTREAM", "https://cells:8080:8080"},
		{"CELLS_GRPC_UPSTREAM", "h2c://cells:33060:33060"},
		{"CELLS_GRPC_UPSTREAM", "h2c://cells::33060"},
		{"CELLS_GRPC_UPSTREAM", "h2c://2001:db8::1:33060"},
		{"CELLS_GRPC_UPSTREAM", "https://::1:8443"},
		{"PROXY_HTTPS_ADDR", "::1:8443"},
		{"PROXY_HTTP_ADDR", "::"},
		{"PROXY_HEALTH_ADDR", "::1:8099"},
	} {
		setEnv(t, map[string]string{"CELLS_UPSTREAM": "http://cells:8080", tc.name: tc.value})
		_, err := Load()
		if err == nil || !strings.HasPrefix(err.Error(), tc.name) || !strings.Contains(err.Error(), "in brackets") {
			t.Errorf("%s=%s: err = %v, want one line saying to write an IPv6 address in brackets", tc.name, tc.value, err)
		}
	}
	for name, value := range map[string]string{
		"CELLS_UPSTREAM":      "https://[2001:db8::1]:8080",
		"CELLS_GRPC_UPSTREAM": "h2c://[2001:db8::1]:33060",
		"PROXY_HTTPS_ADDR":    "[::1]:8443",
	} {
		setEnv(t, map[string]string{"CELLS_UPSTREAM": "http://cells:8080", name: value})
		if _, err := Load(); err != nil {
			t.Errorf("%s=%s: %v", name, value, err)
		}
	}
}

// TestTrustedProxyBracketed: an IPv6 address is written in brackets in
// URLs and Host headers, and PROXY_SERVER_NAMES takes it so; an operator
// who copies [::1] or [fd00::]/8 from there into PROXY_TRUSTED_PROXIES got
// "takes CIDRs or addresses" and no word about the brackets. Each form is
// taken as the bare one; brackets around an IPv4 address, which no URL
// has, are refused saying so.
func TestTrustedProxyBracketed(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want string // the prefix taken, or a part of the error
		ok   bool
	}{
		{"[::1]", "::1/128", true},
		{"[fd00::]/8", "fd00::/8", true},
		{"[fd00::/8]", "fd00::/8", true},
		{"[2001:DB8::7]/64", "2001:db8::/64", true},
		{"[::ffff:10.0.0.1]", "10.0.0.1/32", true},
		{"[127.0.0.1]", "brackets only around an IPv6 address", false},
		{"[10.0.0.0]/8", "brackets only around an IPv6 address", false},
		{"[::1", "takes CIDRs or addresses", false},
		{"[::1]x", "takes CIDRs or addresses", false},
		// With a port, copied from a log line: said so, with the fix.
		{"[::1]:443", "without a port, got \"[::1]:443\": write ::1", false},
		{"10.0.0.1:8080", "without a port, got \"10.0.0.1:8080\": write 10.0.0.1", false},
	} {
		setEnv(t, map[string]string{"CELLS_UPSTREAM": "https://cells:8080", "PROXY_TRUSTED_PROXIES": tc.in})
		c, err := Load()
		switch {
		case tc.ok && err != nil:
			t.Errorf("PROXY_TRUSTED_PROXIES=%s: %v", tc.in, err)
		case tc.ok && (len(c.TrustedProxies) != 1 || c.TrustedProxies[0].String() != tc.want):
			t.Errorf("PROXY_TRUSTED_PROXIES=%s: TrustedProxies = %v, want [%s]", tc.in, c.TrustedProxies, tc.want)
		case !tc.ok && (err == nil || !strings.HasPrefix(err.Error(), "PROXY_TRUSTED_PROXIES") || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("PROXY_TRUSTED_PROXIES=%s: err = %v, want a line with %q", tc.in, err, tc.want)
		}
	}
}
