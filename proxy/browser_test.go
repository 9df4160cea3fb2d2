package proxy

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// browserPage is what the test's Cells serves as its web UI: a script
// that does through the proxy what Cells' web UI does through it, and
// posts what it saw to /report. Each line it reports is "name ok" or
// "name bad: why".
const browserPage = `<!doctype html>
<meta charset="utf-8">
<title>cells-proxy browser test</title>
<script>
const lines = [];
const hex = (buf) => Array.from(new Uint8Array(buf), (b) => b.toString(16).padStart(2, "0")).join("");
async function step(name, f) {
	try {
		const why = await f();
		lines.push(why ? name + " bad: " + why : name + " ok");
	} catch (e) {
		lines.push(name + " bad: " + e);
	}
}
async function main() {
	// The web UI's first calls, many at once over the page's connection.
	await step("parallel", async () => {
		const got = await Promise.all(Array.from({length: 64}, (_, i) =>
			fetch("/a/frontend/state/" + i + "?x=%2F%C3%A9", {headers: {"X-Pydio-Language": "fr"}}).then((r) => r.text())));
		const wrong = got.filter((t, i) => t !== "state " + i + " /a/frontend/state/" + i + "?x=%2F%C3%A9");
		return wrong.length ? wrong.length + " wrong answers, first " + wrong[0] : "";
	});
	await step("protocol", async () => {
		const e = performance.getEntriesByType("resource").find((e) => e.name.includes("/a/frontend/state/0"));
		const want = new URLSearchParams(location.search).get("proto");
		return e && e.nextHopProtocol === want ? "" : "fetched over " + (e && e.nextHopProtocol) + ", want " + want;
	});
	// An upload as the web UI sends parts to /io: 6 MiB and a bit.
	await step("upload", async () => {
		const body = new Uint8Array((6 << 20) + 1234);
		for (let i = 0; i < body.length; i++) body[i] = (i * 7 + (i >> 13)) & 255;
		const want = hex(await crypto.subtle.digest("SHA-256", body));
		const r = await fetch("/io/personal-files/up%20load.bin", {method: "PUT", body});
		const got = await r.text();
		return r.status === 200 && got === want ? "" : "status " + r.status + ", Cells hashed " + got + ", want " + want;
	});
	// A download, as a zip of a folder comes: no length, in pieces.
	await step("download", async () => {
		const r = await fetch("/io/personal-files/folder.zip");
		const got = hex(await crypto.subtle.digest("SHA-256", await r.arrayBuffer()));
		const want = r.headers.get("X-Want-Sha256");
		return got === want ? "" : "SHA-256 " + got + ", want " + want;
	});
	// The websocket of Cells' events, text and binary both ways.
	await step("websocket", () => new Promise((resolve) => {
		const ws = new WebSocket("wss://" + location.host + "/ws/event");
		ws.binaryType = "arraybuffer";
		const sent = ["hello", "x".repeat(100000), new Uint8Array(70000).fill(7)];
		let n = 0;
		ws.onopen = () => sent.forEach((m) => ws.send(m));
		ws.onmessage = (ev) => {
			const want = sent[n++];
			const same = typeof want === "string" ? ev.data === want :
				ev.data.byteLength === want.length && new Uint8Array(ev.data).every((b) => b === 7);
			if (!same) { resolve("message " + n + " differs"); ws.close(); return; }
			if (n === sent.length) { ws.close(1000); resolve(""); }
		};
		ws.onerror = () => resolve("error event");
		ws.onclose = (ev) => { if (n < sent.length) resolve("closed " + ev.code + " after " + n + " messages"); };
	}));
	await fetch("/report", {method: "POST", body: lines.join("\n")});
}
main();
</script>
`

