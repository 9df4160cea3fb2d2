package main

import (
	"bufio"
	"crypto/tls"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

// TestStdlibLogStructured: what net/http's Transport writes with the log
// package reaches stderr through the proxy's slog handler, not as a plain
// line among the JSON ones. The Transport does so when Cells sends bytes
// on a connection it has answered on and that sits idle: here after the
// answer to a chunked upload, the request that takes the Transport's path.
func TestStdlibLogStructured(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				br := bufio.NewReader(c)
				for {
					req, err := http.ReadRequest(br)
					if err != nil {
						return
					}
					io.Copy(io.Discard, req.Body)
					io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
					if req.Method == http.MethodPut {
						// An answer nobody asked for, once the
						// connection is back in the Transport's pool.
						time.Sleep(100 * time.Millisecond)
						io.WriteString(c, "HTTP/1.1 204 No Content\r\n\r\n")
					}
				}
			}()
		}
	}()

	addr := freeAddr(t)
	env := []string{
		"CELLS_UPSTREAM=http://" + ln.Addr().String(),
		"PROXY_HTTPS_ADDR=" + addr,
		"PROXY_HTTP_ADDR=off",
		"PROXY_HEALTH_ADDR=off",
		"PROXY_LOG_FORMAT=json",
	}
	p, stop := startBinary(t, command(nil, env...))
	defer stop()

	tr := &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: 20 * time.Second}
	var res *http.Response
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		// No length: chunked, which the direct path leaves to the Transport.
		body := io.NopCloser(strings.NewReader("part of a file"))
		req, _ := http.NewRequest(http.MethodPut, "https://"+addr+"/io/personal-files/a.txt", body)
		res, err = client.Do(req)
		if err == nil || time.Now().After(deadline) {
			break
		}
	}
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, res.Body)
	res.Body.Close()
	if res.StatusCode != http.StatusOK {
		t.Fatalf("upload: %s, want 200", res.Status)
	}
	for deadline := time.Now().Add(20 * time.Second); !strings.Contains(p.stderr.String(), "Unsolicited"); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("no line about the unsolicited answer within 20 s")
		}
	}
	for _, l := range lines(p.stderr.String()) {
		var rec map[string]any
		if err := json.Unmarshal([]byte(l), &rec); err != nil {
			t.Errorf("stderr line is not JSON: %q", l)
			continue
		}
		if strings.Contains(l, "Unsolicited") && rec["level"] != "WARN" {
			t.Errorf("unsolicited answer logged at %v, want WARN: %s", rec["level"], l)
		}
	}
}
