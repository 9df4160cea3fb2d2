package proxy

import (
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// setEnv sets every variable cells-proxy reads: the given ones, the rest
// empty so that the process environment cannot leak into the test.
func setEnv(t *testing.T, vars map[string]string) {
	t.Helper()
	for _, v := range Variables() {
		t.Setenv(v.Name, "")
	}
	for k, v := range vars {
		t.Setenv(k, v)
	}
}

func TestLoadDefaults(t *testing.T) {
	setEnv(t, map[string]string{"CELLS_UPSTREAM": "https://cells:8080"})
	// envconfig applies a default only when the variable is unset, not
	// empty: unset the ones with defaults.
	for _, v := range Variables() {
		if v.Default != "" {
			unsetEnv(t, v.Name)
		}
	}
	c, err := Load()
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	if got, want := c.Upstream.String(), "https://cells:8080"; got != want {
		t.Errorf("Upstream = %q, want %q", got, want)
	}
	if got, want := c.GRPCUpstream.String(), "https://cells:8080"; got != want {
		t.Errorf("GRPCUpstream = %q, want %q (the https upstream splits gRPC itself)", got, want)
	}
	checks := []struct {
		name      string
		got, want any
	}{
		{"HTTPSAddr", c.HTTPSAddr, ":8443"},
		{"HTTPAddr", c.HTTPAddr, ":8080"},
		{"HealthAddr", c.HealthAddr, "127.0.0.1:8099"},
		{"GRPCAddr", c.GRPCAddr, ""},
		{"RedirectPort", c.RedirectPort, 443},
		{"TLS", c.TLS, true},
		{"MaxBodySize", c.MaxBodySize, int64(0)},
		{"IdleTimeout", c.IdleTimeout, 10 * time.Minute},
		{"WSIdleTimeout", c.WSIdleTimeout, 24 * time.Hour},
		{"ShutdownTimeout", c.ShutdownTimeout, 30 * time.Second},
		{"LogFormat", c.LogFormat, "json"},
		{"AccessLog", c.AccessLog, true},
		{"UpstreamInsecure", c.UpstreamInsecure, false},
	}
	for _, ch := range checks {
		if ch.got != ch.want {
			t.Errorf("%s = %v, want %v", ch.name, ch.got, ch.want)
		}
	}
}

func TestLoadTopologyB(t *testing.T) {
	setEnv(t, map[string]string{
		"CELLS_UPSTREAM":          "http://cells:8080",
		"PYDIO_GRPC_EXTERNAL":     "33060",
		"PROXY_HTTPS_ADDR":        "0.0.0.0:443",
		"PROXY_HTTP_ADDR":         "off",
		"PROXY_TRUSTED_PROXIES":   "10.0.0.0/8, 192.168.1.7",
		"PROXY_SERVER_NAMES":      "Files.Example.com, cells.example.org.",
		"PROXY_MAX_BODY_SIZE":     "200MiB",
		"PROXY_IDLE_TIMEOUT":      "90s",
		"PROXY_WS_IDLE_TIMEOUT":   "1h",
		"PROXY_SHUTDOWN_TIMEOUT":  "5s",
		"PROXY_HEALTH_ADDR":       "127.0.0.1:9000",
		"PROXY_LOG_LEVEL":         "debug",
		"PROXY_LOG_FORMAT":        "text",
		"PROXY_ACCESS_LOG":        "false",
		"PROXY_TLS":               "on",
		"CELLS_UPSTREAM_INSECURE": "false",
	})
	unsetEnv(t, "PROXY_REDIRECT_HTTPS_PORT")
	c, err := Load()
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	if got, want := c.GRPCUpstream.String(), "h2c://cells:33060"; got != want {
		t.Errorf("GRPCUpstream = %q, want %q", got, want)
	}
	if got, want := c.GRPCAddr, "0.0.0.0:33060"; got != want {
		t.Errorf("GRPCAddr = %q, want %q (the host of PROXY_HTTPS_ADDR)", got, want)
	}
	if c.HTTPAddr != "" {
		t.Errorf("HTTPAddr = %q, want empty for off", c.HTTPAddr)
	}
	if got, want := c.MaxBodySize, int64(200<<20); got != want {
		t.Errorf("MaxBodySize = %d, want %d", got, want)
	}
	if got, want := strings.Join(c.ServerNames, ","), "files.example.com,cells.example.org"; got != want {
		t.Errorf("ServerNames = %q, want %q", got, want)
	}
	wantProxies := []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("192.168.1.7/32")}
	if len(c.TrustedProxies) != 2 || c.TrustedProxies[0] != wantProxies[0] || c.TrustedProxies[1] != wantProxies[1] {
		t.Errorf("TrustedProxies = %v, want %v", c.TrustedProxies, wantProxies)
	}
	if c.AccessLog || c.LogFormat != "text" || c.LogLevel.String() != "DEBUG" {
		t.Errorf("logging = %v %q %v, want false text DEBUG", c.AccessLog, c.LogFormat, c.LogLevel)
	}
}