// TestBrowsers loads a page through the proxy in headless Chromium and
// Firefox, as Cells' users load the web UI: over HTTP/2 (ALPN), 64
// requests at once on the page's connection, an upload and a download of
// some MiB, and a websocket (which browsers open over HTTP/1.1 on a
// connection of their own: the proxy offers no extended CONNECT); then
// again with the browser's HTTP/2 turned off. The HTTP/2 page is opened
// at http:// on the redirect port, whose 301 sends the browser on to the
// public port. The two engines' HTTP/2
// stacks are their own (SETTINGS, windows, priorities). The page reports
// what it saw; Cells checks what it got. A browser that is not installed
// is skipped; .ci/run installs both.
func TestBrowsers(t *testing.T) {
	report := make(chan string, 1)
	var mu sync.Mutex
	handshakes := 0 // websocket handshakes that reached Cells
	zip := patternBody(5<<20 + 777)
	zipSum := sha256.Sum256(zip)
	mux := http.NewServeMux()
	mux.HandleFunc("/index.html", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		io.WriteString(w, browserPage)
	})
	mux.HandleFunc("/a/frontend/state/", func(w http.ResponseWriter, r *http.Request) {
		i := strings.TrimPrefix(r.URL.Path, "/a/frontend/state/")
		if r.Header.Get("X-Pydio-Language") != "fr" || r.Header.Get("X-Forwarded-Proto") != "https" {
			http.Error(w, "headers lost", http.StatusBadRequest)
			return
		}
		fmt.Fprintf(w, "state %s %s", i, r.RequestURI)
	})
	mux.HandleFunc("PUT /io/personal-files/{name}", func(w http.ResponseWriter, r *http.Request) {
		h := sha256.New()
		if _, err := io.Copy(h, r.Body); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		io.WriteString(w, hex.EncodeToString(h.Sum(nil)))
	})
	mux.HandleFunc("GET /io/personal-files/folder.zip", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/zip")
		w.Header().Set("X-Want-Sha256", hex.EncodeToString(zipSum[:]))
		for b := zip; len(b) > 0; {
			n := min(len(b), 100_000)
			if _, err := w.Write(b[:n]); err != nil {
				return
			}
			w.(http.Flusher).Flush()
			b = b[n:]
		}
	})
	mux.HandleFunc("/ws/event", func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		handshakes++
		mu.Unlock()
		c, err := websocket.Accept(w, r, &websocket.AcceptOptions{InsecureSkipVerify: true})
		if err != nil {
			return
		}
		defer c.CloseNow()
		c.SetReadLimit(1 << 20)
		for {
			typ, msg, err := c.Read(context.Background())
			if err != nil {
				return
			}
			if err := c.Write(context.Background(), typ, msg); err != nil {
				return
			}
		}
	})
	mux.HandleFunc("POST /report", func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		select {
		case report <- string(b):
		default:
		}
	})
	up := newUpstream(t, upTLS, mux)
	cfg := testConfig(up)
	var caFile string
	caFile, cfg.CertFile, cfg.KeyFile = browserCerts(t)
	tp := startProxy(t, cfg, func(s *Server) {
		// Redirects name the public port, as users reach it.
		s.cfg.RedirectPort = s.Addr().(*net.TCPAddr).Port
	})

	pages := 0
	for _, b := range []struct {
		name string
		bin  []string // the program's names, the first found is run
		run  func(t *testing.T, bin, caFile string, h2 bool, url string, report chan string) string
	}{
		{"Chromium", []string{"chromium", "chromium-browser", "google-chrome"}, runChromium},
		{"Firefox", []string{"firefox-esr", "firefox"}, runFirefox},
	} {
		t.Run(b.name, func(t *testing.T) {
			bin := needProgram(t, b.bin[0], b.bin...)
			needProgram(t, "libnss3-tools", "certutil")
			for _, proto := range []string{"h2", "http/1.1"} {
				t.Run(proto, func(t *testing.T) {
					pages++
					// The HTTP/2 page is typed as users do, http://
					// (the redirect port's 301 takes the browser to
					// https://); the other straight as https://.
					url := tp.URL + "/index.html?proto=" + proto
					if proto == "h2" {
						url = "http://" + tp.RedirectAddr().String() + "/index.html?proto=" + proto
					}
					got := b.run(t, bin, caFile, proto == "h2", url, report)
					lines := strings.Split(got, "\n")
					var bad []string
					for _, step := range []string{"parallel", "protocol", "upload", "download", "websocket"} {
						if !slices.Contains(lines, step+" ok") {
							bad = append(bad, step)
						}
					}
					if len(bad) > 0 {
						t.Errorf("the page reports %q: want %v ok", got, bad)
					}
				})
			}
		})
	}
	mu.Lock()
	defer mu.Unlock()
	if handshakes != pages {
		t.Errorf("Cells got %d websocket handshakes, want one per page (%d): a page's websocket was opened again", handshakes, pages)
	}
}

