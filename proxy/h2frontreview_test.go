package proxy

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/http2"
)

// TestH2FrontReviewZeroLengthThenData: a request that declares
// content-length 0 but leaves its stream open is complete only at
// END_STREAM: an empty DATA frame ending it lets it through; DATA makes it
// malformed (RFC 9113 §8.1.1), and Cells must not have taken it as a
// complete empty request. Without the wait, the proxy sent it to Cells as
// soon as its HEADERS came.
func TestH2FrontReviewZeroLengthThenData(t *testing.T) {
	rec := &wireRecorder{}
	up := newUpstream(t, upTLS, rec)
	tp := startProxy(t, testConfig(up))
	fc := dialH2(t, tp)
	for i, then := range []string{"", `{"Nodes":[]}`} {
		id := uint32(1 + 4*i)
		fc.wmu.Lock()
		fc.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, EndHeaders: true,
			BlockFragment: fc.block(pseudo(tp, "POST", fmt.Sprintf("/a/tree/create/%d", i), "content-length", "0")...)})
		fc.wmu.Unlock()
		// Time for the proxy to forward what it has (an interleaving
		// only: the checks do not depend on it).
		time.Sleep(300 * time.Millisecond)
		fc.wmu.Lock()
		fc.fr.WriteData(id, true, []byte(then))
		fc.wmu.Unlock()
		want := ":status 200"
		if then != "" {
			want = "RST_STREAM PROTOCOL_ERROR"
		}
		if got := fc.answer(t, id).String(); got != want {
			t.Errorf("content-length 0, then DATA %q: client got %s, want %s", then, got, want)
		}
	}
	fc.request(9, pseudo(tp, "GET", "/after")...)
	fc.answer(t, 9)
	quiesce(t, tp, up)
	var got []string
	for _, w := range rec.all() {
		got = append(got, fmt.Sprintf("%s %s %q %v", w.Method, w.RequestURI, w.Body, w.BodyErr))
	}
	if want := []string{`POST /a/tree/create/0 "" <nil>`, `GET /after "" <nil>`}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("Cells saw %q, want %q", got, want)
	}
}

// TestH2FrontReviewSplitCookies: an HTTP/2 client may split Cookie into
// fields (RFC 9113 §8.2.3); Cells over HTTP/1.1 gets one, joined by "; ".
func TestH2FrontReviewSplitCookies(t *testing.T) {
	rec := &wireRecorder{}
	up := newUpstream(t, upTLS, rec)
	tp := startProxy(t, testConfig(up))
	for _, size := range []int{0, 100, 15000} {
		method := "GET"
		var extra []string
		if size > 0 {
			method = "PUT"
			extra = []string{"content-length", strconv.Itoa(size)}
		}
		fields := pseudo(tp, method, "/c"+strconv.Itoa(size), append(extra, "cookie", "a=1", "cookie", "b=2", "cookie", "c=3")...)
		res := rawH2(t, tp, fields, patternBody(size))
		if res.Status != 200 {
			t.Errorf("size %d: status %d", size, res.Status)
		}
	}
	quiesce(t, tp, up)
	for _, w := range rec.all() {
		if got, want := w.Header["Cookie"], []string{"a=1; b=2; c=3"}; fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("%s: Cells got Cookie %q, want %q", w.RequestURI, got, want)
		}
	}
}

