package main

import (
	"bytes"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cells-proxy/cells-proxy/internal/testport"
	"github.com/cells-proxy/cells-proxy/proxy"
)

// testVersion is stamped into the test binary as a release build would be.
const testVersion = "v0.0.0-test"

// bin is the cells-proxy binary that TestMain builds for these tests.
var bin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "cells-proxy-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	bin = filepath.Join(dir, "cells-proxy")
	build := exec.Command("go", "build", "-ldflags", "-X main.version="+testVersion, "-o", bin, ".")
	if out, err := build.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "go build: %v\n%s", err, out)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// command is the binary with args and exactly the environment vars (plus
// PATH): nothing of the test process's own configuration leaks in.
func command(args []string, vars ...string) *exec.Cmd {
	cmd := exec.Command(bin, args...)
	cmd.Env = append([]string{"PATH=" + os.Getenv("PATH")}, vars...)
	return cmd
}

// result runs cmd and returns its stdout, stderr and exit status.
func result(t *testing.T, cmd *exec.Cmd) (stdout, stderr string, status int) {
	t.Helper()
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	var exit *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &exit):
		status = exit.ExitCode()
	default:
		t.Fatalf("running %v: %v", cmd.Args, err)
	}
	return out.String(), errb.String(), status
}

// lines splits output into its non-empty lines.
func lines(s string) []string {
	var out []string
	for l := range strings.SplitSeq(strings.TrimRight(s, "\n"), "\n") {
		if l != "" {
			out = append(out, l)
		}
	}
	return out
}

// noStackTrace fails the test if output shows a panic or a goroutine dump.
func noStackTrace(t *testing.T, name, output string) {
	t.Helper()
	for _, s := range []string{"panic:", "goroutine ", "runtime."} {
		if strings.Contains(output, s) {
			t.Errorf("%s contains %q:\n%s", name, s, output)
		}
	}
}

// freeAddr is a 127.0.0.1 address for the binary to listen on: nothing
// listens there, and the port is reserved for the test until it ends
// (testport.Reserve), so that nothing else on the machine is given it in the
// meantime, not another of the test's ports, nor a listener of a test of
// another package running beside these.
func freeAddr(t *testing.T) string {
	t.Helper()
	return testport.Reserve(t)
}

// lockedBuffer collects a running process's output.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// running is a cells-proxy process started by startBinary.
type running struct {
	stderr *lockedBuffer
	exited chan struct{} // closed once the process has exited, err set
	err    error         // what Wait returned
}

// run starts cmd with its stderr captured (its stdout discarded unless
// set). stop, for the caller to defer, kills the process if it still runs
// and logs its stderr if the test failed.
func startBinary(t *testing.T, cmd *exec.Cmd) (p *running, stop func()) {
	t.Helper()
	p = &running{stderr: &lockedBuffer{}, exited: make(chan struct{})}
	if cmd.Stdout == nil {
		cmd.Stdout = io.Discard
	}
	cmd.Stderr = p.stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.err = cmd.Wait(); close(p.exited) }()
	return p, func() {
		select {
		case <-p.exited:
		default:
			cmd.Process.Kill()
			<-p.exited
		}
		if t.Failed() {
			t.Logf("cells-proxy stderr:\n%s", p.stderr)
		}
	}
}