// runChromium opens url in a headless Chromium whose NSS database
// ($HOME/.pki/nssdb) trusts caFile, and returns what the page posts to
// report; Chromium is stopped then.
func runChromium(t *testing.T, chromium, caFile string, h2 bool, url string, report chan string) string {
	t.Helper()
	dir := t.TempDir()
	nssTrust(t, filepath.Join(dir, ".pki", "nssdb"), caFile)
	args := []string{
		"--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
		"--disable-background-networking", "--disable-component-update", "--disable-sync",
		"--user-data-dir=" + filepath.Join(dir, "profile")}
	if !h2 {
		args = append(args, "--disable-http2")
	}
	return runBrowser(t, exec.Command(chromium, append(args, url)...), dir, report)
}

// runFirefox opens url in a headless Firefox with a profile of its own
// that trusts caFile, and returns what the page posts to report.
func runFirefox(t *testing.T, firefox, caFile string, h2 bool, url string, report chan string) string {
	t.Helper()
	dir := t.TempDir()
	nssTrust(t, dir, caFile)
	prefs := []string{
		`user_pref("browser.shell.checkDefaultBrowser", false);`,
		`user_pref("browser.startup.homepage_override.mstone", "ignore");`,
		`user_pref("datareporting.policy.dataSubmissionEnabled", false);`,
		`user_pref("toolkit.telemetry.reportingpolicy.firstRun", false);`,
		`user_pref("app.update.disabledForTesting", true);`,
		`user_pref("network.captive-portal-service.enabled", false);`,
		`user_pref("network.connectivity-service.enabled", false);`,
		`user_pref("browser.safebrowsing.update.enabled", false);`,
		`user_pref("extensions.update.enabled", false);`,
		`user_pref("network.http.http2.enabled", ` + fmt.Sprint(h2) + `);`,
	}
	if err := os.WriteFile(filepath.Join(dir, "user.js"), []byte(strings.Join(prefs, "\n")+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return runBrowser(t, exec.Command(firefox, "--headless", "--no-remote", "--profile", dir, url), dir, report)
}

// nssTrust makes an NSS certificate database in dir (as Firefox's profile
// and Chromium's ~/.pki/nssdb hold them) that trusts caFile to issue
// server certificates.
func nssTrust(t *testing.T, dir, caFile string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"-N", "-d", "sql:" + dir, "--empty-password"},
		{"-A", "-d", "sql:" + dir, "-n", "cells-proxy test root", "-t", "C,,", "-i", caFile},
	} {
		if out, err := runClient(t, dir, clientEnv(dir), "certutil", args...); err != nil {
			t.Fatalf("certutil %v: %v\n%s", args, err, out)
		}
	}
}

// browserCerts makes a root (newTestCA) and a certificate for 127.0.0.1
// that it issued, as an operator's TLS_CERT_FILE and TLS_KEY_FILE:
// browsers do not take a self-signed server certificate for a root,
// whatever trust it is given. It returns the files of the root, the
// certificate and its key.
func browserCerts(t *testing.T) (caFile, certFile, keyFile string) {
	t.Helper()
	ca := newTestCA(t, "cells-proxy test root")
	certPEM, keyPEM := pemPair(t, *ca.issue(t, true))
	dir := t.TempDir()
	caFile, certFile, keyFile = filepath.Join(dir, "root.pem"), filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	for f, b := range map[string][]byte{caFile: ca.PEM(), certFile: certPEM, keyFile: keyPEM} {
		if err := os.WriteFile(f, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return caFile, certFile, keyFile
}

// runBrowser starts cmd in dir, waits for what the page posts to report,
// and stops the browser.
func runBrowser(t *testing.T, cmd *exec.Cmd, dir string, report chan string) string {
	t.Helper()
	cmd.Dir, cmd.Env = dir, clientEnv(dir)
	out := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting %s: %v", cmd.Path, err)
	}
	defer func() {
		cmd.Process.Kill()
		cmd.Wait()
	}()
	select {
	case got := <-report:
		return got
	case <-time.After(2 * time.Minute):
		t.Fatalf("no report from the page within 2 minutes; %s printed:\n%s", filepath.Base(cmd.Path), out.String())
		return ""
	}
}
