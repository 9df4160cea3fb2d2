package proxy

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// TestMemoryLimit reads cgroup layouts as Docker, Kubernetes and systemd
// make them, from files laid out under a temporary root. The binary in a
// real cgroup is TestMemoryLimitFromCgroup (main_linux_test.go).
func TestMemoryLimit(t *testing.T) {
	const (
		v2Mount  = "30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"
		v1Memory = "35 31 0:32 %s /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
		v1CPU    = "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"
		rootfs   = "21 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n"
		unified  = "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
		v1NoMax  = "9223372036854771712\n"
	)
	for _, tc := range []struct {
		name   string
		cgroup string
		mounts string
		files  map[string]string // relative to root
		want   int64
	}{{
		name:   "v2 container (private cgroup namespace)",
		cgroup: "0::/\n",
		mounts: rootfs + v2Mount,
		files:  map[string]string{"sys/fs/cgroup/memory.max": "268435456\n"},
		want:   256 << 20,
	}, {
		name:   "v2 no limit",
		cgroup: "0::/\n",
		mounts: rootfs + v2Mount,
		files:  map[string]string{"sys/fs/cgroup/memory.max": "max\n"},
	}, {
		name:   "v2 host namespace, a parent is tighter",
		cgroup: "0::/system.slice/docker-abc.scope\n",
		mounts: rootfs + v2Mount,
		files: map[string]string{
			"sys/fs/cgroup/system.slice/docker-abc.scope/memory.max": "max\n",
			"sys/fs/cgroup/system.slice/memory.max":                  "1073741824\n",
		},
		want: 1 << 30,
	}, {
		name:   "v2 host namespace, the process's own is tighter",
		cgroup: "0::/kubepods/pod1/c1\n",
		mounts: rootfs + v2Mount,
		files: map[string]string{
			"sys/fs/cgroup/kubepods/pod1/c1/memory.max": "134217728\n",
			"sys/fs/cgroup/kubepods/pod1/memory.max":    "268435456\n",
			"sys/fs/cgroup/kubepods/memory.max":         "max\n",
		},
		want: 128 << 20,
	}, {
		name:   "v1 container: the mount's root is the container's cgroup",
		cgroup: "12:pids:/docker/abc\n4:memory:/docker/abc\n1:name=systemd:/docker/abc\n",
		mounts: rootfs + v1CPU + fmt.Sprintf(v1Memory, "/docker/abc"),
		files:  map[string]string{"sys/fs/cgroup/memory/memory.limit_in_bytes": "536870912\n"},
		want:   512 << 20,
	}, {
		name:   "v1 no limit",
		cgroup: "4:memory:/process_api/abc\n",
		mounts: rootfs + fmt.Sprintf(v1Memory, "/"),
		files: map[string]string{
			"sys/fs/cgroup/memory/process_api/abc/memory.limit_in_bytes": v1NoMax,
			"sys/fs/cgroup/memory/process_api/memory.limit_in_bytes":     v1NoMax,
			"sys/fs/cgroup/memory/memory.limit_in_bytes":                 v1NoMax,
		},
	}, {
		name:   "hybrid: the v1 memory controller wins",
		cgroup: "4:memory:/user/abc\n0::/user/abc\n",
		mounts: rootfs + fmt.Sprintf(v1Memory, "/") + unified,
		files: map[string]string{
			"sys/fs/cgroup/memory/user/abc/memory.limit_in_bytes": "67108864\n",
			"sys/fs/cgroup/unified/user/abc/memory.max":           "33554432\n",
		},
		want: 64 << 20,
	}, {
		name:   "v1 controllers mounted together",
		cgroup: "3:cpu,memory:/lxc/c1\n",
		mounts: rootfs + "35 31 0:32 / /sys/fs/cgroup/cpu,memory rw - cgroup cgroup rw,cpu,memory\n",
		files:  map[string]string{"sys/fs/cgroup/cpu,memory/lxc/c1/memory.limit_in_bytes": "100003840\n"},
		want:   100003840,
	}, {
		name:   "a mount point with a space",
		cgroup: "0::/\n",
		mounts: rootfs + `30 23 0:26 / /cg\040root rw - cgroup2 cgroup2 rw` + "\n",
		files:  map[string]string{"cg root/memory.max": "268435456\n"},
		want:   256 << 20,
	}, {
		name:   "outside the mount's root: the root is read",
		cgroup: "4:memory:/elsewhere\n",
		mounts: rootfs + fmt.Sprintf(v1Memory, "/docker/abc"),
		files:  map[string]string{"sys/fs/cgroup/memory/memory.limit_in_bytes": "536870912\n"},
		want:   512 << 20,
	}, {
		name:   "no cgroup mounted",
		cgroup: "0::/\n",
		mounts: rootfs,
	}, {
		name:   "garbage",
		cgroup: "0::/\n",
		mounts: rootfs + v2Mount,
		files:  map[string]string{"sys/fs/cgroup/memory.max": "lots\n"},
	}, {
		name: "no /proc",
	}} {
		t.Run(tc.name, func(t *testing.T) {
			root := t.TempDir()
			files := map[string]string{}
			if tc.cgroup != "" {
				files["proc/self/cgroup"] = tc.cgroup
				files["proc/self/mountinfo"] = tc.mounts
			}
			for name, data := range tc.files {
				files[name] = data
			}
			for name, data := range files {
				p := filepath.Join(root, name)
				if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(p, []byte(data), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			if got := MemoryLimit(root); got != tc.want {
				t.Errorf("MemoryLimit = %d, want %d", got, tc.want)
			}
		})
	}
}
