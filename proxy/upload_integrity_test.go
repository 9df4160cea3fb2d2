package proxy

import (
	"bufio"
	_ "bytes"
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

	"golang.org/x/net/http2"
)

// patternBody is size deterministic bytes.
func patternBody(size int) []byte {
	b := make([]byte, size)
	p := &pattern{n: int64(size)}
	io.ReadFull(p, b)
	return b
}

type hashedUpload struct {
	n   int
	sum string
	err error
	cl  int64
	te  []string
}

func hashingUpstream(t testing.TB, kind upstreamKind) (*testUpstream, *sync.Mutex, *[]hashedUpload) {
	var mu sync.Mutex
	var seenAll []hashedUpload
	up := newUpstream(t, kind, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := sha256.New()
		n, err := io.Copy(h, r.Body)
		s := hashedUpload{int(n), hex.EncodeToString(h.Sum(nil)), err, r.ContentLength, r.TransferEncoding}
		mu.Lock()
		seenAll = append(seenAll, s)
		mu.Unlock()
		if err != nil {
			http.Error(w, "broken", 400)
			return
		}
		fmt.Fprintf(w, "%d %s", n, s.sum)
	}))
	return up, &mu, &seenAll
}

func sha(b []byte) string { s := sha256.Sum256(b); return hex.EncodeToString(s[:]) }

// TestUploadMatrixH1: raw HTTP/1.1 clients writing in odd chunks with
// pauses, sized and chunked, with and without Expect, two uploads per
// kept-alive connection.
func TestUploadMatrixH1(t *testing.T) {
	sizes := []int{1, 12<<10 - 1, 12 << 10, 12<<10 + 1, 16<<10 - 1, 16 << 10, 16<<10 + 1,
		32<<10 - 513, 32<<10 - 512, 32<<10 - 511, 32 << 10, 32<<10 + 1, 64<<10 - 1025, 64<<10 - 1024, 64<<10 - 1023, 64 << 10, 64<<10 + 1, 128<<10 - 2049, 128<<10 - 2048, 128<<10 - 2047, 200001}
	chunks := [][]int{{1, 7, 333, 4097}, {16385, 5}, {32255, 3, 1}, {100000}, {511, 513, 16384}}
	for _, kind := range []upstreamKind{upTLS, upPlain} {
		up, mu, seenAll := hashingUpstream(t, kind)
		settle(t, up)
		tp := startProxy(t, testConfig(up))
		for ci, ch := range chunks {
			for _, mode := range []string{"sized", "expect", "chunked"} {
				t.Run(fmt.Sprintf("k%d/c%d/%s", kind, ci, mode), func(t *testing.T) {
					conn := tp.dialTLS(t, tp.Addr().String(), "http/1.1")
					conn.SetDeadline(time.Now().Add(60 * time.Second))
					br := bufio.NewReader(conn)
					for _, size := range sizes {
						body := patternBody(size)
						head := "PUT /up/" + strconv.Itoa(size) + " HTTP/1.1\r\nHost: x\r\n"
						switch mode {
						case "sized":
							head += "Content-Length: " + strconv.Itoa(size) + "\r\n"
						case "expect":
							head += "Content-Length: " + strconv.Itoa(size) + "\r\nExpect: 100-continue\r\n"
						case "chunked":
							head += "Transfer-Encoding: chunked\r\n"
						}
						head += "\r\n"
						if _, err := io.WriteString(conn, head); err != nil {
							t.Fatal(err)
						}
						if mode == "expect" {
							line, err := br.ReadString('\n')
							if err != nil || !strings.Contains(line, "100") {
								t.Fatalf("want 100, got %q %v", line, err)
							}
							br.ReadString('\n')
						}
						off, k := 0, 0
						for off < size {
							n := ch[k%len(ch)]
							k++
							if n > size-off {
								n = size - off
							}
							p := body[off : off+n]
							if mode == "chunked" {
								p = append([]byte(strconv.FormatInt(int64(n), 16)+"\r\n"), p...)
								p = append(p, "\r\n"...)
							}
							if _, err := conn.Write(p); err != nil {
								t.Fatal(err)
							}
							off += n
							if k%3 == 0 {
								time.Sleep(time.Millisecond)
							}
						}
						if mode == "chunked" {
							io.WriteString(conn, "0\r\n\r\n")
						}
						res, err := http.ReadResponse(br, &http.Request{Method: "PUT"})
						for err == nil && res.StatusCode == 100 {
							res, err = http.ReadResponse(br, &http.Request{Method: "PUT"})
						}
						if err != nil {
							t.Fatalf("size %d: %v", size, err)
						}
						rb, _ := io.ReadAll(res.Body)
						res.Body.Close()
						want := fmt.Sprintf("%d %s", size, sha(body))
						if res.StatusCode != 200 || string(rb) != want {
							mu.Lock()
							last := (*seenAll)[len(*seenAll)-1]
							mu.Unlock()
							t.Fatalf("size %d: status %d body %q, want %q; upstream saw %+v", size, res.StatusCode, rb, want, last)
						}
						if mode == "chunked" {
							// the proxy closes after a chunked request
							conn = tp.dialTLS(t, tp.Addr().String(), "http/1.1")
							conn.SetDeadline(time.Now().Add(60 * time.Second))
							br = bufio.NewReader(conn)
						}
					}
				})
			}
		}
	}
}

