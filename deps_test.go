// Package circle_test holds repository-wide checks.
package circle_test

import (
	"encoding/json"
	"errors"
	"os/exec"
	"strings"
	"testing"
)

// forbidden lists, for each Caddy-free package, the import path prefixes it
// must not depend on, directly or transitively.
var forbidden = map[string][]string{
	"github.com/homecircle/circle/identity": {
		"github.com/caddyserver/",
		"go.uber.org/zap",
		"github.com/hashicorp/memberlist",
		"github.com/pion/",
		"github.com/homecircle/circle/replicator",
		"github.com/homecircle/circle/relay",
		"github.com/homecircle/circle/caddymodule",
	},
	"github.com/homecircle/circle/replicator": {
		"github.com/caddyserver/",
		"go.uber.org/zap",
		"github.com/homecircle/circle/identity",
		"github.com/homecircle/circle/caddymodule",
	},
	"github.com/homecircle/circle/relay": {
		"github.com/caddyserver/",
		"go.uber.org/zap",
		"github.com/homecircle/circle/identity",
		"github.com/homecircle/circle/caddymodule",
	},
	// The node assembly: replicator, identity and relay together, no Caddy.
	"github.com/homecircle/circle/caddymodule/circlenode": {
		"github.com/caddyserver/",
		"go.uber.org/zap",
	},
}

// TestDeps keeps identity, replicator and relay free of Caddy, certmagic
// and zap (and identity free of the mesh), as docs/INTERNALS.md says. It
// asks the go tool for the full dependency list, tests included, so a
// forbidden import anywhere below a package fails here.
func TestDeps(t *testing.T) {
	for pkg, bad := range forbidden {
		out, err := exec.Command("go", "list", "-deps", "-test", "-json=ImportPath", pkg).Output()
		if err != nil {
			var ee *exec.ExitError
			if errors.As(err, &ee) {
				t.Fatalf("go list %s: %v: %s", pkg, err, ee.Stderr)
			}
			t.Fatalf("go list %s: %v", pkg, err)
		}
		dec := json.NewDecoder(strings.NewReader(string(out)))
		seen := 0
		for dec.More() {
			var p struct{ ImportPath string }
			if err := dec.Decode(&p); err != nil {
				t.Fatalf("decoding go list output: %v", err)
			}
			seen++
			for _, prefix := range bad {
				if strings.HasPrefix(p.ImportPath, prefix) {
					t.Errorf("%s depends on %s (forbidden prefix %s)", pkg, p.ImportPath, prefix)
				}
			}
		}
		if seen == 0 {
			t.Errorf("go list returned no packages for %s", pkg)
		}
	}
}

// TestDepsCatchesViolation proves the check can fail: caddymodule does
// depend on Caddy, so the same scan must find it there.
func TestDepsCatchesViolation(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", "github.com/homecircle/circle/cmd/caddy").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	if !strings.Contains(string(out), "github.com/caddyserver/caddy/v2\n") {
		t.Fatal("scan did not see caddy in cmd/caddy's dependencies; the deps check would be blind")
	}
}
