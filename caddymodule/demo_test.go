package caddymodule

import (
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

var updateDemo = flag.Bool("update-demo", false, "rewrite caddyfiles/demo-*.Caddyfile from the demo template")

// TestDemoCaddyfiles keeps caddyfiles/demo-*.Caddyfile (adapted in the
// caddyfiles tests) identical to what `caddy circle demo` writes for the
// default ports under /tmp/circle-demo.
func TestDemoCaddyfiles(t *testing.T) {
	nodes := demoNodes("/tmp/circle-demo", defaultDemoBasePort)
	seen := map[int]string{}
	for _, n := range nodes {
		for _, p := range []int{n.AdminPort, n.HTTPPort, n.HTTPSPort, n.GossipPort} {
			if other, dup := seen[p]; dup {
				t.Fatalf("port %d used by %s and %s", p, other, n.Name)
			}
			seen[p] = n.Name
		}
		if len(n.JoinPorts) != 2 {
			t.Fatalf("%s joins %v, want the two others", n.Name, n.JoinPorts)
		}
		got, err := n.caddyfile()
		if err != nil {
			t.Fatal(err)
		}
		for _, want := range []string{"storage circle", "local_certs", "circle_portal", "circle_auth",
			"{http.request.header.Remote-User}", "name " + n.Name} {
			if !strings.Contains(got, want) {
				t.Errorf("%s Caddyfile lacks %q", n.Name, want)
			}
		}
		path := filepath.Join("..", "caddyfiles", "demo-"+n.Name+".Caddyfile")
		if *updateDemo {
			if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
				t.Fatal(err)
			}
			continue
		}
		want, err := os.ReadFile(path)
		if err != nil {
			t.Fatalf("%v (run with -update-demo)", err)
		}
		if string(want) != got {
			t.Errorf("%s differs from the demo template (run with -update-demo):\n%s", path, got)
		}
	}
}