// TestUploadEarlyAnswerThenNext: Cells answers an upload before reading all of
// it; the client finishes sending and then sends another upload on the same
// connection. The second must reach Cells intact, or the connection close.
func TestUploadEarlyAnswerThenNext(t *testing.T) {
	for _, kind := range []upstreamKind{upTLS, upPlain} {
		for _, readFirst := range []int{0, 1000, 40000, 100000} {
			for _, size := range []int{20000, 70000, 200000, 300000} {
				t.Run(fmt.Sprintf("k%d/read%d/size%d", kind, readFirst, size), func(t *testing.T) {
					var mu sync.Mutex
					var got []hashedUpload
					up := newUpstream(t, kind, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
						if strings.HasPrefix(r.URL.Path, "/early") {
							io.CopyN(io.Discard, r.Body, int64(readFirst))
							w.WriteHeader(403)
							io.WriteString(w, "denied")
							return
						}
						h := sha256.New()
						n, err := io.Copy(h, r.Body)
						mu.Lock()
						got = append(got, hashedUpload{n: int(n), sum: hex.EncodeToString(h.Sum(nil)), err: err})
						mu.Unlock()
						fmt.Fprintf(w, "%d %s", n, hex.EncodeToString(h.Sum(nil)))
					}))
					settle(t, up)
					tp := startProxy(t, testConfig(up))
					conn := tp.dialTLS(t, tp.Addr().String(), "http/1.1")
					conn.SetDeadline(time.Now().Add(30 * time.Second))
					b1 := patternBody(size)
					b2 := patternBody(size + 7)
					errc := make(chan error, 1)
					go func() {
						io.WriteString(conn, "PUT /early HTTP/1.1\r\nHost: x\r\nContent-Length: "+strconv.Itoa(len(b1))+"\r\n\r\n")
						for off := 0; off < len(b1); off += 4999 {
							end := min(off+4999, len(b1))
							if _, err := conn.Write(b1[off:end]); err != nil {
								errc <- err
								return
							}
							if off%5 == 0 {
								time.Sleep(100 * time.Microsecond)
							}
						}
						io.WriteString(conn, "PUT /second HTTP/1.1\r\nHost: x\r\nContent-Length: "+strconv.Itoa(len(b2))+"\r\n\r\n")
						_, err := conn.Write(b2)
						errc <- err
					}()
					br := bufio.NewReader(conn)
					res, err := http.ReadResponse(br, &http.Request{Method: "PUT"})
					if err != nil {
						t.Fatal(err)
					}
					rb, _ := io.ReadAll(res.Body)
					if res.StatusCode != 403 || string(rb) != "denied" {
						t.Fatalf("first: %d %q", res.StatusCode, rb)
					}
					res, err = http.ReadResponse(br, &http.Request{Method: "PUT"})
					werr := <-errc
					if err != nil {
						t.Logf("second: connection ended: %v (writer: %v)", err, werr)
						mu.Lock()
						defer mu.Unlock()
						for _, s := range got {
							if s.err == nil {
								t.Errorf("Cells took a complete second body although the client got no answer: %+v", s)
							}
						}
						return
					}
					rb, _ = io.ReadAll(res.Body)
					want := fmt.Sprintf("%d %s", len(b2), sha(b2))
					if res.StatusCode != 200 || string(rb) != want {
						t.Fatalf("second: %d %q want %q", res.StatusCode, rb, want)
					}
				})
			}
		}
	}
}