// TestH2FrontReviewDownloadCancels: many concurrent downloads on one
// HTTP/2 connection, some cancelled mid-body: every completed one is
// right, byte for byte.
func TestH2FrontReviewDownloadCancels(t *testing.T) {
	up := newUpstream(t, upTLS, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n, _ := strconv.Atoi(r.URL.Query().Get("n"))
		body := patternBody(n)
		if r.URL.Query().Get("len") == "1" {
			w.Header().Set("Content-Length", strconv.Itoa(n))
		}
		w.Header().Set("X-Path", r.URL.Path)
		for len(body) > 0 {
			k := min(len(body), 7000)
			if _, err := w.Write(body[:k]); err != nil {
				return
			}
			w.(http.Flusher).Flush()
			body = body[k:]
		}
	}))
	tp := startProxy(t, testConfig(up))
	c := tp.H2
	const N = 120
	done := make(chan string, N)
	for i := range N {
		go func() {
			n := []int{0, 10, 5000, 70000, 300000}[i%5]
			path := fmt.Sprintf("/d/%d?n=%d&len=%d", i, n, i%2)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			req, _ := http.NewRequestWithContext(ctx, "GET", tp.URL+path, nil)
			res, err := c.Do(req)
			if err != nil {
				done <- "err " + err.Error()
				return
			}
			defer res.Body.Close()
			if got := res.Header.Get("X-Path"); got != fmt.Sprintf("/d/%d", i) {
				done <- fmt.Sprintf("%s: X-Path %q", path, got)
				return
			}
			if i%3 == 0 && n > 0 {
				buf := make([]byte, n/2+1)
				io.ReadFull(res.Body, buf)
				cancel()
				done <- ""
				return
			}
			b, err := io.ReadAll(res.Body)
			if err != nil {
				done <- fmt.Sprintf("%s: %v", path, err)
				return
			}
			if !bytes.Equal(b, patternBody(n)) {
				done <- fmt.Sprintf("%s: body of %d bytes differs", path, len(b))
				return
			}
			done <- ""
		}()
	}
	awaitReports(t, done, N)
}

// TestH2FrontReviewTrailers: Cells' response trailers reach an HTTP/2
// client on both paths.
func TestH2FrontReviewTrailers(t *testing.T) {
	up := newUpstream(t, upTLS, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("Trailer", "X-Sum")
		io.WriteString(w, "body")
		w.Header().Set("X-Sum", "abc")
		w.Header().Set(http.TrailerPrefix+"X-Late", "late")
	}))
	tp := startProxy(t, testConfig(up))
	for _, size := range []int{0, 40 << 10} {
		var body io.Reader
		if size > 0 {
			body = bytes.NewReader(patternBody(size))
		}
		req, _ := http.NewRequest("POST", tp.URL+"/t", body)
		res, err := tp.H2.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(res.Body)
		res.Body.Close()
		if string(b) != "body" || res.Trailer.Get("X-Sum") != "abc" || res.Trailer.Get("X-Late") != "late" {
			t.Errorf("size %d: body %q trailer %v", size, b, res.Trailer)
		}
	}
}

// TestH2FrontReviewCutResponses: a response Cells cuts short (declared
// length not reached, chunked without its end) reaches an HTTP/2 client
// as an error, never as a complete body.
func TestH2FrontReviewCutResponses(t *testing.T) {
	up := newUpstream(t, upTLS, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		conn, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		defer conn.Close()
		switch r.URL.Path {
		case "/len":
			brw.WriteString("HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + strings.Repeat("x", 50000))
		case "/chunked":
			brw.WriteString("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
		case "/close":
			brw.WriteString("HTTP/1.1 200 OK\r\n\r\n" + strings.Repeat("y", 30000))
		}
		brw.Flush()
		time.Sleep(100 * time.Millisecond)
	}))
	tp := startProxy(t, testConfig(up))
	for _, p := range []string{"/len", "/chunked", "/close"} {
		res, err := tp.H2.Get(tp.URL + p)
		if err != nil {
			t.Fatalf("%s: %v", p, err)
		}
		b, err := io.ReadAll(res.Body)
		res.Body.Close()
		t.Logf("%s: %d bytes, err %v", p, len(b), err)
		if p != "/close" && err == nil {
			t.Errorf("%s: a cut response read as complete (%d bytes)", p, len(b))
		}
		if p == "/close" && (err != nil || len(b) != 30000) {
			t.Errorf("%s: %d bytes, err %v; want 30000, nil", p, len(b), err)
		}
	}
}

