package main

import (
	"bufio"
	"bytes"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/cells-proxy/cells-proxy/proxy"
)

// The files a Cells operator copies must not drift from the binary: every variable compose.example.yml gives
// cells-proxy (set or offered in a comment) is one the binary reads, and the choices the comments promise are
// there. ci/docker/test.sh runs the same file with Docker for real.

// composeService returns the lines of one service's block in a Compose file, indentation kept. A tiny reader
// for the layout of compose.example.yml (two-space indents, services at level one), not a YAML parser.
func composeService(t *testing.T, file, name string) []string {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var (
		lines      []string
		inServices bool
		inService  bool
	)
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		line := sc.Text()
		indent := len(line) - len(strings.TrimLeft(line, " "))
		trimmed := strings.TrimSpace(line)
		isKey := trimmed != "" && !strings.HasPrefix(trimmed, "#")
		switch {
		case isKey && indent == 0:
			inServices = trimmed == "services:"
			inService = false
		case inServices && isKey && indent == 2:
			inService = trimmed == name+":"
		case inService:
			lines = append(lines, line)
		}
	}
	if len(lines) == 0 {
		t.Fatalf("%s: no service %q", file, name)
	}
	return lines
}

// block returns the lines under key (e.g. "environment") within a service's lines, comments included.
func block(lines []string, key string) []string {
	var out []string
	keyIndent := -1
	for _, line := range lines {
		indent := len(line) - len(strings.TrimLeft(line, " "))
		trimmed := strings.TrimSpace(line)
		if keyIndent < 0 {
			if trimmed == key+":" {
				keyIndent = indent
			}
			continue
		}
		if trimmed != "" && !strings.HasPrefix(trimmed, "#") && indent <= keyIndent {
			break
		}
		out = append(out, line)
	}
	return out
}

// value returns the scalar value of key among a service's top-level lines.
func value(lines []string, key string) string {
	for _, line := range lines {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), key+":"); ok && strings.HasPrefix(line, "    "+key) {
			return strings.Trim(strings.TrimSpace(v), `"'`)
		}
	}
	return ""
}

// envKey matches "KEY: value" and "- KEY=value", and the same commented out ("# KEY: value"), where KEY is
// in upper case: the variables a reader is offered.
var envKey = regexp.MustCompile(`^\s*(?:#\s*)?(?:-\s*)?([A-Z][A-Z0-9_]*)\s*[:=]`)

func composeEnv(t *testing.T) (set, offered map[string]string) {
	t.Helper()
	set, offered = map[string]string{}, map[string]string{}
	for _, line := range block(composeService(t, "compose.example.yml", "cells-proxy"), "environment") {
		m := envKey.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		v := strings.TrimSpace(line[len(m[0]):])
		v = strings.Trim(v, `"'`)
		if strings.HasPrefix(strings.TrimSpace(line), "#") {
			offered[m[1]] = v
		} else {
			set[m[1]] = v
		}
	}
	return set, offered
}

func TestComposeExampleVariablesAreKnown(t *testing.T) {
	known := map[string]bool{}
	for _, v := range proxy.Variables() {
		known[v.Name] = true
	}
	set, offered := composeEnv(t)
	if len(set) == 0 {
		t.Fatal("compose.example.yml: cells-proxy sets no environment variable")
	}
	for _, env := range []map[string]string{set, offered} {
		for name := range env {
			if !known[name] {
				t.Errorf("compose.example.yml: cells-proxy gets %s, which cells-proxy does not read (cells-proxy env lists them)", name)
			}
		}
	}
	if set["CELLS_UPSTREAM"] == "" {
		t.Error("compose.example.yml: CELLS_UPSTREAM is not set for cells-proxy")
	}
	// Verification is either a CA file or an explicit, visible choice to skip it: never both at once.
	if set["CELLS_UPSTREAM_CA_FILE"] != "" && set["CELLS_UPSTREAM_INSECURE"] == "true" {
		t.Error("compose.example.yml: CELLS_UPSTREAM_CA_FILE and CELLS_UPSTREAM_INSECURE=true are both set")
	}
}

func TestComposeExampleHardening(t *testing.T) {
	svc := composeService(t, "compose.example.yml", "cells-proxy")
	for _, tt := range []struct{ key, want string }{
		{"read_only", "true"},
		{"cap_drop", "[ALL]"},
		{"build", "."},
	} {
		if got := value(svc, tt.key); got != tt.want {
			t.Errorf("compose.example.yml: cells-proxy %s is %q, want %q", tt.key, got, tt.want)
		}
	}
	if got := strings.Join(block(svc, "security_opt"), "\n"); !strings.Contains(got, "no-new-privileges:true") {
		t.Errorf("compose.example.yml: cells-proxy security_opt %q lacks no-new-privileges:true", got)
	}
	// distroless has no shell: the healthcheck must be exec form and run the binary itself.
	hc := strings.Join(block(svc, "healthcheck"), "\n")
	if !strings.Contains(hc, `test: ["CMD", "/cells-proxy", "healthcheck"]`) {
		t.Errorf("compose.example.yml: cells-proxy healthcheck %q does not run [\"CMD\", \"/cells-proxy\", \"healthcheck\"]", hc)
	}
}

// docker stop sends SIGTERM, then SIGKILL after the grace period: the drain must fit inside it.
func TestComposeExampleStopGracePeriodOutlastsShutdown(t *testing.T) {
	set, _ := composeEnv(t)
	shutdownStr := set["PROXY_SHUTDOWN_TIMEOUT"]
	if shutdownStr == "" {
		for _, v := range proxy.Variables() {
			if v.Name == "PROXY_SHUTDOWN_TIMEOUT" {
				shutdownStr = v.Default
			}
		}
	}
	shutdown, err := time.ParseDuration(shutdownStr)
	if err != nil {
		t.Fatalf("PROXY_SHUTDOWN_TIMEOUT %q: %v", shutdownStr, err)
	}
	graceStr := value(composeService(t, "compose.example.yml", "cells-proxy"), "stop_grace_period")
	grace, err := time.ParseDuration(graceStr)
	if err != nil {
		t.Fatalf("compose.example.yml: cells-proxy stop_grace_period %q: %v", graceStr, err)
	}
	if grace <= shutdown {
		t.Errorf("compose.example.yml: stop_grace_period %v is not longer than PROXY_SHUTDOWN_TIMEOUT %v", grace, shutdown)
	}
}

// The builder image's Go is the one go.mod names.
func TestDockerfileBuilderMatchesGoMod(t *testing.T) {
	mod, err := os.ReadFile("go.mod")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^go (\S+)$`).FindSubmatch(mod)
	if m == nil {
		t.Fatal("go.mod: no go line")
	}
	df, err := os.ReadFile("Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	from := regexp.MustCompile(`(?m)^FROM\s+(\S+)`).FindAllSubmatch(df, -1)
	if len(from) != 2 {
		t.Fatalf("Dockerfile: %d FROM lines, want 2 (builder, final)", len(from))
	}
	if got, want := string(from[0][1]), "golang:"+string(m[1]); got != want && !strings.HasPrefix(got, want+"-") {
		t.Errorf("Dockerfile builder is %s, want %s (go.mod says go %s)", got, want, m[1])
	}
	if got, want := string(from[1][1]), "gcr.io/distroless/static-debian12:nonroot"; got != want {
		t.Errorf("Dockerfile final stage is %s, want %s", got, want)
	}
}
