package caddymodule

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"net"
	"reflect"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/homecircle/circle/caddymodule/circlenode"
	"github.com/homecircle/circle/replicator"
)

// freeAddr returns a loopback host:port free for both TCP and UDP (the
// gossip port uses both).
func freeAddr(t testing.TB) string {
	t.Helper()
	for range 50 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := l.Addr().String()
		u, err := net.ListenPacket("udp", addr)
		l.Close()
		if err != nil {
			continue
		}
		u.Close()
		return addr
	}
	t.Fatal("no free port")
	return ""
}

func testSecret(t testing.TB) []byte {
	b := make([]byte, 32)
	rand.Read(b)
	return b
}

// openTestNode opens a single real replicator node in t.TempDir().
func openTestNode(t testing.TB, name string, secret []byte) *replicator.Node {
	t.Helper()
	cfg := replicator.DefaultConfig()
	cfg.Name = name
	cfg.DataDir = t.TempDir()
	cfg.Secret = secret
	cfg.BindAddr = freeAddr(t)
	cfg.Replicas = 1
	cfg.AckTimeout = 2 * time.Second
	n, err := replicator.Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	return n
}

// testCertPEM returns a self-signed certificate for name and its EC key,
// both PEM-encoded.
func testCertPEM(t *testing.T, names ...string) (certPEM, keyPEM []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: names[0]},
		DNSNames:     names,
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder})
}

// newTestStorages returns a storage on each of nodes, all with key.
func newTestStorages(t *testing.T, key []byte, nodes ...*replicator.Node) []*Storage {
	t.Helper()
	var ss []*Storage
	for _, n := range nodes {
		ss = append(ss, newTestStorage(t, n, key))
	}
	return ss
}

func newTestStorage(t *testing.T, n *replicator.Node, key []byte) *Storage {
	t.Helper()
	s := &Storage{LockTTL: caddy.Duration(600 * time.Millisecond), LockPollInterval: caddy.Duration(20 * time.Millisecond)}
	if err := s.init(n, n.Name(), key); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Cleanup() })
	return s
}