func TestLoadGRPCAlias(t *testing.T) {
	setEnv(t, map[string]string{"CELLS_UPSTREAM": "http://cells:8080", "CELLS_GRPC_EXTERNAL": "33060"})
	c, err := Load()
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	if got, want := c.GRPCUpstream.String(), "h2c://cells:33060"; got != want {
		t.Errorf("GRPCUpstream = %q, want %q", got, want)
	}

	setEnv(t, map[string]string{"CELLS_UPSTREAM": "http://cells:8080", "CELLS_GRPC_EXTERNAL": "33060", "PYDIO_GRPC_EXTERNAL": "33061"})
	if _, err := Load(); err == nil || !strings.Contains(err.Error(), "CELLS_GRPC_EXTERNAL") {
		t.Errorf("Load with disagreeing aliases: err = %v, want one naming both", err)
	}

	// The two are compared as the port numbers they are taken as: 033060
	// and +33060 are 33060, and were reported as "disagreeing" with it.
	for _, v := range []string{"033060", "+33060"} {
		setEnv(t, map[string]string{"CELLS_UPSTREAM": "http://cells:8080", "PYDIO_GRPC_EXTERNAL": "33060", "CELLS_GRPC_EXTERNAL": v})
		c, err := Load()
		if err != nil {
			t.Errorf("PYDIO_GRPC_EXTERNAL=33060 CELLS_GRPC_EXTERNAL=%s: %v", v, err)
			continue
		}
		if got, want := c.GRPCAddr, ":33060"; got != want {
			t.Errorf("PYDIO_GRPC_EXTERNAL=33060 CELLS_GRPC_EXTERNAL=%s: GRPCAddr = %q, want %q", v, got, want)
		}
	}
}

// TestLoadReportsEveryProblem: an operator fixes everything in one go.
func TestLoadReportsEveryProblem(t *testing.T) {
	bad := map[string]string{
		"CELLS_UPSTREAM":            "cells:8080",
		"CELLS_UPSTREAM_INSECURE":   "maybe",
		"CELLS_GRPC_UPSTREAM":       "grpc://cells:33060",
		"PYDIO_GRPC_EXTERNAL":       "70000",
		"TLS_CERT_FILE":             "/certs/cert.pem",
		"PROXY_HTTPS_ADDR":          "8443",
		"PROXY_HTTP_ADDR":           "eighty",
		"PROXY_REDIRECT_HTTPS_PORT": "https",
		"PROXY_SERVER_NAMES":        "https://files.example.com",
		"PROXY_TLS":                 "sometimes",
		"PROXY_TRUSTED_PROXIES":     "10.0.0.0/33",
		"PROXY_MAX_BODY_SIZE":       "lots",
		"PROXY_IDLE_TIMEOUT":        "10",
		"PROXY_WS_IDLE_TIMEOUT":     "-1s",
		"PROXY_SHUTDOWN_TIMEOUT":    "soon",
		"PROXY_HEALTH_ADDR":         "health",
		"PROXY_LOG_LEVEL":           "loud",
		"PROXY_LOG_FORMAT":          "xml",
		"PROXY_ACCESS_LOG":          "yes please",
	}
	setEnv(t, bad)
	_, err := Load()
	if err == nil {
		t.Fatal("Load succeeded with every variable wrong")
	}
	lines := strings.Split(err.Error(), "\n")
	for name, value := range bad {
		if name == "TLS_CERT_FILE" {
			value = "TLS_KEY_FILE" // the problem is the missing partner
		}
		found := false
		for _, l := range lines {
			if strings.HasPrefix(l, name) && (strings.Contains(l, value) || name == "TLS_CERT_FILE") {
				found = true
			}
		}
		if !found {
			t.Errorf("no error line names %s=%q; got:\n%s", name, bad[name], err)
		}
	}
	for _, l := range lines {
		if strings.Contains(l, "goroutine") || strings.Contains(l, "panic") {
			t.Errorf("error line looks like a crash: %q", l)
		}
	}
}

