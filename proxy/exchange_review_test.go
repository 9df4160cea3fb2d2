package proxy

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptrace"
	"net/textproto"
	"testing"
	"time"
)

// TestH2Dropped1xxLeavesNoHeader: a 1xx from Cells that exchange.WriteHeader
// drops (HTTP/2, body not yet read: a1c5474) does not leave its fields in
// the header map for the final response. Cells sends 103 with Link and then
// its answer without reading the upload, whose client holds its body until
// the answer came, so the proxy has read none of it when the 103 comes:
// through http.Transport (ReverseProxy's Got1xxResponse), with a declared
// length and without. The direct path cannot get there: it sends a body
// (up to maxSyncBody) whole before reading Cells' answer.
func TestH2Dropped1xxLeavesNoHeader(t *testing.T) {
	up := newUpstream(t, upTLS, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Link", "</a.css>; rel=preload")
		w.Header().Set("X-Hint", "1")
		w.WriteHeader(http.StatusEarlyHints)
		w.Header().Del("Link")
		w.Header().Del("X-Hint")
		w.Header().Set("Connection", "close") // the body is not read
		io.WriteString(w, "denied")
	}))
	tp := startProxy(t, testConfig(up))
	for _, tc := range []struct {
		name   string
		length int64
	}{
		{"declared length", 1 << 20},
		{"streamed", -1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pr, pw := io.Pipe()
			defer pw.Close()
			var hints []string
			trace := &httptrace.ClientTrace{Got1xxResponse: func(code int, h textproto.MIMEHeader) error {
				hints = append(hints, fmt.Sprint(code))
				return nil
			}}
			ctx, cancel := context.WithTimeout(httptrace.WithClientTrace(context.Background(), trace), time.Minute)
			defer cancel()
			req, err := http.NewRequestWithContext(ctx, http.MethodPut, tp.URL+"/io/upload", pr)
			if err != nil {
				t.Fatal(err)
			}
			req.ContentLength = tc.length
			res, err := tp.H2.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(res.Body)
			res.Body.Close()
			if got, want := string(b), "denied"; got != want {
				t.Errorf("body %q, want %q", got, want)
			}
			if len(hints) != 0 {
				t.Errorf("client got 1xx %q before any body byte was read, want none (dropped)", hints)
			}
			for _, k := range []string{"Link", "X-Hint"} {
				if got := res.Header.Values(k); len(got) != 0 {
					t.Errorf("final response has %s %q from the dropped 103", k, got)
				}
			}
		})
	}
}