// TestH2FrontReviewStatuses: HEAD, 204, 304 and 103 over HTTP/2.
func TestH2FrontReviewStatuses(t *testing.T) {
	up := newUpstream(t, upTLS, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/204":
			w.WriteHeader(204)
		case "/304":
			w.Header().Set("ETag", `"x"`)
			w.WriteHeader(304)
		case "/103":
			w.Header().Set("Link", "</a.css>; rel=preload")
			w.WriteHeader(103)
			w.Header().Del("Link")
			io.WriteString(w, "final")
		default:
			w.Header().Set("Content-Length", "12345")
			if r.Method != "HEAD" {
				w.Write(make([]byte, 12345))
			}
		}
	}))
	tp := startProxy(t, testConfig(up))
	for _, tc := range []struct{ method, path, want string }{
		{"HEAD", "/file", "200 12345 0"},
		{"GET", "/204", "204 0 0"},
		{"GET", "/304", "304 0 0"},
		{"GET", "/103", "200 5 5"},
	} {
		req, _ := http.NewRequest(tc.method, tp.URL+tc.path, nil)
		res, err := tp.H2.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(res.Body)
		res.Body.Close()
		if got := fmt.Sprint(res.StatusCode, " ", res.ContentLength, " ", len(b)); got != tc.want || err != nil {
			t.Errorf("%s %s: %s (%v), want %s", tc.method, tc.path, got, err, tc.want)
		}
	}
}

// TestH2FrontReviewShortBody: a stream that ends before its declared
// content-length never reaches Cells as a complete body.
func TestH2FrontReviewShortBody(t *testing.T) {
	for _, size := range []int{100, 20000, 200000} {
		t.Run(strconv.Itoa(size), func(t *testing.T) {
			rec := &wireRecorder{}
			up := newUpstream(t, upTLS, rec)
			tp := startProxy(t, testConfig(up))
			fc := dialH2(t, tp)
			fc.wmu.Lock()
			fc.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, EndHeaders: true,
				BlockFragment: fc.block(pseudo(tp, "PUT", "/io/b/f", "content-length", strconv.Itoa(size))...)})
			for b := patternBody(size / 2); len(b) > 0; {
				k := min(len(b), 16384)
				fc.fr.WriteData(1, len(b) == k, b[:k])
				b = b[k:]
			}
			fc.wmu.Unlock()
			t.Logf("client got %v", fc.answer(t, 1))
			fc.request(3, pseudo(tp, "GET", "/after")...)
			if got := fc.answer(t, 3).String(); got != ":status 200" {
				t.Errorf("next request: %s", got)
			}
			quiesce(t, tp, up)
			for _, w := range rec.all() {
				if w.Method == "PUT" && w.BodyErr == nil {
					t.Errorf("Cells took a complete %d-byte body, declared %d", len(w.Body), size)
				}
			}
		})
	}
}

// TestH2FrontReviewEarlyAnswer: Cells answers an upload (413, 401) before
// reading its body while the client still sends; the client gets Cells'
// answer and its connection carries the next requests.
func TestH2FrontReviewEarlyAnswer(t *testing.T) {
	up := newUpstream(t, upTLS, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/big":
			http.Error(w, "<Error><Code>EntityTooLarge</Code></Error>", http.StatusRequestEntityTooLarge)
		case "/auth":
			w.Header().Set("WWW-Authenticate", "Bearer")
			http.Error(w, "unauthorized", http.StatusUnauthorized)
		default:
			n, err := io.Copy(io.Discard, r.Body)
			fmt.Fprintf(w, "%d %v", n, err)
		}
	}))
	tp := startProxy(t, testConfig(up))
	for i, p := range []string{"/big", "/auth", "/big", "/auth"} {
		pr, pw := io.Pipe()
		go func() {
			b := patternBody(1 << 20)
			pw.Write(b)
			pw.Close()
		}()
		req, _ := http.NewRequest("PUT", tp.URL+p, pr)
		if i >= 2 {
			req.Header.Set("Expect", "100-continue")
			req.ContentLength = 1 << 20
		}
		res, err := tp.H2.Do(req)
		if err != nil {
			t.Fatalf("%s: %v", p, err)
		}
		b, _ := io.ReadAll(res.Body)
		res.Body.Close()
		pr.CloseWithError(io.ErrClosedPipe)
		if res.StatusCode != 413 && res.StatusCode != 401 {
			t.Errorf("%s: %d %q", p, res.StatusCode, b)
		}
		res, err = tp.H2.Post(tp.URL+"/echo", "text/plain", strings.NewReader("hello"))
		if err != nil {
			t.Fatalf("after %s: %v", p, err)
		}
		b, _ = io.ReadAll(res.Body)
		res.Body.Close()
		if string(b) != "5 <nil>" {
			t.Errorf("after %s: %d %q", p, res.StatusCode, b)
		}
	}
}

