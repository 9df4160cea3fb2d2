package main

import (
	"crypto/x509"
	"encoding/pem"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cells-proxy/cells-proxy/proxy"
)

// cpuTime is the CPU time process pid has used, from /proc.
func cpuTime(t *testing.T, pid int) time.Duration {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		t.Fatal(err)
	}
	// The fields after the command name, which is in parentheses.
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
	utime, _ := strconv.ParseInt(f[11], 10, 64)
	stime, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(utime+stime) * time.Second / 100 // USER_HZ
}

// TestDescriptorsRunOut: a flood of connections uses up the descriptors
// cells-proxy may open (RLIMIT_NOFILE 64 here; a container's limit is larger,
// its flood too). While none is free, the public port waits before accepting
// again, as net/http's servers and nginx do, and the log says why. cmux's
// accept loop retried at once, without a word: the proxy spun a core (3.2
// CPU-s in 3 s on the reviewer's machine) for as long as the flood lasted.
// The gRPC, redirect and health ports, served by net/http, waited but said
// so only at debug level: each port now warns, once, not also at debug.
func TestDescriptorsRunOut(t *testing.T) {
	if _, err := exec.LookPath("prlimit"); err != nil {
		t.Skip("no prlimit")
	}
	addr, grpcAddr, httpAddr, healthAddr := freeAddr(t), freeAddr(t), freeAddr(t), freeAddr(t)
	cmd := exec.Command("prlimit", "--nofile=64:64", bin)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "CELLS_UPSTREAM=http://127.0.0.1:9",
		"CELLS_GRPC_UPSTREAM=h2c://127.0.0.1:9", "PYDIO_GRPC_EXTERNAL=" + grpcAddr[strings.LastIndexByte(grpcAddr, ':')+1:],
		"PROXY_HTTPS_ADDR=" + addr, "PROXY_HTTP_ADDR=" + httpAddr, "PROXY_HEALTH_ADDR=" + healthAddr,
		"PROXY_LOG_LEVEL=debug"}
	p, stop := startBinary(t, cmd)
	defer stop()
	stderr, exited := p.stderr, p.exited
	for deadline := time.Now().Add(15 * time.Second); strings.Count(stderr.String(), `"msg":"listening"`) < 3; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("not listening within 15 s")
		}
	}
	// prlimit execs cells-proxy: same pid. Connections that send nothing
	// hold a descriptor each for the 10 s handshake limit. Once the public
	// port has taken what it can, the other ports find none either.
	start := time.Now()
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	dial := func(addr string, n int) {
		for range n {
			c, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			conns = append(conns, c)
		}
	}
	dial(addr, 150)
	for deadline := time.Now().Add(15 * time.Second); !strings.Contains(stderr.String(), "too many open files"); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("no log line says that accepting failed for lack of descriptors")
		}
	}
	dial(grpcAddr, 5)
	dial(httpAddr, 5)
	dial(healthAddr, 5)
	time.Sleep(500 * time.Millisecond) // the proxy takes what it can
	before := cpuTime(t, cmd.Process.Pid)
	time.Sleep(2 * time.Second)
	if used := cpuTime(t, cmd.Process.Pid) - before; used > 500*time.Millisecond {
		t.Errorf("cells-proxy used %v of CPU in 2 s with its descriptors used up and nothing to do", used)
	}
	out, took := stderr.String(), time.Since(start)
	for _, a := range []string{addr, grpcAddr, httpAddr, healthAddr} {
		var warned int
		for _, l := range lines(out) {
			if strings.Contains(l, `"addr":"`+a+`"`) && strings.Contains(l, "too many open files") {
				if !strings.Contains(l, `"level":"WARN"`) {
					t.Errorf("%s: %q is not a warning", a, l)
				}
				warned++
			}
		}
		// At most a line a second.
		if limit := int(took/time.Second) + 1; warned == 0 || warned > limit {
			t.Errorf("%s: %d warnings that accepting failed for lack of descriptors in %v, want from 1 to %d", a, warned, took, limit)
		}
	}
	if l := grepLine(out, "Accept error"); l != "" {
		t.Errorf("net/http logs that accepting failed, beside the warning: %q", l)
	}
	// A stop ends the waits; the descriptors are still used up.
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-exited:
		if p.err != nil {
			t.Errorf("cells-proxy stopped with its descriptors used up: %v, want exit status 0", p.err)
		}
	case <-time.After(60 * time.Second):
		t.Error("cells-proxy did not stop within 60 s of SIGTERM with its descriptors used up")
	}
}

