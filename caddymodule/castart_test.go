package caddymodule

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

// caPairs are the files one node would generate for a CA.
type caPairs struct{ rootCrt, rootKey, interCrt, interKey []byte }

func newCAPairs(t *testing.T) caPairs {
	var p caPairs
	p.rootCrt, p.rootKey = testCertPEM(t, "root")
	p.interCrt, p.interKey = testCertPEM(t, "intermediate")
	return p
}

// caddyPKISequence makes the storage calls caddypki's CA.Provision makes
// (ca.go: loadOrGenRoot, then loadOrGenIntermediate) for CA id, with gen as
// the files it would generate, and returns the root and intermediate it
// keeps in memory.
func caddyPKISequence(ctx context.Context, s *Storage, id string, gen caPairs) (root, inter []byte, err error) {
	loadOrGen := func(pair string, crt, key []byte) ([]byte, error) {
		got, err := s.Load(ctx, caPath(id, pair+".crt"))
		if errors.Is(err, fs.ErrNotExist) {
			if err := s.Store(ctx, caPath(id, pair+".crt"), crt); err != nil {
				return nil, err
			}
			return crt, s.Store(ctx, caPath(id, pair+".key"), key)
		}
		if err != nil {
			return nil, err
		}
		if _, err := s.Load(ctx, caPath(id, pair+".key")); err != nil {
			return nil, err
		}
		return got, nil
	}
	if root, err = loadOrGen("root", gen.rootCrt, gen.rootKey); err != nil {
		return nil, nil, err
	}
	inter, err = loadOrGen("intermediate", gen.interCrt, gen.interKey)
	return root, inter, err
}

// Three nodes provisioning the same CA at the same moment end with one
// root and one intermediate, in memory and in the store, and the creation
// lock is released.
func TestStorageCAFirstStartOnce(t *testing.T) {
	ctx := context.Background()
	nodes := openTestCluster(t, "c1", "c2", "c3")
	ss := newTestStorages(t, testSecret(t), nodes...)
	for round := range 5 {
		id := fmt.Sprintf("ca%d", round)
		gens := make([]caPairs, len(ss))
		for i := range ss {
			gens[i] = newCAPairs(t)
		}
		type result struct{ root, inter []byte }
		res := make([]result, len(ss))
		errs := make([]error, len(ss))
		start := make(chan struct{})
		var wg sync.WaitGroup
		for i, s := range ss {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				res[i].root, res[i].inter, errs[i] = caddyPKISequence(ctx, s, id, gens[i])
			}()
		}
		close(start)
		wg.Wait()
		for i, err := range errs {
			if err != nil {
				t.Fatalf("%s, %s: %v", id, nodes[i].Name(), err)
			}
		}
		for i := range ss {
			if !bytes.Equal(res[i].root, res[0].root) || !bytes.Equal(res[i].inter, res[0].inter) {
				t.Fatalf("%s: %s and %s keep different CAs", id, nodes[0].Name(), nodes[i].Name())
			}
			for _, pair := range []string{"root", "intermediate"} {
				if err := ss[i].pairMatches(id, pair); err != nil {
					t.Fatalf("%s on %s: %s: %v", id, nodes[i].Name(), pair, err)
				}
			}
			stored, err := ss[i].Load(ctx, caPath(id, "root.crt"))
			if err != nil || !bytes.Equal(stored, res[0].root) {
				t.Fatalf("%s: %s stores another root (%v)", id, nodes[i].Name(), err)
			}
		}
		waitUntil(t, 5*time.Second, "creation lock released", func() bool {
			return lockFree(t, ss[0], caLockName(id))
		})
	}
}

// lockFree reports whether s can take lock name (and then releases it).
func lockFree(t *testing.T, s *Storage, name string) bool {
	t.Helper()
	ok, err := s.TryLock(context.Background(), name)
	if err != nil {
		t.Fatal(err)
	}
	if ok {
		if err := s.Unlock(context.Background(), name); err != nil {
			t.Fatal(err)
		}
	}
	return ok
}