// TestListenAddrs: a listener's address that cannot be listened on is a
// configuration error, reported with the others and before anything starts,
// not a failure to start after the certificate has been loaded.
func TestListenAddrs(t *testing.T) {
	for _, tc := range []struct {
		in string
		ok bool
	}{
		{":9443", true},
		{"0.0.0.0:443", true},
		{"[::1]:9443", true},
		{"127.0.0.1:0", true},
		{"localhost:https", true},
		{":99999", false},
		{":-1", false},
		{"127.0.0.1:", false},
		{"127.0.0.1", false},
		{":eighty", false},
		{"[::1:8443", false},
	} {
		for _, name := range []string{"PROXY_HTTPS_ADDR", "PROXY_HTTP_ADDR", "PROXY_HEALTH_ADDR"} {
			setEnv(t, map[string]string{"CELLS_UPSTREAM": "https://cells:8080", name: tc.in})
			_, err := Load()
			// Any free port, on the health listener, is one the
			// healthcheck cannot find (TestHealthAddrPortZero).
			ok := tc.ok && !(name == "PROXY_HEALTH_ADDR" && strings.HasSuffix(tc.in, ":0"))
			if ok && err != nil {
				t.Errorf("%s=%q: %v", name, tc.in, err)
			}
			if !ok && (err == nil || !strings.HasPrefix(err.Error(), name) || !strings.Contains(err.Error(), tc.in)) {
				t.Errorf("%s=%q: err = %v, want a line naming the variable and the value", name, tc.in, err)
			}
		}
	}
}

// TestListenAddrStar: nginx's listen *:443 and Apache's <VirtualHost *:443>
// write every address as '*'. PROXY_HTTPS_ADDR=*:9443 passed the
// configuration and stopped the start at listen, exit 1, with "lookup *: no
// such host" and no fix; a host that is no IP address or host name did the
// same. Each is now a configuration line naming the variable and the form,
// and so is a port alone.
func TestListenAddrStar(t *testing.T) {
	for _, tc := range []struct{ value, want string }{
		{"*:9443", "every address"},
		{"cells proxy:9443", "host name"},
		{"cells.example.com/:9443", "host name"},
	} {
		for _, name := range []string{"PROXY_HTTPS_ADDR", "PROXY_HTTP_ADDR", "PROXY_HEALTH_ADDR"} {
			setEnv(t, map[string]string{"CELLS_UPSTREAM": "https://cells:8080", name: tc.value})
			_, err := Load()
			if err == nil || !strings.HasPrefix(err.Error(), name+" ") || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("%s=%s: err = %v, want a line naming it and saying %q", name, tc.value, err, tc.want)
			}
		}
	}
	// A port alone, as PYDIO_GRPC_EXTERNAL and PROXY_REDIRECT_HTTPS_PORT
	// take it: net said "missing port in address" of the port given.
	for _, name := range []string{"PROXY_HTTPS_ADDR", "PROXY_HTTP_ADDR", "PROXY_HEALTH_ADDR"} {
		setEnv(t, map[string]string{"CELLS_UPSTREAM": "https://cells:8080", name: "9443"})
		_, err := Load()
		if err == nil || !strings.HasPrefix(err.Error(), name+" ") || !strings.Contains(err.Error(), "write :9443") || strings.Contains(err.Error(), "missing port") {
			t.Errorf("%s=9443: err = %v, want a line naming it and saying to write :9443", name, err)
		}
	}
	for _, v := range []string{"cells-proxy:8443", "cells_proxy.local:8443", "LOCALHOST:8443", "localhost.:8443", "[::]:8443", "[fe80::1%eth0]:8443", "0.0.0.0:8443"} {
		setEnv(t, map[string]string{"CELLS_UPSTREAM": "https://cells:8080", "PROXY_HTTPS_ADDR": v})
		if _, err := Load(); err != nil {
			t.Errorf("PROXY_HTTPS_ADDR=%s: %v", v, err)
		}
	}
}