// TestUploadH2StreamEndBeforeComplete: an HTTP/2 request is complete only at
// END_STREAM. A client declares content-length N, sends N bytes without
// END_STREAM, then either more bytes (a malformed request, RFC 9113
// §8.1.1) or RST_STREAM. Cells must not have taken a complete N-byte body.
func TestUploadH2StreamEndBeforeComplete(t *testing.T) {
	for _, size := range []int{100, 20000} {
		for _, then := range []string{"excess", "reset"} {
			t.Run(fmt.Sprintf("%d/%s", size, then), func(t *testing.T) {
				complete := make(chan int, 4)
				up := newUpstream(t, upTLS, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					n, err := io.Copy(io.Discard, r.Body)
					if err == nil && r.Method == "PUT" {
						complete <- int(n)
					}
					io.WriteString(w, "stored")
				}))
				settle(t, up)
				tp := startProxy(t, testConfig(up))
				fc := dialH2(t, tp)
				fc.wmu.Lock()
				fc.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, EndHeaders: true,
					BlockFragment: fc.block(pseudo(tp, "PUT", "/io/bucket/file", "content-length", strconv.Itoa(size))...)})
				for b := patternBody(size); len(b) > 0; {
					k := min(len(b), 16384)
					fc.fr.WriteData(1, false, b[:k])
					b = b[k:]
				}
				fc.wmu.Unlock()
				// Give the proxy time to forward what it has (an interleaving
				// only: the check below does not depend on it).
				select {
				case <-complete:
					t.Errorf("Cells took a complete %d-byte body before the client's stream ended", size)
				case <-time.After(time.Second):
				}
				fc.wmu.Lock()
				if then == "excess" {
					fc.fr.WriteData(1, true, []byte("more than declared"))
				} else {
					fc.fr.WriteRSTStream(1, http2.ErrCodeCancel)
				}
				fc.wmu.Unlock()
				if then == "excess" {
					t.Logf("client got %v", fc.answer(t, 1))
				}
				fc.request(3, pseudo(tp, "GET", "/after")...)
				fc.answer(t, 3)
				select {
				case n := <-complete:
					t.Errorf("Cells took a complete %d-byte body from a stream that did not end cleanly", n)
				default:
				}
			})
		}
	}
}

// TestUploadCellsAnswersWhileReading: Cells answers an upload after its
// first part and reads the rest after (a Go handler with full duplex on),
// and the client sends the rest only once the answer has begun. Every byte
// must reach Cells, in order, and the answer must not wait for the body.
// net/http's HTTP/1 server, unless the handler is full duplex, reads away
// what is left of the client's body (up to 256 KiB) when the answer's header
// goes out, and closes the body: here that held the header back until the
// client sent the rest, which it would not; with the client sending anyway,
// the bytes read away never reached Cells. And the body closed under
// http.Transport's copy raced with its read for the body's end after the
// last byte: on a loaded machine, the connection to Cells of an upload whose
// answer had begun was closed under it (TestLogReviewCutShortBothPaths).
func TestUploadCellsAnswersWhileReading(t *testing.T) {
	const first, rest = 10000, 100000
	for _, kind := range []upstreamKind{upTLS, upPlain} {
		t.Run(fmt.Sprintf("k%d", kind), func(t *testing.T) {
			up := newUpstream(t, kind, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if err := http.NewResponseController(w).EnableFullDuplex(); err != nil {
					t.Errorf("Cells stand-in: %v", err)
				}
				h := sha256.New()
				n, err := io.CopyN(h, r.Body, first)
				io.WriteString(w, "started\n")
				w.(http.Flusher).Flush()
				if err == nil {
					var m int64
					m, err = io.Copy(h, r.Body)
					n += m
				}
				fmt.Fprintf(w, "%d %s %v", n, hex.EncodeToString(h.Sum(nil)), err)
			}))
			tp := startProxy(t, testConfig(up))
			body := patternBody(first + rest)
			conn := tp.dialTLS(t, tp.Addr().String(), "http/1.1")
			conn.SetDeadline(time.Now().Add(10 * time.Second))
			io.WriteString(conn, "PUT /duplex HTTP/1.1\r\nHost: x\r\nContent-Length: "+strconv.Itoa(len(body))+"\r\n\r\n")
			conn.Write(body[:first])
			br := bufio.NewReader(conn)
			res, err := http.ReadResponse(br, &http.Request{Method: "PUT"})
			if err != nil {
				t.Fatalf("no answer from Cells before the rest of the body: %v", err)
			}
			rb := bufio.NewReader(res.Body)
			line, err := rb.ReadString('\n')
			if line != "started\n" {
				t.Fatalf("first line of the answer %q (%v), want %q", line, err, "started\n")
			}
			if _, err := conn.Write(body[first:]); err != nil {
				t.Fatal(err)
			}
			got, err := io.ReadAll(rb)
			want := fmt.Sprintf("%d %s <nil>", len(body), sha(body))
			if res.StatusCode != 200 || string(got) != want || err != nil {
				t.Errorf("Cells answered %d %q (%v), want %q", res.StatusCode, got, err, want)
			}
		})
	}
}