// TestH2FrontReviewAuthority: :authority and a differing Host field.
func TestH2FrontReviewAuthority(t *testing.T) {
	rec := &wireRecorder{}
	up := newUpstream(t, upTLS, rec)
	tp := startProxy(t, testConfig(up))
	res := rawH2(t, tp, []string{":method", "GET", ":scheme", "https", ":authority", "files.example.com:8443", ":path", "/a/x", "host", "evil.example"}, nil)
	t.Logf("status %d", res.Status)
	res = rawH2(t, tp, []string{":method", "GET", ":scheme", "https", ":path", "/a/y", "host", "files.example.com:443"}, nil)
	t.Logf("status %d", res.Status)
	quiesce(t, tp, up)
	for _, w := range rec.all() {
		t.Logf("Cells saw %s %s Host %q header %v", w.Method, w.RequestURI, w.Host, w.Header)
	}
}

// TestH2FrontReviewWindowStall: a client that grants no window, then
// grants it bit by bit, gets its whole download.
func TestH2FrontReviewWindowStall(t *testing.T) {
	const size = 300000
	up := newUpstream(t, upTLS, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/len" {
			w.Header().Set("Content-Length", strconv.Itoa(size))
		}
		w.Write(patternBody(size))
	}))
	tp := startProxy(t, testConfig(up))
	for _, p := range []string{"/len", "/chunked"} {
		fc := dialH2At(t, tp, tp.Addr().String(), http2.Setting{ID: http2.SettingInitialWindowSize, Val: 0})
		fc.request(1, pseudo(tp, "GET", p)...)
		if got := fc.answer(t, 1).String(); got != ":status 200" {
			t.Fatalf("%s: %s", p, got)
		}
		time.Sleep(200 * time.Millisecond)
		var body []byte
		for end := false; !end; {
			fc.wmu.Lock()
			fc.fr.WriteWindowUpdate(1, 1000)
			fc.fr.WriteWindowUpdate(0, 1000)
			fc.wmu.Unlock()
			got := 0
			for got < 1000 && !end {
				ev := fc.wait(t, "data", func(ev frameEvent) bool { return ev.StreamID == 1 })
				if ev.Type != http2.FrameData {
					t.Fatalf("%s: %v after %d bytes", p, ev, len(body))
				}
				body = append(body, ev.Data...)
				got += len(ev.Data)
				end = ev.End
			}
		}
		if !bytes.Equal(body, patternBody(size)) {
			t.Errorf("%s: %d bytes, differ", p, len(body))
		}
		fc.Close()
	}
}

// TestH2FrontReviewUploadCancels: concurrent uploads on one HTTP/2
// connection, with and without content-length, a third of them cancelled
// half-way: Cells gets every completed one byte for byte, and never a
// cancelled one as a complete body.
func TestH2FrontReviewUploadCancels(t *testing.T) {
	rec := &wireRecorder{}
	up := newUpstream(t, upTLS, rec)
	tp := startProxy(t, testConfig(up))
	const N = 60
	sizes := []int{5000, 50000, 300000}
	done := make(chan string, N)
	for i := range N {
		go func() {
			n := sizes[i%3]
			body := patternBody(n)
			pr, pw := io.Pipe()
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			cut := i%3 == 1
			go func() {
				half := n / 2
				pw.Write(body[:half])
				if cut {
					cancel()
					pw.CloseWithError(context.Canceled)
					return
				}
				pw.Write(body[half:])
				pw.Close()
			}()
			req, _ := http.NewRequestWithContext(ctx, "PUT", fmt.Sprintf("%s/io/b/%d", tp.URL, i), pr)
			if i%2 == 0 {
				req.ContentLength = int64(n)
			}
			res, err := tp.H2.Do(req)
			if err != nil {
				if !cut {
					done <- fmt.Sprintf("upload %d: %v", i, err)
					return
				}
				done <- ""
				return
			}
			b, _ := io.ReadAll(res.Body)
			res.Body.Close()
			if !cut && (res.StatusCode != 200 || string(b) != "ok") {
				done <- fmt.Sprintf("upload %d: %d %q", i, res.StatusCode, b)
				return
			}
			done <- ""
		}()
	}
	awaitReports(t, done, N)
	quiesce(t, tp, up)
	for _, w := range rec.all() {
		var i int
		fmt.Sscanf(w.RequestURI, "/io/b/%d", &i)
		n := sizes[i%3]
		cut := i%3 == 1
		switch {
		case cut && w.BodyErr == nil:
			t.Errorf("upload %d, cancelled: Cells got a complete body of %d bytes", i, len(w.Body))
		case !cut && (w.BodyErr != nil || !bytes.Equal(w.Body, patternBody(n))):
			t.Errorf("upload %d: Cells got %d bytes, err %v; want %d bytes", i, len(w.Body), w.BodyErr, n)
		}
	}
}