// TestGRPCExternalOnThePublicPort: the public port serves gRPC already, and
// two listeners on one port would stop the proxy at start with "address
// already in use"; the operator is told which setting to change instead.
func TestGRPCExternalOnThePublicPort(t *testing.T) {
	for _, tc := range []struct{ addr, grpc string }{{":443", "443"}, {"0.0.0.0:8443", "08443"}, {"127.0.0.1:https", "443"}} {
		setEnv(t, map[string]string{"CELLS_UPSTREAM": "https://cells:8080", "PROXY_HTTPS_ADDR": tc.addr, "PYDIO_GRPC_EXTERNAL": tc.grpc})
		if _, err := Load(); err == nil || !strings.HasPrefix(err.Error(), "PYDIO_GRPC_EXTERNAL="+tc.grpc+" is the port of PROXY_HTTPS_ADDR") {
			t.Errorf("PROXY_HTTPS_ADDR=%s PYDIO_GRPC_EXTERNAL=%s: err = %v", tc.addr, tc.grpc, err)
		}
	}
	setEnv(t, map[string]string{"CELLS_UPSTREAM": "https://cells:8080", "PROXY_HTTPS_ADDR": ":443", "PYDIO_GRPC_EXTERNAL": "33060"})
	if _, err := Load(); err != nil {
		t.Errorf("the classic 33060 beside 443: %v", err)
	}
	// The Cells v3+ name is the one an error names, when it is the one set.
	for _, v := range []string{"abc", "70000", "443"} {
		setEnv(t, map[string]string{"CELLS_UPSTREAM": "https://cells:8080", "PROXY_HTTPS_ADDR": ":443", "CELLS_GRPC_EXTERNAL": v})
		if _, err := Load(); err == nil || !strings.HasPrefix(err.Error(), "CELLS_GRPC_EXTERNAL") {
			t.Errorf("CELLS_GRPC_EXTERNAL=%s: err = %v, want a line naming CELLS_GRPC_EXTERNAL", v, err)
		}
	}
}

// TestListenerCollisions: two listeners on one port would stop the start
// with "address already in use" after the configuration passed; it is a
// configuration problem, reported with the others and naming both.
func TestListenerCollisions(t *testing.T) {
	for _, tc := range []struct {
		env  map[string]string
		want string // "" = no collision
	}{
		{map[string]string{"PROXY_HTTPS_ADDR": ":8080"}, "PROXY_HTTPS_ADDR=:8080 and PROXY_HTTP_ADDR=:8080"},
		{map[string]string{"PROXY_HTTPS_ADDR": "127.0.0.1:9000", "PROXY_HTTP_ADDR": "0.0.0.0:9000"}, "PROXY_HTTPS_ADDR=127.0.0.1:9000 and PROXY_HTTP_ADDR=0.0.0.0:9000"},
		{map[string]string{"PROXY_HEALTH_ADDR": "[::]:8443"}, "PROXY_HTTPS_ADDR=:8443 and PROXY_HEALTH_ADDR=[::]:8443"},
		{map[string]string{"PYDIO_GRPC_EXTERNAL": "8080"}, "PYDIO_GRPC_EXTERNAL=8080 and PROXY_HTTP_ADDR=:8080"},
		{map[string]string{"CELLS_GRPC_EXTERNAL": "8099", "PROXY_HTTPS_ADDR": "127.0.0.1:443"}, "CELLS_GRPC_EXTERNAL=8099 and PROXY_HEALTH_ADDR=127.0.0.1:8099"},
		{map[string]string{"PROXY_HTTPS_ADDR": "127.0.0.1:9000", "PROXY_HTTP_ADDR": "127.0.0.2:9000"}, ""},
		// Port 0 is a free port each (PROXY_HEALTH_ADDR refuses it: the
		// healthcheck could not find it).
		{map[string]string{"PROXY_HTTPS_ADDR": "127.0.0.1:0", "PROXY_HTTP_ADDR": "127.0.0.1:0"}, ""},
		{map[string]string{"PROXY_HTTP_ADDR": "off", "PROXY_HTTPS_ADDR": ":8080"}, ""},
	} {
		env := map[string]string{"CELLS_UPSTREAM": "https://cells:8080"}
		for k, v := range tc.env {
			env[k] = v
		}
		setEnv(t, env)
		for _, name := range []string{"PROXY_HTTPS_ADDR", "PROXY_HTTP_ADDR", "PROXY_HEALTH_ADDR"} {
			if _, set := tc.env[name]; !set {
				unsetEnv(t, name) // its default
			}
		}
		_, err := Load()
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%v: %v", tc.env, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%v: err = %v, want a line with %q", tc.env, err, tc.want)
		}
	}
}

