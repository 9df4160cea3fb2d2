package proxy

import (
	"io"
	"testing"
)

func TestSmokeH1H2(t *testing.T) {
	rec := &recorder{}
	up := newUpstream(t, upTLS, rec)
	tp := startProxy(t, testConfig(up))
	for _, h2 := range []bool{false, true} {
		c := tp.H1
		if h2 {
			c = tp.H2
		}
		res, err := c.Get(tp.URL + "/a/frontend/bootconf")
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(res.Body)
		res.Body.Close()
		if got, want := string(b), "ok"; got != want {
			t.Errorf("body = %q, want %q", got, want)
		}
		if got, want := res.ProtoMajor, map[bool]int{false: 1, true: 2}[h2]; got != want {
			t.Errorf("client proto = %d, want %d", got, want)
		}
		if got, want := rec.last(t).Proto, "HTTP/1.1"; got != want {
			t.Errorf("upstream proto = %q, want %q", got, want)
		}
	}
}
