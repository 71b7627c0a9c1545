package integration

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

// oldRelease is the release a circle upgrades from in place: main at the
// time rolling upgrades were built (wire version 1 exactly, no data format
// version).
const oldRelease = "b4e49ea"

// buildRelease builds cmd/caddy of commit rev from this checkout's git
// history into a temp dir (once per test) and returns the binary. Outside
// a git checkout, or without rev in its history, the test fails under
// CI=true and is skipped otherwise.
func buildRelease(t *testing.T, rev string) string {
	t.Helper()
	unavailable := func(format string, args ...any) {
		t.Helper()
		msg := fmt.Sprintf("cannot build release %s from git: ", rev) + fmt.Sprintf(format, args...) +
			" (the upgrade test needs a git checkout of the repository with its history)"
		if os.Getenv("CI") == "true" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	out, err := exec.Command("git", "rev-parse", "--show-toplevel").Output()
	if err != nil {
		unavailable("not in a git checkout: %v", err)
	}
	root := strings.TrimSpace(string(out))
	if err := exec.Command("git", "-C", root, "cat-file", "-e", rev+"^{commit}").Run(); err != nil {
		unavailable("commit not in the history (a shallow clone?): %v", err)
	}
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	if err := os.Mkdir(src, 0o700); err != nil {
		t.Fatal(err)
	}
	tarball := filepath.Join(dir, "src.tar")
	if out, err := exec.Command("git", "-C", root, "archive", "--format=tar", "-o", tarball, rev).CombinedOutput(); err != nil {
		t.Fatalf("git archive %s: %v\n%s", rev, err, out)
	}
	if out, err := exec.Command("tar", "-xf", tarball, "-C", src).CombinedOutput(); err != nil {
		t.Fatalf("unpacking %s: %v\n%s", rev, err, out)
	}
	bin := filepath.Join(dir, "caddy-"+rev)
	build := exec.Command("go", "build", "-o", bin, "./cmd/caddy")
	build.Dir = src
	build.Env = append(os.Environ(), "GOFLAGS=-mod=readonly", "GOWORK=off")
	start := time.Now()
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building release %s: %v\n%s", rev, err, out)
	}
	t.Logf("built release %s in %v", rev, time.Since(start).Round(time.Second))
	return bin
}

// stop stops the node gracefully (admin /stop, as an operator replacing
// the binary would), killing it if it does not exit within 20 s.
func (n *node) stop() {
	n.c.t.Helper()
	if n.cmd == nil {
		return
	}
	n.admin("POST", "/stop", nil, nil)
	select {
	case <-n.done:
		n.cmd = nil
	case <-time.After(20 * time.Second):
		n.c.t.Logf("%s did not stop within 20 s; killing it", n.name)
		n.kill()
	}
}

// leafSerial returns the serial of the certificate n serves for the
// portal, verified against root.
func (n *node) leafSerial(root *x509.Certificate) (*big.Int, error) {
	pool := x509.NewCertPool()
	pool.AddCert(root)
	d := &net.Dialer{Timeout: 5 * time.Second}
	c, err := tls.DialWithDialer(d, "tcp", fmt.Sprintf("127.0.0.1:%d", n.httpsPort), &tls.Config{ServerName: domain, RootCAs: pool})
	if err != nil {
		return nil, err
	}
	defer c.Close()
	return c.ConnectionState().PeerCertificates[0].SerialNumber, nil
}

// me checks that cookie is accepted on n (/api/me answers the user).
func (n *node) me(cookie *http.Cookie, user string) error {
	status, body, _, err := n.get(n.url("", "/api/me"), cookie, map[string]string{"Accept": "application/json"})
	if err != nil {
		return err
	}
	if status != http.StatusOK || !strings.Contains(body, `"`+user+`"`) {
		return fmt.Errorf("/api/me on %s with %s's session: %d %s", n.name, user, status, body)
	}
	return nil
}