// TestServerNamesNoWildcard: nginx's *.example.com would be compared whole
// and match no request (421 to all): refused with the other problems.
func TestServerNamesNoWildcard(t *testing.T) {
	for _, v := range []string{"*.example.com", "cells.example.com,*", "*"} {
		setEnv(t, map[string]string{"CELLS_UPSTREAM": "https://cells:8080", "PROXY_SERVER_NAMES": v})
		if _, err := Load(); err == nil || !strings.Contains(err.Error(), "wildcard") {
			t.Errorf("PROXY_SERVER_NAMES=%s: err = %v, want one about wildcards", v, err)
		}
	}
}

// TestServerNamesForms: an IPv6 address is taken bracketed or not and
// kept in the form the Host check compares; what can never match a Host
// is refused with a line that says what is wrong with it.
func TestServerNamesForms(t *testing.T) {
	for _, tc := range []struct {
		in, want string // want: the ServerNames, or a part of the error
		ok       bool
		notInErr string
	}{
		{"::1", "::1", true, ""},
		{"[2001:DB8::1]", "2001:db8::1", true, ""},
		{"2001:db8:0:0:0:0:0:1", "2001:db8::1", true, ""},
		{"Cells.Example.com., 192.0.2.7", "cells.example.com,192.0.2.7", true, ""},
		{"cells.example.com:8443", "without port", false, "scheme"},
		{"[2001:db8::1]:8443", "without port", false, "scheme"},
		{"https://cells.example.com", "without scheme", false, "port"},
		{"fe80::1%eth0", "without a zone", false, "port"},
		{"*.example.com", "wildcard", false, "port"},
		{"[192.0.2.7]", "brackets", false, "port"},
		{"[cells.example.com]", "brackets", false, "port"},
		{"cells.example.com]", "brackets", false, "port"},
		{"cells_app, cells-2.example.com", "cells_app,cells-2.example.com", true, ""},
		// nginx's server_name takes both: a list separated by ';' was
		// one name, and .example.com (example.com and every name under
		// it) matched no Host: every request got 421.
		{"cells.example.com;www.cells.example.com", "commas", false, "port"},
		{".example.com", "wildcard", false, "port"},
		{"cells..example.com", "host names such as", false, "port"},
		{"cells.example.com?", "host names such as", false, "port"},
	} {
		setEnv(t, map[string]string{"CELLS_UPSTREAM": "https://cells:8080", "PROXY_SERVER_NAMES": tc.in})
		c, err := Load()
		switch {
		case tc.ok && err != nil:
			t.Errorf("PROXY_SERVER_NAMES=%s: %v", tc.in, err)
		case tc.ok:
			if got := strings.Join(c.ServerNames, ","); got != tc.want {
				t.Errorf("PROXY_SERVER_NAMES=%s: ServerNames = %q, want %q", tc.in, got, tc.want)
			}
		case err == nil || !strings.HasPrefix(err.Error(), "PROXY_SERVER_NAMES") || !strings.Contains(err.Error(), tc.want) || strings.Contains(err.Error(), tc.notInErr):
			t.Errorf("PROXY_SERVER_NAMES=%s: err = %v, want a line about %q, not %q", tc.in, err, tc.want, tc.notInErr)
		}
	}
}

