package proxy

import (
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"
)

// MemoryLimit is the memory limit of the cgroup the process runs in: the
// tightest of its own cgroup's and of each parent's up to the root of the
// hierarchy's mount (memory.max under cgroup v2, memory.limit_in_bytes
// under v1, whose memory controller wins on a hybrid host), or 0 when none
// is set or none can be read. root is the file system root: "/" but in
// tests.
//
// Go sizes GOMAXPROCS from the cgroup since Go 1.25, but not its heap: the
// collector lets the heap grow to twice what is live (GOGC=100), and a
// container's kernel kills the process at its limit, uploads and all,
// while half of that heap may be garbage.
func MemoryLimit(root string) int64 {
	cgroups, err := os.ReadFile(filepath.Join(root, "proc/self/cgroup"))
	if err != nil {
		return 0
	}
	mounts, err := os.ReadFile(filepath.Join(root, "proc/self/mountinfo"))
	if err != nil {
		return 0
	}
	var v1, v2 string
	v1Found, v2Found := false, false
	for line := range strings.SplitSeq(string(cgroups), "\n") {
		// hierarchy-ID:controller-list:cgroup-path
		id, rest, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		controllers, p, ok := strings.Cut(rest, ":")
		switch {
		case !ok:
		case id == "0" && controllers == "":
			v2, v2Found = p, true
		case hasWord(controllers, "memory"):
			v1, v1Found = p, true
		}
	}
	var v1Mount, v1Root, v2Mount, v2Root string
	for line := range strings.SplitSeq(string(mounts), "\n") {
		// id parent major:minor root mount-point options [optional...] - fstype source super-options
		f := strings.Fields(line)
		sep := -1
		for i := 6; i < len(f); i++ {
			if f[i] == "-" {
				sep = i
				break
			}
		}
		if sep < 0 || sep+3 >= len(f) {
			continue
		}
		switch fstype := f[sep+1]; {
		case fstype == "cgroup2" && v2Mount == "":
			v2Mount, v2Root = unescapeMount(f[4]), unescapeMount(f[3])
		case fstype == "cgroup" && v1Mount == "" && hasWord(f[sep+3], "memory"):
			v1Mount, v1Root = unescapeMount(f[4]), unescapeMount(f[3])
		}
	}
	switch {
	case v1Found && v1Mount != "":
		return tightest(root, v1Mount, v1Root, v1, "memory.limit_in_bytes")
	case v2Found && v2Mount != "":
		return tightest(root, v2Mount, v2Root, v2, "memory.max")
	}
	return 0
}

// tightest walks from the process's cgroup up to the mount's root and
// returns the smallest limit set on the way, or 0.
func tightest(root, mount, mountRoot, cgroup, file string) int64 {
	rel := "/"
	switch {
	case mountRoot == "/":
		rel = cgroup
	case cgroup == mountRoot || strings.HasPrefix(cgroup, mountRoot+"/"):
		rel = cgroup[len(mountRoot):]
	}
	// Otherwise the process's cgroup is outside what is mounted (a cgroup
	// namespace shows it as /..): the mount's root is all there is to read.
	rel = path.Clean("/" + rel)
	var limit int64
	for {
		if n := readLimit(filepath.Join(root, mount, rel, file)); n > 0 && (limit == 0 || n < limit) {
			limit = n
		}
		if rel == "/" {
			return limit
		}
		rel = path.Dir(rel)
	}
}

// readLimit reads a limit file: a number of bytes, or "max" (v2) or a
// value near 2^63 (v1, rounded down to a page) for none, which is 0.
func readLimit(name string) int64 {
	b, err := os.ReadFile(name)
	if err != nil {
		return 0
	}
	n, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	if err != nil || n <= 0 || n >= 1<<62 {
		return 0
	}
	return n
}

// hasWord reports whether the comma list s holds w.
func hasWord(s, w string) bool {
	for x := range strings.SplitSeq(s, ",") {
		if x == w {
			return true
		}
	}
	return false
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