// TestSIGHUPDuringStart: a SIGHUP that arrives while cells-proxy is still
// starting (a renewal hook firing as the container restarts) is a reload
// to do once it serves, not the end of the process (SIGHUP's default
// action, until the signal is caught). TLS_CERT_FILE is a FIFO: opening
// it for writing returns once cells-proxy opened it to read, at start.
func TestSIGHUPDuringStart(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	if err := syscall.Mkfifo(certFile, 0o600); err != nil {
		t.Skip("no FIFO:", err)
	}
	certPEM, keyPEM := selfSignedPEM(t)
	if err := os.WriteFile(keyFile, keyPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	health := freeAddr(t)
	cmd := command(nil, "CELLS_UPSTREAM=http://127.0.0.1:9", "PROXY_HTTPS_ADDR="+freeAddr(t),
		"PROXY_HTTP_ADDR=off", "PROXY_HEALTH_ADDR="+health, "TLS_CERT_FILE="+certFile, "TLS_KEY_FILE="+keyFile)
	p, stop := startBinary(t, cmd)
	defer stop()
	stderr, exited := p.stderr, p.exited
	opened := make(chan *os.File, 1)
	go func() {
		f, err := os.OpenFile(certFile, os.O_WRONLY, 0)
		if err != nil {
			t.Error(err)
		}
		opened <- f
	}()
	var fifo *os.File
	select {
	case fifo = <-opened:
	case <-exited:
		t.Fatalf("cells-proxy exited before reading TLS_CERT_FILE: %v", p.err)
	case <-time.After(20 * time.Second):
		t.Fatal("cells-proxy did not open TLS_CERT_FILE within 20 s")
	}
	if fifo == nil {
		return
	}
	if err := cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	// The certificate only once the signal was delivered (no longer
	// pending for the process): before the fix, that ended it.
	for deadline := time.Now().Add(10 * time.Second); hupPending(t, cmd.Process.Pid); time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("SIGHUP still pending after 10 s")
		}
	}
	fifo.Write(certPEM)
	fifo.Close()
	// Once the start has read it, the reload reads the FIFO again: give
	// it the certificate once more when it opens it (a non-blocking open
	// for writing fails until a reader has it open).
	sent := false
	for deadline := time.Now().Add(20 * time.Second); !strings.Contains(stderr.String(), `"trigger":"reload"`); time.Sleep(20 * time.Millisecond) {
		select {
		case <-exited:
			t.Fatalf("cells-proxy ended by the SIGHUP sent while it started: %v", p.err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("no reload within 20 s of start")
		}
		if !sent && strings.Contains(stderr.String(), `"trigger":"start"`) {
			if f, err := os.OpenFile(certFile, os.O_WRONLY|syscall.O_NONBLOCK, 0); err == nil {
				f.Write(certPEM)
				f.Close()
				sent = true
			}
		}
	}
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	<-exited
	if p.err != nil {
		t.Errorf("after SIGTERM: %v, want exit status 0", p.err)
	}
}

// selfSignedPEM is a certificate for localhost and its key, PEM-encoded.
func selfSignedPEM(t *testing.T) (certPEM, keyPEM []byte) {
	cert, err := proxy.SelfSigned("localhost")
	if err != nil {
		t.Fatal(err)
	}
	key, err := x509.MarshalPKCS8PrivateKey(cert.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Certificate[0]}),
		pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: key})
}

