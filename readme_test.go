package main

import (
	"os"
	"regexp"
	"strings"
	"testing"

	"github.com/cells-proxy/cells-proxy/proxy"
)

// TestREADMEVariables keeps the README's variable table and the code in
// step: same names, same defaults.
func TestREADMEVariables(t *testing.T) {
	b, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	row := regexp.MustCompile("^\\| `([A-Z0-9_]+)` \\| (`([^`]*)`|—) \\|")
	documented := map[string]string{}
	for line := range strings.SplitSeq(string(b), "\n") {
		m := row.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		if _, dup := documented[m[1]]; dup {
			t.Errorf("README lists %s twice", m[1])
		}
		documented[m[1]] = m[3]
	}
	for _, v := range proxy.Variables() {
		def, ok := documented[v.Name]
		if !ok {
			t.Errorf("README does not list %s", v.Name)
			continue
		}
		if def != v.Default {
			t.Errorf("README gives %s the default %q, the code %q", v.Name, def, v.Default)
		}
		delete(documented, v.Name)
	}
	for name := range documented {
		t.Errorf("README lists %s, which the code does not read", name)
	}
}

// TestREADMECommands: the README starts with the command that runs the
// proxy and the command that tests it, and .ci/run runs that same test
// command.
func TestREADMECommands(t *testing.T) {
	b, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	head := strings.Join(strings.SplitN(string(b), "\n", 8)[:7], "\n")
	for _, want := range []string{"docker compose -f compose.example.yml up -d", "go test -race ./..."} {
		if !strings.Contains(head, want) {
			t.Errorf("README's first lines lack %q", want)
		}
	}
	ci, err := os.ReadFile(".ci/run")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(ci), "go test -race ./...") {
		t.Errorf(".ci/run does not run the README's test command %q", "go test -race ./...")
	}
}
