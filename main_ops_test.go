package main

import (
	"net"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cells-proxy/cells-proxy/proxy"
)

// runBad runs the binary with env, killing it if it starts serving.
func runBad(t *testing.T, env ...string) (string, int) {
	t.Helper()
	cmd := command(nil, env...)
	stop := time.AfterFunc(15*time.Second, func() { cmd.Process.Kill() })
	defer stop.Stop()
	out, errOut, status := result(t, cmd)
	noStackTrace(t, "output", out+errOut)
	return errOut, status
}

// namesAVariable: every stderr line names the variable it is about.
func namesAVariable(t *testing.T, errOut string) {
	t.Helper()
	for _, l := range lines(errOut) {
		ok := false
		for _, v := range proxy.Variables() {
			ok = ok || strings.Contains(l, v.Name)
		}
		if !ok {
			t.Errorf("stderr line names no variable: %q", l)
		}
	}
}

// TestNewlineInAddr: a value with a newline (a YAML "|" block keeps
// one) still gives one line that names the variable (it used to split the
// problem over two lines, the second naming nothing).
func TestNewlineInAddr(t *testing.T) {
	errOut, status := runBad(t, "CELLS_UPSTREAM=https://cells:8080", "PROXY_HTTPS_ADDR=8443\n",
		"PROXY_HTTP_ADDR=off", "PROXY_HEALTH_ADDR=off")
	if status != 2 {
		t.Errorf("exit status = %d, want 2", status)
	}
	if n := len(lines(errOut)); n != 1 {
		t.Errorf("one problem printed on %d lines:\n%s", n, errOut)
	}
	namesAVariable(t, errOut)
}

// TestVariablesAndFiles: a bad variable and a missing certificate are
// two problems; both must be reported in one run.
func TestVariablesAndFiles(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "missing.pem")
	errOut, status := runBad(t, "CELLS_UPSTREAM=https://cells:8080", "PROXY_HTTPS_ADDR="+freeAddr(t),
		"PROXY_HTTP_ADDR=off", "PROXY_HEALTH_ADDR=off", "PROXY_TLS=maybe",
		"TLS_CERT_FILE="+missing, "TLS_KEY_FILE="+missing)
	if status != 2 {
		t.Errorf("exit status = %d, want 2", status)
	}
	for _, v := range []string{"PROXY_TLS ", "TLS_CERT_FILE ", "TLS_KEY_FILE "} {
		if !strings.Contains(errOut, "config: "+v) {
			t.Errorf("no line about %s:\n%s", strings.TrimSpace(v), errOut)
		}
	}
}

// TestServerNameUnicodeSelfSigned: PROXY_SERVER_NAMES=café.example
// (no TLS_CERT_FILE) is a configuration problem named as such, exit 2 (it
// used to pass Load and fail signing the self-signed certificate: exit 1,
// a line naming no variable).
func TestServerNameUnicodeSelfSigned(t *testing.T) {
	errOut, status := runBad(t, "CELLS_UPSTREAM=https://cells:8080", "PROXY_HTTPS_ADDR="+freeAddr(t),
		"PROXY_HTTP_ADDR=off", "PROXY_HEALTH_ADDR=off", "PROXY_SERVER_NAMES=café.example")
	if status == 0 || status == -1 {
		return // it started: TestServerNamesUnicode covers what it then does
	}
	if status != 2 {
		t.Errorf("exit status = %d, want 2", status)
	}
	namesAVariable(t, errOut)
}

