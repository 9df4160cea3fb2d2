package proxy

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"net/url"
	"os"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/kelseyhightower/envconfig"
)

// env is the process environment as cells-proxy reads it. Every field is a
// string so that Load can report every bad value at once: envconfig stops at
// the first field it cannot decode. The desc tags are the documentation:
// `cells-proxy env` prints them and the README table is checked against them.
type env struct {
	Upstream           string `envconfig:"CELLS_UPSTREAM" desc:"Cells main port: https://cells:8080 (Cells keeps TLS, recommended) or http://cells:8080 (Cells with CELLS_SITE_NO_TLS=1). Required"`
	UpstreamCAFile     string `envconfig:"CELLS_UPSTREAM_CA_FILE" desc:"PEM bundle that verifies the upstream certificate (Cells writes its self-signed root to <working dir>/certs/rootCA.pem); re-read when it changes (checked every 5 s, and at SIGHUP): new connections to Cells verify with it, and those made before take no new request"`
	UpstreamServerName string `envconfig:"CELLS_UPSTREAM_SERVER_NAME" desc:"name verified in the upstream certificate, without scheme or port; default: the host of CELLS_UPSTREAM (for gRPC, of CELLS_GRPC_UPSTREAM when it is set)"`
	UpstreamInsecure   string `envconfig:"CELLS_UPSTREAM_INSECURE" default:"false" desc:"true: do not verify the upstream certificate (logged as a warning at start)"`
	GRPCUpstream       string `envconfig:"CELLS_GRPC_UPSTREAM" desc:"where gRPC goes: https://host:port (h2 over TLS) or h2c://host:port (cleartext HTTP/2). Default: CELLS_UPSTREAM when it is https; when it is http and PYDIO_GRPC_EXTERNAL is set, h2c://<upstream host>:<that port>"`
	GRPCExternal       string `envconfig:"PYDIO_GRPC_EXTERNAL" desc:"a port: also serve gRPC over TLS on it, on the host of PROXY_HTTPS_ADDR (the classic 33060 setup for Cells Sync)"`
	GRPCExternalAlias  string `envconfig:"CELLS_GRPC_EXTERNAL" desc:"alias of PYDIO_GRPC_EXTERNAL (the Cells v3+ name); if both are set they must give the same port (33060 and 033060 do)"`
	CertFile           string `envconfig:"TLS_CERT_FILE" desc:"public certificate chain (PEM). With TLS_KEY_FILE; both absent: a self-signed certificate is generated in memory"`
	KeyFile            string `envconfig:"TLS_KEY_FILE" desc:"private key of TLS_CERT_FILE (PEM)"`
	ACMEWebroot        string `envconfig:"PROXY_ACME_WEBROOT" desc:"directory given to certbot --webroot -w (or acme.sh --webroot, lego --http.webroot): the plain HTTP port answers /.well-known/acme-challenge/<token> from <dir>/.well-known/acme-challenge/, on any Host, instead of redirecting it, so that HTTP-01 renewals pass while cells-proxy holds port 80. Empty: everything is redirected"`
	HSTS               string `envconfig:"PROXY_HSTS" default:"auto" desc:"Strict-Transport-Security added to HTTPS responses that lack one: auto (max-age=31536000 with TLS_CERT_FILE, none with the self-signed certificate), off, or the header value, e.g. max-age=63072000; includeSubDomains"`
	HTTPSAddr          string `envconfig:"PROXY_HTTPS_ADDR" default:":8443" desc:"public listener: TLS (or cleartext with PROXY_TLS=off), HTTP/1.1, HTTP/2 and gRPC"`
	HTTPAddr           string `envconfig:"PROXY_HTTP_ADDR" default:":8080" desc:"plain listener that answers 301 to https (308 for methods other than GET and HEAD, so uploads keep their body); off disables it"`
	RedirectPort       string `envconfig:"PROXY_REDIRECT_HTTPS_PORT" default:"443" desc:"port written in redirects: the one users reach from outside, not the container's. The first HTTPS request whose Host names another port is logged as a warning"`
	ServerNames        string `envconfig:"PROXY_SERVER_NAMES" desc:"comma list of public host names, each whole (no wildcard; an internationalized name in its xn-- form), or IP addresses (IPv6 with or without brackets: ::1 or [2001:db8::1]); any port passes; other Host values get 421 on HTTPS and 404 on the redirect port. Empty: any"`
	TLS                string `envconfig:"PROXY_TLS" default:"on" desc:"off: the public port speaks cleartext (a load balancer terminates TLS in front) and cmux splits h2c prior knowledge from HTTP/1; Cells is then told X-Forwarded-Proto: http unless PROXY_TRUSTED_PROXIES names the load balancer, whose https it believes: set it, or Cells builds http:// links"`
	TrustedProxies     string `envconfig:"PROXY_TRUSTED_PROXIES" desc:"comma list of CIDRs (an IPv6 one bare or in brackets: fd00::/8, [fd00::]/8) whose X-Forwarded-Proto and X-Forwarded-For are believed: the chain is followed from the right past them to the client, and Cells gets it from there on. A CIDR with host bits set (10.0.0.1/8) is taken as its network, with a warning at start. Empty: none"`
	MaxBodySize        string `envconfig:"PROXY_MAX_BODY_SIZE" default:"0" desc:"largest request body, e.g. 200MiB or 1G; larger bodies get 413. 0: no limit"`
	IdleTimeout        string `envconfig:"PROXY_IDLE_TIMEOUT" default:"10m" desc:"a proxied HTTP exchange with no byte moving either way for this long is cut (nginx proxy_read_timeout and proxy_send_timeout): 504 if Cells never answered, 408 if the client stopped sending its body; an HTTP/2 connection whose client takes no byte for this long, or 60s if shorter (nginx send_timeout), is closed"`
	WSIdleTimeout      string `envconfig:"PROXY_WS_IDLE_TIMEOUT" default:"24h" desc:"the same for websockets (Cells pings every 54 s)"`
	ShutdownTimeout    string `envconfig:"PROXY_SHUTDOWN_TIMEOUT" default:"30s" desc:"how long in-flight requests may finish after SIGTERM before connections are closed; gRPC calls Cells has not finished get at most 5s of it"`
	ReadHeaderTimeout  string `envconfig:"PROXY_READ_HEADER_TIMEOUT" default:"30s" desc:"a client must send a whole request head within this, or its connection is closed (slowloris): on HTTP/1.1 the request line and headers, on HTTP/2 a header block from its HEADERS frame to its last CONTINUATION (nginx client_header_timeout), closed with GOAWAY PROTOCOL_ERROR"`
	MaxHeaderBytes     string `envconfig:"PROXY_MAX_HEADER_BYTES" default:"64KiB" desc:"largest request head, HTTP/1.1 and HTTP/2 alike; larger heads get 431 (nginx allows 32 KiB)"`
	HealthAddr         string `envconfig:"PROXY_HEALTH_ADDR" default:"127.0.0.1:8099" desc:"plain HTTP listener for /livez and /readyz, used by cells-proxy healthcheck; on loopback by default, so never published; another address (0.0.0.0:8099 for kubelet probes of the pod IP) exposes them, and /readyz says why Cells does not answer: its address, Go's errors; off disables it, and then cells-proxy healthcheck (the image's HEALTHCHECK) always reports unhealthy: disable the container's healthcheck too. Port 0 (any free port) is refused: the healthcheck could not find it"`
	LogLevel           string `envconfig:"PROXY_LOG_LEVEL" default:"info" desc:"debug, info, warn or error"`
	LogFormat          string `envconfig:"PROXY_LOG_FORMAT" default:"json" desc:"json or text"`
	AccessLog          string `envconfig:"PROXY_ACCESS_LOG" default:"true" desc:"true: one log line per request"`
}