// stampFormat writes a data format version into a node's bbolt file (the
// node must be stopped).
func stampFormat(t *testing.T, dataDir string, format uint32) {
	t.Helper()
	db, err := bolt.Open(filepath.Join(dataDir, "circle.db"), 0o600, &bolt.Options{Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	err = db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket([]byte("meta")).Put([]byte("format"), binary.BigEndian.AppendUint32(nil, format))
	})
	if err != nil {
		t.Fatal(err)
	}
}

// readFormat returns the data format stamped in a stopped node's bbolt
// file (0: none).
func readFormat(t *testing.T, dataDir string) uint32 {
	t.Helper()
	db, err := bolt.Open(filepath.Join(dataDir, "circle.db"), 0o600, &bolt.Options{Timeout: 5 * time.Second, ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var f uint32
	db.View(func(tx *bolt.Tx) error {
		if v := tx.Bucket([]byte("meta")).Get([]byte("format")); len(v) == 4 {
			f = binary.BigEndian.Uint32(v)
		}
		return nil
	})
	return f
}

// copyDir copies a directory tree of regular files.
func copyDir(t *testing.T, from, to string) {
	t.Helper()
	err := filepath.Walk(from, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(from, p)
		dst := filepath.Join(to, rel)
		if fi.IsDir() {
			return os.MkdirAll(dst, 0o700)
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		return os.WriteFile(dst, b, fi.Mode().Perm())
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestUpgradeInPlace is the acceptance point "upgrade in place from
// today's release": a circle of three nodes on release b4e49ea, upgraded
// one node at a time to this build with the same data directories, keeps
// every account, session and certificate, and the mixed circle replicates
// both ways at every step. The data of this build opened by the old
// release is read correctly, and data of a newer format is refused by
// this build with a clear message. Last, one node moves on to the next
// wire version (a test build) and the circle keeps working.
func TestUpgradeInPlace(t *testing.T) {
	old := buildRelease(t, oldRelease)
	c := newCircle(t, "alpha", "beta", "gamma")
	for _, name := range c.order {
		c.nodes[name].bin = old
	}
	c.startAll()
	nodes := []*node{c.nodes["alpha"], c.nodes["beta"], c.nodes["gamma"]}

	root, err := nodes[0].rootCA()
	if err != nil {
		t.Fatal(err)
	}
	serials := map[string]*big.Int{}
	for _, n := range nodes {
		waitFor(t, 20*time.Second, n.name+" serves a certificate from the circle's root", func() error {
			s, err := n.leafSerial(root)
			serials[n.name] = s
			return err
		})
	}

	// Accounts and sessions made on the old release.
	passwords := map[string]string{}
	type session struct {
		user   string
		cookie *http.Cookie
	}
	var sessions []session
	for _, n := range nodes {
		user := "old-" + n.name
		passwords[user] = user + "'s long password"
		if err := n.addUser(user, passwords[user]); err != nil {
			t.Fatal(err)
		}
	}
	for _, n := range nodes {
		for user, pw := range passwords {
			sessions = append(sessions, session{user, loginEventually(t, n, user, pw)})
		}
	}

	// check runs after every step: every account logs in on every node,
	// every session is accepted everywhere, every node serves its
	// certificate from the same root, and a write on each node (old or new
	// build) reaches every other node.
	check := func(step string) {
		t.Helper()
		for _, n := range nodes {
			r, err := n.rootCA()
			if err != nil || !r.Equal(root) {
				t.Fatalf("%s: %s serves another root (%v)", step, n.name, err)
			}
			s, err := n.leafSerial(root)
			if err != nil || s.Cmp(serials[n.name]) != 0 {
				t.Fatalf("%s: %s serves certificate %v (%v), before the upgrade %v", step, n.name, s, err, serials[n.name])
			}
		}
		for _, n := range nodes {
			user := step + "-" + n.name
			passwords[user] = user + "'s long password"
			if err := n.addUser(user, passwords[user]); err != nil {
				t.Fatalf("%s: adding %s on %s: %v", step, user, n.name, err)
			}
		}
		for _, n := range nodes {
			for user, pw := range passwords {
				cookie := loginEventually(t, n, user, pw)
				if strings.HasPrefix(user, step) {
					sessions = append(sessions, session{user, cookie})
				}
			}
		}
		for _, n := range nodes {
			for _, s := range sessions {
				waitFor(t, 10*time.Second, step+": session of "+s.user+" on "+n.name, func() error { return n.me(s.cookie, s.user) })
			}
		}
	}

	for i, n := range nodes {
		step := fmt.Sprintf("step%d", i+1)
		n.stop()
		if i == 0 {
			if f := readFormat(t, filepath.Join(n.dir, "data")); f != 0 {
				t.Fatalf("%s's data has format %d stamped", oldRelease, f)
			}
			// This build refuses data of a newer format, with a clear
			// message and without touching it (on a copy).
			probe := c.addNode(n.name+"-future", c.secretFile)
			copyDir(t, filepath.Join(n.dir, "data"), filepath.Join(probe.dir, "data"))
			stampFormat(t, filepath.Join(probe.dir, "data"), 99)
			probe.launch()
			select {
			case <-probe.done:
			case <-time.After(30 * time.Second):
				t.Fatal("this build started on data of format 99")
			}
			want := "was written by a newer Circle (format 99); this build reads format <= "
			if !strings.Contains(probe.log.String(), want) {
				t.Fatalf("this build on data of format 99 did not say %q:\n%s", want, tail(probe.log.String(), 3000))
			}
			delete(c.nodes, probe.name)
			c.order = c.order[:len(c.order)-1]
		}
		n.bin = "" // this build
		n.start()
		for _, m := range nodes {
			m.waitMembers(len(nodes))
		}
		t.Logf("%s: %s runs this build", step, n.name)
		check(step)
	}

	// The old release on data this build wrote (stamped with the format):
	// read correctly, and it replicates with the new nodes.
	a := nodes[0]
	a.stop()
	if f := readFormat(t, filepath.Join(a.dir, "data")); f != 1 {
		t.Fatalf("data format after this build's first start: %d, want 1 stamped", f)
	}
	a.bin = old
	a.start()
	for _, m := range nodes {
		m.waitMembers(len(nodes))
	}
	check("downgraded")
	a.stop()
	a.bin = ""
	a.start()
	for _, m := range nodes {
		m.waitMembers(len(nodes))
	}
	check("final")

	// The next release, played by this build with the circle_nextwire tag
	// (wire version 2, a capability and a request type and a gossip type
	// this build does not know): one node of the circle upgraded to it.
	next := filepath.Join(t.TempDir(), "caddy-nextwire")
	build := exec.Command("go", "build", "-tags", "circle_nextwire", "-o", next, "github.com/homecircle/circle/cmd/caddy")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building the next-wire caddy: %v\n%s", err, out)
	}
	g := nodes[2]
	g.stop()
	g.bin = next
	g.start()
	for _, m := range nodes {
		m.waitMembers(len(nodes))
	}
	check("nextwire")
	for _, m := range nodes[:2] {
		if l := m.log.String(); strings.Contains(l, "dropping gossip message") {
			t.Errorf("%s (this build) complained about the next-wire node's gossip:\n%s", m.name, tail(l, 3000))
		}
	}
	// No node, old or new, rejected another's replication messages at any
	// step.
	for _, m := range nodes {
		l := m.log.String()
		for _, bad := range []string{"unexpected message on replication stream", "bad replication message", "failed authentication"} {
			if strings.Contains(l, bad) {
				t.Errorf("%s logged %q during the upgrade:\n%s", m.name, bad, tail(l, 3000))
			}
		}
	}
}
