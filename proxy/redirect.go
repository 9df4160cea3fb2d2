package proxy

import (
	"net/http"
	"strconv"
)

// redirect serves the plain HTTP port: 301 to the same target on https,
// never contacting Cells. A Host outside PROXY_SERVER_NAMES gets 404, as
// nginx's default server in the classic setup.
func (s *Server) redirect(w http.ResponseWriter, r *http.Request) {
	host := hostOnly(r.Host)
	if host == "" || !s.fwd.hostAllowed(r.Host) {
		http.NotFound(w, r)
		return
	}
	target := "https://" + bracketIPv6(host)
	if p := s.cfg.RedirectPort; p != 443 {
		target += ":" + strconv.Itoa(p)
	}
	uri := r.RequestURI
	if len(uri) == 0 || uri[0] != '/' {
		uri = requestPath(r)
		if r.URL.RawQuery != "" {
			uri += "?" + r.URL.RawQuery
		}
	}
	w.Header().Set("Location", target+uri)
	w.WriteHeader(http.StatusMovedPermanently)
}

func bracketIPv6(host string) string {
	for i := 0; i < len(host); i++ {
		if host[i] == ':' {
			return "[" + host + "]"
		}
	}
	return host
}