func TestStorageSemantics(t *testing.T) {
	ctx := context.Background()
	n := openTestNode(t, "solo", testSecret(t))
	key := testSecret(t)
	s := newTestStorage(t, n, key)

	if _, err := s.Load(ctx, "missing"); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("Load(missing) = %v, want fs.ErrNotExist", err)
	}
	if _, err := s.Stat(ctx, "missing"); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("Stat(missing) = %v, want fs.ErrNotExist", err)
	}
	if _, err := s.List(ctx, "missing", true); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("List(missing) = %v, want fs.ErrNotExist", err)
	}
	if s.Exists(ctx, "missing") {
		t.Fatal("Exists(missing)")
	}
	if err := s.Delete(ctx, "missing"); err != nil {
		t.Fatalf("Delete(missing) = %v, want nil", err)
	}

	exCert, exKey := testCertPEM(t, "example.com")
	otherCert, _ := testCertPEM(t, "other.net")
	rootCert, rootKey := testCertPEM(t, "root")
	files := map[string][]byte{
		"certificates/acme/example.com/example.com.crt":  exCert,
		"certificates/acme/example.com/example.com.key":  exKey,
		"certificates/acme/example.com/example.com.json": []byte(`{"sans":["example.com"]}`),
		"certificates/acme/other.net/other.net.crt":      otherCert,
		"pki/authorities/local/root.crt":                 rootCert,
		"pki/authorities/local/root.key":                 rootKey,
		"last_clean.json":                                []byte("{}"),
	}
	before := time.Now().Add(-time.Second)
	for k, v := range files {
		if err := s.Store(ctx, k, v); err != nil {
			t.Fatalf("Store(%s): %v", k, err)
		}
	}
	for k, v := range files {
		got, err := s.Load(ctx, k)
		if err != nil || !bytes.Equal(got, v) {
			t.Fatalf("Load(%s) = %q, %v; want %q", k, got, err, v)
		}
		info, err := s.Stat(ctx, k)
		if err != nil || !info.IsTerminal || info.Key != k || info.Size != int64(len(v)) {
			t.Fatalf("Stat(%s) = %+v, %v", k, info, err)
		}
		if info.Modified.Before(before) || info.Modified.After(time.Now().Add(time.Second)) {
			t.Fatalf("Stat(%s).Modified = %v, not about now", k, info.Modified)
		}
	}
	if err := s.Store(ctx, "last_clean.json", []byte(`{"v":2}`)); err != nil {
		t.Fatal(err)
	}
	if got, _ := s.Load(ctx, "last_clean.json"); string(got) != `{"v":2}` {
		t.Fatalf("overwrite: Load = %q", got)
	}

	for _, k := range []string{"certificates", "certificates/acme", "pki/authorities/local", "last_clean.json"} {
		if !s.Exists(ctx, k) {
			t.Errorf("Exists(%s) = false", k)
		}
	}
	if s.Exists(ctx, "certificates/ac") {
		t.Error("Exists of a partial path segment")
	}
	info, err := s.Stat(ctx, "certificates/acme")
	if err != nil || info.IsTerminal {
		t.Fatalf("Stat(dir) = %+v, %v; want a non-terminal key", info, err)
	}

	list := func(dir string, rec bool) []string {
		t.Helper()
		got, err := s.List(ctx, dir, rec)
		if err != nil {
			t.Fatalf("List(%q, %v): %v", dir, rec, err)
		}
		return got
	}
	if got, want := list("certificates/acme", false), []string{"certificates/acme/example.com", "certificates/acme/other.net"}; !reflect.DeepEqual(got, want) {
		t.Errorf("List non-recursive = %v, want %v", got, want)
	}
	if got, want := list("", false), []string{"certificates", "last_clean.json", "pki"}; !reflect.DeepEqual(got, want) {
		t.Errorf("List root = %v, want %v", got, want)
	}
	wantRec := []string{
		"certificates/acme",
		"certificates/acme/example.com",
		"certificates/acme/example.com/example.com.crt",
		"certificates/acme/example.com/example.com.json",
		"certificates/acme/example.com/example.com.key",
		"certificates/acme/other.net",
		"certificates/acme/other.net/other.net.crt",
	}
	if got := list("certificates", true); !reflect.DeepEqual(got, wantRec) {
		t.Errorf("List recursive = %v, want %v", got, wantRec)
	}

	// Private keys are encrypted at rest, bound to their key name.
	for _, k := range []string{"certificates/acme/example.com/example.com.key", "pki/authorities/local/root.key"} {
		rec, err := n.Get(bucketCerts, k)
		if err != nil {
			t.Fatal(err)
		}
		if bytes.Contains(rec.Value, files[k]) || bytes.Contains(rec.Value, []byte("PRIVATE")) {
			t.Fatalf("%s stored in the clear: %q", k, rec.Value)
		}
	}
	if rec, _ := n.Get(bucketCerts, "pki/authorities/local/root.crt"); !bytes.Equal(rec.Value, rootCert) {
		t.Fatalf("certificate not stored as is: %q", rec.Value)
	}
	other := newTestStorage(t, n, testSecret(t))
	if _, err := other.Load(ctx, "pki/authorities/local/root.key"); err == nil || errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("Load with another circle secret: %v, want a decryption error", err)
	}
	moved, _ := n.Get(bucketCerts, "pki/authorities/local/root.key")
	if err := n.Put(ctx, bucketCerts, "pki/authorities/local/intermediate.key", moved.Value); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Load(ctx, "pki/authorities/local/intermediate.key"); err == nil {
		t.Fatal("a sealed value moved to another key decrypted")
	}

	// Delete of a file, then of a directory with everything below it.
	if err := s.Delete(ctx, "certificates/acme/other.net/other.net.crt"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Load(ctx, "certificates/acme/other.net/other.net.crt"); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("Load after Delete = %v", err)
	}
	if s.Exists(ctx, "certificates/acme/other.net") {
		t.Fatal("empty directory still exists")
	}
	if err := s.Delete(ctx, "certificates"); err != nil {
		t.Fatal(err)
	}
	if s.Exists(ctx, "certificates/acme/example.com/example.com.crt") || s.Exists(ctx, "certificates") {
		t.Fatal("Delete(dir) left keys below it")
	}
	if !s.Exists(ctx, "last_clean.json") || !s.Exists(ctx, "pki") {
		t.Fatal("Delete(dir) removed keys outside it")
	}
}

func TestStorageLocks(t *testing.T) {
	ctx := context.Background()
	n := openTestNode(t, "locker", testSecret(t))
	key := testSecret(t)
	a := newTestStorage(t, n, key)
	b := newTestStorage(t, n, key) // another instance: another owner

	if err := a.Lock(ctx, "issue_cert_example.com"); err != nil {
		t.Fatal(err)
	}
	if ok, err := b.TryLock(ctx, "issue_cert_example.com"); ok || err != nil {
		t.Fatalf("TryLock of a held lock = %v, %v", ok, err)
	}
	if ok, err := a.TryLock(ctx, "issue_cert_example.com"); ok || err != nil {
		t.Fatalf("TryLock by the holder itself = %v, %v", ok, err)
	}
	if ok, err := b.TryLock(ctx, "another"); !ok || err != nil {
		t.Fatalf("TryLock of a free lock = %v, %v", ok, err)
	}
	if err := b.Unlock(ctx, "another"); err != nil {
		t.Fatal(err)
	}

	// Held beyond several TTLs: the refresher keeps the lease alive.
	deadline := time.Now().Add(3 * time.Duration(a.LockTTL))
	for time.Now().Before(deadline) {
		if ok, _ := b.TryLock(ctx, "issue_cert_example.com"); ok {
			t.Fatal("a refreshed lease was taken over")
		}
		time.Sleep(50 * time.Millisecond)
	}

	waitCtx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	err := b.Lock(waitCtx, "issue_cert_example.com")
	cancel()
	if err == nil {
		t.Fatal("Lock of a held lock returned before its context ended")
	}

	// Unlock wakes a waiter.
	got := make(chan error, 1)
	go func() { got <- b.Lock(ctx, "issue_cert_example.com") }()
	if err := a.Unlock(ctx, "issue_cert_example.com"); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-got:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("waiter did not get the lock after Unlock")
	}
	if err := b.Unlock(ctx, "issue_cert_example.com"); err != nil {
		t.Fatal(err)
	}
	if err := b.Unlock(ctx, "issue_cert_example.com"); err == nil {
		t.Fatal("Unlock of a lock not held succeeded")
	}
}