// hupPending reports whether SIGHUP is pending for process pid as a whole
// (ShdPnd in /proc/PID/status), as kill(2) leaves it until a thread takes it.
func hupPending(t *testing.T, pid int) bool {
	st, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return false // gone
	}
	for _, l := range strings.Split(string(st), "\n") {
		if v, ok := strings.CutPrefix(l, "ShdPnd:"); ok {
			mask, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			if err != nil {
				t.Fatalf("ShdPnd: %v", err)
			}
			return mask&(1<<(syscall.SIGHUP-1)) != 0
		}
	}
	t.Fatal("no ShdPnd in /proc/PID/status")
	return false
}

// TestMemoryLimitFromCgroup runs the binary in a memory cgroup of its own,
// limited to 256 MiB, and checks that the garbage collector gets 90% of it,
// and that GOMEMLIMIT set by the operator is left alone. It needs a
// writable memory cgroup (root, cgroup v1 or v2 with the memory controller
// delegated); TestMemoryLimit covers the layouts without one.
func TestMemoryLimitFromCgroup(t *testing.T) {
	dir := newMemoryCgroup(t, 256<<20)
	for _, tc := range []struct {
		name string
		vars []string
		want string // the start's line, or "" for none
	}{
		{"from the cgroup", nil, `"msg":"memory limit","cgroup":268435456,"gomemlimit":241591911}`},
		{"GOMEMLIMIT set", []string{"GOMEMLIMIT=100MiB"}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env := append([]string{"CELLS_UPSTREAM=http://127.0.0.1:9", "PROXY_HTTPS_ADDR=" + freeAddr(t),
				"PROXY_HTTP_ADDR=off", "PROXY_HEALTH_ADDR=off"}, tc.vars...)
			// The shell joins the cgroup, then becomes cells-proxy.
			cmd := exec.Command("sh", "-c", `echo $$ > "$1/cgroup.procs" && exec "$2"`, "sh", dir, bin)
			cmd.Env = command(nil, env...).Env
			p, stop := startBinary(t, cmd)
			defer stop()
			for deadline := time.Now().Add(20 * time.Second); !strings.Contains(p.stderr.String(), `"msg":"listening"`); time.Sleep(20 * time.Millisecond) {
				select {
				case <-p.exited:
					t.Fatalf("cells-proxy exited: %v", p.err)
				default:
				}
				if time.Now().After(deadline) {
					t.Fatal("not listening within 20 s")
				}
			}
			got := p.stderr.String()
			if tc.want != "" && !strings.Contains(got, tc.want) {
				t.Errorf("no %s in the log", tc.want)
			}
			if tc.want == "" && strings.Contains(got, `"memory limit"`) {
				t.Error("the memory limit was set though GOMEMLIMIT was")
			}
		})
	}
}

// newMemoryCgroup makes a memory cgroup limited to limit bytes inside the
// test's own, removed at the end of the test (once its processes are
// gone), or skips the test if it cannot.
func newMemoryCgroup(t *testing.T, limit int64) string {
	own, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		t.Skip("no cgroups:", err)
	}
	var parent, file string
	for _, l := range strings.Split(string(own), "\n") {
		f := strings.SplitN(l, ":", 3)
		switch {
		case len(f) < 3:
		case slices.Contains(strings.Split(f[1], ","), "memory"):
			parent, file = filepath.Join("/sys/fs/cgroup/memory", f[2]), "memory.limit_in_bytes"
		case f[0] == "0" && f[1] == "" && parent == "":
			parent, file = filepath.Join("/sys/fs/cgroup", f[2]), "memory.max"
		}
	}
	dir := filepath.Join(parent, "cells-proxy-test-"+strconv.Itoa(os.Getpid()))
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Skip("cannot make a memory cgroup:", err)
	}
	t.Cleanup(func() {
		for deadline := time.Now().Add(10 * time.Second); os.Remove(dir) != nil && time.Now().Before(deadline); {
			time.Sleep(50 * time.Millisecond)
		}
	})
	if err := os.WriteFile(filepath.Join(dir, file), []byte(strconv.FormatInt(limit, 10)), 0o644); err != nil {
		t.Skip("cannot limit a memory cgroup:", err)
	}
	return dir
}