// Variable describes one environment variable cells-proxy reads.
type Variable struct {
	Name    string
	Default string
	Desc    string
}

// Variables lists every environment variable cells-proxy reads, in the order
// of the documentation.
func Variables() []Variable {
	t := reflect.TypeFor[env]()
	vars := make([]Variable, 0, t.NumField())
	for f := range t.Fields() {
		vars = append(vars, Variable{
			Name:    f.Tag.Get("envconfig"),
			Default: f.Tag.Get("default"),
			Desc:    f.Tag.Get("desc"),
		})
	}
	return vars
}

// Config is the validated configuration of a Server. Its zero value is not
// usable: build it with Load (tests fill it in, as Load would: there is no
// separate validation).
type Config struct {
	// Upstream is the Cells main port, scheme http or https.
	Upstream *url.URL
	// UpstreamCAFile verifies the upstream certificate; empty: the system roots.
	UpstreamCAFile string
	// UpstreamServerName is the name checked in the upstream certificate;
	// empty: the host of Upstream.
	UpstreamServerName string
	// UpstreamInsecure skips upstream certificate verification.
	UpstreamInsecure bool
	// GRPCUpstream receives gRPC calls, scheme https or h2c. Nil: gRPC calls
	// get UNAVAILABLE with a message naming the variable to set.
	GRPCUpstream *url.URL
	// GRPCAddr, when not empty, is the dedicated gRPC listener (PYDIO_GRPC_EXTERNAL).
	GRPCAddr string
	// GRPCVar is the variable that set GRPCAddr, PYDIO_GRPC_EXTERNAL or its
	// alias CELLS_GRPC_EXTERNAL, for the messages about it; empty:
	// PYDIO_GRPC_EXTERNAL.
	GRPCVar string

	// CertFile and KeyFile hold the public certificate; both empty: self-signed.
	CertFile, KeyFile string
	// ACMEWebroot, when set, is where the redirect port finds HTTP-01
	// challenge files (acme.go).
	ACMEWebroot string
	// HSTS is the Strict-Transport-Security value added to the responses of
	// the public port when TLS is on and Cells sent none; empty: none.
	HSTS string
	// HTTPSAddr is the public listener.
	HTTPSAddr string
	// HTTPAddr is the redirect listener; empty: none.
	HTTPAddr string
	// RedirectPort is written in redirects, unless it is 443.
	RedirectPort int
	// ServerNames are the accepted Host names, lower case, IPv6 addresses
	// without brackets in their usual form (netip.Addr.String); empty: any.
	ServerNames []string
	// TLS is false when a load balancer terminates TLS in front of the proxy.
	TLS bool
	// TrustedProxies are the peers whose forwarding headers are believed.
	TrustedProxies []netip.Prefix
	// MaxBodySize caps request bodies; 0: no limit.
	MaxBodySize int64
	// IdleTimeout cuts an HTTP exchange in which no byte moved for this long.
	IdleTimeout time.Duration
	// WSIdleTimeout does the same for websockets.
	WSIdleTimeout time.Duration
	// ShutdownTimeout bounds the drain after SIGTERM.
	ShutdownTimeout time.Duration
	// ReadHeaderTimeout bounds the time a client takes to send a request
	// head; zero: 30 s.
	ReadHeaderTimeout time.Duration
	// MaxHeaderBytes caps the size of a request head; zero: 64 KiB.
	MaxHeaderBytes int
	// HealthAddr serves /livez and /readyz; empty: none.
	HealthAddr string

	LogLevel  slog.Level
	LogFormat string // "json" or "text"
	AccessLog bool

	// Ignored are the variables of the environment that look meant for
	// cells-proxy but that it does not read (a typo); New warns of each.
	Ignored []IgnoredVariable
	// Warnings are the values Load accepted but took otherwise than
	// written; New warns of each.
	Warnings []Warning
}

// Warning is a value of a variable that Load accepted but that may not do
// what the operator meant.
type Warning struct {
	Msg      string // the log line's message, constant
	Variable string
	Value    string // as written
	TakenAs  string // what cells-proxy uses in its place; empty: nothing, the value has no effect
	Fix      string // the setting that makes the value do what was meant; empty: none to give
}

// IgnoredVariable is a variable of the environment that cells-proxy does not
// read although its name looks like one of its own.
type IgnoredVariable struct {
	Name  string
	Meant string // the variable probably meant; empty: none is close
}

// Load reads the configuration from the process environment. The error joins
// one line per problem, each naming its variable and the fix.
func Load() (*Config, error) {
	var e env
	if err := envconfig.Process("", &e); err != nil {
		// Only strings are decoded, so this cannot fail on a value.
		return nil, fmt.Errorf("reading the environment: %w", err)
	}
	padding := e.unpad()
	e.applyDefaults()
	ignored := ignoredVariables(os.Environ())
	c, err := e.parse()
	if err != nil || len(padding) > 0 {
		// A misspelt name is often why a variable is missing or
		// another one contradicts it: say so with the problems.
		errs := append(padding, err)
		for _, v := range ignored {
			if v.Meant != "" {
				errs = append(errs, fmt.Errorf("%s is not a cells-proxy variable and is ignored: did you mean %s?", v.Name, v.Meant))
			}
		}
		return nil, errors.Join(errs...)
	}
	c.Ignored = ignored
	c.noEffect(os.LookupEnv)
	return c, nil
}