// TestGRPCPortPlusSign: PYDIO_GRPC_EXTERNAL=+8443 is port 8443, and is
// caught by the check against PROXY_HTTPS_ADDR=:8443 (it escaped it, and the
// start failed at listen, exit 1, instead of the configuration line).
func TestGRPCPortPlusSign(t *testing.T) {
	addr := freeAddr(t)
	port := addr[strings.LastIndexByte(addr, ':')+1:]
	errOut, status := runBad(t, "CELLS_UPSTREAM=https://cells:8080", "PROXY_HTTPS_ADDR="+addr,
		"PROXY_HTTP_ADDR=off", "PROXY_HEALTH_ADDR=off", "PYDIO_GRPC_EXTERNAL=+"+port)
	if status != 2 || !strings.Contains(errOut, "config: PYDIO_GRPC_EXTERNAL=") {
		t.Errorf("status %d, stderr %q; want 2 and the line saying it is the port of PROXY_HTTPS_ADDR", status, errOut)
	}
}

// TestMisspelledVariable: a variable cells-proxy does not read, spelt like
// one it does (PROXY_IDLE_TIMOUT, proxy_tls in lower case) or in its
// PROXY_ namespace, is named in a warning at start, with the variable meant
// when one is close. It used to be ignored without a word, the default
// serving in its place: nginx refuses an unknown directive.
func TestMisspelledVariable(t *testing.T) {
	addr, health := freeAddr(t), freeAddr(t)
	cmd := command(nil, "CELLS_UPSTREAM=https://cells:8080", "PROXY_HTTPS_ADDR="+addr,
		"PROXY_HTTP_ADDR=off", "PROXY_HEALTH_ADDR="+health,
		"PROXY_IDLE_TIMOUT=5m", "proxy_max_body_size=1G", "PROXY_WEBSOCKET_TIMEOUT=1h",
		"CELLS_UPSTREAM_CA=/cells/certs/rootCA.pem",
		// Cells' own variables, in an env file shared with Cells: not ours.
		"CELLS_SITE_NO_TLS=1", "CELLS_WORKING_DIR=/var/cells")
	stderr := &lockedBuffer{}
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	for deadline := time.Now().Add(15 * time.Second); !strings.Contains(stderr.String(), `"msg":"listening"`); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("not listening within 15 s:\n%s", stderr)
		}
	}
	out := stderr.String()
	for _, tc := range []struct{ name, meant string }{
		{"PROXY_IDLE_TIMOUT", "PROXY_IDLE_TIMEOUT"},
		{"proxy_max_body_size", "PROXY_MAX_BODY_SIZE"},
		{"PROXY_WEBSOCKET_TIMEOUT", ""},
		{"CELLS_UPSTREAM_CA", "CELLS_UPSTREAM_CA_FILE"},
	} {
		line := grepLine(out, `"variable":"`+tc.name+`"`)
		switch {
		case line == "":
			t.Errorf("no warning names %s:\n%s", tc.name, out)
		case !strings.Contains(line, `"level":"WARN"`):
			t.Errorf("%s: %q is not a warning", tc.name, line)
		case tc.meant != "" && !strings.Contains(line, `"did_you_mean":"`+tc.meant+`"`):
			t.Errorf("%s: %q does not suggest %s", tc.name, line, tc.meant)
		}
	}
	for _, name := range []string{"CELLS_SITE_NO_TLS", "CELLS_WORKING_DIR"} {
		if l := grepLine(out, name); l != "" {
			t.Errorf("Cells' own %s is warned about: %q", name, l)
		}
	}
}

// grepLine is the first line of s that holds sub, or "".
func grepLine(s, sub string) string {
	for _, l := range lines(s) {
		if strings.Contains(l, sub) {
			return l
		}
	}
	return ""
}

// TestMisspelledRequiredVariable: CELLS_UPSTRAEM set and CELLS_UPSTREAM
// missing: besides the line saying CELLS_UPSTREAM is required, the operator
// is told which of the variables set was probably meant for it.
func TestMisspelledRequiredVariable(t *testing.T) {
	errOut, status := runBad(t, "CELLS_UPSTRAEM=https://cells:8080", "PROXY_HTTPS_ADDR="+freeAddr(t),
		"PROXY_HTTP_ADDR=off", "PROXY_HEALTH_ADDR=off")
	if status != 2 {
		t.Errorf("exit status = %d, want 2", status)
	}
	namesAVariable(t, errOut)
	if l := grepLine(errOut, "CELLS_UPSTRAEM"); !strings.Contains(l, "CELLS_UPSTREAM?") {
		t.Errorf("no line suggests CELLS_UPSTREAM for CELLS_UPSTRAEM:\n%s", errOut)
	}
}

