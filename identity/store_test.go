package identity

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
)

func TestMemStoreBasics(t *testing.T) {
	ctx := context.Background()
	m := NewMemStore()
	if _, err := m.Get("b", "k"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get absent: %v", err)
	}
	for _, k := range []string{"p2", "x", "p1", "p3"} {
		if err := m.Put(ctx, "b", k, []byte("v"+k)); err != nil {
			t.Fatal(err)
		}
	}
	list, err := m.List("b", "p")
	if err != nil || len(list) != 3 || list[0].Key != "p1" || list[1].Key != "p2" || list[2].Key != "p3" {
		t.Fatalf("List: %v %v", list, err)
	}
	v := []byte("abc")
	_ = m.Put(ctx, "b", "copy", v)
	v[0] = 'X'
	if got, _ := m.Get("b", "copy"); string(got) != "abc" {
		t.Fatalf("Put did not copy: %q", got)
	}
	if err := m.Delete(ctx, "b", "x"); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Get("b", "x"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get deleted: %v", err)
	}
	if err := m.Delete(ctx, "b", "never"); err != nil {
		t.Fatalf("Delete absent: %v", err)
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if err := m.Put(cctx, "b", "k", nil); !errors.Is(err, context.Canceled) {
		t.Fatalf("Put with cancelled ctx: %v", err)
	}
	if err := m.PutAsync("", "k", nil); !errors.Is(err, ErrInvalidInput) {
		t.Fatalf("empty bucket: %v", err)
	}
}

func TestMemStoreFirstWriterWins(t *testing.T) {
	ctx := context.Background()
	m := NewMemStore()
	_ = m.Put(ctx, bucketUsernames, "bob", []byte("A"))
	_ = m.Put(ctx, bucketUsernames, "bob", []byte("B"))
	if v, _ := m.Get(bucketUsernames, "bob"); string(v) != "A" {
		t.Fatalf("usernames should keep the first writer, got %q", v)
	}
	_ = m.Delete(ctx, bucketUsernames, "bob")
	_ = m.Put(ctx, bucketUsernames, "bob", []byte("B"))
	if v, _ := m.Get(bucketUsernames, "bob"); string(v) != "B" {
		t.Fatalf("after delete, got %q", v)
	}
	_ = m.Put(ctx, "other", "k", []byte("1"))
	_ = m.Put(ctx, "other", "k", []byte("2"))
	if v, _ := m.Get("other", "k"); string(v) != "2" {
		t.Fatalf("other buckets are last-writer-wins, got %q", v)
	}
}

func TestMemStoreWatch(t *testing.T) {
	ctx := context.Background()
	m := NewMemStore()
	var mu sync.Mutex
	var got []string
	cancel := m.Watch("b", func(key string, value []byte, deleted bool) {
		mu.Lock()
		got = append(got, fmt.Sprintf("%s=%s/%v", key, value, deleted))
		mu.Unlock()
		if key == "k1" && !deleted {
			// Re-entrant write from a callback: must not deadlock and
			// is delivered after this callback.
			_ = m.Put(ctx, "b", "k2", []byte("from-callback"))
		}
	})
	_ = m.Put(ctx, "b", "k1", []byte("v1"))
	_ = m.Put(ctx, "other", "k", []byte("v"))
	_ = m.Delete(ctx, "b", "k1")
	cancel()
	cancel() // idempotent
	_ = m.Put(ctx, "b", "k3", []byte("v3"))
	mu.Lock()
	defer mu.Unlock()
	want := []string{"k1=v1/false", "k2=from-callback/false", "k1=/true"}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("events %v, want %v", got, want)
	}
}

func TestMemStoreWatchOrderConcurrent(t *testing.T) {
	ctx := context.Background()
	m := NewMemStore()
	var mu sync.Mutex
	last := map[string]string{}
	m.Watch("b", func(key string, value []byte, deleted bool) {
		mu.Lock()
		last[key] = string(value)
		mu.Unlock()
	})
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 200 {
				_ = m.Put(ctx, "b", fmt.Sprintf("k%d", i%5), []byte(fmt.Sprintf("%d-%d", g, i)))
			}
		}()
	}
	wg.Wait()
	// Delivery is in write order, so the last event per key is the stored value.
	mu.Lock()
	defer mu.Unlock()
	for k, v := range last {
		stored, _ := m.Get("b", k)
		if string(stored) != v {
			t.Errorf("key %s: last event %q, stored %q", k, v, stored)
		}
	}
}

// faultStore wraps a Store and can fail or intercept operations.
type faultStore struct {
	Store
	mu      sync.Mutex // guards the following
	failPut map[string]error
	onPut   func(bucket, key string, value []byte)
	puts    []string
}

func newFaultStore() *faultStore {
	return &faultStore{Store: NewMemStore(), failPut: map[string]error{}}
}

func (f *faultStore) Put(ctx context.Context, bucket, key string, value []byte) error {
	f.mu.Lock()
	err := f.failPut[bucket]
	hook := f.onPut
	f.puts = append(f.puts, bucket)
	f.mu.Unlock()
	if hook != nil {
		hook(bucket, key, value)
	}
	if err != nil {
		return err
	}
	return f.Store.Put(ctx, bucket, key, value)
}

func (f *faultStore) setFail(bucket string, err error) {
	f.mu.Lock()
	f.failPut[bucket] = err
	f.mu.Unlock()
}

func (f *faultStore) putLog() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.puts...)
}