// TestListenPrivilegedPort: the image runs as a user without
// CAP_NET_BIND_SERVICE, and PROXY_HTTPS_ADDR=:443 is what an operator
// types first. The line that stops the start says so and what to do
// instead; it was the bare "bind: permission denied". Needs root, to run
// the binary as nobody, and a host where ports below 1024 are privileged.
func TestListenPrivilegedPort(t *testing.T) {
	setpriv, err := exec.LookPath("setpriv")
	if err != nil || os.Geteuid() != 0 {
		t.Skip("needs root and setpriv")
	}
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_unprivileged_port_start")
	if start, _ := strconv.Atoi(strings.TrimSpace(string(b))); err != nil || start < 1000 {
		t.Skip("ports below 1024 are not privileged here")
	}
	port := 0
	for p := 1000; p < 1024 && port == 0; p++ {
		if ln, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(p)); err == nil {
			ln.Close()
			port = p
		}
	}
	if port == 0 {
		t.Skip("no free port from 1000 to 1023")
	}
	// The test binary's directory is root's alone: nobody gets a copy.
	dir, err := os.MkdirTemp("", "cells-proxy-nobody-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	exe, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	nobodyBin := filepath.Join(dir, "cells-proxy")
	if err := os.WriteFile(nobodyBin, exe, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", nobodyBin)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "CELLS_UPSTREAM=https://cells:8080",
		"PROXY_HTTPS_ADDR=127.0.0.1:" + strconv.Itoa(port), "PROXY_HTTP_ADDR=off", "PROXY_HEALTH_ADDR=off"}
	stop := time.AfterFunc(15*time.Second, func() { cmd.Process.Kill() })
	defer stop.Stop()
	out, errOut, status := result(t, cmd)
	noStackTrace(t, "output", out+errOut)
	l := grepLine(errOut, "permission denied")
	if status != 1 || !strings.HasPrefix(l, "cells-proxy: PROXY_HTTPS_ADDR: ") || !strings.Contains(l, "below 1024") ||
		!strings.Contains(l, "-p 443:8443") {
		t.Errorf("status %d, stderr %q; want 1 and a line naming PROXY_HTTPS_ADDR, ports below 1024 and the fix", status, errOut)
	}
}

// TestKeyNotReadable: certbot writes privkey.pem readable by root alone,
// and the image runs as uid 65532. The line said "TLS_KEY_FILE must name a
// file cells-proxy can read: ... permission denied", naming no user; it now
// names the uid that must be able to read it.
func TestKeyNotReadable(t *testing.T) {
	dir := t.TempDir()
	// The test's directory and the one above it, for the image's user.
	for _, d := range []string{dir, filepath.Dir(dir)} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	certPEM, keyPEM := selfSignedPEM(t)
	certFile, keyFile := filepath.Join(dir, "fullchain.pem"), filepath.Join(dir, "privkey.pem")
	if err := os.WriteFile(certFile, certPEM, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, keyPEM, 0o000); err != nil {
		t.Fatal(err)
	}
	cmd := command(nil, "CELLS_UPSTREAM=https://cells:8080", "PROXY_HTTPS_ADDR="+freeAddr(t),
		"PROXY_HTTP_ADDR=off", "PROXY_HEALTH_ADDR=off", "TLS_CERT_FILE="+certFile, "TLS_KEY_FILE="+keyFile)
	uid := asImageUser(t, cmd, dir)
	_, errOut, status := result(t, cmd)
	if status != 2 {
		t.Errorf("exit status = %d, want 2", status)
	}
	if got := lines(errOut); len(got) != 1 || !strings.Contains(got[0], "TLS_KEY_FILE") || !strings.Contains(got[0], "uid "+strconv.Itoa(uid)) {
		t.Errorf("stderr = %q, want one line naming TLS_KEY_FILE and uid %d", errOut, uid)
	}
}

// asImageUser makes cmd run as the image's user, uid 65532, when the test
// runs as root, which reads any file and searches any directory: a copy of
// the binary in dir (which that user must be able to reach) is run instead.
// It returns the uid cmd runs as.
func asImageUser(t *testing.T, cmd *exec.Cmd, dir string) int {
	t.Helper()
	uid := os.Getuid()
	if uid != 0 {
		return uid
	}
	uid = 65532
	exe := filepath.Join(dir, "cells-proxy")
	b, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(exe, b, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd.Path, cmd.Args[0] = exe, exe
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(uid)}}
	return uid
}