// TestGRPCExternalInUse: the gRPC port is taken by another process. The
// line that stops the start names the variable the operator set: with
// CELLS_GRPC_EXTERNAL, the Cells v3+ name, it used to name
// PYDIO_GRPC_EXTERNAL, which the operator had not set.
func TestGRPCExternalInUse(t *testing.T) {
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	port := strconv.Itoa(taken.Addr().(*net.TCPAddr).Port)
	for _, name := range []string{"PYDIO_GRPC_EXTERNAL", "CELLS_GRPC_EXTERNAL"} {
		t.Run(name, func(t *testing.T) {
			errOut, status := runBad(t, "CELLS_UPSTREAM=https://cells:8080", "PROXY_HTTPS_ADDR="+freeAddr(t),
				"PROXY_HTTP_ADDR=off", "PROXY_HEALTH_ADDR=off", name+"="+port)
			if l := grepLine(errOut, "address already in use"); status != 1 || !strings.HasPrefix(l, "cells-proxy: "+name+": ") {
				t.Errorf("status %d, stderr %q; want 1 and a line starting with %q", status, errOut, "cells-proxy: "+name+": ")
			} else if !strings.HasSuffix(l, "set "+name+" to a free port") {
				t.Errorf("line %q does not end with the fix, set %s to a free port", l, name)
			}
		})
	}
}

// TestListenersInUse: every listener that cannot listen is named, one line
// each with the fix, all at once. The second line lacked the "cells-proxy:"
// the first had, and neither said what to do.
func TestListenersInUse(t *testing.T) {
	var taken []string
	for range 2 {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		taken = append(taken, ln.Addr().String())
	}
	errOut, status := runBad(t, "CELLS_UPSTREAM=https://cells:8080", "PROXY_HTTPS_ADDR="+taken[0],
		"PROXY_HTTP_ADDR="+freeAddr(t), "PROXY_HEALTH_ADDR="+taken[1])
	if status != 1 {
		t.Errorf("exit status = %d, want 1", status)
	}
	n := 0
	for _, l := range lines(errOut) {
		if strings.HasPrefix(l, "cells-proxy: ") {
			n++
		}
	}
	if n != 2 {
		t.Errorf("%d lines start with cells-proxy:, want 2:\n%s", n, errOut)
	}
	for _, name := range []string{"PROXY_HTTPS_ADDR", "PROXY_HEALTH_ADDR"} {
		if l := grepLine(errOut, name+": "); !strings.HasPrefix(l, "cells-proxy: "+name+": listen tcp ") ||
			!strings.Contains(l, "address already in use") || !strings.HasSuffix(l, "set "+name+" to a free port") {
			t.Errorf("line about %s = %q, want it to start with cells-proxy: %[1]s: and to end with the fix", name, l)
		}
	}
}

// TestQuotedPath: a path in quotes (docker run --env-file keeps them) is one
// problem, one line saying to remove them, not a second line about a file
// called "/acme" with its quotes that does not exist.
func TestQuotedPath(t *testing.T) {
	errOut, status := runBad(t, "CELLS_UPSTREAM=https://cells:8080", "PROXY_HTTPS_ADDR="+freeAddr(t),
		"PROXY_HTTP_ADDR="+freeAddr(t), "PROXY_HEALTH_ADDR=off", `PROXY_ACME_WEBROOT="`+t.TempDir()+`"`)
	if status != 2 {
		t.Errorf("exit status = %d, want 2", status)
	}
	if got := lines(errOut); len(got) != 1 || !strings.Contains(got[0], "config: PROXY_ACME_WEBROOT ") || !strings.Contains(got[0], "quotes") {
		t.Errorf("stderr = %q, want one line about PROXY_ACME_WEBROOT's quotes", errOut)
	}
}