// noEffect adds a warning for each variable set to a value that the rest
// of the configuration leaves without effect: the operator expects it to
// apply, as with nginx's directives, which warn when they cannot.
func (c *Config) noEffect(lookup func(string) (string, bool)) {
	set := func(name string) (string, bool) {
		v, ok := lookup(name)
		return v, ok && strings.TrimSpace(v) != "" // empty is unset
	}
	if v, ok := set("PROXY_HSTS"); ok && !c.TLS && c.HSTS != "" {
		c.Warnings = append(c.Warnings, Warning{
			Msg:      "PROXY_HSTS does nothing with PROXY_TLS=off: HSTS is sent over HTTPS only, so the TLS front before cells-proxy must send it; unset it",
			Variable: "PROXY_HSTS", Value: v,
		})
	}
	if v, ok := set("PROXY_REDIRECT_HTTPS_PORT"); ok && c.HTTPAddr == "" {
		c.Warnings = append(c.Warnings, Warning{
			Msg:      "PROXY_REDIRECT_HTTPS_PORT does nothing with PROXY_HTTP_ADDR=off: there is no redirect port; unset it",
			Variable: "PROXY_REDIRECT_HTTPS_PORT", Value: v,
		})
	}
	// Cells in clear and gRPC with it (topology B): nothing verifies a
	// certificate of Cells. compose.example.yml says to drop the CA file
	// when switching to it; one left in place is read and used by nothing.
	if c.Upstream.Scheme == "http" && (c.GRPCUpstream == nil || c.GRPCUpstream.Scheme == "h2c") {
		for _, name := range []string{"CELLS_UPSTREAM_CA_FILE", "CELLS_UPSTREAM_SERVER_NAME"} {
			if v, ok := set(name); ok {
				c.Warnings = append(c.Warnings, Warning{
					Msg:      name + " does nothing: no connection to Cells uses TLS (http:// CELLS_UPSTREAM, gRPC in clear); unset it",
					Variable: name, Value: v,
				})
			}
		}
	}
}

// ignoredVariables lists the variables of environ that cells-proxy does not
// read but that look meant for it: any in its PROXY_ namespace or named like
// one of its files or upstreams, and any spelt within two letters of one of
// its own, case aside. A typo would otherwise leave the default in force
// without a word, where nginx refuses an unknown directive. They are warned
// of, not refused: a Kubernetes service called "proxy" puts PROXY_PORT and
// the like in every container's environment, and Cells' own variables
// (CELLS_SITE_NO_TLS, ...) may share an env file with cells-proxy.
func ignoredVariables(environ []string) []IgnoredVariable {
	known := Variables()
	var rows [2][]int // editDistance's, for every pair
	var out []IgnoredVariable
	for _, kv := range environ {
		name, _, _ := strings.Cut(kv, "=")
		if slices.ContainsFunc(known, func(v Variable) bool { return v.Name == name }) {
			continue
		}
		upper := strings.ToUpper(name)
		ours := false
		for _, p := range []string{"PROXY_", "CELLS_UPSTREAM", "CELLS_GRPC_UPSTREAM", "TLS_CERT", "TLS_KEY"} {
			ours = ours || strings.HasPrefix(upper, p)
		}
		// The variable meant: one letter off; else one that the name
		// begins (CELLS_UPSTREAM_CA); else the closest within three.
		meant, best := "", 4
		for _, v := range known {
			if d := editDistance(upper, v.Name, &rows); d < best {
				meant, best = v.Name, d
			}
		}
		if best > 1 {
			for _, v := range known {
				if strings.HasPrefix(v.Name, upper+"_") {
					meant = v.Name
					break
				}
			}
		}
		if ours || best <= 2 {
			out = append(out, IgnoredVariable{Name: name, Meant: meant})
		}
	}
	return out
}

// editDistance is the Levenshtein distance between a and b, in bytes. Its
// two rows are kept in rows between calls: the check runs for every
// variable of the environment against every known name, and rows allocated
// at each call took the idle proxy's RSS up by about 300 KiB (garbage the
// first collection, at 4 MiB of heap, would only come to much later).
func editDistance(a, b string, rows *[2][]int) int {
	if cap(rows[0]) < len(b)+1 {
		rows[0], rows[1] = make([]int, len(b)+1), make([]int, len(b)+1)
	}
	prev, cur := rows[0][:len(b)+1], rows[1][:len(b)+1]
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			sub := prev[j-1]
			if a[i-1] != b[j-1] {
				sub++
			}
			cur[j] = min(sub, prev[j]+1, cur[j-1]+1)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}

// padded lists the variables whose values are paths or URLs, where a space
// or tab at either end is never meant: a file "ca.pem " does not exist and
// the error about it would not show why.
var padded = []string{"CELLS_UPSTREAM", "CELLS_GRPC_UPSTREAM", "CELLS_UPSTREAM_CA_FILE", "TLS_CERT_FILE", "TLS_KEY_FILE", "PROXY_ACME_WEBROOT"}

// onDisk reports whether the variable name takes a path and s names a file
// or directory as written: then a " #" in it is part of the name.
func onDisk(name, s string) bool {
	if !slices.Contains(padded, name) || strings.Contains(s, "://") {
		return false
	}
	_, err := os.Stat(s)
	return err == nil
}

// unquote returns s without the quotes around it, and whether it had them.
func unquote(s string) (string, bool) {
	if len(s) >= 2 && (s[0] == '"' || s[0] == '\'') && s[len(s)-1] == s[0] {
		return s[1 : len(s)-1], true
	}
	return s, false
}

// cutComment returns s without a comment after it, a '#' that a space or
// tab precedes, and whether it had one. A URL's fragment has no space
// before it, and none is allowed; a path may hold one (a folder "certs
// #2"), so unpad takes a path that names something on disk as written.
func cutComment(s string) (string, bool) {
	for i := 1; i < len(s); i++ {
		if s[i] == '#' && (s[i-1] == ' ' || s[i-1] == '\t') {
			return strings.TrimRight(s[:i], " \t"), true
		}
	}
	return s, false
}