// TestH2FrontReviewCurl: curl over HTTP/2, as cec's and scripts' uploads
// go: a file of known length, one from stdin (no content-length), and a
// raw path with escapes and a query kept byte for byte.
func TestH2FrontReviewCurl(t *testing.T) {
	curl, err := exec.LookPath("curl")
	if err != nil {
		t.Skip("no curl")
	}
	rec := &wireRecorder{}
	up := newUpstream(t, upTLS, rec)
	tp := startProxy(t, testConfig(up))
	dir := t.TempDir()
	ca := proxyCA(t, tp)
	file := filepath.Join(dir, "f")
	body := patternBody(3 << 20)
	if err := os.WriteFile(file, body, 0o600); err != nil {
		t.Fatal(err)
	}
	const target = "/io/b/a%2Fb/%2e%2e//x;y/%C3%A9?q=a+b%20c&X-Amz-Signature=s"
	base := []string{"--http2", "-sS", "--cacert", ca, "--path-as-is", "-o", "/dev/null", "-w", "%{http_version} %{http_code}",
		"-b", "a=1; b=2", "-H", "X-Forwarded-For: 6.6.6.6", "-H", "X-Real-IP: 6.6.6.6"}
	for _, tc := range []struct {
		name string
		args []string
	}{
		{"get", nil},
		{"file", []string{"-T", file}},
		{"stdin", []string{"-T", "-"}},
	} {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		cmd := exec.CommandContext(ctx, curl, append(append(base, tc.args...), tp.URL+target)...)
		if tc.name == "stdin" {
			cmd.Stdin = bytes.NewReader(body)
		}
		out, err := cmd.CombinedOutput()
		cancel()
		if got, want := string(out), "2 200"; err != nil || got != want {
			t.Errorf("curl %s: %q, %v; want %q", tc.name, out, err, want)
		}
	}
	quiesce(t, tp, up)
	for _, w := range rec.all() {
		if w.RequestURI != target {
			t.Errorf("%s: Cells got target %q, want %q", w.Method, w.RequestURI, target)
		}
		if got := fmt.Sprint(w.Header["X-Forwarded-For"], w.Header["X-Real-Ip"], w.Header["Cookie"]); got != "[127.0.0.1] [127.0.0.1] [a=1; b=2]" {
			t.Errorf("%s: Cells got X-Forwarded-For, X-Real-Ip, Cookie %s", w.Method, got)
		}
		if w.Method == "PUT" && (w.BodyErr != nil || !bytes.Equal(w.Body, body)) {
			t.Errorf("PUT: Cells got %d bytes, err %v; want %d", len(w.Body), w.BodyErr, len(body))
		}
	}
	if got := len(rec.all()); got != 3 {
		t.Errorf("Cells got %d requests, want 3", got)
	}
}

