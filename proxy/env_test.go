package proxy

import (
	"os"
	"testing"
)

// unsetEnv removes a variable for the rest of the test: t.Setenv can only
// set one, and envconfig applies defaults only to unset variables.
func unsetEnv(t *testing.T, name string) {
	t.Helper()
	t.Setenv(name, "") // registers the restore
	os.Unsetenv(name)
}
