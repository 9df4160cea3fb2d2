package proxy

import (
	"strings"
	"testing"
)

// TestLogReviewInvalidMethodH2: net/http's HTTP/2 server passes on a
// :method that is not a token ("GE T"), which the HTTP/1.1 front refuses
// with 400. Such a request is the client's fault: it gets 400 (a gRPC call
// INTERNAL, as gRPC maps 400), reaches nothing of Cells, and makes no
// warning (found by review: each one was a 502 and a warn "upstream error"
// line blaming Cells, as many as a client cared to send).
func TestLogReviewInvalidMethodH2(t *testing.T) {
	rec := &recorder{}
	up := newUpstream(t, upTLS, rec)
	cfg := testConfig(up)
	cfg.AccessLog = true
	tp := startProxy(t, cfg)
	c := dialH2(t, tp)
	methods := []string{"GE T", `GET"x`, "G(ET", "GET\x80", "G\tET"}
	var id uint32 = 1
	for _, grpc := range []bool{false, true} {
		for _, m := range methods {
			var extra []string
			if grpc {
				extra = []string{"content-type", "application/grpc"}
			}
			if err := c.request(id, pseudo(tp, m, "/p?pydio_jwt=secret-1", extra...)...); err != nil {
				t.Fatal(err)
			}
			ev := c.answer(t, id)
			want := ":status 400"
			if grpc {
				want = ":status 200" // the gRPC status is in the headers
			}
			if got := ev.String(); got != want {
				t.Errorf("method %q (grpc %v): answer %s, want %s", m, grpc, got, want)
			}
			id += 2
		}
	}
	lines := accessLines(t, tp, 2*len(methods))
	for _, f := range lines {
		if f["proto"] != "grpc" && f["status"] != "400" {
			t.Errorf("method %q: access line status %s, want 400", f["method"], f["status"])
		}
	}
	if n := rec.count(); n != 0 {
		t.Errorf("%d requests with an invalid method reached Cells", n)
	}
	log := tp.Log.String()
	if strings.Contains(log, "upstream error") || strings.Contains(log, "secret") {
		t.Errorf("invalid methods logged as Cells' failure, or a secret logged:\n%s", log)
	}
}