// TestH2FrontReviewUploadEndings: uploads on one connection, their DATA
// interleaved, each ended one way: cleanly, reset before or just after its
// last declared byte, with more than declared, or with END_STREAM short
// of it. Cells gets the clean ones byte for byte and never takes another
// as complete; every stream gets an answer and the connection lives on.
func TestH2FrontReviewUploadEndings(t *testing.T) {
	rec := &wireRecorder{}
	up := newUpstream(t, upTLS, rec)
	tp := startProxy(t, testConfig(up))
	fc := dialH2(t, tp)
	fc.request(1, pseudo(tp, "GET", "/first")...)
	fc.answer(t, 1) // the server's SETTINGS are in
	type upload struct {
		id     uint32
		size   int
		sized  bool
		ending string
		sent   int
	}
	var ups []*upload
	id := uint32(3)
	for _, size := range []int{1, 12 << 10, 12<<10 + 1, 70000} {
		for _, sized := range []bool{true, false} {
			for _, ending := range []string{"clean", "reset-before", "reset-after", "excess", "short"} {
				if !sized && (ending == "excess" || ending == "short") {
					continue
				}
				ups = append(ups, &upload{id: id, size: size, sized: sized, ending: ending})
				id += 2
			}
		}
	}
	write := func(f func() error) {
		fc.wmu.Lock()
		defer fc.wmu.Unlock()
		if err := f(); err != nil {
			t.Fatal(err)
		}
	}
	for _, u := range ups {
		kv := pseudo(tp, "PUT", fmt.Sprintf("/io/b/%d", u.id))
		if u.sized {
			kv = append(kv, "content-length", strconv.Itoa(u.size))
		}
		write(func() error {
			return fc.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: u.id, EndHeaders: true, BlockFragment: fc.block(kv...)})
		})
	}
	// Round-robin, up to 5000 bytes at a time; each stream stops one
	// byte short of its end, which its ending decides.
	for more := true; more; {
		more = false
		for _, u := range ups {
			left := u.size - 1 - u.sent
			if u.ending == "short" {
				left = u.size/2 - u.sent
			}
			if left <= 0 {
				continue
			}
			k := min(left, 5000)
			b := patternBody(u.size)[u.sent : u.sent+k]
			write(func() error { return fc.fr.WriteData(u.id, false, b) })
			u.sent += k
			more = true
		}
	}
	last := func(u *upload) []byte { return patternBody(u.size)[u.size-1:] }
	for _, u := range ups {
		write(func() error {
			switch u.ending {
			case "clean":
				return fc.fr.WriteData(u.id, true, last(u))
			case "reset-before":
				return fc.fr.WriteRSTStream(u.id, http2.ErrCodeCancel)
			case "reset-after":
				if err := fc.fr.WriteData(u.id, false, last(u)); err != nil {
					return err
				}
				return fc.fr.WriteRSTStream(u.id, http2.ErrCodeCancel)
			case "excess":
				return fc.fr.WriteData(u.id, true, append(last(u), 'x'))
			default: // short
				return fc.fr.WriteData(u.id, true, nil)
			}
		})
	}
	// The answers come in any order: one wait takes them all.
	answers := map[uint32]string{}
	waiting := 0
	for _, u := range ups {
		if !strings.HasPrefix(u.ending, "reset") {
			waiting++
		}
	}
	fc.wait(t, "the uploads' answers", func(ev frameEvent) bool {
		u := ups[(ev.StreamID-3)/2%uint32(len(ups))]
		if ev.StreamID < 3 || u.id != ev.StreamID || strings.HasPrefix(u.ending, "reset") || answers[ev.StreamID] != "" {
			return false
		}
		if ev.Type == http2.FrameHeaders || ev.Type == http2.FrameRSTStream {
			answers[ev.StreamID] = ev.String()
			waiting--
		}
		return waiting == 0
	})
	for _, u := range ups {
		if got := answers[u.id]; u.ending == "clean" && got != ":status 200" {
			t.Errorf("upload %d (%d bytes, sized %v) ended cleanly: %v", u.id, u.size, u.sized, got)
		}
	}
	fc.request(id, pseudo(tp, "GET", "/last")...)
	if got := fc.answer(t, id).String(); got != ":status 200" {
		t.Errorf("request after the uploads: %s", got)
	}
	quiesce(t, tp, up)
	byID := map[uint32]*upload{}
	for _, u := range ups {
		byID[u.id] = u
	}
	clean := 0
	for _, w := range rec.all() {
		var id uint32
		if _, err := fmt.Sscanf(w.RequestURI, "/io/b/%d", &id); err != nil {
			continue
		}
		u := byID[id]
		if u.ending == "clean" {
			clean++
			if w.BodyErr != nil || !bytes.Equal(w.Body, patternBody(u.size)) {
				t.Errorf("upload %d (%d bytes, sized %v), clean: Cells got %d bytes, err %v", id, u.size, u.sized, len(w.Body), w.BodyErr)
			}
		} else if w.BodyErr == nil {
			t.Errorf("upload %d (%d bytes, sized %v), %s: Cells took a complete body of %d bytes", id, u.size, u.sized, u.ending, len(w.Body))
		}
	}
	if clean != 8 {
		t.Errorf("Cells got %d clean uploads, want 8", clean)
	}
}