func TestStorageLockMutualExclusion(t *testing.T) {
	ctx := context.Background()
	n := openTestNode(t, "mutex", testSecret(t))
	key := testSecret(t)
	var inside, max atomic.Int32
	var wg sync.WaitGroup
	for i := range 4 {
		s := newTestStorage(t, n, key)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range 5 {
				if err := s.Lock(ctx, "shared"); err != nil {
					t.Error(err)
					return
				}
				v := inside.Add(1)
				if v > max.Load() {
					max.Store(v)
				}
				if err := s.Store(ctx, fmt.Sprintf("w/%d/%d", i, j), []byte("x")); err != nil {
					t.Error(err)
				}
				inside.Add(-1)
				if err := s.Unlock(ctx, "shared"); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	if max.Load() != 1 {
		t.Fatalf("%d holders at once", max.Load())
	}
}

// openTestCluster opens n joined replicator nodes with replicas 2.
func openTestCluster(t *testing.T, names ...string) []*replicator.Node {
	t.Helper()
	secret := testSecret(t)
	var out []*replicator.Node
	var first string
	for _, name := range names {
		cfg := replicator.DefaultConfig()
		cfg.Name = name
		cfg.DataDir = t.TempDir()
		cfg.Secret = secret
		cfg.BindAddr = freeAddr(t)
		cfg.Replicas = 2
		cfg.AckTimeout = 2 * time.Second
		cfg.AntiEntropyInterval = time.Second
		if first != "" {
			cfg.Join = []string{first}
		} else {
			first = cfg.BindAddr
		}
		n, err := replicator.Open(cfg)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { n.Close() })
		out = append(out, n)
	}
	deadline := time.Now().Add(10 * time.Second)
	for _, n := range out {
		for circlenode.AlivePeers(n) != len(out)-1 {
			if time.Now().After(deadline) {
				t.Fatalf("%s sees %d alive peers", n.Name(), circlenode.AlivePeers(n))
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	return out
}

// Every alive node holds a stored value when Store returns: a challenge
// token is answerable by any node before the CA validates.
func TestStorageAllAliveAck(t *testing.T) {
	ctx := context.Background()
	// a4 runs no storage of its own, but its replicator holds the token
	// too: the acknowledgement comes from the store, not the module.
	all := openTestCluster(t, "a1", "a2", "a3", "a4")
	ns := all[:3]
	ss := newTestStorages(t, testSecret(t), ns...)
	for i := range 5 {
		k := fmt.Sprintf("acme/ca/challenge_tokens/name%d.json", i)
		start := time.Now()
		if err := ss[i%3].Store(ctx, k, []byte(`{"token":"x"}`)); err != nil {
			t.Fatal(err)
		}
		took := time.Since(start)
		for _, s := range ss {
			if _, err := s.Load(ctx, k); err != nil {
				t.Fatalf("%s right after Store on %s (took %v): %v", s.node.Name(), ss[i%3].node.Name(), took, err)
			}
		}
		if _, err := all[3].Get(bucketCerts, k); err != nil {
			t.Fatalf("a4 lacks %s right after Store: %v", k, err)
		}
		if took > 3*time.Second {
			t.Fatalf("Store took %v", took)
		}
	}
}

// Nodes that take the same lock at the same moment agree on one holder
// (stable membership): the "one order per name" of a circle starting up.
func TestStorageLockAcrossNodes(t *testing.T) {
	ctx := context.Background()
	ns := openTestCluster(t, "l1", "l2", "l3")
	ss := newTestStorages(t, testSecret(t), ns...)
	for round := range 5 {
		name := fmt.Sprintf("issue_cert_round%d.example", round)
		var wins atomic.Int32
		var wg sync.WaitGroup
		start := make(chan struct{})
		for _, s := range ss {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				ok, err := s.TryLock(ctx, name)
				if err != nil {
					t.Error(err)
				}
				if ok {
					wins.Add(1)
				}
			}()
		}
		close(start)
		wg.Wait()
		if w := wins.Load(); w > 1 {
			t.Fatalf("round %d: %d nodes hold the lock", round, w)
		}
		// A lock nobody won (all saw a later lease) is taken on the next try.
		for _, s := range ss {
			if s.locks.Held(name) {
				if err := s.Unlock(ctx, name); err != nil {
					t.Fatal(err)
				}
			}
		}
	}
}