// TestSIGTERM runs the binary against a plain-HTTP upstream, waits until
// `cells-proxy healthcheck` says it is ready, sends SIGTERM while a request
// is in flight, and checks that the request completes, healthcheck turns
// unhealthy during the drain, and the process exits with status 0.
func TestSIGTERM(t *testing.T) {
	arrived := make(chan struct{}, 1)
	release := make(chan struct{})
	var releaseOnce sync.Once
	open := func() { releaseOnce.Do(func() { close(release) }) }
	defer open()
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/slow" {
			arrived <- struct{}{}
			<-release
		}
		io.WriteString(w, "ok")
	}))
	defer up.Close()

	addr, health := freeAddr(t), freeAddr(t)
	env := []string{
		"CELLS_UPSTREAM=" + up.URL,
		"PROXY_HTTPS_ADDR=" + addr,
		"PROXY_HTTP_ADDR=off",
		"PROXY_HEALTH_ADDR=" + health,
		"PROXY_SHUTDOWN_TIMEOUT=30s",
	}
	proc := command(nil, env...)
	p, stop := startBinary(t, proc)
	defer stop()
	stderr, exited := p.stderr, p.exited

	// Ready: the healthcheck subcommand, as Docker's HEALTHCHECK runs it.
	var out string
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		var status int
		out, _, status = result(t, command([]string{"healthcheck"}, env...))
		if status == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("healthcheck did not pass within 20 s; last output %q", out)
		}
	}
	if l := lines(out); len(l) != 1 || !strings.HasPrefix(l[0], "healthy:") {
		t.Errorf("healthcheck output = %q, want one line starting with \"healthy:\"", out)
	}

	// The certificate is generated in memory at start: nothing to trust
	// but the connection itself.
	tr := &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: 60 * time.Second}
	type reply struct {
		body string
		err  error
	}
	replies := make(chan reply, 1)
	go func() {
		res, err := client.Get("https://" + addr + "/slow")
		if err != nil {
			replies <- reply{err: err}
			return
		}
		b, err := io.ReadAll(res.Body)
		res.Body.Close()
		replies <- reply{string(b), err}
	}()
	select {
	case <-arrived:
	case <-time.After(30 * time.Second):
		t.Fatal("request did not reach the upstream")
	}

	if err := proc.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	// Draining: the healthcheck fails with one line, exit status 1.
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		out, errOut, status := result(t, command([]string{"healthcheck"}, env...))
		if status == 1 {
			if l := lines(out + errOut); len(l) != 1 {
				t.Errorf("healthcheck while draining printed %q, want one line", out+errOut)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("healthcheck still passes 20 s after SIGTERM (status %d, %q)", status, out)
		}
	}
	select {
	case <-exited:
		t.Fatalf("cells-proxy exited (%v) with a request in flight", p.err)
	default:
	}

	open()
	if r := <-replies; r.err != nil || r.body != "ok" {
		t.Errorf("request in flight at SIGTERM: %q, %v; want \"ok\"", r.body, r.err)
	}
	select {
	case <-exited:
		if p.err != nil {
			t.Errorf("cells-proxy after SIGTERM: %v, want exit status 0", p.err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("cells-proxy did not exit within 30 s of SIGTERM")
	}
	noStackTrace(t, "stderr", stderr.String())
}

// TestHealthcheckNothingListening: with no proxy running, the healthcheck
// prints one line and exits 1 (Docker marks the container unhealthy).
func TestHealthcheckNothingListening(t *testing.T) {
	out, errOut, status := result(t, command([]string{"healthcheck"},
		"CELLS_UPSTREAM=https://cells:8080", "PROXY_HEALTH_ADDR="+freeAddr(t)))
	if status != 1 {
		t.Errorf("exit status = %d, want 1", status)
	}
	if l := lines(out + errOut); len(l) != 1 || !strings.HasPrefix(l[0], "unhealthy:") {
		t.Errorf("output = %q, want one line starting with \"unhealthy:\"", out+errOut)
	}
	noStackTrace(t, "output", out+errOut)
}

// TestHealthcheckHealthOff: with PROXY_HEALTH_ADDR=off the healthcheck can
// never pass; its line says what to do, as the README does: set it, or
// disable the container's healthcheck. It used to say only "nothing to
// ask", and Docker marked a working proxy unhealthy with no way out named.
func TestHealthcheckHealthOff(t *testing.T) {
	out, _, status := result(t, command([]string{"healthcheck"},
		"CELLS_UPSTREAM=https://cells:8080", "PROXY_HEALTH_ADDR=off"))
	if status != 1 {
		t.Errorf("exit status = %d, want 1", status)
	}
	if !strings.Contains(out, "disable") || !strings.Contains(out, "healthcheck") {
		t.Errorf("output = %q, want it to say to disable the container's healthcheck", out)
	}
}

// TestBadConfig sets several bad variables at once: each gets one line
// naming the variable, its value and what it must be; exit status 2; no
// stack trace. The subcommands that read the configuration behave alike.
func TestBadConfig(t *testing.T) {
	bad := []struct{ name, value string }{
		{"CELLS_UPSTREAM", "cells:8080"},
		{"PROXY_TLS", "maybe"},
		{"PROXY_WS_IDLE_TIMEOUT", "-5s"},
		{"PROXY_SHUTDOWN_TIMEOUT", "soon"},
		{"PROXY_LOG_LEVEL", "loud"},
		{"PROXY_MAX_BODY_SIZE", "lots"},
		{"PROXY_TRUSTED_PROXIES", "10.0.0.0/33"},
		{"PROXY_REDIRECT_HTTPS_PORT", "70000"},
	}
	var env []string
	for _, b := range bad {
		env = append(env, b.name+"="+b.value)
	}
	for _, args := range [][]string{nil, {"serve"}, {"healthcheck"}} {
		t.Run(fmt.Sprint(args), func(t *testing.T) {
			out, errOut, status := result(t, command(args, env...))
			if status != 2 {
				t.Errorf("exit status = %d, want 2", status)
			}
			if out != "" {
				t.Errorf("stdout = %q, want nothing", out)
			}
			noStackTrace(t, "stderr", errOut)
			got := lines(errOut)
			if len(got) != len(bad) {
				t.Errorf("stderr has %d lines, want one per problem (%d):\n%s", len(got), len(bad), errOut)
			}
			for _, b := range bad {
				var matched []string
				for _, l := range got {
					if strings.Contains(l, b.name+" ") {
						matched = append(matched, l)
					}
				}
				if len(matched) != 1 {
					t.Errorf("%s: %d lines name it, want 1:\n%s", b.name, len(matched), errOut)
					continue
				}
				l := matched[0]
				if !strings.Contains(l, fmt.Sprintf("%q", b.value)) {
					t.Errorf("%s: line %q does not show the value %q", b.name, l, b.value)
				}
				if !strings.Contains(l, " must ") && !strings.Contains(l, " takes ") {
					t.Errorf("%s: line %q does not say what the value must be", b.name, l)
				}
			}
		})
	}
}

// TestBadFiles: the files the variables name are checked before anything
// listens, every one of them, and reported like a bad variable: one line
// each naming it, exit status 2, no stack trace, nothing left listening.
func TestBadFiles(t *testing.T) {
	dir := t.TempDir()
	junk := filepath.Join(dir, "junk.pem")
	if err := os.WriteFile(junk, []byte("not PEM\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	missing := filepath.Join(dir, "missing.pem")
	addr := freeAddr(t)
	for _, tc := range []struct {
		name string
		env  []string
		want []string // the start of each line, in order
	}{
		{"missing", []string{"CELLS_UPSTREAM_CA_FILE=" + missing, "TLS_CERT_FILE=" + missing, "TLS_KEY_FILE=" + missing},
			[]string{"CELLS_UPSTREAM_CA_FILE must", "TLS_CERT_FILE must", "TLS_KEY_FILE must"}},
		{"not PEM", []string{"CELLS_UPSTREAM_CA_FILE=" + junk, "TLS_CERT_FILE=" + junk, "TLS_KEY_FILE=" + junk},
			[]string{"CELLS_UPSTREAM_CA_FILE must", "TLS_CERT_FILE and TLS_KEY_FILE must"}},
		// Without TLS_CERT_FILE: no line saying that a self-signed
		// certificate is served by a proxy that does not start.
		{"CA file alone", []string{"CELLS_UPSTREAM_CA_FILE=" + missing},
			[]string{"CELLS_UPSTREAM_CA_FILE must"}},
		{"webroot alone", []string{"PROXY_ACME_WEBROOT=" + missing, "PROXY_HTTP_ADDR=" + freeAddr(t)},
			[]string{"PROXY_ACME_WEBROOT must"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env := append([]string{"CELLS_UPSTREAM=https://cells:8080", "PROXY_HTTPS_ADDR=" + addr,
				"PROXY_HTTP_ADDR=off", "PROXY_HEALTH_ADDR=off"}, tc.env...)
			out, errOut, status := result(t, command(nil, env...))
			if status != 2 {
				t.Errorf("exit status = %d, want 2", status)
			}
			noStackTrace(t, "stderr", out+errOut)
			got := lines(errOut)
			if len(got) != len(tc.want) {
				t.Fatalf("stderr has %d lines, want %d:\n%s", len(got), len(tc.want), errOut)
			}
			for i, w := range tc.want {
				if !strings.HasPrefix(got[i], "cells-proxy: config: "+w) {
					t.Errorf("line %d = %q, want it to start with %q", i+1, got[i], w)
				}
			}
		})
	}
}

// TestUnknownCommand: a usage error exits 2 and says what is accepted.
func TestUnknownCommand(t *testing.T) {
	_, errOut, status := result(t, command([]string{"frobnicate"}))
	if status != 2 {
		t.Errorf("exit status = %d, want 2", status)
	}
	if !strings.Contains(errOut, `"frobnicate"`) || !strings.Contains(errOut, "usage:") {
		t.Errorf("stderr = %q, want the command named and the usage", errOut)
	}
	noStackTrace(t, "stderr", errOut)
}

// TestEnvCommand: `cells-proxy env` lists every variable the proxy reads,
// with its default and its meaning, even when the configuration is bad.
func TestEnvCommand(t *testing.T) {
	out, errOut, status := result(t, command([]string{"env"}, "CELLS_UPSTREAM=bad"))
	if status != 0 || errOut != "" {
		t.Fatalf("cells-proxy env: status %d, stderr %q; want 0 and nothing", status, errOut)
	}
	byName := map[string]string{}
	for _, l := range lines(out)[1:] {
		byName[strings.Fields(l)[0]] = l
	}
	vars := proxy.Variables()
	if got, want := len(lines(out)), len(vars)+1; got != want {
		t.Errorf("cells-proxy env printed %d lines, want a header and one per variable (%d)", got, want)
	}
	for _, v := range vars {
		l, ok := byName[v.Name]
		if !ok {
			t.Errorf("cells-proxy env does not list %s", v.Name)
			continue
		}
		def := v.Default
		if def == "" {
			def = "-"
		}
		if got := strings.Fields(l)[1]; got != def {
			t.Errorf("%s: default column = %q, want %q", v.Name, got, def)
		}
		if v.Desc == "" || !strings.HasSuffix(l, v.Desc) {
			t.Errorf("%s: line %q does not end with its meaning %q", v.Name, l, v.Desc)
		}
	}
}

// TestVersionCommand: `cells-proxy version` prints the version stamped at
// build time.
func TestVersionCommand(t *testing.T) {
	for _, arg := range []string{"version", "--version"} {
		out, _, status := result(t, command([]string{arg}))
		if got, want := out, "cells-proxy "+testVersion+"\n"; status != 0 || got != want {
			t.Errorf("cells-proxy %s: status %d, output %q; want 0, %q", arg, status, got, want)
		}
	}
}

// TestHealthcheckSilentCells: Cells accepts connections and never answers.
// The healthcheck says so in its one line ("cells unreachable"), which
// needs the proxy's check of Cells to give up before the command does, and
// the command before Docker kills it (TestHealthcheckFitsDockerTimeout).
func TestHealthcheckSilentCells(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	accepted := make(chan net.Conn, 16)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				close(accepted)
				return
			}
			accepted <- c // held open, never answered
		}
	}()
	defer func() {
		ln.Close()
		for c := range accepted {
			c.Close()
		}
	}()
	health := freeAddr(t)
	env := []string{"CELLS_UPSTREAM=http://" + ln.Addr().String(), "PROXY_HTTPS_ADDR=" + freeAddr(t),
		"PROXY_HTTP_ADDR=off", "PROXY_HEALTH_ADDR=" + health}
	proc := command(nil, env...)
	stderr := &lockedBuffer{}
	proc.Stdout, proc.Stderr = io.Discard, stderr
	if err := proc.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { proc.Process.Kill(); proc.Wait() }()
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if c, err := net.Dial("tcp", health); err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the health listener never came up:\n%s", stderr.String())
		}
	}
	out, errOut, status := result(t, command([]string{"healthcheck"}, env...))
	if l := lines(out + errOut); status != 1 || len(l) != 1 || !strings.Contains(l[0], "cells unreachable") {
		t.Errorf("status %d, output %q; want 1 and one line saying Cells is unreachable", status, out+errOut)
	}
}