// waitUntil polls cond every 20 ms until it holds or within passes.
func waitUntil(t *testing.T, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v", what, within)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// A node alone (a circle that has never met) creates its CA at once.
func TestStorageCAAlone(t *testing.T) {
	ctx := context.Background()
	s := newTestStorage(t, openTestNode(t, "alone", testSecret(t)), testSecret(t))
	gen := newCAPairs(t)
	start := time.Now()
	root, inter, err := caddyPKISequence(ctx, s, "local", gen)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(root, gen.rootCrt) || !bytes.Equal(inter, gen.interCrt) {
		t.Fatal("the lone node does not keep the CA it generated")
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Fatalf("took %v", took)
	}
	if !lockFree(t, s, caLockName("local")) {
		t.Fatal("creation lock still held")
	}
	// A restart loads the same CA.
	root2, inter2, err := caddyPKISequence(ctx, s, "local", newCAPairs(t))
	if err != nil || !bytes.Equal(root2, root) || !bytes.Equal(inter2, inter) {
		t.Fatalf("reload: %v", err)
	}
}

// A CA key whose certificate is stored but which has not arrived yet is
// waited for; a key that does not match its certificate is refused.
func TestStorageCAKeyOnItsWay(t *testing.T) {
	ctx := context.Background()
	n := openTestNode(t, "n", testSecret(t))
	key := testSecret(t)
	writer := newTestStorage(t, n, key)
	reader := newTestStorage(t, n, key)
	core, logs := observer.New(zap.InfoLevel)
	reader.logger = zap.New(core)
	reader.cas.pairWait = 500 * time.Millisecond
	gen := newCAPairs(t)

	// No certificate: a key reads as missing at once.
	start := time.Now()
	if _, err := reader.Load(ctx, caPath("local", "root.key")); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("key without certificate: %v", err)
	}
	if took := time.Since(start); took >= reader.cas.pairWait {
		t.Fatalf("key without certificate waited %v", took)
	}

	// Certificate stored, key on its way: the reader waits and gets it.
	if err := writer.Store(ctx, caPath("local", "root.crt"), gen.rootCrt); err != nil {
		t.Fatal(err)
	}
	reader.cas.pairWait = 10 * time.Second
	got := make(chan error, 1)
	var loaded []byte
	go func() {
		var err error
		loaded, err = reader.Load(ctx, caPath("local", "root.key"))
		got <- err
	}()
	waitUntil(t, 5*time.Second, "reader waiting", func() bool {
		return logs.FilterMessage("waiting for the CA key to arrive").Len() > 0
	})
	if err := writer.Store(ctx, caPath("local", "root.key"), gen.rootKey); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-got:
		if err != nil || !bytes.Equal(loaded, gen.rootKey) {
			t.Fatalf("waiting Load: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("waiting Load did not return after the key arrived")
	}

	// A key that never arrives: missing after the wait.
	reader.cas.pairWait = 300 * time.Millisecond
	if err := writer.Store(ctx, caPath("local", "intermediate.crt"), gen.interCrt); err != nil {
		t.Fatal(err)
	}
	if _, err := reader.Load(ctx, caPath("local", "intermediate.key")); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("key that never arrives: %v", err)
	}

	// A key of another pair: refused after the wait.
	other := newCAPairs(t)
	if err := writer.Store(ctx, caPath("local", "intermediate.key"), other.interKey); err != nil {
		t.Fatal(err)
	}
	_, err := reader.Load(ctx, caPath("local", "intermediate.key"))
	if err == nil || !strings.Contains(err.Error(), "do not match") {
		t.Fatalf("mismatched key: %v", err)
	}
}

// A node that took the creation lock and is cleaned up before it stored
// the CA (a failed provisioning) releases the lock at once.
func TestStorageCACreationReleasedOnCleanup(t *testing.T) {
	ctx := context.Background()
	nodes := openTestCluster(t, "d1", "d2")
	key := testSecret(t)
	a := newTestStorage(t, nodes[0], key)
	b := newTestStorage(t, nodes[1], key)
	if _, err := a.Load(ctx, caPath("local", "root.crt")); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("first Load: %v", err)
	}
	if !a.creating("local") {
		t.Fatal("a does not hold the creation")
	}
	a.Cleanup()
	gen := newCAPairs(t)
	root, _, err := caddyPKISequence(ctx, b, "local", gen)
	if err != nil || !bytes.Equal(root, gen.rootCrt) {
		t.Fatalf("b after a's cleanup: %v", err)
	}
}