// unpad reports every value written in quotes, which docker run --env-file
// and compose's list form (- NAME="value") keep as part of the value, every
// value followed by a comment, which docker run --env-file keeps too, and
// every path or URL with a space, tab or line break at an end (an .env file's trailing
// space), one line each naming the fix. It takes each value as meant, so
// that the other problems are reported with them. Any other value, a
// number, duration, size, switch, address or name, is taken without the
// space, tab or line break at its ends, which is never part of it: a YAML
// "|" block keeps a newline and a .env file saved on Windows a carriage
// return, and durations and ports used to refuse them where sizes and
// switches took them.
func (e *env) unpad() []error {
	var errs []error
	v := reflect.ValueOf(e).Elem()
	for i, f := range reflect.VisibleFields(v.Type()) {
		name, s := f.Tag.Get("envconfig"), v.Field(i).String()
		if c, ok := cutComment(s); ok && !onDisk(name, s) {
			errs = append(errs, fmt.Errorf("%s has a comment after its value, got %q: put the comment on a line of its own (docker run --env-file keeps it as part of the value, docker/cli#4404)", name, redactURL(s)))
			s = c
		}
		if u, ok := unquote(s); ok {
			errs = append(errs, fmt.Errorf("%s is written in quotes, got %q: remove them (docker run --env-file and compose's - NAME=value list keep quotes as part of the value)", name, redactURL(s)))
			s = u
		}
		if t := strings.TrimSpace(s); t != s {
			if slices.Contains(padded, name) {
				errs = append(errs, fmt.Errorf("%s has a space, tab or line break at its start or end, got %q: remove it", name, redactURL(s)))
			}
			s = t
		}
		v.Field(i).SetString(s)
	}
	return errs
}

// applyDefaults gives a variable that is set but empty its default, as if
// unset: "PROXY_IDLE_TIMEOUT=" in a compose file means "the default".
func (e *env) applyDefaults() {
	v := reflect.ValueOf(e).Elem()
	for i, f := range reflect.VisibleFields(v.Type()) {
		if d := f.Tag.Get("default"); d != "" && strings.TrimSpace(v.Field(i).String()) == "" {
			v.Field(i).SetString(d)
		}
	}
}