// TestListsSeparatedBySpaces: nginx separates server_name and the like
// with spaces; an operator who does the same here is told to use commas,
// not to write an internationalized name in its xn-- form (what a space in
// PROXY_SERVER_NAMES used to get) or only which form an entry takes.
func TestListsSeparatedBySpaces(t *testing.T) {
	for _, tc := range []struct{ name, value string }{
		{"PROXY_SERVER_NAMES", "cells.example.com www.cells.example.com"},
		{"PROXY_SERVER_NAMES", "cells.example.com\nwww.cells.example.com"},
		{"PROXY_SERVER_NAMES", "cells.example.com\twww.cells.example.com"},
		{"PROXY_TRUSTED_PROXIES", "10.0.0.0/8 192.168.0.0/16"},
	} {
		v := tc.value
		setEnv(t, map[string]string{"CELLS_UPSTREAM": "https://cells:8080", tc.name: v})
		_, err := Load()
		if err == nil || !strings.HasPrefix(err.Error(), tc.name) || !strings.Contains(err.Error(), "commas") || strings.Contains(err.Error(), "xn--") {
			t.Errorf("%s=%q: err = %v, want a line saying to separate with commas", tc.name, v, err)
		}
	}
}

func TestLoadRequiresUpstream(t *testing.T) {
	setEnv(t, nil)
	_, err := Load()
	if err == nil || !strings.Contains(err.Error(), "CELLS_UPSTREAM is required") {
		t.Errorf("Load without CELLS_UPSTREAM: err = %v", err)
	}
}

// TestGRPCUpstreamNeedsPort: h2c has no default port. Without one the
// dial went to port 80, and every gRPC call failed with a refused
// connection that named no setting.
func TestGRPCUpstreamNeedsPort(t *testing.T) {
	for _, in := range []string{"h2c://cells", "h2c://cells/", "h2c://[::1]"} {
		setEnv(t, map[string]string{"CELLS_UPSTREAM": "http://cells:8080", "CELLS_GRPC_UPSTREAM": in})
		_, err := Load()
		if err == nil || !strings.HasPrefix(err.Error(), "CELLS_GRPC_UPSTREAM=") || !strings.Contains(err.Error(), "no port") {
			t.Errorf("CELLS_GRPC_UPSTREAM=%s: err = %v, want one line saying it has no port", in, err)
		}
	}
	for in, want := range map[string]string{"h2c://cells:33060": "h2c://cells:33060", "https://cells": "https://cells"} {
		setEnv(t, map[string]string{"CELLS_UPSTREAM": "http://cells:8080", "CELLS_GRPC_UPSTREAM": in})
		c, err := Load()
		if err != nil {
			t.Errorf("CELLS_GRPC_UPSTREAM=%s: %v", in, err)
		} else if got := c.GRPCUpstream.String(); got != want {
			t.Errorf("CELLS_GRPC_UPSTREAM=%s: GRPCUpstream = %s, want %s", in, got, want)
		}
	}
}

func TestUpstreamURLs(t *testing.T) {
	for _, tc := range []struct {
		in      string
		want    string // "" = error
		notInEr string // must not appear in the error
	}{
		{"https://cells:8080", "https://cells:8080", ""},
		{"https://cells:8080/", "https://cells:8080", ""},
		{"http://[::1]:8080", "http://[::1]:8080", ""},
		{"https://cells", "https://cells", ""},
		{"ftp://cells:8080", "", ""},
		{"https://cells:8080/cells", "", ""},
		{"https://cells:99999", "", ""},
		{"https://admin:s3cret@cells:8080", "", "s3cret"},
		// Mistyped: the password must not be repeated either.
		{"https:/admin:s3cret@cells:8080", "", "s3cret"},
		{"https//admin:s3cret@cells:8080", "", "s3cret"},
		{"https:admin:s3cret@cells:8080", "", "s3cret"},
		{"//admin:s3cret@cells:8080", "", "s3cret"},
		{"admin:s3cret@cells:8080", "", "s3cret"},
		{"https://:8080", "", ""},
		// A port left empty, as a compose file's https://cells:${PORT}
		// with PORT unset gives: not 443 without a word.
		{"https://cells:", "", ""},
		{"http://[::1]:", "", ""},
		{"", "", ""},
	} {
		t.Run(tc.in, func(t *testing.T) {
			u, err := parseUpstream(tc.in, "http", "https")
			if tc.want == "" {
				if err == nil {
					t.Fatalf("parseUpstream(%q) = %v, want an error", tc.in, u)
				}
				if tc.notInEr != "" && strings.Contains(err.Error(), tc.notInEr) {
					t.Errorf("error %q leaks %q", err, tc.notInEr)
				}
				return
			}
			if err != nil {
				t.Fatalf("parseUpstream(%q): %v", tc.in, err)
			}
			if got := u.String(); got != tc.want {
				t.Errorf("parseUpstream(%q) = %q, want %q", tc.in, got, tc.want)
			}
		})
	}
}