// TestUnusedCAFileMissing: in topology B (CELLS_UPSTREAM=http://, gRPC in
// clear) nothing uses CELLS_UPSTREAM_CA_FILE, and a Cells run with
// CELLS_SITE_NO_TLS=1 writes no certs/rootCA.pem. An operator who kept the
// compose file's CA line was told only that the file cannot be read: with
// restart: unless-stopped, the proxy waited for it at every restart, for
// ever. The line now says to unset it.
func TestUnusedCAFileMissing(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "rootCA.pem")
	errOut, status := runBad(t, "CELLS_UPSTREAM=http://cells:8080", "PYDIO_GRPC_EXTERNAL=33060",
		"PROXY_HTTPS_ADDR="+freeAddr(t), "PROXY_HTTP_ADDR=off", "PROXY_HEALTH_ADDR=off",
		"CELLS_UPSTREAM_CA_FILE="+missing)
	if status != 2 {
		t.Errorf("exit status = %d, want 2", status)
	}
	if got := lines(errOut); len(got) != 1 || !strings.Contains(got[0], "unset CELLS_UPSTREAM_CA_FILE") {
		t.Errorf("stderr = %q, want one line saying to unset CELLS_UPSTREAM_CA_FILE", errOut)
	}
}

// TestFileIsADirectory: docker run -v and compose mount a directory where
// the host file to mount does not exist, and the operator who named a file
// got "read /certs/rootCA.pem: is a directory". The line now says why that
// happens and what to check.
func TestFileIsADirectory(t *testing.T) {
	dir := t.TempDir()
	errOut, status := runBad(t, "CELLS_UPSTREAM=https://cells:8080", "PROXY_HTTPS_ADDR="+freeAddr(t),
		"PROXY_HTTP_ADDR=off", "PROXY_HEALTH_ADDR=off", "CELLS_UPSTREAM_CA_FILE="+dir,
		"TLS_CERT_FILE="+dir, "TLS_KEY_FILE="+dir)
	if status != 2 {
		t.Errorf("exit status = %d, want 2", status)
	}
	for _, v := range []string{"CELLS_UPSTREAM_CA_FILE", "TLS_CERT_FILE", "TLS_KEY_FILE"} {
		if l := grepLine(errOut, "config: "+v+" "); !strings.Contains(l, "host path") {
			t.Errorf("%s: line %q, want it to say to check the host path of the mount", v, l)
		}
	}
}

// TestHealthAddrPortZero: PROXY_HEALTH_ADDR=:0 served on a port the kernel
// chose, which cells-proxy healthcheck (the image's HEALTHCHECK, another
// process reading the same environment) cannot know: it asked port 0, got
// "connection refused", and Docker marked a working proxy unhealthy for
// ever. The proxy and the healthcheck now refuse it at start, in one line
// naming the variable.
func TestHealthAddrPortZero(t *testing.T) {
	for _, args := range [][]string{nil, {"healthcheck"}} {
		for _, v := range []string{":0", "127.0.0.1:0", "[::1]:00"} {
			cmd := command(args, "CELLS_UPSTREAM=https://cells:8080", "PROXY_HTTPS_ADDR="+freeAddr(t),
				"PROXY_HTTP_ADDR=off", "PROXY_HEALTH_ADDR="+v)
			stop := time.AfterFunc(15*time.Second, func() { cmd.Process.Kill() })
			out, errOut, status := result(t, cmd)
			stop.Stop()
			noStackTrace(t, "output", out+errOut)
			if l := lines(errOut); status != 2 || len(l) != 1 || !strings.Contains(l[0], "config: PROXY_HEALTH_ADDR="+v+" ") {
				t.Errorf("%v PROXY_HEALTH_ADDR=%s: status %d, stdout %q, stderr %q; want 2 and one line naming PROXY_HEALTH_ADDR", args, v, status, out, errOut)
			}
		}
	}
}