func (e *env) parse() (*Config, error) {
	var errs []error
	// One line per problem: a value's newline (a YAML "|" block keeps one)
	// must not start a line that names no variable.
	bad := func(format string, args ...any) {
		errs = append(errs, errors.New(strings.ReplaceAll(fmt.Sprintf(format, args...), "\n", `\n`)))
	}
	c := &Config{
		UpstreamCAFile:     e.UpstreamCAFile,
		UpstreamServerName: strings.TrimSpace(e.UpstreamServerName),
		CertFile:           e.CertFile,
		KeyFile:            e.KeyFile,
		ACMEWebroot:        e.ACMEWebroot,
		HTTPSAddr:          e.HTTPSAddr,
		HTTPAddr:           e.HTTPAddr,
		HealthAddr:         e.HealthAddr,
	}

	switch {
	case e.Upstream == "":
		bad("CELLS_UPSTREAM is required: set it to the Cells main port, e.g. https://cells:8080")
	default:
		u, err := parseUpstream(e.Upstream, "http", "https")
		if err != nil {
			bad("CELLS_UPSTREAM %v, e.g. https://cells:8080", err)
		}
		c.Upstream = u
	}

	if n := c.UpstreamServerName; n != "" {
		// An IP may be written in brackets (crypto/x509 verifies "[::1]").
		ip := n
		if len(n) > 2 && n[0] == '[' && n[len(n)-1] == ']' {
			ip = n[1 : len(n)-1]
		}
		if _, err := netip.ParseAddr(ip); err != nil && strings.ContainsAny(n, ":/@ \t") {
			bad("CELLS_UPSTREAM_SERVER_NAME takes a host name without scheme or port, such as localhost, got %q", n)
		}
	}

	var err error
	if c.UpstreamInsecure, err = parseBool(e.UpstreamInsecure); err != nil {
		bad("CELLS_UPSTREAM_INSECURE must be true or false, got %q", e.UpstreamInsecure)
	}
	if c.UpstreamInsecure && c.UpstreamCAFile != "" {
		bad("CELLS_UPSTREAM_INSECURE=true and CELLS_UPSTREAM_CA_FILE contradict each other: set only one")
	}

	// Errors name the variable the operator set.
	grpcPort, grpcVar := e.GRPCExternal, "PYDIO_GRPC_EXTERNAL"
	if e.GRPCExternalAlias != "" {
		// Compared as the port numbers they are taken as below:
		// 33060 and 033060 agree.
		a, errA := strconv.Atoi(grpcPort)
		b, errB := strconv.Atoi(e.GRPCExternalAlias)
		if grpcPort != "" && grpcPort != e.GRPCExternalAlias && (errA != nil || errB != nil || a != b) {
			bad("PYDIO_GRPC_EXTERNAL=%q and CELLS_GRPC_EXTERNAL=%q disagree: set only one", e.GRPCExternal, e.GRPCExternalAlias)
		}
		grpcPort, grpcVar = e.GRPCExternalAlias, "CELLS_GRPC_EXTERNAL"
	}
	grpcNum := 0 // the port as a number: "+8443" and "08443" are 8443
	if grpcPort != "" {
		if p, err := strconv.Atoi(grpcPort); err != nil || p < 1 || p > 65535 {
			bad("%s must be a port number from 1 to 65535, got %q", grpcVar, grpcPort)
			grpcPort = ""
		} else {
			grpcNum = p
		}
	}

	if e.GRPCUpstream != "" {
		u, err := parseUpstream(e.GRPCUpstream, "https", "h2c")
		if err != nil {
			bad("CELLS_GRPC_UPSTREAM %v, e.g. h2c://cells:33060 or https://cells:8080", err)
		} else if u.Scheme == "h2c" && u.Port() == "" {
			// Cleartext HTTP/2 has no port of its own: without one the
			// dial went to 80, where no Cells serves gRPC.
			bad("CELLS_GRPC_UPSTREAM=%q has no port: give Cells' gRPC port, e.g. h2c://%s:33060", e.GRPCUpstream, u.Hostname())
		}
		c.GRPCUpstream = u
	} else if c.Upstream != nil {
		switch {
		case c.Upstream.Scheme == "https":
			c.GRPCUpstream = &url.URL{Scheme: "https", Host: c.Upstream.Host}
		case grpcPort != "":
			c.GRPCUpstream = &url.URL{Scheme: "h2c", Host: net.JoinHostPort(c.Upstream.Hostname(), strconv.Itoa(grpcNum))}
		}
	}

	if (c.CertFile == "") != (c.KeyFile == "") {
		bad("TLS_CERT_FILE and TLS_KEY_FILE go together: set both, or neither for a self-signed certificate")
	}

	if c.TLS, err = parseOnOff(e.TLS); err != nil {
		bad("PROXY_TLS must be on or off, got %q", e.TLS)
	}
	if c.HSTS, err = parseHSTS(e.HSTS, c.CertFile != ""); err != nil {
		bad("PROXY_HSTS must be auto, off or a Strict-Transport-Security value such as max-age=31536000, got %q: %v", e.HSTS, err)
	}
	if err := checkListenAddr(c.HTTPSAddr); err != nil {
		bad("PROXY_HTTPS_ADDR must be host:port or :port, got %q: %v", c.HTTPSAddr, err)
	} else if grpcPort != "" {
		host, port, _ := net.SplitHostPort(c.HTTPSAddr)
		if p, _ := net.LookupPort("tcp", port); p != 0 && p == grpcNum {
			bad("%s=%s is the port of PROXY_HTTPS_ADDR, which serves gRPC already: unset it, or give the classic separate port such as 33060", grpcVar, grpcPort)
		}
		c.GRPCAddr, c.GRPCVar = net.JoinHostPort(host, strconv.Itoa(grpcNum)), grpcVar
	}
	if u := c.GRPCUpstream; u != nil && u.Scheme == "h2c" && grpcPort == "" && c.TLS && !samePort(c.HTTPSAddr, u.Port()) {
		// Topology B: Cells' discovery advertises its CELLS_GRPC_EXTERNAL
		// port, and Cells Sync dials the public host there, with TLS,
		// never the main port. Without the same port here the upstream
		// only gets the calls that arrive on PROXY_HTTPS_ADDR, where
		// Sync sends none, and Sync fails to connect with no line saying
		// why. Nothing is said when the public port is that port (it
		// serves gRPC already, and the fix would be refused), nor with
		// PROXY_TLS=off: the front before cells-proxy answers Sync's TLS
		// on that port, and may well pass the calls to the cleartext
		// public port, which forwards them.
		c.Warnings = append(c.Warnings, Warning{
			Msg:      "CELLS_GRPC_UPSTREAM is h2c (Cells in clear, topology B) and no PYDIO_GRPC_EXTERNAL is set: Cells' discovery sends Cells Sync to this host on the port of CELLS_GRPC_UPSTREAM, with TLS, and nothing here listens there, so Sync cannot connect; set PYDIO_GRPC_EXTERNAL to that port (fix)",
			Variable: "CELLS_GRPC_UPSTREAM", Value: e.GRPCUpstream,
			Fix: "PYDIO_GRPC_EXTERNAL=" + u.Port(),
		})
	}
	if u := c.GRPCUpstream; u != nil && u.Scheme == "h2c" && grpcNum != 0 && c.TLS {
		// The same trap with the port set, to another number: Cells
		// listens for gRPC on its CELLS_GRPC_EXTERNAL port and advertises
		// that one, so Sync dials it, not the port served here. A host
		// that publishes Cells' port to this one makes it work, hence a
		// warning, not an error.
		if p, err := strconv.Atoi(u.Port()); err == nil && p != grpcNum {
			c.Warnings = append(c.Warnings, Warning{
				Msg:      "the gRPC port served here is not the port of CELLS_GRPC_UPSTREAM (Cells in clear, topology B): Cells' discovery sends Cells Sync to this host on Cells' own gRPC port, with TLS, so Sync connects only if that port reaches this one; unless the host publishes it to this port, serve Cells' port here (fix)",
				Variable: grpcVar, Value: grpcPort,
				Fix: grpcVar + "=" + u.Port(),
			})
		}
	}
	if off(c.HTTPAddr) {
		c.HTTPAddr = ""
		if c.ACMEWebroot != "" {
			bad("PROXY_ACME_WEBROOT is served on the plain HTTP port, which PROXY_HTTP_ADDR=off turns off: set PROXY_HTTP_ADDR (the default :8080, published as port 80), or unset PROXY_ACME_WEBROOT")
		}
	} else if err := checkListenAddr(c.HTTPAddr); err != nil {
		bad("PROXY_HTTP_ADDR must be host:port, :port or off, got %q: %v", c.HTTPAddr, err)
	}
	if off(c.HealthAddr) {
		c.HealthAddr = ""
	} else if err := checkListenAddr(c.HealthAddr); err != nil {
		bad("PROXY_HEALTH_ADDR must be host:port or off, got %q: %v", c.HealthAddr, err)
	} else if _, port, _ := net.SplitHostPort(c.HealthAddr); isPortZero(port) {
		// Port 0 is any free port: the listener gets one, and says
		// which in its log, but cells-proxy healthcheck, another
		// process reading this same variable, asks port 0, and Docker
		// marks a working proxy unhealthy for ever. The public
		// listeners take it (their "listening" line gives the port,
		// and the CI scripts read it there): nothing else must find
		// them.
		bad("PROXY_HEALTH_ADDR=%s asks for any free port, which cells-proxy healthcheck (the image's HEALTHCHECK) and a kubelet probe cannot know: give a port, such as 127.0.0.1:8099, or off", c.HealthAddr)
	}
	// Two listeners on one port: the second would stop the start with
	// "address already in use". (The gRPC port on the public one has its
	// own message above.)
	listeners := []struct{ name, value, addr string }{
		{"PROXY_HTTPS_ADDR", c.HTTPSAddr, c.HTTPSAddr},
		{grpcVar, grpcPort, c.GRPCAddr},
		{"PROXY_HTTP_ADDR", c.HTTPAddr, c.HTTPAddr},
		{"PROXY_HEALTH_ADDR", c.HealthAddr, c.HealthAddr},
	}
	for i, a := range listeners {
		for _, b := range listeners[i+1:] {
			if (i > 0 || b.name != grpcVar) && sameListener(a.addr, b.addr) {
				bad("%s=%s and %s=%s take the same port: give each listener its own", a.name, a.value, b.name, b.value)
			}
		}
	}
	if p, err := strconv.Atoi(e.RedirectPort); err != nil || p < 1 || p > 65535 {
		bad("PROXY_REDIRECT_HTTPS_PORT must be a port number from 1 to 65535, got %q", e.RedirectPort)
	} else {
		c.RedirectPort = p
	}

	for _, n := range splitList(e.ServerNames) {
		n = strings.ToLower(strings.TrimSuffix(n, "."))
		if strings.ContainsAny(n, " \t\r\n") {
			// nginx's server_name takes names separated by spaces.
			bad("PROXY_SERVER_NAMES separates names with commas, not spaces, got %q", n)
			continue
		}
		if strings.IndexFunc(n, func(r rune) bool { return r <= ' ' || r > '~' }) >= 0 {
			bad("PROXY_SERVER_NAMES takes host names in ASCII: write an internationalized name in its xn-- form, got %q", n)
			continue
		}
		// An IPv6 address, bracketed as in a Host header or not, is
		// kept as the Host check compares it: bare, in its usual form.
		ip := n
		if len(n) > 2 && n[0] == '[' && n[len(n)-1] == ']' {
			ip = n[1 : len(n)-1]
		}
		if a, err := netip.ParseAddr(ip); err == nil && a.Is6() {
			if a.Zone() != "" {
				bad("PROXY_SERVER_NAMES takes IPv6 addresses without a zone (no client sends one in Host), got %q", n)
				continue
			}
			c.ServerNames = append(c.ServerNames, a.String())
			continue
		}
		switch {
		case strings.Contains(n, "*"):
			// A wildcard would match nothing: the names are compared
			// whole, and Cells has one public name.
			bad("PROXY_SERVER_NAMES takes whole host names, no wildcard, got %q", n)
		case strings.Contains(n, "://"):
			bad("PROXY_SERVER_NAMES takes host names without scheme, such as cells.example.com, got %q", n)
		case strings.Contains(n, ":"):
			bad("PROXY_SERVER_NAMES takes host names without port (any port passes), such as cells.example.com or [2001:db8::1], got %q", n)
		case strings.ContainsAny(n, "[]"):
			// A Host has brackets only around an IPv6 address
			// (RFC 3986, section 3.2.2): this would match none.
			bad("PROXY_SERVER_NAMES takes brackets only around an IPv6 address, got %q", n)
		case strings.Contains(n, ";"):
			// nginx's server_name may end with one; the names
			// would be taken as one, which no Host matches.
			bad("PROXY_SERVER_NAMES separates names with commas, not semicolons, got %q", n)
		case strings.HasPrefix(n, "."):
			// nginx's ".example.com" is example.com and every name
			// under it; compared whole, it matched no Host.
			bad("PROXY_SERVER_NAMES takes whole host names, no wildcard (nginx's .example.com): list each name, such as example.com,www.example.com, got %q", n)
		case !hostName(n):
			bad("PROXY_SERVER_NAMES takes host names such as cells.example.com, got %q", n)
		default:
			c.ServerNames = append(c.ServerNames, n)
		}
	}
	for _, s := range splitList(e.TrustedProxies) {
		bare, bracketed := unbracket(s)
		p, err := parsePrefix(bare)
		if err != nil && strings.ContainsAny(s, " \t\r\n") {
			bad("PROXY_TRUSTED_PROXIES separates CIDRs with commas, not spaces, got %q", s)
			continue
		}
		if err == nil && bracketed && !strings.Contains(bare, ":") {
			// As in PROXY_SERVER_NAMES: no URL puts an IPv4
			// address in brackets (RFC 3986, section 3.2.2).
			bad("PROXY_TRUSTED_PROXIES takes brackets only around an IPv6 address, got %q: write %s", s, bare)
			continue
		}
		if ap, perr := netip.ParseAddrPort(s); err != nil && perr == nil {
			// Copied from a log line or an upstream address: the
			// load balancer's connections come from any port.
			bad("PROXY_TRUSTED_PROXIES takes addresses without a port, got %q: write %s", s, ap.Addr().Unmap())
			continue
		}
		if err != nil {
			bad("PROXY_TRUSTED_PROXIES takes CIDRs or addresses such as 10.0.0.0/8, got %q", s)
			continue
		}
		if q, err := netip.ParsePrefix(bare); err == nil && unmap(q) != p {
			// nginx warns too: "low address bits of 10.0.0.1/8 are
			// meaningless". The operator may have meant the address.
			c.Warnings = append(c.Warnings, Warning{
				Msg:      "a trusted CIDR has host bits set: its network is trusted, not the address",
				Variable: "PROXY_TRUSTED_PROXIES", Value: s, TakenAs: p.String(),
			})
		}
		c.TrustedProxies = append(c.TrustedProxies, p)
	}

	if c.MaxBodySize, err = ParseSize(e.MaxBodySize); err != nil {
		bad("PROXY_MAX_BODY_SIZE must be a size such as 200MiB, 1G or 0 for no limit, got %q", e.MaxBodySize)
	}
	dur := func(name, v string, d *time.Duration) {
		x, err := time.ParseDuration(v)
		if err != nil || x <= 0 {
			bad("%s must be a positive duration such as 90s or 10m, got %q", name, v)
			return
		}
		*d = x
	}
	dur("PROXY_IDLE_TIMEOUT", e.IdleTimeout, &c.IdleTimeout)
	dur("PROXY_WS_IDLE_TIMEOUT", e.WSIdleTimeout, &c.WSIdleTimeout)
	dur("PROXY_SHUTDOWN_TIMEOUT", e.ShutdownTimeout, &c.ShutdownTimeout)
	dur("PROXY_READ_HEADER_TIMEOUT", e.ReadHeaderTimeout, &c.ReadHeaderTimeout)
	// A head of at least 4 KiB: browsers' cookies and Cells' JWTs need it.
	// At most 16 MiB: more is no header but an attack on memory.
	if n, err := ParseSize(e.MaxHeaderBytes); err != nil || n < 4<<10 || n > 16<<20 {
		bad("PROXY_MAX_HEADER_BYTES must be a size from 4KiB to 16MiB such as 64KiB, got %q", e.MaxHeaderBytes)
	} else {
		c.MaxHeaderBytes = int(n)
	}

	if err := c.LogLevel.UnmarshalText([]byte(e.LogLevel)); err != nil {
		bad("PROXY_LOG_LEVEL must be debug, info, warn or error, got %q", e.LogLevel)
	}
	switch c.LogFormat = strings.ToLower(e.LogFormat); c.LogFormat {
	case "json", "text":
	default:
		bad("PROXY_LOG_FORMAT must be json or text, got %q", e.LogFormat)
	}
	if c.AccessLog, err = parseBool(e.AccessLog); err != nil {
		bad("PROXY_ACCESS_LOG must be true or false, got %q", e.AccessLog)
	}

	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return c, nil
}

