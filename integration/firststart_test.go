package integration

import (
	"bytes"
	"crypto/x509"
	"fmt"
	"os"
	"testing"
	"time"
)

// firstStartRounds is how many fresh circles TestFirstStartTogether starts
// (the acceptance: 10 times).
const firstStartRounds = 10

// TestFirstStartTogether: three fresh nodes with `local_certs` and
// `storage circle`, joining each other by loopback addresses, started at
// the same instant, 10 times with fresh data dirs. Every node must start
// (none exits) and all must serve the same CA root and intermediate, and a
// certificate for the portal that chains to that root.
func TestFirstStartTogether(t *testing.T) {
	failed := 0
	for i := 1; i <= firstStartRounds; i++ {
		if !t.Run(fmt.Sprintf("round%d", i), firstStartRound) {
			failed++
		}
	}
	t.Logf("%d of %d rounds failed", failed, firstStartRounds)
}

func firstStartRound(t *testing.T) {
	c := newCircle(t, "alpha", "beta", "gamma")
	// Launch every process held at a gate (a pipe its shell reads before
	// it execs caddy), then release them together by closing the pipes.
	var release []*os.File
	for _, name := range c.order {
		r, w, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		n := c.nodes[name]
		n.gate = r
		n.launch()
		r.Close() // the child holds its own copy
		release = append(release, w)
	}
	for _, w := range release {
		w.Close()
	}
	for _, name := range c.order {
		c.nodes[name].waitUp()
	}

	var root, inter *x509.Certificate
	for _, name := range c.order {
		n := c.nodes[name]
		r, i, err := fetchCA(n.admin)
		if err != nil {
			t.Fatalf("CA of %s: %v", name, err)
		}
		if root == nil {
			root, inter = r, i
			continue
		}
		if !bytes.Equal(r.Raw, root.Raw) {
			t.Errorf("%s serves root %q (serial %s), %s serves root %q (serial %s)",
				name, r.Subject.CommonName, r.SerialNumber, c.order[0], root.Subject.CommonName, root.SerialNumber)
		}
		if !bytes.Equal(i.Raw, inter.Raw) {
			t.Errorf("%s serves intermediate serial %s, %s serves serial %s",
				name, i.SerialNumber, c.order[0], inter.SerialNumber)
		}
	}
	if t.Failed() {
		return
	}

	// Each node's portal certificate chains to the one root.
	pool := x509.NewCertPool()
	pool.AddCert(root)
	for _, name := range c.order {
		n := c.nodes[name]
		n.rootPool = pool
		waitFor(t, 20*time.Second, name+" serves the portal under the shared root", func() error {
			code, _, _, err := getWith(n.client(), n.url("", "/login"), nil, nil)
			if err != nil {
				return err
			}
			if code >= 500 {
				return fmt.Errorf("status %d", code)
			}
			return nil
		})
	}
	for _, name := range c.order {
		select {
		case <-c.nodes[name].done:
			t.Errorf("%s exited: %s", name, tail(c.nodes[name].log.String(), 2000))
		default:
		}
	}
}