// TestHealthcheckFitsDockerTimeout: the image's HEALTHCHECK and the compose
// file give the command a timeout; the command's own bound must be below it.
func TestHealthcheckFitsDockerTimeout(t *testing.T) {
	for file, re := range map[string]*regexp.Regexp{
		"Dockerfile":          regexp.MustCompile(`HEALTHCHECK .*--timeout=(\w+)`),
		"compose.example.yml": regexp.MustCompile(`(?m)^\s+timeout: (\w+)`),
	} {
		b, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		m := re.FindSubmatch(b)
		if m == nil {
			t.Errorf("%s: no healthcheck timeout found", file)
			continue
		}
		d, err := time.ParseDuration(string(m[1]))
		if err != nil {
			t.Fatalf("%s: timeout %q: %v", file, m[1], err)
		}
		if d <= proxy.ProbeTimeout {
			t.Errorf("%s gives the healthcheck %v, not more than the command's own %v", file, d, proxy.ProbeTimeout)
		}
	}
}

// TestBadFilesTLSOff: with PROXY_TLS=off and no gRPC port the pair is not
// used, yet a TLS_CERT_FILE that cannot be read is reported as ever, not
// found when TLS is turned back on.
func TestBadFilesTLSOff(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "missing.pem")
	cmd := command(nil, "CELLS_UPSTREAM=https://cells:8080", "PROXY_TLS=off",
		"PROXY_HTTPS_ADDR="+freeAddr(t), "PROXY_HTTP_ADDR=off", "PROXY_HEALTH_ADDR=off",
		"TLS_CERT_FILE="+missing, "TLS_KEY_FILE="+missing)
	// A proxy that starts instead serves until stopped.
	stop := time.AfterFunc(20*time.Second, func() { cmd.Process.Kill() })
	defer stop.Stop()
	out, errOut, status := result(t, cmd)
	if status != 2 || !strings.Contains(errOut, "config: TLS_CERT_FILE must") {
		t.Errorf("status %d, stderr %q; want 2 and a line about TLS_CERT_FILE", status, out+errOut)
	}
}