func TestParseSize(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int64
		ok   bool
	}{
		{"0", 0, true},
		{"1024", 1024, true},
		{"200MiB", 200 << 20, true},
		{"200m", 200 << 20, true},
		{"1G", 1 << 30, true},
		{"1g", 1 << 30, true},
		{"1GB", 1e9, true},
		{"5 KiB", 5 << 10, true},
		{"2TiB", 2 << 40, true},
		{"12b", 12, true},
		{"", 0, false},
		{"MiB", 0, false},
		{"-1", 0, false},
		{"1.5G", 0, false},
		{"10 parsecs", 0, false},
		{"9223372036854775807", 1<<63 - 1, true},
		{"9223372036854775807k", 0, false},
	} {
		got, err := ParseSize(tc.in)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d, ok=%v", tc.in, got, err, tc.want, tc.ok)
		}
	}
}

func TestVariablesDocumented(t *testing.T) {
	seen := map[string]bool{}
	for _, v := range Variables() {
		if v.Name == "" || v.Desc == "" {
			t.Errorf("variable %+v lacks a name or a description", v)
		}
		if seen[v.Name] {
			t.Errorf("variable %s listed twice", v.Name)
		}
		seen[v.Name] = true
	}
}

// refusedWith loads a configuration of CELLS_UPSTREAM (and TLS_KEY_FILE
// for a TLS_ variable) with name set to value, and returns the lines of
// the error; the test ends if Load accepts it.
func refusedWith(t *testing.T, name, value string) []string {
	t.Helper()
	vars := map[string]string{"CELLS_UPSTREAM": "https://cells:8080", name: value}
	if strings.HasPrefix(name, "TLS_") {
		vars["TLS_KEY_FILE"] = "/certs/privkey.pem"
	}
	setEnv(t, vars)
	_, err := Load()
	if err == nil {
		t.Fatalf("Load accepted %s=%s", name, value)
	}
	return strings.Split(err.Error(), "\n")
}

// TestQuotedValues: docker run --env-file and compose's list form
// (- NAME="value") keep quotes as part of the value, and an .env file keeps
// a trailing space. Each is one line naming the variable and saying to
// remove them. PROXY_SERVER_NAMES="cells.example.com" used to be accepted
// as the name "cells.example.com" with its quotes: every request got 421.
func TestQuotedValues(t *testing.T) {
	for _, tc := range []struct{ name, value, want string }{
		{"PROXY_SERVER_NAMES", `"cells.example.com"`, "quotes"},
		{"PROXY_SERVER_NAMES", `'cells.example.com'`, "quotes"},
		{"CELLS_UPSTREAM", `"https://cells:8080"`, "quotes"},
		{"PROXY_IDLE_TIMEOUT", `"10m"`, "quotes"},
		{"PROXY_IDLE_TIMEOUT", `""`, "quotes"},
		{"PYDIO_GRPC_EXTERNAL", `"33060"`, "quotes"},
		{"CELLS_UPSTREAM", "https://cells:8080 ", "space"},
		{"CELLS_UPSTREAM_CA_FILE", "/cells/certs/rootCA.pem ", "space"},
		{"TLS_CERT_FILE", " /certs/fullchain.pem", "space"},
	} {
		t.Run(tc.name+"="+tc.value, func(t *testing.T) {
			got := refusedWith(t, tc.name, tc.value)
			if len(got) != 1 || !strings.HasPrefix(got[0], tc.name+" ") || !strings.Contains(got[0], tc.want) || !strings.Contains(got[0], "remove") {
				t.Errorf("%s=%s: err = %q, want one line naming it and saying to remove the %s", tc.name, tc.value, got, tc.want)
			}
		})
	}
	setEnv(t, map[string]string{"CELLS_UPSTREAM": `"https://admin:s3cret@cells:8080"`})
	if _, err := Load(); err == nil || strings.Contains(err.Error(), "s3cret") {
		t.Errorf("quoted CELLS_UPSTREAM with a password: err = %v, want one that hides the password", err)
	}
}