// parseUpstream accepts an absolute URL with one of schemes, a host and no
// path, query or credentials. Its error never repeats a password.
func parseUpstream(s string, schemes ...string) (*url.URL, error) {
	if hp := hostPort(s); strings.Count(hp, ":") > 1 && !strings.HasPrefix(hp, "[") {
		// An IPv6 address without brackets, or a port written twice
		// (Docker's 33060:33060). url.Parse refuses it for http and
		// https without saying why, and takes it for h2c, the host
		// being all before the last ':', which no dial resolves.
		scheme, _, _ := strings.Cut(s, "://")
		if !slices.Contains(schemes, strings.ToLower(scheme)) {
			scheme = schemes[0]
		}
		return nil, fmt.Errorf("has more than one ':' in its host and port, got %q: write an IPv6 address in brackets, as in %s://[2001:db8::1]:8080, and the port once", redactURL(s), strings.ToLower(scheme))
	}
	u, err := url.Parse(s)
	if err != nil || u.Host == "" || u.Hostname() == "" {
		return nil, fmt.Errorf("must be a URL (%s) with a host, got %q", strings.Join(schemes, ":// or ")+"://", redactURL(s))
	}
	ok := false
	for _, sc := range schemes {
		ok = ok || u.Scheme == sc
	}
	if !ok {
		return nil, fmt.Errorf("must be a URL (%s), got %q", strings.Join(schemes, ":// or ")+"://", redactURL(s))
	}
	if u.User != nil {
		return nil, fmt.Errorf("must not carry credentials, got %q", redactURL(s))
	}
	if (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.Fragment != "" {
		return nil, fmt.Errorf("must have no path or query (Cells is served from /), got %q", redactURL(s))
	}
	if p := u.Port(); p != "" {
		if n, err := strconv.Atoi(p); err != nil || n < 1 || n > 65535 {
			return nil, fmt.Errorf("has a bad port %q", p)
		}
	} else if strings.HasSuffix(u.Host, ":") {
		// https://cells:${PORT} with PORT unset: the dial would go to
		// the scheme's port without a word.
		return nil, fmt.Errorf("has no port after its ':' (a variable left unset?), got %q", redactURL(s))
	}
	return &url.URL{Scheme: u.Scheme, Host: u.Host}, nil
}

// hostPort is the host and port of the URL s as written, without the user
// information; empty without "://".
func hostPort(s string) string {
	_, rest, ok := strings.Cut(s, "://")
	if !ok {
		return ""
	}
	if i := strings.IndexAny(rest, "/?#"); i >= 0 {
		rest = rest[:i]
	}
	if i := strings.LastIndexByte(rest, '@'); i >= 0 {
		rest = rest[i+1:]
	}
	return rest
}

// redactURL hides a password so that an error line never leaks it. The
// password is whatever follows the first ':' of everything up to the last
// '@': a password may itself hold '@', '/' or '#', and the URL is being
// reported because it does not parse as the user meant. Without a
// scheme and "://" in front (https:/u:pw@cells, //u:pw@cells,
// u:pw@cells), where the user name ends is anyone's guess: everything
// before the '@' is hidden.
func redactURL(s string) string {
	at := strings.LastIndexByte(s, '@')
	if at < 0 {
		return s
	}
	scheme, rest, ok := strings.Cut(s[:at], "://")
	if !ok || !isScheme(scheme) {
		return "xxxxx" + s[at:]
	}
	if user, _, hasPass := strings.Cut(rest, ":"); hasPass {
		return scheme + "://" + user + ":xxxxx" + s[at:]
	}
	return s
}

// isScheme reports whether s is a URL scheme (RFC 3986 §3.1).
func isScheme(s string) bool {
	for i, c := range s {
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z':
		case i > 0 && ('0' <= c && c <= '9' || c == '+' || c == '-' || c == '.'):
		default:
			return false
		}
	}
	return s != ""
}