// TestACMEWebrootSearchOnly: serving a challenge opens a file by name in
// the webroot, which takes search (x) permission on the directories, not
// read (r). The start check opened the webroot itself, which takes read:
// a webroot of mode 0711 was refused though it serves, and one of 0644
// taken though every challenge then failed. Now the first starts and
// serves, and the second stops the start with a line naming the variable
// and the uid.
func TestACMEWebrootSearchOnly(t *testing.T) {
	dir := t.TempDir()
	// The test's directory and the one above it, for the image's user.
	for _, d := range []string{dir, filepath.Dir(dir)} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	const token, keyAuth = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA", "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA.9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI"
	searchOnly, readOnly := filepath.Join(dir, "search-only"), filepath.Join(dir, "read-only")
	challenges := filepath.Join(searchOnly, ".well-known", "acme-challenge")
	if err := os.MkdirAll(challenges, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(challenges, token), []byte(keyAuth), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(readOnly, 0o755); err != nil {
		t.Fatal(err)
	}
	for d, mode := range map[string]os.FileMode{searchOnly: 0o711, readOnly: 0o644} {
		if err := os.Chmod(d, mode); err != nil {
			t.Fatal(err)
		}
	}

	t.Run("read, no search", func(t *testing.T) {
		cmd := command(nil, "CELLS_UPSTREAM=https://cells:8080", "PROXY_HTTPS_ADDR="+freeAddr(t),
			"PROXY_HTTP_ADDR="+freeAddr(t), "PROXY_HEALTH_ADDR=off", "PROXY_ACME_WEBROOT="+readOnly)
		uid := asImageUser(t, cmd, dir)
		// A binary that takes the webroot runs until it is killed.
		kill := time.AfterFunc(15*time.Second, func() { cmd.Process.Kill() })
		defer kill.Stop()
		_, errOut, status := result(t, cmd)
		if status != 2 {
			t.Errorf("exit status = %d, want 2", status)
		}
		if got := lines(errOut); len(got) != 1 || !strings.HasPrefix(got[0], "cells-proxy: config: PROXY_ACME_WEBROOT must") ||
			!strings.Contains(got[0], "uid "+strconv.Itoa(uid)) {
			t.Errorf("stderr = %q, want one line naming PROXY_ACME_WEBROOT and uid %d", errOut, uid)
		}
	})

	t.Run("search, no read", func(t *testing.T) {
		httpAddr := freeAddr(t)
		cmd := command(nil, "CELLS_UPSTREAM=https://cells:8080", "PROXY_HTTPS_ADDR="+freeAddr(t),
			"PROXY_HTTP_ADDR="+httpAddr, "PROXY_HEALTH_ADDR=off", "PROXY_ACME_WEBROOT="+searchOnly)
		asImageUser(t, cmd, dir)
		p, stop := startBinary(t, cmd)
		defer stop()
		client := &http.Client{Transport: &http.Transport{}, Timeout: time.Minute}
		defer client.CloseIdleConnections()
		// Bounded: until the binary listens, or exits, or 20 s.
		var res *http.Response
		for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(50 * time.Millisecond) {
			select {
			case <-p.exited:
				t.Fatalf("cells-proxy exited: %v", p.err)
			default:
			}
			var err error
			if res, err = client.Get("http://" + httpAddr + "/.well-known/acme-challenge/" + token); err == nil {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("GET the token: %v 20 s after the start", err)
			}
		}
		b, err := io.ReadAll(res.Body)
		res.Body.Close()
		if res.StatusCode != http.StatusOK || string(b) != keyAuth || err != nil {
			t.Errorf("GET the token: %d %q %v, want 200 %q", res.StatusCode, b, err, keyAuth)
		}
		if l := p.stderr.String(); strings.Contains(l, "ACME") {
			t.Errorf("stderr, want no line about the webroot:\n%s", l)
		}
	})
}