// TestH2FrontReviewCancelsBeforeAnswer: requests on one HTTP/2
// connection, a third of them cancelled while Cells prepares its answer,
// in rounds that reuse the connections to Cells: every answer that
// arrives is its own request's, byte for byte.
func TestH2FrontReviewCancelsBeforeAnswer(t *testing.T) {
	up := newUpstream(t, upTLS, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		i, _ := strconv.Atoi(r.URL.Query().Get("i"))
		select {
		case <-time.After(time.Duration(i%5) * 10 * time.Millisecond):
		case <-r.Context().Done():
			return
		}
		w.Header().Set("X-Path", r.URL.RequestURI())
		w.Write(patternBody(1000 + i))
	}))
	tp := startProxy(t, testConfig(up))
	for round := range 4 {
		const N = 60
		done := make(chan string, N)
		for i := range N {
			go func() {
				path := fmt.Sprintf("/r/%d?i=%d", round, i)
				ctx, cancel := context.WithCancel(context.Background())
				defer cancel()
				if i%3 == 0 {
					time.AfterFunc(time.Duration(i%7)*7*time.Millisecond, cancel)
				}
				req, _ := http.NewRequestWithContext(ctx, "GET", tp.URL+path, nil)
				res, err := tp.H2.Do(req)
				if err != nil {
					if i%3 != 0 {
						done <- fmt.Sprintf("%s: %v", path, err)
						return
					}
					done <- ""
					return
				}
				b, err := io.ReadAll(res.Body)
				res.Body.Close()
				switch {
				case err != nil && i%3 == 0:
					done <- ""
				case err != nil:
					done <- fmt.Sprintf("%s: %v", path, err)
				case res.Header.Get("X-Path") != path || !bytes.Equal(b, patternBody(1000+i)):
					done <- fmt.Sprintf("%s: got the answer of %q (%d bytes)", path, res.Header.Get("X-Path"), len(b))
				default:
					done <- ""
				}
			}()
		}
		awaitReports(t, done, N)
	}
}

// TestH2FrontReviewZeroLengthNeverEnds: a request declared empty whose
// stream never ends is cut by the idle timeout like any stalled body
// (408), and Cells sees nothing of it.
func TestH2FrontReviewZeroLengthNeverEnds(t *testing.T) {
	rec := &wireRecorder{}
	up := newUpstream(t, upTLS, rec)
	cfg := testConfig(up)
	cfg.IdleTimeout = 300 * time.Millisecond
	tp := startProxy(t, cfg)
	fc := dialH2(t, tp)
	fc.wmu.Lock()
	fc.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, EndHeaders: true,
		BlockFragment: fc.block(pseudo(tp, "POST", "/a/never", "content-length", "0")...)})
	fc.wmu.Unlock()
	if got, want := fc.answer(t, 1).String(), ":status 408"; got != want {
		t.Errorf("client got %s, want %s", got, want)
	}
	quiesce(t, tp, up)
	if n := len(rec.all()); n != 0 {
		t.Errorf("Cells got %d requests, want none", n)
	}
}

// awaitReports takes n reports from done, each empty or a failure to
// report, for at most a minute each.
func awaitReports(t *testing.T, done <-chan string, n int) {
	t.Helper()
	for range n {
		select {
		case s := <-done:
			if s != "" {
				t.Error(s)
			}
		case <-time.After(60 * time.Second):
			t.Fatal("timed out")
		}
	}
}