// unbracket is s, an address or CIDR of PROXY_TRUSTED_PROXIES, without the
// brackets an IPv6 address has in a URL or a Host header, where operators
// copy it from: [::1], [fd00::]/8, and [fd00::/8] as well. Anything else
// is s unchanged, and bracketed false.
func unbracket(s string) (bare string, bracketed bool) {
	rest, ok := strings.CutPrefix(s, "[")
	if !ok {
		return s, false
	}
	addr, bits, ok := strings.Cut(rest, "]")
	if !ok || bits != "" && !strings.HasPrefix(bits, "/") || strings.ContainsAny(addr, "[]") {
		return s, false
	}
	return addr + bits, true
}

func parsePrefix(s string) (netip.Prefix, error) {
	if strings.Contains(s, "/") {
		p, err := netip.ParsePrefix(s)
		return unmap(p).Masked(), err
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Prefix{}, err
	}
	a = a.Unmap()
	return netip.PrefixFrom(a, a.BitLen()), nil
}

// unmap makes an IPv4-mapped prefix an IPv4 one: peers are compared
// unmapped, and ::ffff:10.0.0.0/104 is 10.0.0.0/8.
func unmap(p netip.Prefix) netip.Prefix {
	if p.Addr().Is4In6() && p.Bits() >= 96 {
		return netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
	}
	return p
}

