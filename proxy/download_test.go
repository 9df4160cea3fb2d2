package proxy

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// downloadKinds are the ways Cells answers the direct path: over TLS, and
// in cleartext (CELLS_SITE_NO_TLS=1).
var downloadKinds = []struct {
	name string
	kind upstreamKind
}{{"tls", upTLS}, {"plain", upPlain}}

// TestDownloadChunkNotHeld has Cells send a first part, then wait until
// the client has it before it sends the rest: a proxy that holds bytes
// until its buffer fills, or until the body's end, deadlocks here (Cells
// then breaks the response after 20 s). The first parts are smaller than
// a TLS record, between a record and the proxy's 63 KiB, and beyond it:
// zips Cells builds on the fly, server-sent events. (It took over from
// TestSlowResponseFlushedAsItArrives, which had one small first part, from
// Cells over TLS only.)
func TestDownloadChunkNotHeld(t *testing.T) {
	const rest = "the rest of the archive\n"
	firsts := []int{1, 40000, 100000}
	var clientGot sync.Map // request id -> chan struct{}, closed once the client has the first part
	for _, k := range downloadKinds {
		up := newUpstream(t, k.kind, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			n, _ := strconv.Atoi(strings.TrimPrefix(r.URL.Path, "/first/"))
			if r.URL.Query().Has("length") {
				w.Header().Set("Content-Length", strconv.Itoa(n+len(rest)))
			}
			got, _ := clientGot.Load(r.URL.Query().Get("id"))
			w.Write(patternBody(n))
			http.NewResponseController(w).Flush()
			select {
			case <-got.(chan struct{}):
				io.WriteString(w, rest)
			case <-r.Context().Done():
			case <-time.After(20 * time.Second):
				// Break the response: the client sees an error rather
				// than waiting, or a body that looks complete.
				panic(http.ErrAbortHandler)
			}
		}))
		settle(t, up)
		tp := startProxy(t, testConfig(up))
		for _, pc := range h1h2Clients(tp) {
			for _, first := range firsts {
				for _, length := range []bool{false, true} {
					name := fmt.Sprintf("%s/%s/%d/%s", k.name, pc.name, first, map[bool]string{false: "no-content-length", true: "content-length"}[length])
					t.Run(name, func(t *testing.T) {
						got := make(chan struct{})
						clientGot.Store(name, got)
						url := tp.URL + "/first/" + strconv.Itoa(first) + "?id=" + name
						if length {
							url += "&length"
						}
						res, err := pc.c.Get(url)
						if err != nil {
							t.Fatal(err)
						}
						defer res.Body.Close()
						part := make([]byte, first)
						if _, err := io.ReadFull(res.Body, part); err != nil {
							t.Fatalf("reading the first part: %v", err)
						}
						if got, want := sha(part), sha(patternBody(first)); got != want {
							t.Fatalf("first part sha256 = %s, want %s", got, want)
						}
						close(got)
						tail, err := io.ReadAll(res.Body)
						if err != nil {
							t.Fatalf("reading the rest: %v", err)
						}
						if string(tail) != rest {
							t.Errorf("rest = %q, want %q", tail, rest)
						}
					})
				}
			}
		}
	}
}

// TestDownloadIntegrity downloads bodies of sizes around the edges of a
// TLS record, of the proxy's copy buffers (32 KiB) and of its 63 KiB
// writes, and of about 1 MiB, with a Content-Length and chunked, through
// HTTP/1.1 and HTTP/2 clients from Cells over TLS and in cleartext, and
// checks every byte (sha256) and the framing the client sees.
func TestDownloadIntegrity(t *testing.T) {
	sizes := []int{1, 16<<10 - 1, 16 << 10, 16<<10 + 1, 32<<10 - 1, 32 << 10, 32<<10 + 1,
		64<<10 - 1025, 64<<10 - 1024, 64<<10 - 1023, 64<<10 - 1, 64 << 10, 64<<10 + 1,
		128<<10 - 2049, 128<<10 - 2048, 128<<10 - 2047, 1<<20 + 3}
	for _, k := range downloadKinds {
		up := newUpstream(t, k.kind, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			n, _ := strconv.Atoi(strings.TrimPrefix(r.URL.Path, "/dl/"))
			if r.URL.Query().Has("length") {
				w.Header().Set("Content-Length", strconv.Itoa(n))
			}
			w.Header().Set("Content-Type", "application/octet-stream")
			// In pieces that are no record's size, flushed: a chunk
			// each when chunked.
			p := &pattern{n: int64(n)}
			buf := make([]byte, 20000)
			rc := http.NewResponseController(w)
			for {
				m, err := p.Read(buf)
				w.Write(buf[:m])
				rc.Flush()
				if err != nil {
					return
				}
			}
		}))
		settle(t, up)
		tp := startProxy(t, testConfig(up))
		for _, pc := range h1h2Clients(tp) {
			for _, length := range []bool{false, true} {
				name := k.name + "/" + pc.name + "/" + map[bool]string{false: "chunked", true: "content-length"}[length]
				t.Run(name, func(t *testing.T) {
					for _, size := range sizes {
						url := tp.URL + "/dl/" + strconv.Itoa(size)
						if length {
							url += "?length"
						}
						res, err := pc.c.Get(url)
						if err != nil {
							t.Fatal(err)
						}
						h := sha256.New()
						n, err := io.Copy(h, res.Body)
						res.Body.Close()
						if err != nil {
							t.Fatalf("size %d: reading the body: %v", size, err)
						}
						if got, want := hex.EncodeToString(h.Sum(nil)), sha(patternBody(size)); n != int64(size) || got != want {
							t.Errorf("size %d: got %d bytes sha256 %s, want %d bytes sha256 %s", size, n, got, size, want)
						}
						wantLength := int64(-1) // chunked
						if length {
							wantLength = int64(size)
						}
						if pc.name == "h1" && res.ContentLength != wantLength {
							t.Errorf("size %d: Content-Length %d, want %d", size, res.ContentLength, wantLength)
						}
					}
				})
			}
		}
	}
}
