package main

import (
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"
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
func TestDescriptorsRunOut(t *testing.T) {
	if _, err := exec.LookPath("prlimit"); err != nil {
		t.Skip("no prlimit")
	}
	addr := freeAddr(t)
	cmd := exec.Command("prlimit", "--nofile=64:64", bin)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "CELLS_UPSTREAM=http://127.0.0.1:9",
		"PROXY_HTTPS_ADDR=" + addr, "PROXY_HTTP_ADDR=off", "PROXY_HEALTH_ADDR=off"}
	stderr := &lockedBuffer{}
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		cmd.Process.Kill()
		cmd.Wait()
		if t.Failed() {
			t.Logf("cells-proxy stderr:\n%s", stderr)
		}
	}()
	for deadline := time.Now().Add(15 * time.Second); !strings.Contains(stderr.String(), `"msg":"listening"`); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("not listening within 15 s")
		}
	}
	// prlimit execs cells-proxy: same pid. Connections that send nothing
	// hold a descriptor each for the 10 s handshake limit.
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for range 150 {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
	}
	time.Sleep(500 * time.Millisecond) // the proxy takes what it can
	before := cpuTime(t, cmd.Process.Pid)
	time.Sleep(2 * time.Second)
	if used := cpuTime(t, cmd.Process.Pid) - before; used > 500*time.Millisecond {
		t.Errorf("cells-proxy used %v of CPU in 2 s with its descriptors used up and nothing to do", used)
	}
	if !strings.Contains(stderr.String(), "too many open files") {
		t.Error("no log line says that accepting failed for lack of descriptors")
	}
}