// TestSecondSignal: a request holds the drain, PROXY_SHUTDOWN_TIMEOUT is
// 10 minutes. A second SIGTERM or SIGINT (Ctrl-C twice, an orchestrator
// that insists) ends the process now, exit status 1, with a warning that
// says what it cut. It used to be ignored: the process waited the whole
// timeout.
func TestSecondSignal(t *testing.T) {
	for _, tc := range []struct {
		name          string
		first, second syscall.Signal
	}{
		{"TERM TERM", syscall.SIGTERM, syscall.SIGTERM},
		{"INT INT", syscall.SIGINT, syscall.SIGINT},
		{"TERM INT", syscall.SIGTERM, syscall.SIGINT},
	} {
		t.Run(tc.name, func(t *testing.T) {
			arrived := make(chan struct{}, 1)
			release := make(chan struct{})
			up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if r.URL.Path != "/slow" {
					return // the proxy's probe of Cells at its start
				}
				arrived <- struct{}{}
				<-release
			}))
			defer up.Close()
			defer close(release)

			addr := freeAddr(t)
			proc := command(nil, "CELLS_UPSTREAM="+up.URL, "PROXY_HTTPS_ADDR="+addr,
				"PROXY_HTTP_ADDR=off", "PROXY_HEALTH_ADDR=off", "PROXY_SHUTDOWN_TIMEOUT=10m")
			p, stop := startBinary(t, proc)
			defer stop()
			stderr, exited := p.stderr, p.exited
			waitLog := func(msg string) {
				t.Helper()
				for deadline := time.Now().Add(15 * time.Second); !strings.Contains(stderr.String(), `"msg":"`+msg+`"`); time.Sleep(20 * time.Millisecond) {
					if time.Now().After(deadline) {
						t.Fatalf("no %q line within 15 s", msg)
					}
				}
			}
			waitLog("listening")
			// Cells is probed from the start, health listener or not.
			waitLog("cells answers")

			tr := &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}
			defer tr.CloseIdleConnections()
			go func() {
				if res, err := (&http.Client{Transport: tr}).Get("https://" + addr + "/slow"); err == nil {
					io.Copy(io.Discard, res.Body)
					res.Body.Close()
				}
			}()
			select {
			case <-arrived:
			case <-time.After(30 * time.Second):
				t.Fatal("request did not reach the upstream")
			}

			if err := proc.Process.Signal(tc.first); err != nil {
				t.Fatal(err)
			}
			waitLog("shutting down")
			select {
			case <-exited:
				t.Fatalf("cells-proxy exited (%v) at the first signal with a request in flight", p.err)
			default:
			}
			if err := proc.Process.Signal(tc.second); err != nil {
				t.Fatal(err)
			}
			// Well within PROXY_SHUTDOWN_TIMEOUT=10m.
			select {
			case <-exited:
			case <-time.After(60 * time.Second):
				t.Fatal("cells-proxy still draining 60 s after a second signal")
			}
			var exit *exec.ExitError
			if !errors.As(p.err, &exit) || exit.ExitCode() != 1 {
				t.Errorf("cells-proxy after a second signal: %v, want exit status 1", p.err)
			}
			out := stderr.String()
			noStackTrace(t, "stderr", out)
			if l := grepLine(out, `"msg":"shutdown"`); l != "" {
				t.Errorf("the cut drain is logged as a failed shutdown: %q", l)
			}
			if l := grepLine(out, "drain cut short"); !strings.Contains(l, `"level":"WARN"`) || !strings.Contains(l, `"requests":1`) {
				t.Errorf("the line about the cut drain is %q, want a warning saying one request was cut", l)
			}
		})
	}
}
