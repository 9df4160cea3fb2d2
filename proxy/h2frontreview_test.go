package proxy

import (
	"fmt"
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