// TestCommentAfterValue: docker run --env-file keeps a comment written
// after a value as part of it (docker/cli#4404; compose's .env files drop
// it). It gave a line quoting the value, or a wrong fix: "PROXY_SERVER_NAMES
// separates names with commas, not spaces". It is now one line naming the
// variable and the comment.
func TestCommentAfterValue(t *testing.T) {
	for _, tc := range []struct{ name, value string }{
		{"PROXY_SERVER_NAMES", "files.example.com # the public name"},
		{"PROXY_TRUSTED_PROXIES", "10.0.0.0/8 # the load balancer"},
		{"PROXY_IDLE_TIMEOUT", "10m\t# ten minutes"},
		{"CELLS_UPSTREAM", "https://cells:8080 # Cells"},
		{"TLS_CERT_FILE", "/certs/fullchain.pem # certbot's"},
	} {
		t.Run(tc.name+"="+tc.value, func(t *testing.T) {
			got := refusedWith(t, tc.name, tc.value)
			if len(got) != 1 || !strings.HasPrefix(got[0], tc.name+" ") || !strings.Contains(got[0], "comment") || strings.Contains(got[0], "commas") {
				t.Errorf("%s=%s: err = %q, want one line naming it and its comment", tc.name, tc.value, got)
			}
		})
	}
	setEnv(t, map[string]string{"CELLS_UPSTREAM": "https://admin:s3cret@cells:8080 # Cells"})
	if _, err := Load(); err == nil || strings.Contains(err.Error(), "s3cret") {
		t.Errorf("CELLS_UPSTREAM with a password and a comment: err = %v, want one that hides the password", err)
	}
}

// TestValueEndsTrimmed: a line break, carriage return, space or tab at the
// ends of a value that is no path or URL (a YAML "|" block keeps a
// newline, a .env file saved on Windows a carriage return) is not part of
// it, for every kind of value alike: durations and ports refused it where
// sizes and switches took it.
func TestValueEndsTrimmed(t *testing.T) {
	setEnv(t, map[string]string{
		"CELLS_UPSTREAM":            "https://cells:8080",
		"PROXY_IDLE_TIMEOUT":        "7m\n",
		"PROXY_SHUTDOWN_TIMEOUT":    " 12s\r\n",
		"PROXY_REDIRECT_HTTPS_PORT": "8443\r",
		"PROXY_MAX_BODY_SIZE":       "2MiB\t",
		"PROXY_TLS":                 "off\n",
		"PROXY_LOG_LEVEL":           "warn\r\n",
		"PROXY_HTTPS_ADDR":          "127.0.0.1:9443\n",
	})
	c, err := Load()
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	if c.IdleTimeout != 7*time.Minute || c.ShutdownTimeout != 12*time.Second {
		t.Errorf("durations: idle %v, shutdown %v; want 7m0s, 12s", c.IdleTimeout, c.ShutdownTimeout)
	}
	if c.RedirectPort != 8443 || c.MaxBodySize != 2<<20 || c.TLS || c.LogLevel != slog.LevelWarn {
		t.Errorf("redirect port %d, body size %d, TLS %v, log level %v; want 8443, %d, false, WARN", c.RedirectPort, c.MaxBodySize, c.TLS, c.LogLevel, 2<<20)
	}
	if c.HTTPSAddr != "127.0.0.1:9443" {
		t.Errorf("PROXY_HTTPS_ADDR = %q, want 127.0.0.1:9443", c.HTTPSAddr)
	}
}

// TestPathWithSpaceHash: a path whose directory or file name holds " #"
// (a folder "certs #2") is a path, not a value with a comment: it names
// something on disk, which a comment never does. The comment check refused
// it, where 9c2d728 took it.
func TestPathWithSpaceHash(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "www #1")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	setEnv(t, map[string]string{"CELLS_UPSTREAM": "https://cells:8080", "PROXY_ACME_WEBROOT": dir})
	c, err := Load()
	if err != nil {
		t.Fatalf("Load with PROXY_ACME_WEBROOT=%q: %v", dir, err)
	}
	if got, want := c.ACMEWebroot, dir; got != want {
		t.Errorf("ACMEWebroot = %q, want %q", got, want)
	}
}