func splitList(s string) []string {
	var out []string
	for f := range strings.SplitSeq(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

// hostName reports whether n, in lower case, is dot-separated labels of
// letters, digits, '-' and '_' (Docker's service names have them), none
// empty: the only Host values a client sends for a name.
func hostName(n string) bool {
	for l := range strings.SplitSeq(n, ".") {
		if l == "" || strings.IndexFunc(l, func(r rune) bool {
			return !('a' <= r && r <= 'z' || '0' <= r && r <= '9' || r == '-' || r == '_')
		}) >= 0 {
			return false
		}
	}
	return true
}

func off(s string) bool { return strings.EqualFold(strings.TrimSpace(s), "off") }

// sameListener reports whether listening on a and on b would collide: the
// same port, and the same host or a wildcard on either side (Go listens on
// both IPv4 and IPv6 for "", 0.0.0.0 and ::). Host names are not resolved:
// only what is certain is reported.
func sameListener(a, b string) bool {
	ha, pa, errA := net.SplitHostPort(a)
	hb, pb, errB := net.SplitHostPort(b)
	if errA != nil || errB != nil {
		return false // off, or reported already
	}
	portA, errA := net.LookupPort("tcp", pa)
	portB, errB := net.LookupPort("tcp", pb)
	if errA != nil || errB != nil || portA == 0 || portA != portB {
		return false
	}
	wildcard := func(h string) bool {
		ip, err := netip.ParseAddr(h)
		return h == "" || err == nil && ip.IsUnspecified()
	}
	if wildcard(ha) || wildcard(hb) {
		return true
	}
	ipA, errA := netip.ParseAddr(ha)
	ipB, errB := netip.ParseAddr(hb)
	if errA == nil && errB == nil {
		return ipA.Unmap() == ipB.Unmap()
	}
	return strings.EqualFold(ha, hb)
}

// samePort reports whether the listener address addr is on port, a number.
func samePort(addr, port string) bool {
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		return false // reported already
	}
	a, errA := net.LookupPort("tcp", p)
	b, errB := strconv.Atoi(port)
	return errA == nil && errB == nil && a != 0 && a == b
}

// isPortZero reports whether port, of a listener address that passed
// checkListenAddr, is 0 (or 00, 000: net.LookupPort reads it as a number).
func isPortZero(port string) bool {
	p, err := net.LookupPort("tcp", port)
	return err == nil && p == 0
}

// checkListenAddr finds, before anything listens, the mistakes in a
// listener's address that net.Listen would only report once the proxy is
// starting: no port, a port out of range, a host that is no IP address or
// host name (nginx's '*'). A host name is left to the listener, which may
// have to resolve it.
func checkListenAddr(s string) error {
	host, port, err := net.SplitHostPort(s)
	if _, errN := strconv.ParseUint(s, 10, 16); err != nil && errN == nil {
		// A port alone, as PYDIO_GRPC_EXTERNAL takes it: net says
		// "missing port in address" of it.
		return fmt.Errorf("a port alone takes a ':' before it: write :%s", s)
	}
	if err != nil && strings.Count(s, ":") > 1 && !strings.HasPrefix(s, "[") {
		// net's "too many colons in address" does not say the fix.
		return errors.New("an IPv6 address goes in brackets, as in [::]:8443 or [::1]:8443")
	}
	if err != nil {
		return err
	}
	switch _, ipErr := netip.ParseAddr(host); {
	case strings.Contains(host, "*"):
		// nginx's listen *:443, Apache's <VirtualHost *:443>.
		return fmt.Errorf("'*' is no host here: write :%s for every address, or an address such as 127.0.0.1:%s", port, port)
	case host == "" || ipErr == nil:
	case !hostName(strings.ToLower(strings.TrimSuffix(host, "."))):
		// The listener would look it up and stop the start with
		// "no such host", not a configuration line.
		return fmt.Errorf("host %q is no IP address or host name", host)
	}
	if port == "" {
		return errors.New("no port")
	}
	if _, err := net.LookupPort("tcp", port); err != nil {
		return fmt.Errorf("port %q is not a number from 0 to 65535", port)
	}
	return nil
}

func parseOnOff(s string) (bool, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "on", "true", "1", "yes":
		return true, nil
	case "off", "false", "0", "no":
		return false, nil
	}
	return false, errors.New("not on or off")
}

// defaultHSTS is one year, the minimum the HSTS preload list asks for.
const defaultHSTS = "max-age=31536000"

// parseHSTS reads PROXY_HSTS. "auto" turns HSTS on only with a real
// certificate: pinning browsers to https for a year on a self-signed one
// would lock users out once they click through the warning (RFC 6797 §8.4
// makes certificate errors fatal on an HSTS host).
func parseHSTS(s string, realCert bool) (string, error) {
	v := strings.TrimSpace(s)
	switch strings.ToLower(v) {
	case "", "auto":
		if realCert {
			return defaultHSTS, nil
		}
		return "", nil
	case "off", "false", "0", "no", "none":
		return "", nil
	}
	// RFC 6797 §6.1: directives separated by ';', max-age required.
	maxAge := false
	for d := range strings.SplitSeq(v, ";") {
		name, val, _ := strings.Cut(strings.TrimSpace(d), "=")
		if !strings.EqualFold(strings.TrimSpace(name), "max-age") {
			continue
		}
		val = strings.Trim(strings.TrimSpace(val), `"`)
		if _, err := strconv.ParseUint(val, 10, 63); err != nil {
			return "", fmt.Errorf("max-age %q is not a number of seconds", val)
		}
		maxAge = true
	}
	if !maxAge {
		return "", errors.New("no max-age directive")
	}
	for _, c := range v {
		if c < ' ' || c > '~' {
			return "", errors.New("not printable ASCII")
		}
	}
	return v, nil
}

func parseBool(s string) (bool, error) { return parseOnOff(s) }

// ParseSize reads a byte count: a plain number, or a number with a unit
// (k, M, G, T for powers of 1000 or 1024: "KiB", "MiB", "GiB", "TiB" and the
// nginx-style "k", "m", "g" are powers of 1024; "KB", "MB", "GB", "TB" are
// powers of 1000). Units are case-insensitive except that a lone "b" is a byte.
func ParseSize(s string) (int64, error) {
	t := strings.TrimSpace(s)
	i := 0
	for i < len(t) && t[i] >= '0' && t[i] <= '9' {
		i++
	}
	if i == 0 {
		return 0, fmt.Errorf("size %q: no number", s)
	}
	n, err := strconv.ParseInt(t[:i], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("size %q: %w", s, err)
	}
	unit := strings.ToLower(strings.TrimSpace(t[i:]))
	var mult int64
	switch unit {
	case "", "b":
		mult = 1
	case "k", "kib", "ki":
		mult = 1 << 10
	case "m", "mib", "mi":
		mult = 1 << 20
	case "g", "gib", "gi":
		mult = 1 << 30
	case "t", "tib", "ti":
		mult = 1 << 40
	case "kb":
		mult = 1e3
	case "mb":
		mult = 1e6
	case "gb":
		mult = 1e9
	case "tb":
		mult = 1e12
	default:
		return 0, fmt.Errorf("size %q: unknown unit %q", s, unit)
	}
	if n > (1<<63-1)/mult {
		return 0, fmt.Errorf("size %q: too large", s)
	}
	return n * mult, nil
}
